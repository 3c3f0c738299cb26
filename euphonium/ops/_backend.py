"""Which implementation an op runs: the fused Triton kernel or the eager PyTorch reference.

``EUPHONIUM_BACKEND`` (read at each call) or the ``use_backend`` context manager chooses:

- ``auto`` (default): CUDA tensors run the Triton kernels, CPU tensors the eager reference.
- ``reference``: always the eager reference (the spec).
- ``triton``: always the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1`` set
  before Triton is first imported, so that the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("auto", "reference", "triton")

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
    name = getattr(_local, "override", None) or os.environ.get("EUPHONIUM_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"EUPHONIUM_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``auto``, ``reference`` or ``triton``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous


def resolve(device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` under the requested backend."""
    name = get_backend()
    if name == "reference":
        return "reference"
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "reference"
    if not _triton_available():
        raise RuntimeError("EUPHONIUM_BACKEND=triton but Triton is not installed")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"EUPHONIUM_BACKEND=triton with tensors on {device}: Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 set before Triton is first imported to run them on the CPU"
        )
    return "triton"
