"""Test setup: Triton kernels run in Triton's interpreter, except in a `-m gpu` run on a CUDA machine.

The tests that are not marked `gpu` run the kernels on CPU tensors, which needs the interpreter
on any machine; the `gpu` tests run the compiled kernels on CUDA tensors, which needs it off. Triton
reads TRITON_INTERPRET when a kernel is defined, at the import of `euphonium.kernels` during
collection, so one process cannot do both: a CUDA machine runs `pytest` for the first and
`pytest -m gpu` (exactly that mark expression) for the second. Ahead-of-time compile tests run in a
subprocess with it unset.
"""

import json
import os
import subprocess
import sys

import pytest
import torch


def _compiled_run(config) -> bool:
    return torch.cuda.is_available() and (config.getoption("markexpr") or "").strip() == "gpu"


def pytest_configure(config):
    if _compiled_run(config):
        os.environ.pop("TRITON_INTERPRET", None)
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton
    except ImportError:  # setup.py installs Triton on Linux only
        return
    import numpy as np

    # Before 3.7 the interpreter turns a loop bound into an int with int(array of shape [1]), which
    # numpy 2.4 refuses: every kernel with a runtime loop bound would fail with a TypeError.
    triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(p) for p in np.__version__.split(".")[:2])
    if os.environ["TRITON_INTERPRET"] not in ("", "0") and triton_version < (3, 7) and numpy_version >= (2, 4):
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy {np.__version__}: "
            "pip install 'triton>=3.7' or 'numpy<2.4' for the CPU test run"
        )


def pytest_collection_modifyitems(config, items):
    if _compiled_run(config):
        return
    reason = "compiled kernels: run `pytest -m gpu`" if torch.cuda.is_available() else "needs a CUDA device"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs on every run; the seed is printed on failure so a failure can be replayed.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with the captured output of a failing test
    yield seed


@pytest.fixture
def nan_poison():
    """Freshly allocated outputs are NaN, so an element a kernel forgets to write fails the test."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill


@pytest.fixture(autouse=True, scope="session")
def _interpreter_rounds_bf16_to_nearest():
    """Make Triton's interpreter round fp32 -> bf16 to nearest even, as the GPU does.

    ``tensor.to(tl.bfloat16)`` lowers to ``arith.truncf`` (round to nearest even on CUDA), but the
    3.9 interpreter truncates the mantissa; without this the interpreted kernels would be up to one
    bf16 ulp less accurate than the compiled ones and fail the bf16 accuracy rule.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
            return interpreter.TensorHandle(rounded.view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    interpreter.InterpreterBuilder.create_fp_trunc = create_fp_trunc
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_fp_trunc = original


def aot_compile(kernels, archs=(80, 90)):
    """Compile the named ``AOTSpec``s for ``archs`` in a fresh process without TRITON_INTERPRET.

    Returns the rows of ``euphonium.kernels.aot.report`` (registers, spills, access widths).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "euphonium.kernels.aot", "--arch", *map(str, archs), "--kernel", *kernels]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise AssertionError(f"AOT compile failed:\n{out.stderr[-4000:]}")
    rows = json.loads(out.stdout)
    missing = set(kernels) - {r["kernel"] for r in rows}
    assert not missing, f"no AOTSpec named {sorted(missing)}"
    return rows
