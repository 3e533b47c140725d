"""What `pip install .` ships: every package of the checkout, the prompts and the stage configs (so an installed
tinygpt runs its tiny default from any directory)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tinygpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_of_the_checkout():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(init.parent.relative_to(ROOT).parts) for top in ("tinygpt", "quantize")
             for init in (ROOT / top).rglob("__init__.py")}
    listed = set(setuptools["packages"])
    assert found <= listed, f"add to pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == {"tinygpt.train_configs", "tinygpt.eval_configs"}
    assert setuptools["package-dir"] == {"tinygpt.train_configs": "train_configs",
                                         "tinygpt.eval_configs": "eval_configs"}


def test_the_stage_configs_ship_with_the_package(monkeypatch, tmp_path):
    import tinygpt.paths as paths

    assert paths.train_configs_dir() == ROOT / "train_configs"  # a checkout uses its own folder
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data["tinygpt.train_configs"]
    shipped = {p.relative_to(ROOT / "train_configs").as_posix() for pattern in patterns
               for p in (ROOT / "train_configs").glob(pattern)}
    every = {p.relative_to(ROOT / "train_configs").as_posix() for p in (ROOT / "train_configs").rglob("*.yaml")}
    assert shipped == every and "tiny/stage1.yaml" in shipped
    installed = tmp_path / "site-packages" / "tinygpt"
    (installed / "train_configs" / "tiny").mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE_ROOT", installed)  # no train_configs/ beside it: the installed copy
    assert paths.train_configs_dir() == installed / "train_configs"


def test_the_launch_configs_ship_and_resolve_outside_a_checkout(monkeypatch, tmp_path):
    import tinygpt.chat.launch as launch

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert data["tinygpt.eval_configs"] == ["*.yaml"] and (ROOT / "eval_configs" / "tiny.yaml").is_file()
    installed = tmp_path / "site-packages" / "tinygpt"
    (installed / "eval_configs").mkdir(parents=True)
    (installed / "eval_configs" / "tiny.yaml").write_text("model: {backend: torch, path: outputs/tiny/stage4}\n")
    monkeypatch.setattr(launch, "PACKAGE_ROOT", installed)
    monkeypatch.chdir(tmp_path)  # no eval_configs/ here: the shipped copy answers
    cfg = launch.load_launch_config("eval_configs/tiny.yaml", check_model=False)
    assert cfg.source == installed / "eval_configs" / "tiny.yaml" and cfg.model.path == "outputs/tiny/stage4"


def test_the_stage_configs_resolve_outside_a_checkout(monkeypatch, tmp_path):
    """`--cfg-path train_configs/tiny/stage1.yaml`, as the README writes it, run from a folder without train_configs/
    (an installed tinygpt): the copy shipped in the package is read."""
    import shutil

    import tinygpt.config.load as load

    installed = tmp_path / "site-packages" / "tinygpt" / "train_configs"
    shutil.copytree(ROOT / "train_configs", installed)
    monkeypatch.setattr(load, "train_configs_dir", lambda: installed)
    monkeypatch.chdir(tmp_path)
    cfg = load.load_config("train_configs/tiny/stage1.yaml")
    assert cfg.source == str(installed / "tiny" / "stage1.yaml")
    with pytest.raises(UserError, match=r"train_configs/tiny/nope\.yaml: config file does not exist"):
        load.load_config("train_configs/tiny/nope.yaml")


def test_python_m_tinygpt_is_the_console_script():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tinygpt", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "train" in done.stdout and "serve" in done.stdout, done.stderr


# imported only where their feature is asked for, each behind a message naming the package to install
OPTIONAL_IMPORTS = {"llama_cpp": "llama-cpp extra", "lmms_eval": "lmms extra", "wandb": "run.wandb_project"}


def _third_party_imports() -> dict[str, str]:
    """top-level module -> one file of tinygpt/ or quantize/ that imports it (absolute imports outside the stdlib)."""
    import ast
    import sys

    found: dict[str, str] = {}
    for top in ("tinygpt", "quantize"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    name = module.split(".")[0]
                    if name not in sys.stdlib_module_names and name not in ("tinygpt", "quantize", "__future__"):
                        found.setdefault(name, path.relative_to(ROOT).as_posix())
    return found


def test_every_third_party_import_is_a_declared_dependency():
    """A package the code imports but only gets through another one disappears when that one stops needing it."""
    import importlib.metadata as metadata
    import re

    declared = {re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower().replace("_", "-")
                for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "yaml", "tokenizers", "starlette"} <= set(imports)  # the scan sees the code's imports
    undeclared = []
    for module, where in sorted(imports.items()):
        if module in OPTIONAL_IMPORTS:
            continue
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [])}
        if not names & declared:
            undeclared.append(f"{module} (imported by {where}; installed from {sorted(names) or 'nothing'})")
    assert not undeclared, "declare in pyproject.toml and requirements.txt: " + "; ".join(undeclared)


# declared, used without an import statement of ours: TensorBoard through torch.utils.tensorboard (run.tensorboard)
USED_WITHOUT_IMPORT = {"tensorboard"}


def test_every_declared_dependency_is_imported():
    """A declared package nothing imports is an install cost for nothing (webdataset was one until the shard reader
    used it)."""
    import importlib.metadata as metadata
    import re

    declared = {re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower().replace("_", "-")
                for req in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    imported = {name.lower().replace("_", "-") for module, names in metadata.packages_distributions().items()
                if module in _third_party_imports() for name in names}
    assert not declared - imported - USED_WITHOUT_IMPORT, "declared but never imported"
