"""Running the app under uvicorn: `AppServer` (the serve command's and the tests'), and `BackgroundServer`, which
serves an app from a background thread of this process (the tests and the benchmark use it).

    with BackgroundServer(app) as server:          # a free port on 127.0.0.1 unless told otherwise
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...

`AppServer` is uvicorn's server that, the moment it begins to stop (a signal, or `should_exit`), ends every request
the app has admitted (tinygpt.serve.runner.Runner.shutdown: a 503, a stream's error event, the generation cancelled at
its next token) before it waits, at most ``timeout_graceful_shutdown`` seconds, for the connections to close; without
that, uvicorn would wait for every queued generation to run to its end.

`listen(host, port)` (tinygpt.chat.launch, shared with the demo) makes the listening socket: `tinygpt serve` calls it
before loading the model, so a port already taken is one clear error at once. The background server runs uvicorn on
its own event loop in a daemon thread; leaving the block asks it to stop and waits for it.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from ..chat.launch import listen

GRACE_S = 5  # seconds the connections get to close once the server stops (the requests have been ended by then)


class AppServer(uvicorn.Server):
    async def shutdown(self, sockets=None) -> None:
        runner = getattr(getattr(self.config.app, "state", None), "runner", None)
        if runner is not None:
            runner.shutdown()
        await super().shutdown(sockets=sockets)


def app_server(app, log_level: str = "info") -> AppServer:
    return AppServer(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACE_S))


class BackgroundServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = listen(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = app_server(app, log_level)
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
