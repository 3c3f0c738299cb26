"""Group-relative advantages (GRPO): rewards normalised within the group of samples of one prompt.

For a group ``G`` of samples (one prompt) and each reward column ``k``::

    A[b, k] = (r[b, k] - mean_{j in G} r[j, k]) / (std_{j in G} r[j, k] + eps)

``std`` is the unbiased (``n - 1``) or population (``n``) standard deviation of the group, or with
``global_std=True`` (Flow-GRPO's option) of the whole column over the batch (the mean stays per
group). A group whose rewards in a column are all equal (a single member included) gives exactly
zero advantage there, never NaN. ``clip`` clamps the result to ``[-clip, clip]``.

Every path (reference, PyTorch, Triton) evaluates the same overflow- and underflow-free form: with
``s`` the power of two at or below the pool's largest ``|r|`` (the group, or the column with
``global_std``) and ``u = r / s``, ``d = u - mean_group(u)``, ``t`` the power of two at or below
``max |d|`` of the pool::

    std_u = t * sqrt(sum_pool((d / t)^2) / (n - 1 or n)),   A = d / (std_u + eps / s)

(both scales clamped to ``[2^-100, 2^100]``, ``[2^-1000, 2^1000]`` in float64). Scaling by powers
of two is exact, so for rewards whose sums and squares stay in range this gives the same bits as
the plain formula, and for any finite rewards (``[1e20, 2e20]``, ``[3e38, -3e38]``, ``1e-40``) it
neither overflows nor underflows.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from euphonium._checks import (
    check_bool,
    check_finite,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_positive,
)
from euphonium.ops._backend import resolve


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """Group-relative advantages ``(r - mean_group(r)) / (std_group(r) + eps)``, per reward column.

    Args:
        rewards: ``[B]`` (one outcome reward per sample) or ``[B, K]`` (e.g. a process reward per
            denoising step; each column is normalised within its groups independently). Any float
            dtype; must be finite.
        group_size: groups are contiguous blocks of ``group_size`` samples (``B % group_size == 0``).
        group_ids: or an integer ``[B]`` tensor: samples with equal ids form a group, in any order and
            of any sizes. Exactly one of ``group_size`` / ``group_ids`` is given.
        eps: added to the standard deviation.
        unbiased: ``n - 1`` (True) or ``n`` (False) in the variance; a group of one has std 0.
        global_std: divide by the std of the whole column over the batch instead of the group's.
        clip: if given, clamp the advantages to ``[-clip, clip]``.

    Returns:
        Advantages of the shape of ``rewards`` (not differentiable: they are constants of the
        GRPO loss), float32 (float64 for float64 rewards). A group whose
        rewards in a column are all equal gets exactly 0 there. On CUDA one Triton launch computes
        every group and column (fp32 accumulation); on CPU contiguous groups (``group_size``) are
        reduced as a ``[B / group_size, group_size, K]`` view (``group_advantages_contiguous``) and
        ``group_ids`` go through the eager reference.
    """
    check_float_tensor("rewards", rewards)
    if rewards.dim() > 2:
        raise ValueError(f"rewards must be [B] or [B, K], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, torch.Tensor):
        raise TypeError("group_size must be an int; pass a tensor of per-sample group ids as group_ids=")
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_ids (a [B] tensor of ids)")
    batch = rewards.shape[0]
    if group_size is not None:
        _check_group_size(group_size, batch)
    else:
        check_index_tensor("group_ids", group_ids, batch, "rewards", rewards)
    eps = check_positive("eps", eps, allow_zero=True)
    clip = check_positive("clip", clip, allow_none=True)
    check_bool("unbiased", unbiased)
    check_bool("global_std", global_std)
    check_finite("rewards", rewards)
    rewards = rewards.detach()  # advantages are constants of the policy-gradient loss

    backend = resolve(rewards.device, torch_path=True, kernels="advantages")
    if backend == "torch" and group_size is not None:
        return group_advantages_contiguous(
            rewards, group_size, eps=eps, unbiased=unbiased, global_std=global_std, clip=clip
        )
    if backend != "triton":
        ids = group_ids if group_ids is not None else contiguous_group_ids(batch, group_size, rewards.device)
        return group_advantages_ref(rewards, ids, eps=eps, unbiased=unbiased, global_std=global_std, clip=clip)

    from euphonium.kernels.advantages import group_advantages_forward

    order, seg_end = segment_layout(batch, group_size=group_size, group_ids=group_ids, device=rewards.device)
    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    adv = group_advantages_forward(
        rewards.reshape(batch, -1),
        order,
        seg_end,
        out_dtype=out_dtype,
        eps=eps,
        unbiased=unbiased,
        global_std=global_std,
        clip=clip,
        max_group=group_size,
    )
    return adv.reshape(rewards.shape)


def _check_group_size(group_size, batch: int) -> None:
    check_int("group_size", group_size)
    if group_size < 1 or batch % group_size != 0:
        raise ValueError(f"group_size must be a positive divisor of the batch size {batch}, got {group_size}")


def contiguous_group_ids(batch: int, group_size: int, device) -> torch.Tensor:
    """``[B]`` int64 ids of contiguous groups: ``b // group_size``."""
    return torch.div(torch.arange(batch, device=device), group_size, rounding_mode="floor")


