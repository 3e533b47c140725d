"""Serving an app from a background thread of this process (the tests and the benchmark use it).

    with BackgroundServer(app) as server:          # a free port on 127.0.0.1 unless told otherwise
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...

`listen(host, port)` (tinygpt.chat.launch, shared with the demo) makes the listening socket: `tinygpt serve` calls it
before loading the model, so a port already taken is one clear error at once. The server runs uvicorn on its own
event loop in a daemon thread; leaving the block asks it to stop and waits for it.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from ..chat.launch import listen


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = listen(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="tinygpt-serve-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
