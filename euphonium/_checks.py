"""Input validation shared by the package: every error names the argument and what was expected.

Scalar checks (``check_bool``, ``check_int``, ``check_float``, ``check_positive``, ``check_choice``,
``check_path``) raise ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of
range; a bool is never taken for a number, and None passes only where ``allow_none`` asks for it.
They do not need torch: the trainer's config is validated with them before torch is imported, so
that a config error costs a fraction of a second. The tensor checks import torch when called.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

if TYPE_CHECKING:
    import torch

Scalar = Union[float, int, "torch.Tensor"]


def _float_dtypes() -> tuple:
    import torch

    return (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_bool(name: str, value: Any) -> bool:
    """``value`` is ``True`` or ``False`` (not 0/1, not a string, not a one-element tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return value


def check_int(
    name: str,
    value: Any,
    *,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
    allow_none: bool = False,
) -> Optional[int]:
    """``value`` is an integer (not a bool) in ``[minimum, maximum]`` (either bound optional), or None if allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an integer{' or None' if allow_none else ''}, got {value!r} ({type(value).__name__})"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: bool = False,
) -> Optional[float]:
    """``value`` is a finite real number within the bounds (``min_open``/``max_open``: that bound excluded).

    NaN and infinities are always refused: no setting of the trainer means anything with them.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{' or null' if allow_none else ''}, got {value!r}")
    value = float(value)
    low = "" if minimum is None else f"{'>' if min_open else '>='} {minimum:g}"
    high = "" if maximum is None else f"{'<' if max_open else '<='} {maximum:g}"
    wanted = low or high
    if low and high:
        wanted = f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' ' + wanted if wanted else ''}, got {value}")
    if minimum is not None and (value <= minimum if min_open else value < minimum):
        raise ValueError(f"{name} must be {wanted}, got {value:g}")
    if maximum is not None and (value >= maximum if max_open else value > maximum):
        raise ValueError(f"{name} must be {wanted}, got {value:g}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_path(name: str, value: Any, *, kind: str = "any", must_exist: bool = False) -> Path:
    """``value`` is a path (str or PathLike) to a ``dir``, a ``file`` or ``any`` entry.

    A path that exists must be of that kind; ``must_exist`` also refuses a missing one. For a ``dir``
    that does not exist yet, no part of the path above it may be a file (it could never be created).
    """
    check_choice("kind", kind, ("any", "dir", "file"))
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name} must be a non-empty path, got {value!r}")
    path = Path(value)
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise ValueError(f"{name} {path} is a file, not a folder")
        if kind == "file" and not path.is_file():
            raise ValueError(f"{name} {path} is not a file")
        return path
    if must_exist:
        raise ValueError(f"{name} {path} does not exist")
    if kind == "dir":
        for parent in path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"{name} {path} cannot be created: {parent} is a file")
                break
    return path


def check_float_tensor(name: str, t, *, min_dim: int = 1) -> torch.Tensor:
    """``t`` is a floating-point tensor with at least ``min_dim`` dimensions and a non-empty batch."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _float_dtypes():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got {t.dtype}"
        )
    if t.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions with the batch first, got shape {tuple(t.shape)}"
        )
    if t.dim() >= 1 and t.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch dimension (shape {tuple(t.shape)})")
    return t


def check_like(name: str, t, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``t`` is a floating-point tensor with the shape and device of ``ref``."""
    check_float_tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    check_same_device(name, t, ref_name, ref)
    return t


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def per_sample(name: str, value: Scalar, batch: int, device: torch.device, *, dtype=None) -> torch.Tensor:
    """A Python number or a ``[B]`` (or 0-d) tensor as a contiguous ``[B]`` tensor of ``dtype`` on ``device``.

    Contiguous because kernels index it as ``ptr + b``: a 0-d tensor expanded to ``[B]`` (stride 0)
    or a strided view (a column of a ``[B, T]`` schedule) would otherwise be read out of bounds.
    """
    import torch

    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.dtype not in _float_dtypes():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        elif value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"{name} must be a float or a tensor of shape [{batch}] (one per sample), got shape "
                f"{tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the latents are on {device}")
        return value.to(dtype or torch.float32).contiguous()
    return torch.full((batch,), float(value), dtype=dtype or torch.float32, device=device)


def check_finite(name: str, t: torch.Tensor, *, what: Optional[str] = None) -> None:
    """Raise naming the first non-finite entry (along the batch dimension) of ``t``."""
    # One sum first (NaN and inf propagate through it; ~20x cheaper than isfinite().all() on a CPU);
    # the elementwise look only when the sum is not finite, which finite values can also cause by
    # overflowing.
    import torch

    if bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = bad.reshape(t.shape[0], -1).any(dim=1).nonzero()[0].item() if t.dim() else 0
        raise ValueError(f"{name} has non-finite values (first at sample {index}){'; ' + what if what else ''}")


def check_positive(name: str, value, *, allow_zero: bool = False, allow_none: bool = False) -> Optional[float]:
    """``value`` is a finite real number ``> 0`` (``>= 0`` with ``allow_zero``), or None if allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{' or None' if allow_none else ''}, got {type(value).__name__}")
    value = float(value)
    bound_ok = value >= 0 if allow_zero else value > 0
    if not (bound_ok and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_index_tensor(name: str, t, batch: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``t`` is an integer tensor of shape ``[batch]`` on the device of ``ref`` (ids, labels)."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one per sample), got {tuple(t.shape)}")
    check_same_device(name, t, ref_name, ref)
    return t
