"""Which implementation an op runs: a fused Triton kernel, the library's PyTorch path, or the eager reference.

``EUPHONIUM_BACKEND`` (read at each call) or the ``use_backend`` context manager chooses:

- ``auto`` (default): CUDA tensors run the Triton kernels; CPU tensors run the op's PyTorch path
  where it has one (``sde_step``, ``sde_log_prob``, ``grpo_loss``, contiguous ``group_advantages``,
  ``reward_grad``'s norm post-processing), else its eager reference.
- ``reference``: always the eager reference (the spec, written the way peer trainers write it).
- ``torch``: the op's PyTorch path on any device (the eager reference for ops without one): the
  same arithmetic as the kernels (per-sample coefficients, fp32 on blocks small enough to stay in
  cache, one log-prob reduction shared by the step and the log-prob) in plain PyTorch ops.
- ``triton``: always the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1`` set
  before Triton and ``euphonium.kernels`` are imported, so that the kernels run in Triton's
  interpreter (Triton decides between interpreter and compiler when a ``@triton.jit`` function is
  defined: kernels defined for the compiler are refused on CPU tensors with a one-line error).

``resolve(device, torch_path=..., kernels=...)`` turns the request into what runs: ``"triton"``,
``"torch"`` (only for callers that pass ``torch_path=True``) or ``"reference"``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from typing import Iterator, Optional, Set

import torch

BACKENDS = ("auto", "reference", "torch", "triton")

_local = threading.local()
# Modules whose @triton.jit functions were found to be interpreted (they stay so once defined).
_interpreted_modules: Set[str] = set()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def get_backend() -> str:
    """The requested backend: the innermost ``use_backend`` or else ``EUPHONIUM_BACKEND``."""
    name = getattr(_local, "override", None) or os.environ.get("EUPHONIUM_BACKEND", "")
    name = name.strip().lower() or "auto"  # set but empty means the default, as unset does
    if name not in BACKENDS:
        raise ValueError(f"EUPHONIUM_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``auto``, ``reference``, ``torch`` or ``triton``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous


def _compiled_kernels(module) -> list:
    """Names of the ``@triton.jit`` functions of ``module`` that Triton compiles (not interpreted)."""
    from triton.runtime.jit import JITFunction

    return sorted(name for name, value in vars(module).items() if isinstance(value, JITFunction))


@torch.compiler.assume_constant_result
def _not_interpreted(kernels: Optional[str]) -> str:
    """The first module (``name (function, ...)``) whose ``@triton.jit`` functions Triton compiles
    instead of interpreting, or ``""``: among ``euphonium.kernels.<kernels>`` (imported here if it
    is not yet, under the current ``TRITON_INTERPRET``; None: every kernel module imported so far)
    and Triton's own ``@triton.jit`` library (``tl.sum``, ``tl.max``, ...), which the kernels call and
    which is defined when Triton is imported. Run once at trace time under ``torch.compile``.
    """
    if kernels is not None:
        names = [importlib.import_module(f"euphonium.kernels.{kernels}").__name__]
    else:
        names = [n for n in list(sys.modules) if n.startswith("euphonium.kernels.")]
    names.append(importlib.import_module("triton.language.standard").__name__)
    for name in names:
        if name in _interpreted_modules:
            continue
        compiled = _compiled_kernels(sys.modules[name])
        if compiled:
            return f"{name} ({compiled[0]}, ...)"
        _interpreted_modules.add(name)
    return ""


def resolve(device: torch.device, *, torch_path: bool = False, kernels: Optional[str] = None) -> str:
    """What runs for tensors on ``device`` under the requested backend.

    ``torch_path``: the calling op has a PyTorch path of its own. Then the result is ``"triton"``,
    ``"torch"`` or ``"reference"``; without it ``"torch"`` is never returned (those ops' PyTorch
    path is their reference), so such callers see ``"triton"`` or ``"reference"`` only.
    ``kernels``: the ``euphonium.kernels`` module the op launches (``"sde"``, ``"grpo_loss"``, ...);
    when the Triton backend is chosen for tensors off CUDA, its kernels must be interpreted.
    """
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "torch":
        return "torch" if torch_path else "reference"
    if name == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "torch" if torch_path else "reference"
    if not _triton_available():
        raise RuntimeError("EUPHONIUM_BACKEND=triton but Triton is not installed")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"EUPHONIUM_BACKEND=triton with tensors on {device}: Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before Triton is first imported to run them on the CPU"
        )
    if device.type != "cuda":
        compiled = _not_interpreted(kernels)
        if compiled:
            raise RuntimeError(
                f"EUPHONIUM_BACKEND=triton with tensors on {device}, but the @triton.jit functions of {compiled} "
                "were defined for the compiler: TRITON_INTERPRET=1 was set after Triton or euphonium.kernels had "
                "been imported; set TRITON_INTERPRET=1 before importing Triton or euphonium.kernels (at the start "
                "of the process)"
            )
    return "triton"
