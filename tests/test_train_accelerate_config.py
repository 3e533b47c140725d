"""accelerate's own launch settings against ours (tinygpt/train/accelerate_config.py):
ACCELERATE_GRADIENT_ACCUMULATION_STEPS no longer divides the loss a second time, and under DeepSpeed the engine
clips with optim.max_grad_norm.

DeepSpeed is not installed here: the DeepSpeed tests use accelerate's real DeepSpeedPlugin (it needs no DeepSpeed) and
replay the "auto" filling accelerate's prepare does before it builds the engine; nothing runs under DeepSpeed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.config import load_config
from tinygpt.errors import UserError

from test_train import TINY, SteppingInBackward, fresh_accelerate_state, options, run  # noqa: F401 (fixture)

ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"


@pytest.fixture(scope="module")
def synthetic(tiny_synthetic_data):
    return tiny_synthetic_data


@pytest.fixture(autouse=True)
def no_accelerate_launch_env(monkeypatch):
    for name in (ENV, "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)


def run_recording_gradients(synthetic, base_model, out, monkeypatch, **extra) -> tuple[list[float], dict]:
    """A tiny stage 1 (2 steps); the global gradient norm at each optimizer step, and the output weights."""
    from tinygpt.train import loop

    norms, real = [], loop.build_optimizer

    def build(model, optim, lr):
        optimizer = real(model, optim, lr)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return step(*args, **kwargs)

        optimizer.step = recording_step
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", build)
    try:
        output = run(1, options(1, synthetic, out, steps=2, model__init_from=base_model, **extra))
    finally:
        monkeypatch.setattr(loop, "build_optimizer", real)
    return norms, load_file(str(output / "model.safetensors"))


def test_accumulation_env_var_equal_to_ours_does_not_divide_the_loss_again(synthetic, base_model, tmp_path,
                                                                            monkeypatch):
    """accelerate launch --gradient_accumulation_steps 2 (or an accelerate config file) sets the variable; the
    Accelerator divided the loop's loss / 2 by 2 again: the gradient norms halved (3.78 -> 1.89 at step 1, 2 micro-
    batches, no clipping), and with clipping on, the clip then acted on quarter-size gradients."""
    from accelerate.state import AcceleratorState

    extra = {"run__grad_accum_steps": 2, "optim__max_grad_norm": "null"}
    plain_norms, plain = run_recording_gradients(synthetic, base_model, tmp_path / "plain", monkeypatch, **extra)
    AcceleratorState._reset_state(True)
    monkeypatch.setenv(ENV, "2")
    env_norms, with_env = run_recording_gradients(synthetic, base_model, tmp_path / "env", monkeypatch, **extra)
    assert len(plain_norms) == len(env_norms) == 2  # one optimizer step per 2 micro-batches in both
    assert env_norms == pytest.approx(plain_norms, rel=1e-6)  # was half of it
    assert plain.keys() == with_env.keys()
    for name in plain:
        assert torch.equal(plain[name], with_env[name]), name


def test_accelerator_divides_each_micro_batch_by_grad_accum_steps_once(monkeypatch):
    """The loop hands each micro-batch's loss to accelerator.backward undivided: the accelerator, built with
    run.grad_accum_steps, divides it, so two micro-batches give the mean of their gradients."""
    from tinygpt.config.schema import RunSection
    from tinygpt.train.loop import make_accelerator

    for env in (None, "2"):
        if env is not None:
            monkeypatch.setenv(ENV, env)
        accelerator = make_accelerator(RunSection(output_dir="unused", precision="fp32", cpu=True, grad_accum_steps=2))
        assert accelerator.gradient_accumulation_steps == 2
        weight = torch.nn.Parameter(torch.zeros(3))
        for x in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])):
            accelerator.backward((weight * x).sum())
        torch.testing.assert_close(weight.grad, torch.tensor([2.0, 2.0, 2.0]))


def test_accumulation_env_var_other_than_ours_is_refused(synthetic, base_model, tmp_path, monkeypatch):
    """A launch asking for 4 while the config says 2 stops before the model loads, naming both."""
    monkeypatch.setenv(ENV, "4")
    with pytest.raises(UserError) as info:
        run(1, options(1, synthetic, tmp_path, model__init_from=base_model, run__grad_accum_steps=2))
    message = str(info.value)
    where, _, rest = message.partition(": ")  # first the file or --options that set it
    assert where == "--options"
    assert rest.startswith("run.grad_accum_steps: 2 disagrees with ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4")
    assert "set run.grad_accum_steps: 4 or unset ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in message
    assert not (tmp_path / "stage1").exists()


# --- DeepSpeed gradient clipping (accelerate's real DeepSpeedPlugin, no DeepSpeed) ---

def deepspeed_plugin(ds_config: dict | None = None):
    """accelerate's DeepSpeedPlugin as accelerate launch builds it: from the launch's variables (no config file:
    gradient_clipping "auto" unless ACCELERATE_GRADIENT_CLIPPING), or from a DeepSpeed config file's dict."""
    from accelerate.utils import DeepSpeedPlugin

    if ds_config is None:
        return DeepSpeedPlugin()
    return DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, **ds_config})


