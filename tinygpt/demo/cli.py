"""The demo command: ``python demo.py --cfg-path eval_configs/<name>.yaml`` (= ``tinygpt demo ...``).

Contract: reads the launch config (tinygpt.chat.launch; default ``eval_configs/tiny.yaml``, the model the quick
start's ``python train.py`` makes), opens its ChatEngine and serves the gradio demo on ``--host`` / ``--port``; a
public gradio link only with ``--share``. A missing model, a bad config, a ``--port`` already taken or a ``--host``
that is not this machine's (checked on a free port when ``--port`` is not given) is one ``error:`` line saying what
to do, exit status 2 (tinygpt.errors.report_errors), before the model is loaded; without ``--port``, gradio finding
no free port in its range (7860-7959) is one such line too, naming ``--port``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..chat.launch import eval_configs_dir, listen, load_launch_config, open_engine, sigterm_as_interrupt
from ..errors import UserError, report_errors


def _default_cfg() -> str:
    local = Path("eval_configs/tiny.yaml")
    return str(local if local.is_file() else eval_configs_dir() / "tiny.yaml")


def parse_args(argv: list[str] | None = None, prog: str = "demo.py") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="The gradio chat demo over a trained (PyTorch) or exported (GGUF) model.")
    parser.add_argument("--cfg-path", default=None,
                        help="launch config (default: eval_configs/tiny.yaml, the quick start's tiny model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true",
                        help="also make a public *.gradio.live link (off unless given)")
    args = parser.parse_args(argv)
    args.prog = prog
    return args


def main(argv: list[str] | None = None, prog: str = "demo.py") -> int:
    args = parse_args(argv, prog)
    return report_errors(lambda: sigterm_as_interrupt(lambda: _run(args)))  # SIGTERM stops it as Ctrl-C does


def _run(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise UserError(f"--port: expected 1-65535, got {args.port}")
    cfg = load_launch_config(args.cfg_path or _default_cfg())
    _check_address(args.host, args.port)  # before loading the model
    from .app import build_demo, launch  # gradio loads in seconds: after the config has been checked

    engine = open_engine(cfg)
    try:
        launch(build_demo(engine, cfg), cfg, host=args.host, port=args.port, share=args.share,
               share_hint=("python " if args.prog.endswith(".py") else "") + f"{args.prog} --share")
    except OSError as exc:  # the port was taken while the model loaded, or gradio found no free one
        if args.port is None:  # gradio's own advice names launch(), which the command's user cannot call
            reason = str(exc).split(". You can specify")[0]
            raise UserError(f"--port: gradio cannot listen on {args.host} ({reason}); give a free port with --port") \
                from None
        raise UserError(f"--host/--port: gradio cannot listen on {args.host}:{args.port} ({exc})") from None
    return 0


def _check_address(host: str, port: int | None) -> None:
    """A --port that is taken, or a --host that does not resolve or is not this machine's, is one UserError. Without
    --port the host is checked on a free port: gradio would otherwise try its 100 ports on it, one console error each,
    and then hang instead of exiting."""
    try:
        listen(host, 0 if port is None else port).close()
    except UserError as exc:
        if port is not None:
            raise
        raise UserError(str(exc).replace("--host/--port:", "--host:").replace(f" {host}:0 ", f" {host} ")) from None
