"""The serve command (``tinygpt serve`` / ``python -m tinygpt.serve``): the OpenAI-compatible server over the model a
launch config names.

    tinygpt serve --cfg-path eval_configs/tiny.yaml [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                  [--allow-local-images] [--model-name NAME] [--allowed-origins ORIGIN[,ORIGIN...]]

Binds 127.0.0.1 unless --host says otherwise. The API key comes from --api-key, else $TINYGPT_API_KEY; without
one, no key is asked. The port is taken before the model loads, so a busy port, an unknown host or a bad config is
one ``error:`` line and exit status 2 at once (tinygpt.errors), and so is a --port outside 0-65535 or an
--allowed-origins entry that is not an origin; the server then runs until interrupted. Ctrl+C (SIGINT) and SIGTERM
(what ``kill``, systemd and docker stop send) are the same: every admitted request ends at once with a 503 (a
generation stops at its next token; tinygpt.serve.background.AppServer), the connections get a few seconds to close,
and the process exits with status 0. Either signal while the model loads is an interrupt (exit 130).
"""

from __future__ import annotations

import argparse
import logging
import os
from urllib.parse import urlparse

from ..chat.launch import sigterm_as_interrupt
from ..errors import UserError, report_errors

API_KEY_ENV = "TINYGPT_API_KEY"
MAX_PORT = 65535


def parse_args(argv: list[str] | None = None, prog: str = "python -m tinygpt.serve") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="An OpenAI-compatible chat server (/v1/chat/completions, /v1/completions, /v1/models, "
                               "/health) over the model a launch config names (docs/serving.md).")
    parser.add_argument("--cfg-path", required=True, help="launch config, e.g. eval_configs/tiny.yaml")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else no key)")
    parser.add_argument("--allow-local-images", action="store_true",
                        help="accept image URLs that are paths or file:// URLs on this machine (default: data: URIs "
                             "only)")
    parser.add_argument("--model-name", default=None,
                        help="the model name clients send and /v1/models lists (default: the config's file name, "
                             "e.g. tiny)")
    parser.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGINS",
                        help="let web pages from these origins call the API (CORS): comma-separated and/or repeated, "
                             "e.g. http://localhost:3000; '*' for any (default: none)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m tinygpt.serve") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return report_errors(lambda: sigterm_as_interrupt(lambda: _run(args)))


def allowed_origins(values: list[str]) -> list[str]:
    """The --allowed-origins values, split at commas; each must be ``*`` or scheme://host[:port] (a UserError)."""
    origins = [o.strip() for value in values for o in value.split(",") if o.strip()]
    for origin in origins:
        parts = urlparse(origin)
        if origin != "*" and not (parts.scheme in ("http", "https") and parts.netloc and parts.path in ("", "/")
                                  and not parts.query):
            raise UserError(f"--allowed-origins: {origin!r} is not an origin (expected e.g. http://localhost:3000 "
                            "or https://example.com, or * for any)")
    return [o.rstrip("/") for o in origins]


def _run(args: argparse.Namespace) -> int:
    from ..chat.launch import load_launch_config, open_engine
    from .app import create_app
    from .background import app_server, listen

    if not 0 <= args.port <= MAX_PORT:
        raise UserError(f"--port: expected 1-{MAX_PORT} (or 0: any free port), got {args.port}")
    origins = allowed_origins(args.allowed_origins)
    cfg = load_launch_config(args.cfg_path)
    sock = listen(args.host, args.port)
    engine = open_engine(cfg)
    name = args.model_name or cfg.name
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    app = create_app(engine, name, cfg.limits, api_key=api_key or None, allow_local_images=args.allow_local_images,
                     allowed_origins=origins)
    host, port = sock.getsockname()[:2]
    logging.getLogger("tinygpt.serve").info(
        "serving %r (%s) on http://%s:%d/v1%s", name, engine.name, host, port, " (API key required)" if api_key else "")
    try:
        app_server(app, args.log_level).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl+C / SIGTERM, then raises the signal again
        pass
    return 0
