"""Hardening: config values that could only break a run are refused when the config is parsed, in one
line, before torch loads; the shared validators in euphonium._checks; EUPHONIUM_BACKEND=''."""

import subprocess
import sys

import pytest

from euphonium._checks import check_choice, check_float, check_int, check_path
from euphonium.train import ConfigError, load_config
from euphonium.train.__main__ import main

REFUSED = [
    ("lr=.inf", "lr must be a finite number > 0"),
    ("lr=.nan", "lr must be a finite number > 0"),
    ("max_grad_norm=.nan", "max_grad_norm must be a finite number > 0"),
    ("adv_clip=0", "adv_clip must be > 0"),
    ("clip_range=.inf", "clip_range must be a finite number > 0"),
    ("adv_eps=.nan", "adv_eps must be a finite number > 0"),
    ("process_weight=.inf", "process_weight must be a finite number >= 0"),
    ("kl_coef=.inf", "kl_coef must be a finite number >= 0"),
    ("distill_coef=-1", "distill_coef must be >= 0"),
    ("adam_eps=-1", "adam_eps must be > 0"),
    ("adam_betas=[2, 0.5]", r"adam_betas\[0\] must be in \[0, 1\)"),
    ("adam_betas=[0.9, .nan]", r"adam_betas\[1\] must be a finite number"),
    ("weight_decay=-1", "weight_decay must be >= 0"),
    ("ema_decay=1", r"ema_decay must be in \(0, 1\)"),
    ("reward_weights.color=.inf", "reward_weights.color must be a finite number"),
    ("model.lora_alpha=.nan", "model.lora_alpha must be a finite number"),
    ("device=foo", "device must be auto, cpu, cuda, cuda:N or mps, got 'foo'"),
    ("seed=-1", "seed must be >= 0"),
]


@pytest.mark.parametrize("override, message", REFUSED)
def test_values_that_can_only_break_a_run_are_refused_at_parse_time(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, _", REFUSED[:6] + [("device=foo", None), ("lr=[1", None), ("x==", None)])
def test_cli_config_errors_are_one_line_before_torch_loads(tmp_path, override, _):
    """The whole command in a fresh interpreter: exit 2, one line, and neither torch nor the trainer imported."""
    code = (
        "import sys; from euphonium.train.__main__ import main; "
        f"rc = main(['--output-dir', {str(tmp_path / 'run')!r}, {override!r}]); "
        "heavy = [m for m in ('torch', 'diffusers', 'euphonium.train.trainer') if m in sys.modules]; "
        "print(rc, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    err = out.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_invalid_yaml_override_is_one_line():
    with pytest.raises(ConfigError, match=r"override 'lr=\[1': the value is not valid YAML") as info:
        load_config(None, ["lr=[1"])
    assert "\n" not in str(info.value)


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("not a folder\n")
    assert main(["--output-dir", str(target)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --output-dir {target} is a file, not a folder"
    assert main(["--output-dir", str(target / "below")]) == 2
    assert f"cannot be created: {target} is a file" in capsys.readouterr().err


def test_cuda_device_without_cuda_is_refused(tmp_path, capsys):
    import torch

    from euphonium.train.config import check_device

    if torch.cuda.is_available():
        config = load_config(None, [f"device=cuda:{torch.cuda.device_count()}"])
        with pytest.raises(ConfigError, match="CUDA device"):
            check_device(config)
        return
    with pytest.raises(ConfigError, match="device=cuda but CUDA is not available"):
        check_device(load_config(None, ["device=cuda"]))
    assert main(["--output-dir", str(tmp_path / "run"), "device=cuda:1"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: device=cuda:1 but CUDA is not available here (use device=auto or cpu)"
    )
    check_device(load_config(None, ["device=cpu"]))  # no error


def test_shared_validators():
    assert check_int("n", 3, minimum=1) == 3
    with pytest.raises(TypeError, match="n must be an integer, got True"):
        check_int("n", True)
    with pytest.raises(ValueError, match="n must be <= 2, got 3"):
        check_int("n", 3, maximum=2)
    assert check_float("x", 1, minimum=0, min_open=True) == 1.0 and isinstance(check_float("x", 1), float)
    assert check_float("x", None, allow_none=True) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="x must be a finite number"):
            check_float("x", bad)
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\], got 0"):
        check_float("x", 0, minimum=0, maximum=1, min_open=True)
    with pytest.raises(ValueError, match="x must be < 1, got 1"):
        check_float("x", 1.0, maximum=1, max_open=True)
    with pytest.raises(TypeError, match="x must be a number"):
        check_float("x", "1")
    assert check_choice("c", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"c must be one of \['a', 'b'\], got 'z'"):
        check_choice("c", "z", ("a", "b"))
    with pytest.raises(TypeError, match="p must be a non-empty path"):
        check_path("p", "")


def test_shared_validators_do_not_import_torch():
    code = (
        "import sys, euphonium._checks, euphonium.train.config, euphonium.checkpointing; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_empty_euphonium_backend_means_auto(monkeypatch):
    from euphonium.ops._backend import get_backend

    monkeypatch.setenv("EUPHONIUM_BACKEND", "")
    assert get_backend() == "auto"
    monkeypatch.setenv("EUPHONIUM_BACKEND", " ")
    assert get_backend() == "auto"
    monkeypatch.setenv("EUPHONIUM_BACKEND", "nosuch")
    with pytest.raises(ValueError, match="EUPHONIUM_BACKEND must be one of"):
        get_backend()