def segment_layout(
    batch: int, *, group_size: Optional[int] = None, group_ids: Optional[torch.Tensor] = None, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The layout the segmented-reduction kernel reads, built with device ops only (no host sync).

    Returns ``order`` (int32 ``[B]``: the sample at each position once sorted by group id, stably)
    and ``seg_end`` (int32 ``[B]``): for a position ``i`` where a group starts, the position one
    past that group's last member; ``i`` itself elsewhere, so that the program of a position that
    starts no group has an empty range of rows.
    """
    pos = torch.arange(batch, device=device, dtype=torch.int64)
    if group_ids is None:
        starts = pos % group_size == 0
        seg_end = torch.where(starts, pos + group_size, pos)
        return pos.to(torch.int32), seg_end.to(torch.int32)
    sorted_ids, order = torch.sort(group_ids.to(torch.int64), stable=True)
    is_last = torch.ones(batch, dtype=torch.bool, device=device)
    is_last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    is_first = torch.ones_like(is_last)
    is_first[1:] = is_last[:-1]
    # The end of the group containing position i is the first group-last position at or after i.
    end_if_last = torch.where(is_last, pos + 1, torch.full_like(pos, batch))
    group_end = end_if_last.flip(0).cummin(0).values.flip(0)
    seg_end = torch.where(is_first, group_end, pos)
    return order.to(torch.int32), seg_end.to(torch.int32)


def pow2_scale(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(p, 1 / p)``: the power of two at or below ``x >= 0``, ``x`` clamped to ``[2^-100, 2^100]``
    (``[2^-1000, 2^1000]`` in float64). Multiplying by either is exact (no rounding) for values
    within the dtype's normal range; ``x / p`` lies in ``[1, 2)`` when ``x`` is within the clamp."""
    bound = 2.0 ** (1000 if x.dtype == torch.float64 else 100)
    x = x.clamp(1 / bound, bound)
    mantissa, _ = torch.frexp(x)  # x = mantissa * 2^e, mantissa in [0.5, 1): x / (2 mantissa) = 2^(e-1) exactly
    p = x / (mantissa * 2)
    return p, 1 / p


# Same formula: ops.advantages.group_advantages_ref (spec), kernels.advantages.group_advantages_forward (Triton).
def group_advantages_contiguous(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """:func:`group_advantages` of contiguous groups (the PyTorch path; inputs validated by it).

    The groups are a ``[B / group_size, group_size, K]`` view of the rewards, so every statistic is
    one reduction over the group dimension: no group ids, sort or scatter. Same arithmetic as the
    reference (float32, or float64 for float64 rewards; the scaled two-pass form of the module docstring;
    all-equal groups exactly 0).
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    batch = rewards.shape[0]
    r = rewards.reshape(batch // group_size, group_size, -1).to(dtype)
    lo, hi = torch.aminmax(r, dim=1, keepdim=True)
    if global_std:
        flat = r.reshape(batch, -1)
        g_lo, g_hi = torch.aminmax(flat, dim=0, keepdim=True)
        _, inv = pow2_scale(torch.maximum(g_lo.abs(), g_hi.abs()))
        u = flat * inv
        g_mean = u.mean(0, keepdim=True)
        d_scale, d_inv = pow2_scale(torch.maximum(g_hi * inv - g_mean, g_mean - g_lo * inv))
        denom = batch - 1 if unbiased and batch > 1 else batch
        std = d_scale * (((u - g_mean) * d_inv).square().sum(0) / denom).sqrt()
        inv = inv.unsqueeze(0)
    else:
        _, inv = pow2_scale(torch.maximum(lo.abs(), hi.abs()))
    u = r * inv
    mean = u.mean(1, keepdim=True)
    centred = u - mean
    if not global_std:
        d_scale, d_inv = pow2_scale(torch.maximum(hi * inv - mean, mean - lo * inv))
        denom = max(group_size - 1, 1) if unbiased else group_size
        std = d_scale * ((centred * d_inv).square().sum(1, keepdim=True) / denom).sqrt()
    adv = centred / (std + eps * inv)
    # Rounding in the mean would turn an all-equal group into +-ulp / eps: force the exact zero.
    adv = adv.masked_fill_(hi * inv == lo * inv, 0.0)
    if clip is not None:
        adv = adv.clamp_(-clip, clip)
    return adv.reshape(rewards.shape)


# Same formula: ops.advantages.group_advantages_contiguous (PyTorch), kernels.advantages.group_advantages_forward.
def group_advantages_ref(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """Eager reference of :func:`group_advantages` (the spec); ``group_ids`` is an integer ``[B]``.

    Computes in float32 (float64 for float64 rewards) with the scaled two-pass form of the module docstring.
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    batch = rewards.shape[0]
    r = rewards.reshape(batch, -1).to(dtype)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups, n_cols = counts.numel(), r.shape[1]
    n = counts.to(dtype).unsqueeze(1)

    index = inverse.unsqueeze(1).expand(-1, n_cols)
    hi = torch.full((n_groups, n_cols), -torch.inf, dtype=dtype, device=r.device)
    lo = torch.full((n_groups, n_cols), torch.inf, dtype=dtype, device=r.device)
    hi = hi.scatter_reduce(0, index, r, reduce="amax")
    lo = lo.scatter_reduce(0, index, r, reduce="amin")
    if global_std:
        # One scale for the column: the group means and the global std in the same units.
        g_lo, g_hi = r.amin(0, keepdim=True), r.amax(0, keepdim=True)
        _, inv = pow2_scale(torch.maximum(g_lo.abs(), g_hi.abs()))
        u = r * inv
        g_mean = u.mean(0, keepdim=True)
        d_scale, d_inv = pow2_scale(torch.maximum(g_hi * inv - g_mean, g_mean - g_lo * inv))
        denom = batch - 1 if unbiased and batch > 1 else batch
        std = d_scale * (((u - g_mean) * d_inv).square().sum(0, keepdim=True) / denom).sqrt()
        inv = inv.expand(n_groups, n_cols)
    else:
        _, inv = pow2_scale(torch.maximum(lo.abs(), hi.abs()))
        u = r * inv[inverse]
    mean = torch.zeros(n_groups, n_cols, dtype=dtype, device=r.device).index_add_(0, inverse, u) / n
    centred = u - mean[inverse]
    if not global_std:
        d_scale, d_inv = pow2_scale(torch.maximum(hi * inv - mean, mean - lo * inv))
        sq = torch.zeros(n_groups, n_cols, dtype=dtype, device=r.device)
        sq = sq.index_add_(0, inverse, (centred * d_inv[inverse]).square())
        std = (d_scale * (sq / ((n - 1).clamp(min=1) if unbiased else n)).sqrt())[inverse]
    adv = centred / (std + eps * inv[inverse])
    # Rounding in the mean would turn an all-equal group into +-ulp / eps: force the exact zero.
    adv = torch.where((hi * inv == lo * inv)[inverse], torch.zeros_like(adv), adv)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.reshape(rewards.shape)
