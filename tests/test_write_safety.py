"""Nothing lost, nothing mixed (issue 21): every writer checks where it writes before any work, every write failure is
one ``error:`` line that names the path and leaves what was there before intact, resume validates every checkpoint
file, and a GGUF pair is one export (a shared content ``model_id``, written as one transaction).

Full disks are a file-size limit (``RLIMIT_FSIZE`` with SIGXFSZ ignored, so writes fail with EFBIG), set in this
process around one CLI call; permissions run the CLIs as ``nobody`` with ``setpriv`` (the tests run as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tiny_stage1 import STAGE1, stage_options, train_main  # noqa: F401  (also imported from here by the resume tests)
from tinygpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A "full disk" for this process: writes past ``nbytes`` fail with EFBIG."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file and directory under root (hidden ones too), with file contents; a run lock only by its name (each
    run writes its pid and output directory into it)."""
    return {str(p.relative_to(root)): (b"<lock>" if p.name == "run.lock" else p.read_bytes() if p.is_file() else
                                       b"<dir>") for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def synthetic(tiny_synthetic_data) -> Path:
    return tiny_synthetic_data  # conftest: generated once for the session


@pytest.fixture(scope="module")
def trained(tiny_stage1_run) -> Path:
    """A finished 3-step tiny stage 1 (conftest.tiny_stage1_run: trained once for the session; copy it to change it).
    (Every run here uses the same single-process CPU accelerator, so its shared state needs no reset.)"""
    return tiny_stage1_run


def copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest, symlinks=True)
    return dest


# ------------------------------------------------------------------------ 1, 2: GGUF pairs
def check_dir_pair(d: Path) -> None:
    from quantize import gguf_names as names
    from quantize.gguf_file import check_pair, find_llm_file, find_vision_file, llm_hyperparams, open_gguf, \
        vision_values

    llm = open_gguf(find_llm_file(d), names.ARCH_LLM)
    vision = open_gguf(find_vision_file(d), names.ARCH_VISION)
    check_pair(llm, llm_hyperparams(llm), vision, vision_values(vision))


@pytest.fixture(scope="module")
def seed_pairs(tmp_path_factory) -> Path:
    """Tiny random exports (same shapes, different weights) of seeds 0 and 1 under ``seed0/`` and ``seed1/``."""
    from quantize.random_model import write_random_model

    root = tmp_path_factory.mktemp("pairs")
    for seed in (0, 1):
        write_random_model(root / f"seed{seed}", "tiny", "q8_0", seed=seed, progress=False)
    return root


def test_vision_file_of_another_model_is_refused(seed_pairs, tmp_path, capsys):
    """Class 1: two random exports of the same shapes differ only in content; the pairing check sees it."""
    import quantize.__main__ as cli

    shutil.copytree(seed_pairs / "seed0", tmp_path / "a")
    check_dir_pair(tmp_path / "a")  # each export's own pair belongs together
    check_dir_pair(seed_pairs / "seed1")
    shutil.copy(seed_pairs / "seed1" / "vision.gguf", tmp_path / "a" / "vision.gguf")
    capsys.readouterr()
    assert cli.main(["chat", "--gguf", str(tmp_path / "a"), "--prompt", "What is this?"]) == 2
    out, err = capsys.readouterr()
    line = one_error(err)
    assert str(tmp_path / "a" / "vision.gguf") in line and "model_id" in line and "different" in line
    assert out == ""  # no answer


def test_full_disk_during_reexport_keeps_the_previous_pair(seed_pairs, tmp_path, capsys):
    """Class 2: the re-export fails in the LLM file, after its vision file was complete; the old pair is kept."""
    import quantize.__main__ as cli

    out = tmp_path / "gguf"
    shutil.copytree(seed_pairs / "seed0", out)
    before = snapshot(out)
    assert len((out / "vision.gguf").read_bytes()) < 4 << 20 < len((out / "llm-q8_0.gguf").read_bytes())
    capsys.readouterr()
    with file_size_limit(4 << 20):
        rc = cli.main(["random", "--out", str(out), "--size", "tiny", "--seed", "1", "--qtype", "q8_0", "--quiet"])
    assert rc == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {out}: could not write the GGUF export") and "file size limit" in line
    assert snapshot(out) == before  # same files, same bytes, no temporary file
    check_dir_pair(out)


