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
  before Triton is first imported, so that the kernels run in Triton's interpreter.

``resolve(device, torch_path=...)`` turns the request into what runs: ``"triton"``, ``"torch"``
(only for callers that pass ``torch_path=True``) or ``"reference"``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("auto", "reference", "torch", "triton")

_local = threading.local()


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


def resolve(device: torch.device, *, torch_path: bool = False) -> str:
    """What runs for tensors on ``device`` under the requested backend.

    ``torch_path``: the calling op has a PyTorch path of its own. Then the result is ``"triton"``,
    ``"torch"`` or ``"reference"``; without it ``"torch"`` is never returned (those ops' PyTorch
    path is their reference), so such callers see ``"triton"`` or ``"reference"`` only.
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
    return "triton"
