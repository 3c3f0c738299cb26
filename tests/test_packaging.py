"""Packaged configs (``--config NAME`` from any folder) and the installed wheel: configs, assets, every
subpackage and ``euphonium.kernels`` inside it, with no help from the repository or the editable install.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from euphonium.train.__main__ import main
from euphonium.train.config import PACKAGED_CONFIGS, ConfigError, available_configs, load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
# Every packaged config, listed by hand: a config that goes missing from the package fails here.
NAMES = sorted(["toy", "mixture", "wan2_1_t2v_1_3b", "wan2_2_t2v_a14b", "sd3_5_medium", "flux_1_dev", "hunyuan_video"])
WAN_PATHS = ["model.path=/data/wan", "prm_path=/data/prm", "rewards.clip_score.path=/data/clip"]


def test_packaged_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert available_configs() == NAMES
    assert PACKAGED_CONFIGS == ROOT / "euphonium" / "configs"
    for name in NAMES:
        assert resolve_config(name) == resolve_config(f"{name}.yaml") == PACKAGED_CONFIGS / f"{name}.yaml"
    assert load_config("toy").to_dict() == load_config().to_dict()
    wan = load_config("wan2_1_t2v_1_3b", WAN_PATHS)
    assert wan.model.kind == "wan" and wan.model.path == "/data/wan"
    assert wan.to_dict() == load_config(str(PACKAGED_CONFIGS / "wan2_1_t2v_1_3b.yaml"), WAN_PATHS).to_dict()


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy.yaml").write_text("group_size: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("group_size: 5\n")
    assert resolve_config("toy.yaml") == Path("toy.yaml")
    assert load_config("toy.yaml").group_size == 3
    assert load_config("toy").group_size == load_config().group_size != 3  # no file named "toy": packaged
    assert load_config("sub/mine.yaml").group_size == 5
    assert load_config(str(tmp_path / "sub" / "mine.yaml")).group_size == 5


@pytest.mark.parametrize("path", ["nope", "nope.yaml", "configs/toy.yaml", "sub/toy", "toy.yml", "", "."])
def test_an_unknown_config_is_a_one_line_error_listing_the_packaged_names(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match=rf"packaged: {', '.join(NAMES)}\)$") as err:
        load_config(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--config {path}: no such file")


def test_cli_reports_an_unknown_config_with_the_packaged_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", "configs/toy.yaml", "--output-dir", str(tmp_path / "run")]) == 2
    assert f"packaged: {', '.join(NAMES)}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_packaged_configs_are_valid_yaml_mappings_of_known_keys():
    for name in NAMES:
        values = yaml.safe_load((PACKAGED_CONFIGS / f"{name}.yaml").read_text())
        assert isinstance(values, dict) and values
        text = (PACKAGED_CONFIGS / f"{name}.yaml").read_text()
        assert "configs/" not in text and "euphonium.sde" not in text  # stale paths and module names


# Runs in the installed wheel's venv, from an empty folder: prints what it found as JSON.
INSTALLED_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    from pathlib import Path

    import euphonium
    import euphonium.kernels
    import euphonium.train.trainer
    from euphonium.train.config import available_configs, load_config, resolve_config

    for info in pkgutil.iter_modules(euphonium.kernels.__path__, "euphonium.kernels."):
        importlib.import_module(info.name)
    package = Path(euphonium.__file__).parent
    print(json.dumps({
        "prefix": sys.prefix,
        "euphonium": euphonium.__file__,
        "kernels": euphonium.kernels.__file__,
        "loaded": {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                   if name == "euphonium" or name.startswith("euphonium.")},
        "configs": available_configs(),
        "toy": str(resolve_config("toy")),
        "wan": str(resolve_config("wan2_1_t2v_1_3b.yaml")),
        "toy_is_default": load_config("toy").to_dict() == load_config().to_dict(),
        "files": sorted(str(p.relative_to(package)) for p in package.rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts),
    }))
    """
)


def _tree(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.mark.slow
def test_the_wheel_installs_configs_assets_kernels_and_every_subpackage(tmp_path):
    # Build from a copy of what the wheel is made of, so a stale build/ in the checkout can neither add
    # files nor be left behind there.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("euphonium", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def run(*cmd, cwd=tmp_path):
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src)
    (wheel,) = dist.glob("euphonium-*.whl")
    # The venv sees this interpreter's packages (torch, ...; pip too, hence --without-pip) but its own
    # site-packages come first, so its euphonium shadows the editable install (checked below).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    found = json.loads(run(python, "-c", INSTALLED_PROBE, cwd=cwd).strip().splitlines()[-1])

    venv_root = venv.resolve()
    installed = Path(found["euphonium"]).resolve().parent
    assert Path(found["prefix"]).resolve() == venv_root
    assert installed.is_relative_to(venv_root) and not installed.is_relative_to(ROOT), found["euphonium"]
    assert Path(found["kernels"]).resolve() == installed / "kernels" / "__init__.py"
    # Every euphonium module the probe imported (the trainer's, all kernel modules) is the installed one.
    kernel_modules = {f"euphonium.kernels.{p.stem}" for p in (src / "kernels").glob("*.py") if p.stem != "__init__"}
    assert kernel_modules <= set(found["loaded"]) and "euphonium.train.trainer" in found["loaded"]
    for name, file in found["loaded"].items():
        assert file is not None and Path(file).resolve().is_relative_to(installed), (name, file)
    assert found["configs"] == NAMES and found["toy_is_default"]
    assert Path(found["toy"]).resolve() == installed / "configs" / "toy.yaml"
    assert Path(found["wan"]).resolve() == installed / "configs" / "wan2_1_t2v_1_3b.yaml"

    files = set(found["files"])
    assert any(f.startswith("assets/toy/") for f in files) and any(f.startswith("assets/toy_prm/") for f in files)
    # Everything of the package is installed: each module of every subpackage (euphonium.toy,
    # euphonium.rewards.prm, ...), the kernels, the configs and the assets (committed models, PRM).
    expected = set(_tree(src / "euphonium")) | {f"kernels/{f}" for f in _tree(src / "kernels")}
    assert expected - files == set()
    for name in ("toy/__init__.py", "rewards/prm/__init__.py", "configs/toy.yaml", "kernels/aot.py"):
        assert name in files