# ------------------------------------------------------------- 3, 5: where the stage writes
@pytest.mark.parametrize("case", ["under_a_file", "is_a_file", "foreign_dir", "checkpoints_inside_output"])
def test_stage_output_location_is_checked_before_any_work(case, synthetic, base_model, tmp_path, capsys,
                                                          monkeypatch):
    """Classes 3 and 5: a bad run.output_dir is one error before the data or the model is touched."""
    import tinygpt.train.stage as stage

    def no_work(*args, **kwargs):
        raise AssertionError("the run started working before its output location was checked")

    monkeypatch.setattr(stage, "build_datasets", no_work)
    user = tmp_path / "user"
    user.mkdir()
    (user / "afile").write_text("the user's file\n")
    (user / "notes").mkdir()
    (user / "notes" / "todo.txt").write_text("keep me\n")
    target, key = {"under_a_file": (user / "afile" / "out", "run.output_dir"),
                   "is_a_file": (user / "afile", "run.output_dir"),
                   "foreign_dir": (user / "notes", "run.output_dir"),
                   "checkpoints_inside_output": (user / "model" / "ckpt", "run.checkpoint_dir")}[case]
    before = snapshot(user)
    extra = {"run__output_dir": target}
    if case == "checkpoints_inside_output":
        extra = {"run__output_dir": user / "model", "run__checkpoint_dir": target}
    capsys.readouterr()
    assert train_main(stage_options(synthetic, tmp_path, base_model, 2, **extra)) == 2
    line = one_error(capsys.readouterr().err)
    assert key in line and str(target) in line
    assert snapshot(user) == before  # nothing replaced, nothing hidden away as .NAME.old-<pid>


@pytest.mark.parametrize("target_kind", ["a_file", "under_a_file", "foreign_dir"])
@pytest.mark.parametrize("writer", ["export", "random", "synthetic", "weights_build", "features"])
def test_other_writers_check_their_out_before_any_work(writer, target_kind, trained, tmp_path, capsys):
    """The same rules for every other CLI that writes a directory: a file is never replaced by one, nothing is
    written under a file, and a directory of the user's is not replaced whole."""
    import quantize.__main__ as q
    import tinygpt.tiny.synthetic.__main__ as synth
    import tinygpt.train.features as features
    import tinygpt.weights.build as weights

    user = tmp_path / "user"
    user.mkdir()
    (user / "afile").write_text("the user's file\n")
    (user / "notes").mkdir()
    (user / "notes" / "todo.txt").write_text("keep me\n")
    out = {"a_file": user / "afile", "under_a_file": user / "afile" / "out", "foreign_dir": user / "notes"}[target_kind]
    if writer in ("export", "random") and target_kind == "foreign_dir":
        pytest.skip("an export adds its files to a directory and replaces only its own three")
    before = snapshot(user)
    call = {
        "export": lambda: q.main(["export", "--model", str(trained / "stage1"), "--out", str(out), "--quiet"]),
        "random": lambda: q.main(["random", "--out", str(out), "--quiet"]),
        "synthetic": lambda: synth.main(["--out", str(out), "--quiet"]),
        "weights_build": lambda: weights.main(["--llm", str(tmp_path / "no-phi2"), "--vision", "none",
                                               "--out", str(out)]),
        "features": lambda: features.main(["--cfg-path", str(STAGE1), "--out", str(out)]),
    }[writer]
    capsys.readouterr()
    assert call() == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith("error: --out: ") and str(out if target_kind != "under_a_file" else user / "afile") in line
    assert snapshot(user) == before


