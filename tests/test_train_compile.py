"""Compilation and fusion (run.compile, optim.fused), and the bench that measures every speed switch: the compiled
model computes what the eager one does; a packed, compiled, fused tiny stage trains and resumes bit-identically (as
the eager one does, tests/test_train.py); the bench's --compare table and the GPU script run on the tiny configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import test_train
from tinygpt.config import load_config
from tinygpt.errors import UserError
from tinygpt.model.packing import RowLayout
from tinygpt.train.speed import apply_compile, compile_layers, uncompile_layers

# test_train's fixtures (the accelerate state reset, the synthetic data) and its kill-after-checkpoint script
fresh_accelerate_state, synthetic, KILL_SCRIPT = test_train.fresh_accelerate_state, test_train.synthetic, \
    test_train.KILL_SCRIPT
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train_configs" / "tiny"
PYTHON = sys.executable
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["qkv", "dense"]}
TURNS = [[{"user": "<Img><ImageHere></Img> Describe this image.", "assistant": "a red circle and a blue square"}],
         [{"user": "<Img><ImageHere></Img> What is it?", "assistant": "four"}]]


def _loss_and_grads(model, layout):
    model.zero_grad(set_to_none=True)
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    loss = model(turns=TURNS, image_counts=[1, 1], pixel_values=pixels, max_txt_len=24, loss_only=True,
                 row_layout=layout).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_layers_compute_what_the_eager_ones_do(tiny_vlm):
    """Every Phi, ViT and Q-Former layer compiled (LLM gradient checkpointing on, a packed and bucketed batch): the
    same loss and gradients in training, the same logits in eval. Inductor fuses and reorders fp32 element-wise
    work, so results agree to float rounding (measured: gradients within 2.2e-6 of their largest entry), not bit for
    bit; 1e-5 of the largest entry leaves room and still sees any real difference (a dropped mask, a wrong
    position: percent)."""
    from tinygpt.model.trainable import apply_trainable_set

    model = tiny_vlm(lora=LORA, lora_b_std=0.02)  # a trained-like B: LoRA A's gradients are compared too
    apply_trainable_set(model, "lora")
    model.train()
    model.vision_model.eval()
    model.qformer.eval()
    model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layout = RowLayout(tokens_per_row=2048, pad_to_multiple=64)
    loss0, grads0 = _loss_and_grads(model, layout)
    assert compile_layers(model, llm=True, vision=True) == 4 + 4 + 2  # tiny: 4 Phi, 4 ViT, 2 Q-Former layers
    assert all(layer._compiled_call_impl is not None for layer in model.language_model.model.layers)
    loss, grads = _loss_and_grads(model, layout)
    assert grads.keys() == grads0.keys() and any(".lora_A." in n for n in grads)
    assert all(grads0[n].abs().max() > 0 for n in grads0 if ".lora_A." in n)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads0[name], rtol=0, atol=1e-5 * float(grads0[name].abs().max()), msg=name)
    model.eval()
    ids = torch.tensor([[50256, 464, 3290, 318, 257, 2266, 9197]])
    with torch.no_grad():
        compiled = model.language_model(input_ids=ids).logits
        uncompile_layers(model)
        assert all(layer._compiled_call_impl is None for layer in model.language_model.model.layers)
        eager = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 * float(eager.abs().max()))


def test_fused_adamw_makes_the_same_step():
    """torch's fused AdamW (here on the CPU) against the default for-each one: one step on the same gradients agrees
    to float rounding (the update is a few ulps of lr-sized numbers)."""
    from tinygpt.train.optim import build_optimizer

    cfg = load_config(TINY / "stage3.yaml", ["optim.fused=true"])
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        cfg.optim.fused = fused
        optimizer = build_optimizer(model, cfg.optim, lr=1e-2)
        assert bool(optimizer.defaults["fused"]) == fused
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


def test_compile_is_skipped_with_a_warning_under_fsdp_and_a_no_op_when_off(caplog):
    cfg = load_config(TINY / "stage3.yaml", ["run.compile.llm=true"])
    fsdp = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"))
    with caplog.at_level("WARNING", logger="tinygpt.train.speed"):
        assert apply_compile(cfg, fsdp, model=None) == 0  # model=None: nothing may be compiled
    assert "--options: run.compile: not applied under FSDP" in caplog.text
    assert apply_compile(load_config(TINY / "stage3.yaml"), fsdp, model=None) == 0


@pytest.mark.slow
def test_packed_compiled_fused_stage_resumes_bit_identically(synthetic, base_model, tmp_path):
    """Tiny stage 3 with every speed switch on (packing, bucketing, compiled LLM and vision layers, fused AdamW) and
    LoRA dropout 0.05 (compiled random numbers): 4 steps straight vs killed right after the checkpoint of step 2,
    then resumed. The compiled dropout draws its seeds from torch's generator, which the checkpoint restores."""
    from tinygpt.train.stage import run_stage

    def opts(out: Path) -> list[str]:
        return [f"vars.data_root={synthetic}", f"vars.output_root={out}", f"model.init_from={base_model}",
                "schedule.total_steps=4", "schedule.warmup_steps=1", "run.progress=false", "run.resume=false",
                "model.max_txt_len=24", "data.datasets.cc_sbu_align.batch_size=3", "run.save_every=2",
                "run.packing.enabled=true", "run.packing.tokens_per_row=128", "run.pad_to_multiple=64",
                "run.compile.llm=true", "run.compile.vision=true", "optim.fused=true"]

    from torch._dynamo.utils import counters

    config = TINY / "stage3.yaml"
    graphs = counters["stats"]["unique_graphs"]
    out_a = run_stage(load_config(config, opts(tmp_path / "a")))
    assert counters["stats"]["unique_graphs"] > graphs  # the layers did run compiled
    summary = json.loads((out_a / "train_summary.json").read_text())
    assert summary["config"]["run"]["packing"]["enabled"] and summary["config"]["run"]["compile"]["llm"]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = opts(tmp_path / "b")
    proc = subprocess.run([PYTHON, "-c", KILL_SCRIPT, json.dumps([str(config), killed, 2])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out_b = run_stage(load_config(config, killed + ["run.resume=auto"]))
    assert json.loads((out_b / "train_summary.json").read_text())["summary"]["start_step"] == 2
    a, b = load_file(str(out_a / "model.safetensors")), load_file(str(out_b / "model.safetensors"))
    start = load_file(str(base_model / "model.safetensors"))
    assert a.keys() == b.keys() and any(".lora_A." in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert max((a[n] - start[n]).abs().max().item() for n in a if n in start) > 1e-4  # it did train


STAGE3 = TINY / "stage3.yaml"
SMALL = ["data.datasets.cc_sbu_align.batch_size=3", "model.max_txt_len=24"]


def test_bench_compares_switches_side_by_side(capsys):
    from tinygpt.train.bench import main

    code = main(["--cfg-path", str(STAGE3), "--steps", "1", "--random-weights", "--json", "--lengths", "mixed",
                 "--compare", "packing,bucketing", "--options", *SMALL])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["baseline", "all", "packing", "bucketing"]
    assert len({r["real_tokens"] for r in rows.values()}) == 1  # every layout holds the same tokens
    base = rows["baseline"]
    assert base["padding_tokens"] > 0 and base["rows"] == 3  # mixed answer lengths leave padding
    assert rows["packing"]["padding_tokens"] == 0 and rows["packing"]["rows"] == 1
    width = (base["real_tokens"] + base["padding_tokens"]) // 3
    assert rows["bucketing"]["padding_tokens"] == 3 * (-(-width // 64) * 64) - base["real_tokens"]
    assert rows["all"]["padding_tokens"] == -(-base["real_tokens"] // 64) * 64 - base["real_tokens"]
    for row in rows.values():
        assert row["seconds_per_step"] > 0 and row["tokens_per_s"] == pytest.approx(
            row["real_tokens"] / row["seconds_per_step"])


def test_bench_lists_variants_past_the_deadline_as_skipped():
    from tinygpt.train.bench_switches import compare, markdown_table

    rows = compare(None, None, None, {}, ["packing", "compile_llm"], 1, 1, None, deadline=0.0)
    assert [r["variant"] for r in rows] == ["baseline", "all", "packing", "compile_llm"]
    assert all(r["skipped"] == "not run: past the deadline" for r in rows)
    assert "| packing | not run: past the deadline |" in markdown_table(rows, "t")


def test_bench_keeps_the_other_variants_when_one_fails(monkeypatch, capsys):
    """A compiler error in one variant (as torch 2.11's Dynamo raised on an H200 under LLM checkpointing) is listed
    with its exception; the other variants still run, and ``all`` is retried without the failing switch."""
    from tinygpt.train import bench_switches

    def fake_run(cfg, accelerator, model, batch, variant, steps, warmup, peak):
        if "compile_llm" in variant.on:
            raise RuntimeError("Dynamo failed to run FX node\nmore detail")
        return {"variant": variant.name, "samples_per_s": 1.0 + len(variant.on)}

    monkeypatch.setattr(bench_switches, "run_variant", fake_run)
    model = torch.nn.Linear(2, 2)
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, device=torch.device("cpu"))
    monkeypatch.setattr(bench_switches, "uncompile_layers", lambda m: None)
    rows = bench_switches.compare(None, accelerator, model, {}, ["packing", "fused_adamw", "compile_llm"], 1, 1, None)
    assert [r["variant"] for r in rows] == ["baseline", "all", "packing", "fused_adamw", "compile_llm",
                                            "all but compile_llm"]
    assert rows[1]["skipped"] == rows[4]["skipped"] == "failed: RuntimeError: Dynamo failed to run FX node more detail"
    assert rows[5]["samples_per_s"] == 3.0  # packing and fused AdamW
    assert "Traceback" in capsys.readouterr().err


def test_gpu_script_names_the_exception_not_the_compilers_hint(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    from train_speed_gpu import exception_line

    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
              "torch._dynamo.exc.Unsupported: checkpoint with reentrant\n\n"
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n")
    assert exception_line(stderr) == "torch._dynamo.exc.Unsupported: checkpoint with reentrant"
    assert exception_line("killed\n") == "killed"


def test_bench_refuses_an_unknown_switch(capsys):
    from tinygpt.train.bench import main

    assert main(["--cfg-path", str(STAGE3), "--random-weights", "--compare", "packing,turbo"]) == 2
    assert "--compare: unknown switch turbo; choose from all, packing, bucketing" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_script_writes_the_table_on_the_tiny_configs(tmp_path, monkeypatch, capsys):
    """The prepared GPU run (experiments/train_speed_gpu.py), on the CPU with a tiny stage and one step. Its main runs
    here (importing the script costs what this process has imported already); each stage's bench is its own
    process, as on the GPU machine."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from train_speed_gpu import main

    out = tmp_path / "speed.md"
    code = main(["--tiny", "--stages", "3", "--steps", "1", "--warmup", "1", "--switches", "packing,fused_adamw",
                 "--out", str(out), "--options", *SMALL])
    assert code == 0, capsys.readouterr().err[-3000:]
    text = out.read_text()
    assert "| stage | samples/s before | samples/s after (all) |" in text
    assert "| stage3 | " in text and "| yes |" in text  # the tiny model fits 24 GB
    assert "| all | " in text and "| packing | " in text and "| fused_adamw | " in text
    results = json.loads(out.with_suffix(".json").read_text())
    assert [r["variant"] for r in results[0]["variants"]] == ["baseline", "all", "packing", "fused_adamw"]


def test_a_compiler_failure_in_training_is_one_line_naming_run_compile():
    """torch 2.11's inductor failed on the Phi layers on an H200 (checkpointed, padded rows): the loop turns that
    into one error naming the config key and the way out, not a 60-line compiler traceback."""
    import torch._dynamo.exc

    from tinygpt.train.speed import compile_failed

    def inductor():
        pass

    exc = torch._dynamo.exc.BackendCompilerFailed(inductor, AssertionError("Node add_409 was invalid, but is output"),
                                                    None)
    cfg = load_config(STAGE3)
    err = compile_failed(cfg, exc)
    assert isinstance(err, UserError)
    text = str(err)
    assert text.startswith(f"{TINY / 'base.yaml'}: run.compile: torch {torch.__version__} could not compile the model")
    assert "AssertionError: Node add_409 was invalid, but is output" in text
    assert "set run.compile.llm=false and run.compile.vision=false" in text and "\n" not in text
