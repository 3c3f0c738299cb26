"""Backend dispatch (euphonium.ops._backend): names, overrides, and the Triton interpreter on CPU tensors.

Triton decides between its interpreter and its compiler when a ``@triton.jit`` function is defined,
i.e. when ``euphonium.kernels`` is imported; the cases that depend on the import order run in fresh
processes (this one imported the kernels long ago, under ``TRITON_INTERPRET=1``).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from euphonium import ops
from euphonium.ops import _backend

pytest.importorskip("triton")


def _run(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EUPHONIUM_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def test_resolve_names_and_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("EUPHONIUM_BACKEND", " Torch ")
    assert _backend.resolve(cpu, torch_path=True) == "torch"
    assert _backend.resolve(cpu) == "reference"  # an op without a PyTorch path of its own
    with ops.use_backend("reference"):
        assert _backend.resolve(cpu, torch_path=True) == "reference"
    monkeypatch.setenv("EUPHONIUM_BACKEND", "")
    assert _backend.get_backend() == "auto"
    assert _backend.resolve(cpu, torch_path=True) == "torch"
    monkeypatch.setenv("EUPHONIUM_BACKEND", "cuda")
    with pytest.raises(ValueError, match="EUPHONIUM_BACKEND must be one of"):
        _backend.resolve(cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("fast"):
            pass


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors, or TRITON_INTERPRET=1"):
            _backend.resolve(torch.device("cpu"), torch_path=True, kernels="sde")


def test_interpreted_kernels_pass_the_check():
    # This process imported the kernels under TRITON_INTERPRET=1 (conftest): every module is interpreted.
    assert os.environ.get("TRITON_INTERPRET") not in (None, "", "0")
    with ops.use_backend("triton"):
        for name in ("sde", "advantages", "grpo_loss", "reward_grad"):
            assert _backend.resolve(torch.device("cpu"), torch_path=True, kernels=name) == "triton"
        assert _backend.resolve(torch.device("cpu")) == "triton"


def test_compiled_kernel_module_is_detected():
    fake = type(sys)("euphonium.kernels._fake_compiled")
    from triton.runtime.jit import JITFunction

    def kernel(x_ptr):
        pass

    fake._kernel = JITFunction(kernel)
    sys.modules[fake.__name__] = fake
    try:
        with ops.use_backend("triton"):
            with pytest.raises(RuntimeError, match="_fake_compiled .*set TRITON_INTERPRET=1 before importing"):
                _backend.resolve(torch.device("cpu"))  # no module named: every imported kernel module
            # An op naming its own (interpreted) module is not refused for an unrelated one.
            assert _backend.resolve(torch.device("cpu"), torch_path=True, kernels="sde") == "triton"
    finally:
        del sys.modules[fake.__name__]


def test_interpret_set_after_kernels_were_imported_is_one_clear_error():
    result = _run(
        """
        import os, torch
        import euphonium.kernels.sde  # defined for the compiler: TRITON_INTERPRET is unset
        from euphonium import ops
        os.environ["TRITON_INTERPRET"] = "1"  # too late for the kernels above
        x = torch.randn(2, 8)
        with ops.use_backend("triton"):
            try:
                ops.sde_step(x, torch.randn(2, 8), 0.9, 0.8, seed=1)
            except RuntimeError as err:
                print("ERROR", err)
            try:  # its kernels are defined only now, but on Triton's compiled library (tl.sum, ...)
                ops.grpo_loss(torch.zeros(4), torch.zeros(4), torch.ones(4))
            except RuntimeError as err:
                print("ERROR", err)
        """,
        interpret=False,
    )
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stdout
    assert "of euphonium.kernels.sde (" in errors[0] and "of triton.language.standard (" in errors[1]
    for error in errors:
        assert "set TRITON_INTERPRET=1 before importing Triton or euphonium.kernels" in error


def test_interpret_set_after_triton_alone_was_imported():
    result = _run(
        """
        import os, torch, triton
        os.environ["TRITON_INTERPRET"] = "1"
        from euphonium import ops
        with ops.use_backend("triton"):
            ops.group_advantages(torch.randn(4), group_size=2)
        """,
        interpret=False,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "RuntimeError: EUPHONIUM_BACKEND=triton with tensors on cpu, but the @triton.jit functions of "
    )
    assert "triton.language.standard" in last and "before importing Triton" in last


def test_interpret_set_before_import_runs_the_kernels():
    result = _run(
        """
        import torch
        from euphonium import ops
        x, v = torch.randn(2, 8), torch.randn(2, 8)
        with ops.use_backend("triton"):
            a = ops.sde_step(x, v, 0.9, 0.8, seed=3)
        with ops.use_backend("reference"):
            b = ops.sde_step(x, v, 0.9, 0.8, seed=3)
        print("CLOSE", bool(torch.allclose(a.x_next, b.x_next, atol=1e-5)))
        """,
        interpret=True,
    )
    assert result.returncode == 0, result.stderr
    assert "CLOSE True" in result.stdout


def test_implementation_pointers_name_existing_functions():
    # Each op's three implementations (eager reference, PyTorch path, Triton launcher) carry a one-line
    # "# Same formula: ..." pointer to the other two; every name in it must exist.
    import importlib
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    files = sorted((root / "euphonium" / "ops").glob("*.py")) + sorted((root / "kernels").glob("*.py"))
    pointers = {}
    for path in files:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"# (Same formula|Same gradient|No trio of its own)", line):
                target = re.match(r"(?:def|class) (\w+)", lines[i + 1])
                assert target, f"{path.name}:{i + 1}: a pointer comment must sit right above a def or class"
                pointers[f"{path.parent.name}.{path.stem}.{target.group(1)}"] = line
    for where, line in pointers.items():
        names = re.findall(r"\b((?:ops|kernels)\.\w+(?:\.\w+)+)", line)
        assert len(names) >= (1 if line.startswith("# No trio") else 2), (where, line)
        for name in names:
            module, _, attribute = name.rpartition(".")
            if module.count(".") == 2:  # ops.grpo._GRPOLossTorch.backward: a method
                module, _, cls = module.rpartition(".")
                obj = getattr(importlib.import_module(f"euphonium.{module}"), cls)
            else:
                obj = importlib.import_module(f"euphonium.{module}")
            assert hasattr(obj, attribute), f"{where}: {name} does not exist"
    implementations = {
        "sde_step": ("ops.sde.sde_step_reference", "ops._sde_torch.sde_step", "kernels.sde.sde_step_forward"),
        "sde_log_prob": (
            "ops.sde.sde_log_prob_reference",
            "ops._sde_torch.sde_log_prob",
            "kernels.sde.sde_log_prob_forward",
        ),
        "group_advantages": (
            "ops.advantages.group_advantages_ref",
            "ops.advantages.group_advantages_contiguous",
            "kernels.advantages.group_advantages_forward",
        ),
        "grpo_loss": ("ops.grpo.grpo_loss_ref", "ops.grpo._GRPOLossTorch", "kernels.grpo_loss.grpo_loss_forward"),
        "scale_by_norm": (
            "ops.reward_grad.scale_by_norm_ref",
            "ops.reward_grad.scale_by_norm_torch",
            "kernels.reward_grad.scale_by_norm",
        ),
    }
    for op, trio in implementations.items():
        for where in trio:
            others = [name for name in trio if name != where]
            assert where in pointers, f"{op}: {where} has no pointer comment"
            assert all(other in pointers[where] for other in others), (op, where, pointers[where])
    for composite in ("ops.grpo.dual_reward_advantages", "ops.grpo.dual_reward_loss", "ops.reward_grad.reward_grad"):
        assert composite in pointers, composite
