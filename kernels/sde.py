"""Fused Triton kernels for the guided SDE step and the training log-prob (DESIGN.md section 2).

Layout: the latents are ``[B, N]`` row-major (``N`` elements per sample); the grid is one program
per ``(sample, block of BLOCK elements)``, so ``sigma``, ``sigma_next`` and the guidance scale are
per-program scalars and every schedule coefficient is computed once per program. Each program reads
its block once (``x``, ``v``, optional ``reward_grad``, optional noise or ``x_next``), writes its
outputs and one fp32 partial sum of squares to ``partial[b, block]``; ``_finalize_kernel`` then
reduces each row of partials in a fixed order (no float atomics) and adds the constant terms.

Bit-identical log-probs between the step (rollout) and the log-prob kernel (training) rest on:
the same ``@triton.jit`` helpers for the coefficients, the mean and the squared residual; the block
partition depending on ``N`` only; a block sum in a fixed pairwise order (``_pairwise_sum``) that
does not depend on the register layout the compiler picks; the same finalize code; and FP
contraction disabled at launch (``enable_fp_fusion=False``) with the intended FMAs written
explicitly, so that the compiler cannot contract the two kernels' arithmetic differently.

All arithmetic is fp32 whatever the storage dtype. Noise, when not given, is ``tl.randn(seed, i)``
at the flat element index ``i = b * N + n`` (Philox4x32-10).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from euphonium.kernels.aot import AOTSpec

SCHEDULE_IDS = {"flow_grpo": 0, "dance_grpo": 1, "cps": 2, "ode": 3}
_FLOW_GRPO: tl.constexpr = tl.constexpr(0)
_DANCE_GRPO: tl.constexpr = tl.constexpr(1)
_CPS: tl.constexpr = tl.constexpr(2)
_ODE: tl.constexpr = tl.constexpr(3)
_HALF_LOG_2PI: tl.constexpr = tl.constexpr(0.5 * math.log(2 * math.pi))

MAX_BLOCK = 2048
MIN_BLOCK = 32
REDUCE_BLOCK = 256
NUM_WARPS = 8
# Flat element offsets beyond this need 64-bit index arithmetic (the INT64 variant).
INDEX32_LIMIT = 2**31
# Explicit FMAs only: the step and log-prob kernels must round the shared arithmetic identically.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


# ----------------------------------------------------------------------------------------------
# Shared helpers (inlined into every kernel: one definition of each formula).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _coefficients(sigma, sigma_next, scale, sigma_max, SCHEDULE: tl.constexpr):
    """Per-sample ``(a_x, k, var)``: ``mean = a_x * x + k * v`` and ``std^2 = var``.

    ``scale`` is ``a`` (flow_grpo), ``eta`` (dance_grpo) or ``sin(a * pi / 2)`` (cps).
    """
    sigma = tl.cast(sigma, tl.float32)
    sigma_next = tl.cast(sigma_next, tl.float32)
    scale = tl.cast(scale, tl.float32)
    if SCHEDULE == _CPS:
        std = sigma_next * scale
        var = std * std
        root = tl.sqrt_rn(tl.maximum(sigma_next * sigma_next - var, 0.0))
        a_x = (1.0 - sigma_next) + root
        k = root * (1.0 - sigma) - sigma * (1.0 - sigma_next)
    else:
        delta = sigma - sigma_next
        if SCHEDULE == _FLOW_GRPO:
            den = tl.where(sigma == 1.0, tl.cast(sigma_max, tl.float32), sigma)
            s2 = tl.div_rn(scale * scale * sigma, 1.0 - den)
        elif SCHEDULE == _DANCE_GRPO:
            s2 = scale * scale
        else:
            s2 = scale * 0.0
        h = tl.div_rn(s2 * delta, 2.0 * sigma)
        a_x = 1.0 - h
        k = -delta - h * (1.0 - sigma)
        var = s2 * delta
    return a_x, k, var


@triton.jit
def _mean(x, v, a_x, k):
    return tl.fma(a_x, x, k * v)


@triton.jit
def _guided_mean(b_mean, g_ptr, c_ptr, i_b, o_x, m_x):
    """``mean + c * g`` as one FMA: the step's guided mean and the guided log-prob's (forward and backward)."""
    b_g = tl.load(g_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    return tl.fma(tl.load(c_ptr + i_b), b_g, b_mean)


@triton.jit
def _pairwise_sum(t):
    """Sum of a power-of-two block by a fixed binary tree over element indices.

    Every level adds pairs ``(2i, 2i + 1)``: one commutative add per pair, so the bits do not depend
    on which thread holds which element. ``tl.sum`` would reduce in an order set by the layout the
    compiler picks, which can differ between two kernels that load different tensors.
    """
    for _ in tl.static_range(16):
        if t.shape[0] > 1:
            t = tl.sum(tl.reshape(t, [t.shape[0] // 2, 2]), axis=1)
    return tl.sum(t, axis=0)


@triton.jit
def _residual_sq(x_next, m, mask):
    d = x_next - m
    return _pairwise_sum(tl.where(mask, d * d, 0.0))


@triton.jit
def _block_offsets(pid, N, n_blocks, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """Sample index, flat element offsets and mask of program ``pid`` (grid ``B * n_blocks``)."""
    i_b = pid // n_blocks
    i_n = pid - i_b * n_blocks
    if INT64:
        o_n = i_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        o_x = i_b.to(tl.int64) * N + o_n
    else:
        o_n = i_n * BLOCK + tl.arange(0, BLOCK)
        o_x = i_b * N + o_n
    return i_b, o_x, o_n < N


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------


# The seed arrives as two int32 halves and is not specialised on its value, so that every seed runs
# one compiled variant (a Python int would be typed i32 or i64 by magnitude and specialised on 1
# and on divisibility by 16).
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _sde_step_kernel(
    x_ptr,
    v_ptr,
    g_ptr,
    eps_ptr,
    c_ptr,
    sigma_ptr,
    sigma_next_ptr,
    x_next_ptr,
    x0_ptr,
    partial_ptr,
    N,
    n_blocks,
    seed_lo,
    seed_hi,
    scale,
    sigma_max,
    SCHEDULE: tl.constexpr,
    HAS_GUIDANCE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    GUIDED_LOGPROB: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    i_b, o_x, m_x = _block_offsets(pid, N, n_blocks, BLOCK, INT64)
    sigma = tl.load(sigma_ptr + i_b)
    a_x, k, var = _coefficients(sigma, tl.load(sigma_next_ptr + i_b), scale, sigma_max, SCHEDULE)

    b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    tl.store(x0_ptr + o_x, tl.fma(-sigma, b_v, b_x).to(x0_ptr.dtype.element_ty), mask=m_x)
    b_mean = _mean(b_x, b_v, a_x, k)
    b_mean_g = b_mean
    if HAS_GUIDANCE:
        b_mean_g = _guided_mean(b_mean, g_ptr, c_ptr, i_b, o_x, m_x)
    if SCHEDULE == _ODE:
        tl.store(x_next_ptr + o_x, b_mean_g.to(x_next_ptr.dtype.element_ty), mask=m_x)
    else:
        if HAS_NOISE:
            b_eps = tl.load(eps_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        else:
            seed = (seed_hi.to(tl.uint32).to(tl.uint64) << 32) | seed_lo.to(tl.uint32).to(tl.uint64)
            b_eps = tl.randn(seed, o_x)
        # The log-prob is taken at x_next as stored (rounded to the output dtype).
        b_x_next = tl.fma(tl.sqrt_rn(var), b_eps, b_mean_g).to(x_next_ptr.dtype.element_ty)
        tl.store(x_next_ptr + o_x, b_x_next, mask=m_x)
        if GUIDED_LOGPROB:
            b_m = b_mean_g
        else:
            b_m = b_mean
        tl.store(partial_ptr + pid, _residual_sq(b_x_next.to(tl.float32), b_m, m_x))


@triton.jit
def _sde_log_prob_fwd_kernel(
    x_ptr,
    v_ptr,
    x_next_ptr,
    v_ref_ptr,
    g_ptr,
    c_ptr,
    sigma_ptr,
    sigma_next_ptr,
    partial_ptr,
    partial_kl_ptr,
    N,
    n_blocks,
    scale,
    sigma_max,
    SCHEDULE: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_GUIDANCE: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    # HAS_GUIDANCE: the density around the guided mean ``mean + c g`` (the step's GUIDED_LOGPROB).
    pid = tl.program_id(0)
    i_b, o_x, m_x = _block_offsets(pid, N, n_blocks, BLOCK, INT64)
    a_x, k, var = _coefficients(tl.load(sigma_ptr + i_b), tl.load(sigma_next_ptr + i_b), scale, sigma_max, SCHEDULE)

    b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_x_next = tl.load(x_next_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_m = _mean(b_x, b_v, a_x, k)
    if HAS_GUIDANCE:
        b_m = _guided_mean(b_m, g_ptr, c_ptr, i_b, o_x, m_x)
    tl.store(partial_ptr + pid, _residual_sq(b_x_next, b_m, m_x))
    if HAS_REF:
        b_v_ref = tl.load(v_ref_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        tl.store(partial_kl_ptr + pid, _residual_sq(b_v, b_v_ref, m_x))


@triton.jit
def _sde_log_prob_bwd_kernel(
    grad_lp_ptr,
    grad_kl_ptr,
    x_ptr,
    v_ptr,
    x_next_ptr,
    v_ref_ptr,
    g_ptr,
    c_ptr,
    sigma_ptr,
    sigma_next_ptr,
    grad_v_ptr,
    N,
    n_blocks,
    scale,
    sigma_max,
    SCHEDULE: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_GUIDANCE: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64: tl.constexpr,
):
    # d log_prob / d v = k (x_next - m) / (var N);  d kl / d v = k^2 (v - v_ref) / (var N), with
    # m = mean or (HAS_GUIDANCE) mean + c g: c g does not depend on v.
    pid = tl.program_id(0)
    i_b, o_x, m_x = _block_offsets(pid, N, n_blocks, BLOCK, INT64)
    a_x, k, var = _coefficients(tl.load(sigma_ptr + i_b), tl.load(sigma_next_ptr + i_b), scale, sigma_max, SCHEDULE)
    # A deterministic sample (var == 0) has log-prob 0 and no gradient.
    inv = tl.where(var > 0.0, tl.div_rn(1.0, tl.where(var > 0.0, var, 1.0) * N.to(tl.float32)), 0.0)

    b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_x_next = tl.load(x_next_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
    b_m = _mean(b_x, b_v, a_x, k)
    if HAS_GUIDANCE:
        b_m = _guided_mean(b_m, g_ptr, c_ptr, i_b, o_x, m_x)
    b_grad = (tl.load(grad_lp_ptr + i_b) * k * inv) * (b_x_next - b_m)
    if HAS_REF:
        b_v_ref = tl.load(v_ref_ptr + o_x, mask=m_x, other=0.0).to(tl.float32)
        b_grad = tl.fma(tl.load(grad_kl_ptr + i_b) * k * k * inv, b_v - b_v_ref, b_grad)
    tl.store(grad_v_ptr + o_x, b_grad.to(grad_v_ptr.dtype.element_ty), mask=m_x)


@triton.jit
def _row_sum(row_ptr, n_blocks, REDUCE_BLOCK: tl.constexpr):
    """Sum of ``n_blocks`` partials in a fixed order (the same code wherever a log-prob is finalised)."""
    acc = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
    for start in range(0, n_blocks, REDUCE_BLOCK):
        o = start + tl.arange(0, REDUCE_BLOCK)
        acc += tl.load(row_ptr + o, mask=o < n_blocks, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _finalize_kernel(
    partial_ptr,
    partial_kl_ptr,
    sigma_ptr,
    sigma_next_ptr,
    log_prob_ptr,
    kl_ptr,
    N,
    n_blocks,
    scale,
    sigma_max,
    SCHEDULE: tl.constexpr,
    HAS_KL: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,
):
    """Per sample: ``log_prob = -sum / (2 var N) - log(var) / 2 - log(2 pi) / 2`` (0 where var == 0)."""
    i_b = tl.program_id(0)
    a_x, k, var = _coefficients(tl.load(sigma_ptr + i_b), tl.load(sigma_next_ptr + i_b), scale, sigma_max, SCHEDULE)
    total = _row_sum(partial_ptr + i_b.to(tl.int64) * n_blocks, n_blocks, REDUCE_BLOCK)
    stochastic = var > 0.0
    var_n = tl.where(stochastic, var, 1.0) * N.to(tl.float32)
    log_prob = -tl.div_rn(total, 2.0 * var_n) - 0.5 * tl.log(tl.where(stochastic, var, 1.0)) - _HALF_LOG_2PI
    tl.store(log_prob_ptr + i_b, tl.where(stochastic, log_prob, 0.0))
    if HAS_KL:
        total_kl = _row_sum(partial_kl_ptr + i_b.to(tl.int64) * n_blocks, n_blocks, REDUCE_BLOCK)
        kl = tl.div_rn(k * k * total_kl, 2.0 * var_n)
        tl.store(kl_ptr + i_b, tl.where(stochastic, kl, 0.0))


# ----------------------------------------------------------------------------------------------
# Launchers: flatten, allocate, pick the block, launch. Inputs are validated by euphonium.ops.sde.
# ----------------------------------------------------------------------------------------------


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_size(n: int) -> int:
    """Elements per program for ``n`` elements per sample: a function of ``n`` only, so that the
    step and the log-prob kernels partition (and therefore sum) a sample identically."""
    return max(MIN_BLOCK, min(MAX_BLOCK, triton.next_power_of_2(n)))


def _layout(x: torch.Tensor) -> Tuple[int, int, int, int, bool]:
    batch = x.shape[0]
    n = x.numel() // batch
    block = block_size(n)
    n_blocks = triton.cdiv(n, block)
    return batch, n, block, n_blocks, x.numel() >= INDEX32_LIMIT


def _int32_halves(seed: int) -> Tuple[int, int]:
    """A seed in ``[0, 2^64)`` as its low and high 32 bits, each read as a signed int32."""
    return tuple(h - 2**32 if h >= 2**31 else h for h in (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))


def _sigma_max_arg(sigma_max: Optional[float]) -> float:
    # Only read where sigma == 1, which the caller rejects for flow_grpo without sigma_max.
    return 0.5 if sigma_max is None else float(sigma_max)


def _finalize(partial, partial_kl, sigma, sigma_next, n, n_blocks, schedule_id, scale, sigma_max):
    batch = sigma.shape[0]
    log_prob = _alloc((batch,), torch.float32, sigma.device)
    kl = _alloc((batch,), torch.float32, sigma.device) if partial_kl is not None else None
    _finalize_kernel[(batch,)](
        partial,
        partial_kl if partial_kl is not None else partial,
        sigma,
        sigma_next,
        log_prob,
        kl if kl is not None else log_prob,
        n,
        n_blocks,
        scale,
        sigma_max,
        SCHEDULE=schedule_id,
        HAS_KL=partial_kl is not None,
        REDUCE_BLOCK=min(REDUCE_BLOCK, triton.next_power_of_2(n_blocks)),
        num_warps=1,
        **LAUNCH_OPTIONS,
    )
    return log_prob, kl


# Same formula: ops.sde.sde_step_reference (spec), ops._sde_torch.sde_step (PyTorch path).
def sde_step_forward(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    reward_grad: Optional[torch.Tensor],
    guidance_scale: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: int,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    guided_logprob: bool,
):
    """Launch the fused step; returns ``(x_next, log_prob or None, x0_pred)``.

    ``sigma``, ``sigma_next``, ``guidance_scale``: ``[B]`` float32 on the device of ``x``;
    ``scale``: ``a``, ``eta`` or ``sin(a pi / 2)`` of the schedule.
    """
    batch, n, block, n_blocks, int64 = _layout(x)
    schedule_id = SCHEDULE_IDS[schedule]
    x, v = x.contiguous(), v.contiguous()
    has_guidance = reward_grad is not None
    has_noise = noise is not None and schedule != "ode"
    x_next = _alloc(x.shape, x.dtype, x.device)
    x0_pred = _alloc(x.shape, x.dtype, x.device)
    partial = _alloc((batch, n_blocks), torch.float32, x.device) if schedule != "ode" else x_next
    _sde_step_kernel[(batch * n_blocks,)](
        x,
        v,
        reward_grad.contiguous() if has_guidance else x,
        noise.contiguous() if has_noise else x,
        guidance_scale if has_guidance else sigma,
        sigma,
        sigma_next,
        x_next,
        x0_pred,
        partial,
        n,
        n_blocks,
        *_int32_halves(seed),
        scale,
        _sigma_max_arg(sigma_max),
        SCHEDULE=schedule_id,
        HAS_GUIDANCE=has_guidance,
        HAS_NOISE=has_noise,
        GUIDED_LOGPROB=guided_logprob,
        BLOCK=block,
        INT64=int64,
        num_warps=NUM_WARPS,
        **LAUNCH_OPTIONS,
    )
    if schedule == "ode":
        return x_next, None, x0_pred
    log_prob, _ = _finalize(
        partial, None, sigma, sigma_next, n, n_blocks, schedule_id, scale, _sigma_max_arg(sigma_max)
    )
    return x_next, log_prob, x0_pred


# Same formula: ops.sde.sde_log_prob_reference (spec), ops._sde_torch.sde_log_prob (PyTorch path).
def sde_log_prob_forward(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    v_ref: Optional[torch.Tensor],
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Optional[torch.Tensor] = None,
):
    """Launch the fused log-prob; returns ``(log_prob, kl or None)``, both ``[B]`` float32.

    With ``reward_grad`` (and ``guidance_scale``, ``[B]`` float32) the density is around ``mean + c g``,
    the same bits as ``sde_step_forward(..., guided_logprob=True)``.
    """
    batch, n, block, n_blocks, int64 = _layout(x)
    schedule_id = SCHEDULE_IDS[schedule]
    has_ref = v_ref is not None
    has_guidance = reward_grad is not None
    partial = _alloc((batch, n_blocks), torch.float32, x.device)
    partial_kl = _alloc((batch, n_blocks), torch.float32, x.device) if has_ref else None
    _sde_log_prob_fwd_kernel[(batch * n_blocks,)](
        x.contiguous(),
        v.contiguous(),
        x_next.contiguous(),
        v_ref.contiguous() if has_ref else x,
        reward_grad.contiguous() if has_guidance else x,
        guidance_scale if has_guidance else sigma,
        sigma,
        sigma_next,
        partial,
        partial_kl if has_ref else partial,
        n,
        n_blocks,
        scale,
        _sigma_max_arg(sigma_max),
        SCHEDULE=schedule_id,
        HAS_REF=has_ref,
        HAS_GUIDANCE=has_guidance,
        BLOCK=block,
        INT64=int64,
        num_warps=NUM_WARPS,
        **LAUNCH_OPTIONS,
    )
    return _finalize(partial, partial_kl, sigma, sigma_next, n, n_blocks, schedule_id, scale, _sigma_max_arg(sigma_max))


# Same gradient: ops.sde.sde_log_prob_reference (autograd), ops._sde_torch.sde_log_prob_backward (PyTorch).
def sde_log_prob_backward(
    grad_log_prob: Optional[torch.Tensor],
    grad_kl: Optional[torch.Tensor],
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    v_ref: Optional[torch.Tensor],
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused backward; returns ``grad_v`` in the dtype of ``v``.

    ``grad_log_prob``/``grad_kl``: upstream ``[B]`` gradients (None counts as zero); ``reward_grad``
    and ``guidance_scale`` as in ``sde_log_prob_forward`` (constants: no gradient flows to them).
    """
    batch, n, block, n_blocks, int64 = _layout(x)
    has_ref = v_ref is not None and grad_kl is not None
    has_guidance = reward_grad is not None
    if grad_log_prob is None:
        grad_lp = torch.zeros(batch, dtype=torch.float32, device=x.device)
    else:
        grad_lp = grad_log_prob.to(torch.float32).contiguous()
    grad_v = _alloc(v.shape, v.dtype, v.device)
    _sde_log_prob_bwd_kernel[(batch * n_blocks,)](
        grad_lp,
        grad_kl.to(torch.float32).contiguous() if has_ref else grad_lp,
        x.contiguous(),
        v.contiguous(),
        x_next.contiguous(),
        v_ref.contiguous() if has_ref else x,
        reward_grad.contiguous() if has_guidance else x,
        guidance_scale if has_guidance else sigma,
        sigma,
        sigma_next,
        grad_v,
        n,
        n_blocks,
        scale,
        _sigma_max_arg(sigma_max),
        SCHEDULE=SCHEDULE_IDS[schedule],
        HAS_REF=has_ref,
        HAS_GUIDANCE=has_guidance,
        BLOCK=block,
        INT64=int64,
        num_warps=NUM_WARPS,
        **LAUNCH_OPTIONS,
    )
    return grad_v


