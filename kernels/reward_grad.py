"""Per-sample L2 normalisation and norm clipping of a gradient ``[B, N]`` in one launch.

One program per sample: a first pass accumulates ``sum(g^2)`` in fp32, a second writes
``g * scale`` in the input dtype. The norm is reduced in a fixed order (no atomics), so the result
is deterministic. Guidance batches are small (B of 1-16 per GPU) with large samples (video
latents, 10^5-10^6 elements); each program streams its sample at 128-bit width.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from euphonium.kernels.aot import AOTSpec


@triton.jit
def _scale_by_norm_kernel(
    g_ptr, out_ptr, N, max_norm,
    NORMALIZE: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    i_b = tl.program_id(0)
    base = i_b.to(tl.int64) * N
    o = tl.arange(0, BLOCK)
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        m = start + o < N
        b_g = tl.load(g_ptr + base + start + o, mask=m, other=0.0).to(tl.float32)
        b_acc += b_g * b_g
    norm = tl.sqrt(tl.sum(b_acc, axis=0))
    scale = tl.full([], 1.0, dtype=tl.float32)
    if NORMALIZE:
        # A zero gradient stays zero (no direction to normalise).
        scale = tl.where(norm > 0.0, 1.0 / tl.maximum(norm, 1e-30), 0.0)
        norm = norm * scale
    if CLIP:
        scale = scale * tl.minimum(1.0, max_norm / tl.maximum(norm, 1e-30))
    for start in range(0, N, BLOCK):
        m = start + o < N
        b_g = tl.load(g_ptr + base + start + o, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + start + o, (b_g * scale).to(out_ptr.dtype.element_ty), mask=m)


def scale_by_norm(grad: torch.Tensor, *, normalize: bool, max_norm: Optional[float]) -> torch.Tensor:
    """``grad [B, ...]`` with each sample scaled to unit norm and/or clipped to ``max_norm``."""
    grad = grad.contiguous()
    batch = grad.shape[0]
    n = grad.numel() // batch
    out = torch.empty_like(grad)
    block = min(max(triton.next_power_of_2(n), 128), 4096)
    _scale_by_norm_kernel[(batch,)](
        grad, out, n, float(max_norm if max_norm is not None else 0.0),
        NORMALIZE=normalize, CLIP=max_norm is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return out


_SIG = {"g_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "max_norm": "fp32"}
_ALIGNED = ("g_ptr", "out_ptr", "N")

AOT_SPECS = [
    AOTSpec("reward_grad_normalize_fp32", _scale_by_norm_kernel, _SIG,
            dict(NORMALIZE=True, CLIP=False, BLOCK=4096), aligned=_ALIGNED, num_warps=8),
    AOTSpec("reward_grad_normalize_clip_bf16", _scale_by_norm_kernel, {**_SIG, "g_ptr": "*bf16", "out_ptr": "*bf16"},
            dict(NORMALIZE=True, CLIP=True, BLOCK=4096), aligned=_ALIGNED, num_warps=8),
]
