"""`bench`, `profile` and `accuracy` report user mistakes as one `error: <message>` line and exit 2, also when the
mistake surfaces in a child process (a crash or a signal in a child stays exit 1: tests/test_bench_child.py); --threads
and --ctx are checked up front; the bench header says which bandwidth its roofline uses; `accuracy` checks the GGUF
side, the model's identity and the split's records before the PyTorch evaluation."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("gguf")

from quantize import bench, bench_child  # noqa: E402
from quantize.__main__ import main  # noqa: E402
from tinygpt.errors import UserError  # noqa: E402
from tinygpt.tiny import gguf_accuracy  # noqa: E402


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error")]


def test_child_failures_a_user_error_is_exit_2_anything_else_exit_1(capsys):
    user = bench_child.failure(UserError("x.gguf: damaged"))
    crash = bench_child.failure(RuntimeError("boom"))
    assert user == {"error": "x.gguf: damaged", "user_error": True} and crash == {"error": "RuntimeError: boom"}
    assert bench_child.report_failures([]) == 0
    assert bench_child.report_failures([user, dict(user)]) == 2
    assert bench_child.report_failures([user, crash]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: x.gguf: damaged", "error: x.gguf: damaged",
                                                    "error: RuntimeError: boom"]


@pytest.mark.timeout(300)
def test_bench_with_a_file_that_is_not_an_image_exits_2_without_a_class_name(random_gguf_pairs, capsys):
    code = main(["bench", "--gguf", str(random_gguf_pairs / "modified"), "--image", __file__, "--bandwidth-gb", "0",
                 "--prefill-tokens", "4", "--decode-tokens", "2", "--child-timeout", "240"])
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and errors == [f"error: {__file__}: not a readable image (UnidentifiedImageError)"]


@pytest.mark.timeout(300)
def test_profile_of_a_truncated_file_exits_2_without_a_class_name(random_gguf_pairs, tmp_path, capsys):
    data = (random_gguf_pairs / "modified" / "llm-q8_0.gguf").read_bytes()
    (tmp_path / "llm-q8_0.gguf").write_bytes(data[: len(data) // 2])
    code = main(["profile", "--gguf", str(tmp_path), "--bandwidth-gb", "0", "--positions", "4", "--repeats", "1",
                 "--child-timeout", "240"])
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: {tmp_path / 'llm-q8_0.gguf'}: damaged or truncated GGUF file")


@pytest.mark.parametrize("extra, message", [(["--threads", "0"], "--threads must be >= 1, got 0"),
                                            (["--threads", "-3"], "--threads must be >= 1, got -3"),
                                            (["--ctx", "0"], "--ctx must be >= 1, got 0"),
                                            (["--ctx", "5000"], "--ctx 5000 is larger than the model's context")])
def test_bench_checks_threads_and_ctx_up_front(random_gguf_pairs, capsys, extra, message):
    assert main(["bench", "--gguf", str(random_gguf_pairs / "modified"), *extra]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and message in errors[0]


def test_bench_header_says_the_roofline_uses_the_bandwidth_beside_each_decode():
    bandwidth = {"bandwidth_gb_s": 40.0, "bandwidth_median_gb_s": 38.0, "bandwidth_bytes": 1.6e9,
                 "bandwidth_4k_gb_s": 40.0}
    line = bench._header(argparse.Namespace(threads=2), False, bandwidth)[-1]
    assert "roofline = weights read per token / the read bandwidth measured beside each engine's decode" in line


# accuracy
def _split(root, refer_records: int = 1):
    root.mkdir()
    record = {"image": "a.png", "question": "q", "answer": ["a"], "sents": "s", "bbox": [0, 0, 1, 1], "width": 2,
              "height": 2}
    (root / "vqa.json").write_text(json.dumps([record]))
    (root / "refer.json").write_text(json.dumps([record] * refer_records))
    return root


@pytest.fixture
def no_evaluation(monkeypatch):
    """The PyTorch evaluation fails the test if it starts: every check must come before it."""
    def evaluate(*args, **kwargs):
        raise AssertionError("the PyTorch evaluation ran before the checks")

    monkeypatch.setattr(gguf_accuracy, "evaluate_loaded", evaluate)


def test_accuracy_checks_the_gguf_side_before_the_evaluation(base_model, tmp_path, capsys, no_evaluation):
    code = main(["accuracy", "--model", str(base_model), "--gguf", str(tmp_path / "none"),
                 "--split", str(_split(tmp_path / "split"))])
    assert code == 2 and "--gguf directory not found" in _error_lines(capsys.readouterr().err)[0]


def test_accuracy_refuses_a_model_the_gguf_was_not_exported_from(base_model, random_gguf_pairs, tmp_path, capsys,
                                                                  no_evaluation):
    gguf = random_gguf_pairs / "modified"
    code = main(["accuracy", "--model", str(base_model), "--gguf", str(gguf), "--split", str(_split(tmp_path / "s"))])
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1
    assert f"--model {base_model} is not the model --gguf {gguf / 'llm-q8_0.gguf'} was exported from" in errors[0]


def test_accuracy_accepts_the_model_its_gguf_was_exported_from(base_model, tmp_path):
    from quantize import gguf_names as names
    from quantize.export import export_model
    from quantize.gguf_file import open_gguf

    export_model(base_model, tmp_path / "gguf", qtype="q8_0", progress=False)
    llm = open_gguf(tmp_path / "gguf" / "llm-q8_0.gguf", names.ARCH_LLM)
    gguf_accuracy.check_exported_from(base_model, llm)  # no error


def test_accuracy_with_an_empty_task_file_names_it(base_model, tmp_path, capsys, no_evaluation):
    split = _split(tmp_path / "split", refer_records=0)
    code = main(["accuracy", "--model", str(base_model), "--gguf", str(tmp_path / "none"), "--split", str(split)])
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and errors == [f"error: {split / 'refer.json'}: has no records (expected a non-empty JSON list "
                                    "of refer records)"]