# ----------------------------------------------------------------------------------------------
# Ahead-of-time variants: contiguous tensors of per-sample size divisible by 16 (what video
# latents are), so pointers and N are 16-aligned and the main loads can be 128-bit.
# ----------------------------------------------------------------------------------------------


def _aot_specs():
    specs = []
    for tag, ty in (("fp32", "*fp32"), ("bf16", "*bf16")):
        # The step with given noise or in-kernel Philox, and the guided-mean log-prob (Philox) variant.
        for noise, guided_lp in ((False, False), (True, False), (False, True)):
            specs.append(
                AOTSpec(
                    name=f"sde_step_{'noise_' if noise else ''}{'guided_lp_' if guided_lp else ''}{tag}",
                    options=LAUNCH_OPTIONS,
                    kernel=_sde_step_kernel,
                    signature={
                        "x_ptr": ty,
                        "v_ptr": ty,
                        "g_ptr": ty,
                        "eps_ptr": ty,
                        "c_ptr": "*fp32",
                        "sigma_ptr": "*fp32",
                        "sigma_next_ptr": "*fp32",
                        "x_next_ptr": ty,
                        "x0_ptr": ty,
                        "partial_ptr": "*fp32",
                        "N": "i32",
                        "n_blocks": "i32",
                        "seed_lo": "i32",
                        "seed_hi": "i32",
                        "scale": "fp32",
                        "sigma_max": "fp32",
                    },
                    constexprs={
                        "SCHEDULE": SCHEDULE_IDS["flow_grpo"],
                        "HAS_GUIDANCE": True,
                        "HAS_NOISE": noise,
                        "GUIDED_LOGPROB": guided_lp,
                        "BLOCK": MAX_BLOCK,
                        "INT64": False,
                    },
                    aligned=("x_ptr", "v_ptr", "g_ptr", "eps_ptr", "x_next_ptr", "x0_ptr", "N"),
                    num_warps=NUM_WARPS,
                )
            )
        # The log-prob around the unguided mean, and (guided_) around mean + c g: what a rollout with
        # logprob_mean="guided" is trained with.
        for guided in (False, True):
            variant = f"{'guided_' if guided else ''}{tag}"
            specs.append(
                AOTSpec(
                    name=f"sde_log_prob_fwd_{variant}",
                    options=LAUNCH_OPTIONS,
                    kernel=_sde_log_prob_fwd_kernel,
                    signature={
                        "x_ptr": ty,
                        "v_ptr": ty,
                        "x_next_ptr": ty,
                        "v_ref_ptr": ty,
                        "g_ptr": ty,
                        "c_ptr": "*fp32",
                        "sigma_ptr": "*fp32",
                        "sigma_next_ptr": "*fp32",
                        "partial_ptr": "*fp32",
                        "partial_kl_ptr": "*fp32",
                        "N": "i32",
                        "n_blocks": "i32",
                        "scale": "fp32",
                        "sigma_max": "fp32",
                    },
                    constexprs={
                        "SCHEDULE": SCHEDULE_IDS["flow_grpo"],
                        "HAS_REF": True,
                        "HAS_GUIDANCE": guided,
                        "BLOCK": MAX_BLOCK,
                        "INT64": False,
                    },
                    aligned=("x_ptr", "v_ptr", "x_next_ptr", "v_ref_ptr", "g_ptr", "N"),
                    num_warps=NUM_WARPS,
                )
            )
            specs.append(
                AOTSpec(
                    name=f"sde_log_prob_bwd_{variant}",
                    options=LAUNCH_OPTIONS,
                    kernel=_sde_log_prob_bwd_kernel,
                    signature={
                        "grad_lp_ptr": "*fp32",
                        "grad_kl_ptr": "*fp32",
                        "x_ptr": ty,
                        "v_ptr": ty,
                        "x_next_ptr": ty,
                        "v_ref_ptr": ty,
                        "g_ptr": ty,
                        "c_ptr": "*fp32",
                        "sigma_ptr": "*fp32",
                        "sigma_next_ptr": "*fp32",
                        "grad_v_ptr": ty,
                        "N": "i32",
                        "n_blocks": "i32",
                        "scale": "fp32",
                        "sigma_max": "fp32",
                    },
                    constexprs={
                        "SCHEDULE": SCHEDULE_IDS["flow_grpo"],
                        "HAS_REF": True,
                        "HAS_GUIDANCE": guided,
                        "BLOCK": MAX_BLOCK,
                        "INT64": False,
                    },
                    aligned=("x_ptr", "v_ptr", "x_next_ptr", "v_ref_ptr", "g_ptr", "grad_v_ptr", "N"),
                    num_warps=NUM_WARPS,
                )
            )
    specs.append(
        AOTSpec(
            name="sde_finalize",
            options=LAUNCH_OPTIONS,
            kernel=_finalize_kernel,
            signature={
                "partial_ptr": "*fp32",
                "partial_kl_ptr": "*fp32",
                "sigma_ptr": "*fp32",
                "sigma_next_ptr": "*fp32",
                "log_prob_ptr": "*fp32",
                "kl_ptr": "*fp32",
                "N": "i32",
                "n_blocks": "i32",
                "scale": "fp32",
                "sigma_max": "fp32",
            },
            constexprs={"SCHEDULE": SCHEDULE_IDS["flow_grpo"], "HAS_KL": True, "REDUCE_BLOCK": REDUCE_BLOCK},
            num_warps=1,
        )
    )
    return specs


AOT_SPECS = _aot_specs()