def on_deepspeed(plugin):
    return SimpleNamespace(distributed_type=SimpleNamespace(name="DEEPSPEED"),
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def engine_config(plugin, micro_batch: int = 2) -> dict:
    """The config accelerate's _prepare_deepspeed hands to deepspeed.initialize (accelerate 1.16): "auto"
    gradient_accumulation_steps from the accelerator, then "auto" values filled, gradient_clipping with 1.0."""
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=1)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch  # as train() sets it
    plugin.deepspeed_config_process(must_match=False, gradient_clipping=1.0, train_micro_batch_size_per_gpu=micro_batch,
                                    train_batch_size=micro_batch, **{
                                        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False})
    return plugin.deepspeed_config


def stage3(*opts: str):
    return load_config(TINY / "stage3.yaml", list(opts))


@pytest.mark.parametrize("norm, expected", [("0.5", 0.5), ("null", 0.0)])
def test_deepspeed_auto_clipping_becomes_max_grad_norm(norm, expected):
    """Without a value of its own accelerate filled "auto" with 1.0: DeepSpeed clipped at 1.0 for
    optim.max_grad_norm 0.5, and clipped at all for null (0.0 is DeepSpeed's "no clipping")."""
    from tinygpt.train.loop import check_deepspeed

    plugin = deepspeed_plugin()
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"
    check_deepspeed(stage3(f"optim.max_grad_norm={norm}"), on_deepspeed(plugin))
    assert engine_config(plugin)["gradient_clipping"] == expected  # was 1.0


def test_deepspeed_config_without_clipping_clips_with_max_grad_norm():
    """A DeepSpeed config file without gradient_clipping: DeepSpeed's default 0.0 did not clip at all."""
    from tinygpt.train.loop import check_deepspeed

    plugin = deepspeed_plugin({"train_micro_batch_size_per_gpu": "auto"})
    assert "gradient_clipping" not in plugin.deepspeed_config
    check_deepspeed(stage3("optim.max_grad_norm=0.5"), on_deepspeed(plugin))
    assert engine_config(plugin)["gradient_clipping"] == 0.5


def test_deepspeed_explicit_clipping_must_equal_max_grad_norm(monkeypatch):
    from tinygpt.train.loop import check_deepspeed

    check_deepspeed(stage3("optim.max_grad_norm=1.0"), on_deepspeed(deepspeed_plugin({"gradient_clipping": 1.0})))
    check_deepspeed(stage3("optim.max_grad_norm=null"), on_deepspeed(deepspeed_plugin({"gradient_clipping": 0.0})))
    with pytest.raises(UserError) as info:
        check_deepspeed(stage3("optim.max_grad_norm=0.5"), on_deepspeed(deepspeed_plugin({"gradient_clipping": 1.0})))
    assert str(info.value).startswith("--options: optim.max_grad_norm: 0.5 disagrees with the DeepSpeed config's "
                                      "gradient_clipping: 1.0")
    assert "or set optim.max_grad_norm: 1" in str(info.value)
    with pytest.raises(UserError, match=r"optim.max_grad_norm: None disagrees .* gradient_clipping: 1.0.*"
                                        r"set optim.max_grad_norm: 1$"):
        check_deepspeed(stage3("optim.max_grad_norm=null"), on_deepspeed(deepspeed_plugin({"gradient_clipping": 1.0})))
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "2.0")  # accelerate launch --gradient_clipping 2.0
    with pytest.raises(UserError, match=r"optim.max_grad_norm: 1.0 disagrees .* gradient_clipping: 2.0 .*"
                                        r"ACCELERATE_GRADIENT_CLIPPING"):
        check_deepspeed(stage3("optim.max_grad_norm=1.0"), on_deepspeed(deepspeed_plugin()))


def test_deepspeed_explicit_accumulation_must_equal_grad_accum_steps():
    """A DeepSpeed config with gradient_accumulation_steps 4 made accelerate use 4 (with a warning) while the loop
    steps every micro-batch."""
    from tinygpt.train.loop import check_deepspeed

    with pytest.raises(UserError, match=r"run.grad_accum_steps: 1 disagrees with the DeepSpeed config's "
                                        r"gradient_accumulation_steps: 4"):
        check_deepspeed(stage3(), on_deepspeed(deepspeed_plugin({"gradient_accumulation_steps": 4})))


class DeepSpeedLike(SteppingInBackward):
    """SteppingInBackward with accelerate's DeepSpeedPlugin in its state; ``prepare`` keeps a copy of the config the
    engine would be built from."""

    def __init__(self, real, plugin):
        super().__init__(real)
        self.state, self.seen = SimpleNamespace(deepspeed_plugin=plugin), None

    def prepare(self, model, optimizer):
        self.seen = engine_config(self.state.deepspeed_plugin, micro_batch=2)
        return super().prepare(model, optimizer)


def test_a_deepspeed_stage_hands_max_grad_norm_to_the_engine(synthetic, base_model, tmp_path, monkeypatch):
    """Through run_stage and train(): the config accelerate's prepare would give DeepSpeed clips at 0.3."""
    from tinygpt.train import stage

    made, real = [], stage.make_accelerator

    def make(run_section, where=""):
        made.append(DeepSpeedLike(real(run_section, where), deepspeed_plugin()))
        return made[-1]

    monkeypatch.setattr(stage, "make_accelerator", make)
    run(1, options(1, synthetic, tmp_path, steps=1, model__init_from=base_model, optim__max_grad_norm=0.3))
    assert made[0].seen["gradient_clipping"] == 0.3  # was 1.0
    assert made[0].seen["gradient_accumulation_steps"] == 1
