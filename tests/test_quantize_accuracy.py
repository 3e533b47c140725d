"""Scoring used by `python -m quantize accuracy` (the same metrics as the PyTorch shapes evaluation)."""

import pytest

from tinygpt.tiny.gguf_accuracy import score


def test_vqa_and_grounding_scores_on_hand_made_answers():
    vqa = [{"answer": ["red"] * 10}, {"answer": ["2"] * 10}, {"answer": ["circle"] * 10}]
    assert score("vqa", ["Red.", "two", "square"], vqa) == 2 / 3
    refer = [{"bbox": [10, 10, 40, 40], "width": 100, "height": 100}] * 3
    answers = ["{<10><10><50><50>}", "{<60><60><90><90>}", "no box here"]
    assert score("refer", answers, refer) == 1 / 3


def test_answers_that_do_not_parse_are_counted():
    from tinygpt.tiny.gguf_accuracy import unparsed

    split = [{"answer": ["red"] * 10}, {"answer": ["2"] * 10}]
    assert unparsed("vqa", ["Red.", "two", "red red red red", "yes#####"], split) == 0.5  # garbage is not an answer
    assert unparsed("refer", ["{<10><10><50><50>}", "{<p>}", "no box"], []) == 2 / 3


@pytest.mark.slow
def test_accuracy_of_a_garbage_model_prints_its_table_then_refuses_it(base_model, tmp_path, capsys):
    """An untrained model answers noise on both sides: the table is printed, then one error line and exit 3."""
    from quantize.__main__ import main
    from quantize.export import export_model
    from tinygpt.tiny.synthetic import Scale, generate

    data = tmp_path / "data"
    generate(data, seed=1, scale=Scale(laion=4, cc_sbu=2, align=2, instruct_images=2, vqa_per_image=1, multi_image=2,
                                       unnatural=2, eval_images=3, eval_vqa_per_image=2, shard_size=20), progress=False)
    export_model(base_model, tmp_path / "gguf", qtype="q8_0", progress=False)
    code = main(["accuracy", "--model", str(base_model), "--gguf", str(tmp_path / "gguf"),
                 "--split", str(data / "eval"), "--limit", "3"])
    out, err = capsys.readouterr()
    assert code == 3
    assert out.splitlines()[0].split() == ["task", "pytorch", "gguf", "retained"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: accuracy of {tmp_path / 'gguf'}: the results are not "
                                                   "believable: ")
    assert "do not parse" in lines[0] and "python .ci/canary.py" in lines[0]
