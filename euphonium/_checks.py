"""Input validation shared by the package: every error names the argument and what was expected."""

from __future__ import annotations

from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Scalar = Union[float, int, torch.Tensor]


def check_float_tensor(name: str, t, *, min_dim: int = 1) -> torch.Tensor:
    """``t`` is a floating-point tensor with at least ``min_dim`` dimensions and a non-empty batch."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
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


def per_sample(name: str, value: Scalar, batch: int, device: torch.device, *, dtype=torch.float32) -> torch.Tensor:
    """A Python number or a ``[B]`` (or 0-d) tensor as a contiguous ``[B]`` tensor of ``dtype`` on ``device``.

    Contiguous because kernels index it as ``ptr + b``: a 0-d tensor expanded to ``[B]`` (stride 0)
    or a strided view (a column of a ``[B, T]`` schedule) would otherwise be read out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES:
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
        return value.to(dtype).contiguous()
    return torch.full((batch,), float(value), dtype=dtype, device=device)


def check_finite(name: str, t: torch.Tensor, *, what: Optional[str] = None) -> None:
    """Raise naming the first non-finite entry (along the batch dimension) of ``t``."""
    # One sum first (NaN and inf propagate through it; ~20x cheaper than isfinite().all() on a CPU);
    # the elementwise look only when the sum is not finite, which finite values can also cause by
    # overflowing.
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
    if not (bound_ok and value < float("inf")):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_index_tensor(name: str, t, batch: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``t`` is an integer tensor of shape ``[batch]`` on the device of ``ref`` (ids, labels)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one per sample), got {tuple(t.shape)}")
    check_same_device(name, t, ref_name, ref)
    return t
