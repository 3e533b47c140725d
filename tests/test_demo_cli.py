"""The demo's command line (tinygpt.demo.cli): its help, a missing model and a taken port are each one error line
and exit status 2, before any model is loaded."""

from __future__ import annotations

import socket

import pytest

from tinygpt.demo import cli


def test_cli_help_and_a_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--share" in capsys.readouterr().out
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"model:\n  backend: torch\n  path: {tmp_path / 'nothing'}\n")
    assert cli.main(["--cfg-path", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "python train.py" in err[0]
    assert cli.main(["--cfg-path", str(tmp_path / "none.yaml")]) == 2
    assert "launch config does not exist" in capsys.readouterr().err


def test_cli_a_taken_port_is_one_error_line_before_the_model_loads(monkeypatch, capsys):
    def never(cfg):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(cli, "load_launch_config", lambda path: object())
    monkeypatch.setattr(cli, "open_engine", never)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --host/--port: cannot listen on 127.0.0.1:{port} (Address already in use)"], err


def test_the_examples_writer_has_a_real_command_line(tmp_path, monkeypatch, capsys):
    from tinygpt.demo import examples

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        examples.main(["--help"])
    assert done.value.code == 0 and "folder to write into" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # --help wrote nothing (it used to make a folder named --help)
    assert examples.main([str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(examples.example_path(i).name for i in range(3))


def test_the_start_up_lines_name_our_share_flag_not_gradios_launch_argument(capfd):
    import gradio as gr

    from tinygpt.chat.launch import Limits
    from tinygpt.demo.app import launch, serving_lines

    cfg = type("Cfg", (), {"limits": Limits()})()
    with gr.Blocks() as demo:
        gr.Markdown("hello")
    launch(demo, cfg, port=None, prevent_thread_lock=True, share_hint="python demo.py --share")  # type: ignore
    try:
        out = capfd.readouterr().out
    finally:
        demo.close()
    assert "share=True" not in out and "launch()" not in out, out
    assert f"* Running on local URL:  {demo.local_url}" in out
    assert "* No public link; python demo.py --share makes one (*.gradio.live)" in out
    assert serving_lines("http://h:1/", "https://x.gradio.live", True)[1].endswith(": https://x.gradio.live")
    assert "could not make one" in serving_lines("http://h:1/", None, True)[1]