# -------------------------------------------------------------------------- 4: permissions
UNPRIVILEGED = textwrap.dedent("""
    import contextlib, io, json, sys
    sys.path.insert(0, sys.argv[1])
    import train, quantize.__main__ as q, tinygpt.tiny.synthetic.__main__ as synth
    ro, cfg = sys.argv[2], sys.argv[3]
    calls = {
        "output_dir": lambda: train.main(["--quiet", "--cfg-path", cfg, "--options", f"vars.data_root={ro}/none",
                                          f"run.output_dir={ro}/out", f"run.checkpoint_dir={ro}/../home/ck"]),
        "checkpoint_dir": lambda: train.main(["--quiet", "--cfg-path", cfg, "--options", f"vars.data_root={ro}/none",
                                              f"run.output_dir={ro}/../home/out", f"run.checkpoint_dir={ro}/ck"]),
        "export": lambda: q.main(["random", "--out", f"{ro}/gguf", "--size", "tiny", "--quiet"]),
        "synthetic": lambda: synth.main(["--out", f"{ro}/data", "--quiet"]),
    }
    results = {}
    for name, call in calls.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = call()
        results[name] = [rc, err.getvalue()]
    print(json.dumps(results))
""")


def test_read_only_output_locations_fail_before_any_work(tmp_path):
    """Class 4: run as an unprivileged user, every writer refuses a read-only directory up front."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is unavailable: cannot drop the right to write anywhere")
        hidden = [p for p in [REPO, *REPO.parents] if p.stat().st_mode & 0o005 != 0o005]
        if hidden:
            pytest.skip(f"{hidden[0]} is closed to other users (a mktemp -d checkout?): the unprivileged user "
                        "could not import the code under test")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="tinygpt-ro-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        (base / "home").mkdir(mode=0o777)
        os.chmod(base / "home", 0o777)
        ro = base / "ro"
        ro.mkdir()
        (ro / "keep.txt").write_text("the user's file\n")
        os.chmod(ro, 0o555)
        before = snapshot(ro)
        env = {**os.environ, "HOME": str(base / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([*prefix, sys.executable, "-c", UNPRIVILEGED, str(REPO), str(ro), str(STAGE1)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=base / "home")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for name, (rc, err) in results.items():
            assert rc == 2, (name, err[-2000:])
            line = one_error(err)
            assert str(ro) in line and "Permission denied" in line, (name, line)
        assert "run.output_dir" in one_error(results["output_dir"][1])
        assert "run.checkpoint_dir" in one_error(results["checkpoint_dir"][1])
        assert snapshot(ro) == before
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- 6: damaged checkpoints
def test_corrupt_optimizer_state_names_the_file_and_offers_the_previous_checkpoint(trained, synthetic, base_model,
                                                                                   tmp_path, capsys):
    """Class 6: resume validates every file; the error names optimizer.pt and the checkpoint before it, which
    then resumes (the finished 3-step run extended to 4 steps, resumed from its last checkpoint by name: auto would
    go back to the intact one itself, test_resume_damaged.py)."""
    root = copy_run(trained, tmp_path / "run")
    ckpts = root / "stage1-checkpoints" / "checkpoints"
    damaged = ckpts / "step_00000003" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    output_before = snapshot(root / "stage1")
    opts = stage_options(synthetic, root, base_model, 4, run__save_every=1, run__keep_last=2)
    capsys.readouterr()
    assert train_main(opts + [f"run.resume={damaged.parent}"]) == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {damaged}: damaged checkpoint file")
    previous = ckpts / "step_00000002"
    assert f"run.resume={previous}" in line
    assert snapshot(root / "stage1") == output_before
    assert train_main(opts + [f"run.resume={previous}"]) == 0  # the offered checkpoint resumes
    summary = json.loads((root / "stage1" / "train_summary.json").read_text())["summary"]
    assert (summary["start_step"], summary["end_step"]) == (2, 4)


@pytest.mark.parametrize("name", ["state.json", "trainable.safetensors", "optimizer.pt", "rng_0.pt"])
@pytest.mark.parametrize("manifest", [True, False])
def test_every_checkpoint_file_is_validated(name, manifest, trained, tmp_path):
    """A flipped byte is caught by state.json's sha256 record; without the record (older checkpoints) a truncated
    file is caught by its loader. Either way one UserError names the file."""
    from tinygpt.train.checkpoint import read_checkpoint

    step = tmp_path / "checkpoints" / "step_00000002"
    shutil.copytree(trained / "stage1-checkpoints" / "checkpoints" / "step_00000002", step)
    read_checkpoint(step, 0, with_scaler=False)  # intact: reads
    if not manifest:
        state = json.loads((step / "state.json").read_text())
        del state["files"]
        (step / "state.json").write_text(json.dumps(state))
    data = bytearray((step / name).read_bytes())
    if manifest and name != "state.json":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    (step / name).write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        read_checkpoint(step, 0, with_scaler=False)
    assert str(info.value).startswith(f"{step / name}: damaged checkpoint file")
    assert "run.resume=false" in str(info.value)  # no earlier checkpoint here to offer


# ------------------------------------------------------------------------- 7, 8: full disks
def test_full_disk_at_a_checkpoint_keeps_the_earlier_ones(trained, synthetic, base_model, tmp_path, capsys):
    """Class 7: the checkpoint of step 4 cannot be written; no step_*.tmp is left, steps 2-3 are intact, and resume
    picks step 3."""
    from tinygpt.train.checkpoint import list_checkpoints, read_checkpoint

    root = copy_run(trained, tmp_path / "run")
    shutil.rmtree(root / "stage1")
    ckpt_dir = root / "stage1-checkpoints"
    before = snapshot(ckpt_dir)
    opts = stage_options(synthetic, root, base_model, 4, run__save_every=1, run__keep_last=5, run__resume="auto")
    capsys.readouterr()
    with file_size_limit(200_000):  # the checkpoint's tensors are 0.8 MB
        rc = train_main(opts)
    assert rc == 2
    line = one_error(capsys.readouterr().err)
    assert "step_00000004" in line and "checkpoint of step 4" in line and "File too large" in line
    curve = {"metrics.jsonl", "loss.png"}  # the run's curve goes on (its step 4 was trained and logged)
    assert {k: v for k, v in snapshot(ckpt_dir).items() if k not in curve} == \
        {k: v for k, v in before.items() if k not in curve}
    assert not (root / "stage1").exists()
    assert list_checkpoints(ckpt_dir)[-1].name == "step_00000003"
    read_checkpoint(list_checkpoints(ckpt_dir)[-1], 0, with_scaler=False)


def test_full_disk_at_the_final_save_keeps_the_previous_output(trained, synthetic, base_model, tmp_path, capsys):
    """Class 8: the stage output cannot be written; the previous model directory is byte-identical and no
    temporary directory is left. (The run resumes from its last checkpoint, named: under run.resume auto a finished
    run is not written again.)"""
    root = copy_run(trained, tmp_path / "run")
    before = snapshot(root)
    last = root / "stage1-checkpoints" / "checkpoints" / "step_00000003"
    opts = stage_options(synthetic, root, base_model, 3, run__save_every=0, run__resume=last)
    capsys.readouterr()
    with file_size_limit(200_000):  # model.safetensors is 0.8 MB
        rc = train_main(opts)
    assert rc == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {root / 'stage1'}: could not write the model directory (File too large)")
    assert snapshot(root) == before


# ---------------------------------------------------------------------------- permissions
def test_written_files_get_the_usual_permissions(trained, tmp_path):
    """Files 0666 and directories 0777 minus the umask: stage outputs, checkpoints, GGUF exports."""
    from quantize.random_model import write_random_model
    from tinygpt.model import load_vlm, save_vlm

    def modes(root: Path) -> set[tuple[str, int]]:
        return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}

    mask = os.umask(0o022)
    os.umask(mask)
    assert modes(trained / "stage1") == {("d", 0o777 & ~mask), ("f", 0o666 & ~mask)}
    assert modes(trained / "stage1-checkpoints" / "checkpoints") == {("d", 0o777 & ~mask), ("f", 0o666 & ~mask)}
    model = load_vlm(trained / "stage1")
    old = os.umask(0o027)
    try:
        save_vlm(model, tmp_path / "model")
        write_random_model(tmp_path / "gguf", "tiny", "f16", seed=0, progress=False)
    finally:
        os.umask(old)
    assert modes(tmp_path / "model") == {("d", 0o750), ("f", 0o640)}
    assert modes(tmp_path / "gguf") == {("d", 0o750), ("f", 0o640)}
