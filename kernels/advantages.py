"""Group-relative advantages as one segmented reduction over any group layout.

The host sorts the samples by group id once (``euphonium.ops.advantages.segment_layout``: device
ops, no sync), so every group is a contiguous run of positions in ``order``. The launch has one
program per (sorted position, block of reward columns); the program at the first position of a
group reduces that group's rows (gathered through ``order``) and writes its advantages back to the
original rows; programs at other positions get an empty row range and do nothing. Group sizes in
GRPO are small (8-32), so the four passes over a group's rows (min/max, scaled sum, scaled centred
squares, write) hit L1/L2; the launch needs neither the number of groups nor their sizes on the host.

With ``GLOBAL_STD`` each group program also reduces its column block over the whole batch: the
same values in every program, in the same order (deterministic, no atomics), at O(groups * B)
reads, which is negligible for RL batch sizes (a few thousand samples).

Sums and squares are taken in power-of-two units of the pool's largest ``|r|`` and ``|d|`` (the
form in ``euphonium.ops.advantages``): exact rescalings, so nothing overflows or underflows for
finite fp32 rewards and ordinary rewards give the bits of the plain formula.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from euphonium.kernels.aot import AOTSpec


@triton.jit
def _load_rows(r_ptr, order_ptr, start, end, o_b, o_k, m_k, K, GATHER: tl.constexpr):
    """Rows at positions ``start .. start + BLOCK_B`` (below ``end``) and the block of columns ``o_k``.

    Positions index ``order`` (``GATHER``: the rows of a group) or the batch directly. Returns the
    values in fp32 (0 where masked), their offsets in ``r`` and the mask.
    """
    o_s = start + o_b
    m_b = o_s < end
    if GATHER:
        o_row = tl.load(order_ptr + o_s, mask=m_b, other=0)
    else:
        o_row = o_s
    m = m_b[:, None] & m_k[None, :]
    p_r = o_row[:, None] * K + o_k[None, :]
    return tl.load(r_ptr + p_r, mask=m, other=0.0).to(tl.float32), p_r, m


# Scales are powers of two clamped to [2^-100, 2^100] (see ``euphonium.ops.advantages``): both
# the scale and its inverse are normal fp32 numbers, so multiplying by them is exact.
_SCALE_MIN = tl.constexpr(2.0**-100)
_SCALE_MAX = tl.constexpr(2.0**100)


@triton.jit
def _pow2_scale(x):
    """``(p, 1 / p)``: the power of two at or below ``x`` clamped to ``[2^-100, 2^100]`` (exact bits)."""
    x = tl.minimum(tl.maximum(x, _SCALE_MIN), _SCALE_MAX)
    bits = x.to(tl.int32, bitcast=True) & 0x7F800000
    # The exponent field of 1 / 2^(E - 127) is 254 - E.
    return bits.to(tl.float32, bitcast=True), ((254 << 23) - bits).to(tl.float32, bitcast=True)


@triton.jit
def _group_advantages_kernel(
    r_ptr,
    out_ptr,
    order_ptr,
    seg_end_ptr,
    B,
    K,
    eps,
    clip,
    UNBIASED: tl.constexpr,
    GLOBAL_STD: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    i_s = tl.program_id(0)
    i_k = tl.program_id(1)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    o_b = tl.arange(0, BLOCK_B)
    seg_end = tl.load(seg_end_ptr + i_s)
    n = tl.maximum(seg_end - i_s, 1).to(tl.float32)

    # Pass 1: min and max of the group (fp32 accumulators, reduced once at the end).
    b_min = tl.full([BLOCK_B, BLOCK_K], float("inf"), dtype=tl.float32)
    b_max = tl.full([BLOCK_B, BLOCK_K], float("-inf"), dtype=tl.float32)
    for start in range(i_s, seg_end, BLOCK_B):
        b_r, _, m = _load_rows(r_ptr, order_ptr, start, seg_end, o_b, o_k, m_k, K, True)
        b_min = tl.minimum(b_min, tl.where(m, b_r, float("inf")))
        b_max = tl.maximum(b_max, tl.where(m, b_r, float("-inf")))
    lo = tl.min(b_min, axis=0)
    hi = tl.max(b_max, axis=0)

    if GLOBAL_STD:
        # Only group programs reduce the batch: the others get an empty range. One scale for the
        # column, so that the group means and the global std are in the same units.
        n_rows = tl.where(seg_end > i_s, B, 0)
        b_gmin = tl.full([BLOCK_B, BLOCK_K], float("inf"), dtype=tl.float32)
        b_gmax = tl.full([BLOCK_B, BLOCK_K], float("-inf"), dtype=tl.float32)
        for start in range(0, n_rows, BLOCK_B):
            b_r, _, m = _load_rows(r_ptr, order_ptr, start, n_rows, o_b, o_k, m_k, K, False)
            b_gmin = tl.minimum(b_gmin, tl.where(m, b_r, float("inf")))
            b_gmax = tl.maximum(b_gmax, tl.where(m, b_r, float("-inf")))
        g_lo = tl.min(b_gmin, axis=0)
        g_hi = tl.max(b_gmax, axis=0)
        scale, inv = _pow2_scale(tl.maximum(tl.abs(g_lo), tl.abs(g_hi)))
        b_gsum = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK_B):
            b_r, _, _ = _load_rows(r_ptr, order_ptr, start, n_rows, o_b, o_k, m_k, K, False)
            b_gsum += b_r * inv[None, :]
        g_mean = tl.sum(b_gsum, axis=0) / B
        d_scale, d_inv = _pow2_scale(tl.maximum(g_hi * inv - g_mean, g_mean - g_lo * inv))
        b_gsq = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK_B):
            b_r, _, m = _load_rows(r_ptr, order_ptr, start, n_rows, o_b, o_k, m_k, K, False)
            b_d = (b_r * inv[None, :] - g_mean[None, :]) * d_inv[None, :]
            b_gsq += tl.where(m, b_d * b_d, 0.0)
        if UNBIASED:
            var = tl.sum(b_gsq, axis=0) / tl.maximum(B - 1, 1).to(tl.float32)
        else:
            var = tl.sum(b_gsq, axis=0) / B
    else:
        scale, inv = _pow2_scale(tl.maximum(tl.abs(lo), tl.abs(hi)))

    # Pass 2: the group mean of u = r / scale.
    b_sum = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for start in range(i_s, seg_end, BLOCK_B):
        b_r, _, _ = _load_rows(r_ptr, order_ptr, start, seg_end, o_b, o_k, m_k, K, True)
        b_sum += b_r * inv[None, :]
    mean = tl.sum(b_sum, axis=0) / n
    # All equal in the scaled units (exactly the raw values' equality unless they underflow).
    equal = hi * inv == lo * inv

    if not GLOBAL_STD:
        # Pass 3: centred sum of squares, the deviations scaled by max |d| first (two-pass variance:
        # no cancellation for large rewards, no overflow or underflow in the squares).
        d_scale, d_inv = _pow2_scale(tl.maximum(hi * inv - mean, mean - lo * inv))
        b_sq = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        for start in range(i_s, seg_end, BLOCK_B):
            b_r, _, m = _load_rows(r_ptr, order_ptr, start, seg_end, o_b, o_k, m_k, K, True)
            b_d = (b_r * inv[None, :] - mean[None, :]) * d_inv[None, :]
            b_sq += tl.where(m, b_d * b_d, 0.0)
        if UNBIASED:
            var = tl.sum(b_sq, axis=0) / tl.maximum(n - 1.0, 1.0)
        else:
            var = tl.sum(b_sq, axis=0) / n
    inv_std = 1.0 / (d_scale * tl.sqrt(var) + eps * inv)

    # Pass 4: write the advantages back to the samples' original rows.
    for start in range(i_s, seg_end, BLOCK_B):
        b_r, p_r, m = _load_rows(r_ptr, order_ptr, start, seg_end, o_b, o_k, m_k, K, True)
        b_a = tl.where(equal[None, :], 0.0, (b_r * inv[None, :] - mean[None, :]) * inv_std[None, :])
        if CLIP:
            b_a = tl.minimum(tl.maximum(b_a, -clip), clip)
        tl.store(out_ptr + p_r, b_a.to(out_ptr.dtype.element_ty), mask=m)


# Same formula: ops.advantages.group_advantages_ref (spec), ops.advantages.group_advantages_contiguous (PyTorch path).
def group_advantages_forward(
    rewards: torch.Tensor,
    order: torch.Tensor,
    seg_end: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
    clip: Optional[float] = None,
    max_group: Optional[int] = None,
) -> torch.Tensor:
    """Launch the kernel on ``rewards [B, K]`` with the layout of ``segment_layout``.

    ``max_group`` (the group size, when known) sizes the row block; otherwise 32 rows per step.
    """
    rewards = rewards.contiguous()
    batch, cols = rewards.shape
    if rewards.numel() >= 2**31:
        raise ValueError(
            f"rewards has {rewards.numel()} elements; the kernel indexes them with 32-bit offsets (< 2^31)"
        )
    out = torch.empty((batch, cols), dtype=out_dtype, device=rewards.device)
    if cols == 0:
        return out
    block_k = min(triton.next_power_of_2(cols), 32)
    block_b = min(triton.next_power_of_2(max_group or 32), max(1024 // block_k, 16), 64)
    grid = (batch, triton.cdiv(cols, block_k))
    _group_advantages_kernel[grid](
        rewards,
        out,
        order,
        seg_end,
        batch,
        cols,
        float(eps),
        float(clip if clip is not None else 0.0),
        UNBIASED=unbiased,
        GLOBAL_STD=global_std,
        CLIP=clip is not None,
        BLOCK_B=block_b,
        BLOCK_K=block_k,
        num_warps=1 if block_b * block_k <= 256 else 4,
    )
    return out


_SIG = {
    "r_ptr": "*fp32",
    "out_ptr": "*fp32",
    "order_ptr": "*i32",
    "seg_end_ptr": "*i32",
    "B": "i32",
    "K": "i32",
    "eps": "fp32",
    "clip": "fp32",
}

AOT_SPECS = [
    AOTSpec(
        "group_advantages_outcome",
        _group_advantages_kernel,
        _SIG,
        dict(UNBIASED=True, GLOBAL_STD=False, CLIP=False, BLOCK_B=32, BLOCK_K=1),
        num_warps=1,
    ),
    AOTSpec(
        "group_advantages_process_global_clip",
        _group_advantages_kernel,
        {**_SIG, "r_ptr": "*bf16"},
        dict(UNBIASED=False, GLOBAL_STD=True, CLIP=True, BLOCK_B=32, BLOCK_K=16),
        num_warps=4,
    ),
]
