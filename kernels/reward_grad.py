"""Per-sample L2 normalisation and norm clipping of a gradient ``[B, N]``.

Guidance batches are small (B of 1-16 per GPU) with large samples (video latents, 10^5-10^6
elements), so one program per sample would leave most of the GPU idle. The work is split over a
``(sample, chunk)`` grid in two launches: ``_sum_sq_kernel`` writes each chunk's power-of-two
scale ``p_c`` (at or below its ``max |g|``) and fp32 sum of ``(g / p_c)^2`` to ``partial[b, :, chunk]``;
``_scale_kernel`` combines its sample's partials in a fixed order (every program of a sample gets
the same bits: deterministic, no atomics) as ``||g|| = P sqrt(sum_c (p_c / P)^2 s_c)``, ``P = max_c p_c``,
and writes ``(g / P) * k`` for its chunk in the input dtype, ``k`` the scale in units of ``P``. A
chunk is ``iters`` blocks, sized so that a sample has at most ``MAX_CHUNKS`` partials.

The powers of two (clamped to ``[2^-100, 2^100]``) make every rescaling exact: a gradient whose
squares stay in fp32's range gives the bits of the plain ``g / ||g||``, and tiny (``1e-22``,
subnormal) or huge gradients neither underflow nor overflow.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from euphonium.kernels.advantages import _pow2_scale
from euphonium.kernels.aot import AOTSpec

MIN_BLOCK = 128
MAX_BLOCK = 1024
MAX_CHUNKS = 256
NUM_WARPS = 4


@triton.jit
def _chunk_offsets(i_c, it, iters, BLOCK: tl.constexpr):
    # Written as a product with BLOCK so that the compiler sees 16-aligned offsets (128-bit access).
    return (i_c.to(tl.int64) * iters + it) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _sum_sq_kernel(g_ptr, partial_ptr, N, n_chunks, iters, BLOCK: tl.constexpr):
    i_b = tl.program_id(0)
    i_c = tl.program_id(1)
    p_g = g_ptr + i_b.to(tl.int64) * N
    # Pass 1: the chunk's max |g| (NaN-free: the op checks the gradient is finite first).
    b_max = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(0, iters):
        o_n = _chunk_offsets(i_c, it, iters, BLOCK)
        b_g = tl.load(p_g + o_n, mask=o_n < N, other=0.0).to(tl.float32)
        b_max = tl.maximum(b_max, tl.abs(b_g))
    scale, inv = _pow2_scale(tl.max(b_max, axis=0))
    # Pass 2 (the chunk again, from cache): the sum of squares in units of the scale.
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(0, iters):
        o_n = _chunk_offsets(i_c, it, iters, BLOCK)
        b_g = tl.load(p_g + o_n, mask=o_n < N, other=0.0).to(tl.float32) * inv
        b_acc += b_g * b_g
    p_out = partial_ptr + i_b * 2 * n_chunks + i_c
    tl.store(p_out, scale)
    tl.store(p_out + n_chunks, tl.sum(b_acc, axis=0))


@triton.jit
def _scale_kernel(
    g_ptr,
    out_ptr,
    partial_ptr,
    N,
    n_chunks,
    iters,
    max_norm,
    NORMALIZE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_c = tl.program_id(1)
    o_r = tl.arange(0, REDUCE_BLOCK)
    p_part = partial_ptr + i_b * 2 * n_chunks + o_r
    b_scale = tl.load(p_part, mask=o_r < n_chunks, other=0.0)
    b_sum = tl.load(p_part + n_chunks, mask=o_r < n_chunks, other=0.0)
    scale, inv = _pow2_scale(tl.max(b_scale, axis=0))
    b_rel = b_scale * inv  # p_c / P: exact; below 2^-75 the chunk's share rounds to 0, as it should
    norm = tl.sqrt(tl.sum(b_rel * b_rel * b_sum, axis=0))  # ||g|| / P
    # The output is (g / P) * k: k = P leaves g as it is.
    k = scale
    if NORMALIZE:
        # A zero gradient stays zero (no direction to normalise).
        k = tl.where(norm > 0.0, 1.0 / tl.maximum(norm, 1e-30), 0.0)
        if CLIP:
            k = k * tl.minimum(1.0, max_norm / tl.maximum(norm * k, 1e-30))
    elif CLIP:
        # min(1, c / ||g||) in units of P: min(P, c / (||g|| / P)); a zero gradient keeps k = P.
        k = tl.minimum(scale, max_norm / norm)
    offset = i_b.to(tl.int64) * N
    for it in range(0, iters):
        o_n = _chunk_offsets(i_c, it, iters, BLOCK)
        m = o_n < N
        b_g = tl.load(g_ptr + offset + o_n, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offset + o_n, ((b_g * inv) * k).to(out_ptr.dtype.element_ty), mask=m)


# Same formula: ops.reward_grad.scale_by_norm_ref (spec), ops.reward_grad.scale_by_norm_torch (PyTorch path).
def scale_by_norm(
    grad: torch.Tensor, *, normalize: bool, max_norm: Optional[float], inplace: bool = False
) -> torch.Tensor:
    """``grad [B, ...]`` with each sample scaled to unit norm and/or clipped to ``max_norm``.

    ``n_b = ||g_b||_2`` (fp32, in power-of-two units of ``max |g_b|``); ``normalize`` gives
    ``g_b / n_b`` (0 stays 0), then ``max_norm`` multiplies by ``min(1, max_norm / ||.||)``. Returns
    a new tensor of the dtype of ``grad``, or ``grad`` itself with ``inplace`` (every program reads
    its chunk before writing it, and the norms are complete before the second launch reads them, so
    writing over the input is safe).
    """
    if inplace and not grad.is_contiguous():
        raise ValueError("scale_by_norm(inplace=True) needs a contiguous grad")
    grad = grad.contiguous()
    batch = grad.shape[0]
    n = grad.numel() // batch
    out = grad if inplace else torch.empty_like(grad)
    if n == 0:
        return out
    block = min(max(triton.next_power_of_2(n), MIN_BLOCK), MAX_BLOCK)
    iters = triton.cdiv(n, block * MAX_CHUNKS)
    n_chunks = triton.cdiv(n, block * iters)
    partial = torch.empty((batch, 2, n_chunks), dtype=torch.float32, device=grad.device)
    grid = (batch, n_chunks)
    _sum_sq_kernel[grid](grad, partial, n, n_chunks, iters, BLOCK=block, num_warps=NUM_WARPS)
    _scale_kernel[grid](
        grad,
        out,
        partial,
        n,
        n_chunks,
        iters,
        float(max_norm if max_norm is not None else 0.0),
        NORMALIZE=normalize,
        CLIP=max_norm is not None,
        BLOCK=block,
        REDUCE_BLOCK=triton.next_power_of_2(n_chunks),
        num_warps=NUM_WARPS,
    )
    return out


def _aot_specs():
    specs = []
    for tag, ty in (("fp32", "*fp32"), ("bf16", "*bf16")):
        specs.append(
            AOTSpec(
                f"reward_grad_sum_sq_{tag}",
                _sum_sq_kernel,
                {"g_ptr": ty, "partial_ptr": "*fp32", "N": "i32", "n_chunks": "i32", "iters": "i32"},
                dict(BLOCK=MAX_BLOCK),
                aligned=("g_ptr", "N"),
                num_warps=NUM_WARPS,
            )
        )
    scale_sig = {
        "g_ptr": "*fp32",
        "out_ptr": "*fp32",
        "partial_ptr": "*fp32",
        "N": "i32",
        "n_chunks": "i32",
        "iters": "i32",
        "max_norm": "fp32",
    }
    specs.append(
        AOTSpec(
            "reward_grad_normalize_fp32",
            _scale_kernel,
            scale_sig,
            dict(NORMALIZE=True, CLIP=False, BLOCK=MAX_BLOCK, REDUCE_BLOCK=MAX_CHUNKS),
            aligned=("g_ptr", "out_ptr", "N"),
            num_warps=NUM_WARPS,
        )
    )
    specs.append(
        AOTSpec(
            "reward_grad_normalize_clip_bf16",
            _scale_kernel,
            {**scale_sig, "g_ptr": "*bf16", "out_ptr": "*bf16"},
            dict(NORMALIZE=True, CLIP=True, BLOCK=MAX_BLOCK, REDUCE_BLOCK=MAX_CHUNKS),
            aligned=("g_ptr", "out_ptr", "N"),
            num_warps=NUM_WARPS,
        )
    )
    return specs


AOT_SPECS = _aot_specs()
