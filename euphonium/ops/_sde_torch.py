"""The PyTorch path of ``sde_step`` and ``sde_log_prob`` (backend ``torch``: CPU tensors under ``auto``).

The arithmetic of the Triton kernels (``euphonium.kernels.sde``) in plain PyTorch ops. Every mean
is linear in ``v`` with per-sample coefficients, computed once per sample (``coefficients``)::

    mean = a_x * x + k * v        std^2 = var

The latents, viewed as ``[B, N]``, are processed block by block (``blocks``: several whole samples
or a slice of one, at most ``BLOCK_ELEMENTS`` elements): a block is upcast to fp32 (float64 for
float64 inputs), combined by a few fused ops while it is in cache and written to the outputs in
their dtype. Besides the outputs nothing latent-sized is allocated, where an eager step over whole
tensors allocates (and page-faults) about ten fp32 temporaries.

The step and the log-prob return the same bits on the same inputs: both take a block's mean from
``_mean``, the squared residual at the stored ``x_next`` from ``_residual_sums`` over the same
blocks (a function of ``B`` and ``N`` only), add the per-sample totals in the same order and
finish with ``_log_prob``. The sums are independent of torch's thread count too
(``_row_sums_of_squares``), so a rollout and a training step may use different numbers of threads.

Training: ``log_prob_backward`` recomputes the mean block by block from the saved inputs:
``grad_v = g_lp k (x_next - mean) / (var N) + g_kl k^2 (v - v_ref) / (var N)``.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

from euphonium.ops.philox import philox_randn

# Elements per block: about 1 MiB of fp32 per temporary, so that the handful a block needs stays in
# the caches. Tests shrink it to exercise blocks that split a sample and blocks of several samples.
BLOCK_ELEMENTS = 1 << 18
# Width of the first stage of the per-row sums (see _row_sums_of_squares).
SUM_WIDTH = 512
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for every input dtype; float64 inputs stay float64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def coefficients(
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(a_x, k, var)`` ``[B]`` in ``dtype`` with ``mean = a_x x + k v`` and ``std^2 = var``.

    ``scale``: ``a`` (flow_grpo), ``eta`` (dance_grpo) or ``sin(a pi / 2)`` (cps). SDE schedules
    (``s^2`` of the schedule, ``h = s^2 delta / (2 sigma)``): ``a_x = 1 - h``,
    ``k = -delta - h (1 - sigma)``, ``var = s^2 delta``; cps (``r = sqrt(sigma_next^2 - var)``):
    ``var = (sigma_next scale)^2``, ``a_x = 1 - sigma_next + r``,
    ``k = r (1 - sigma) - sigma (1 - sigma_next)``.
    """
    sigma, sigma_next = sigma.to(dtype), sigma_next.to(dtype)
    if schedule == "cps":
        std = sigma_next * scale
        var = std * std
        root = torch.sqrt(torch.clamp_min(sigma_next * sigma_next - var, 0))
        return (1 - sigma_next) + root, root * (1 - sigma) - sigma * (1 - sigma_next), var
    delta = sigma - sigma_next
    if schedule == "flow_grpo":
        den = sigma if sigma_max is None else torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
        s2 = scale * scale * sigma / (1 - den)
    elif schedule == "dance_grpo":
        s2 = torch.full_like(sigma, scale * scale)
    else:  # ode
        s2 = torch.zeros_like(sigma)
    h = s2 * delta / (2 * sigma)
    return 1 - h, -delta - h * (1 - sigma), s2 * delta


def blocks(batch: int, n: int) -> Iterator[Tuple[slice, slice]]:
    """``(rows, cols)`` of the blocks covering ``[batch, n]``, in a fixed order.

    A sample of at most ``BLOCK_ELEMENTS`` elements is never split (blocks of whole samples);
    a larger one is cut into slices of ``BLOCK_ELEMENTS``. Each block is a contiguous range of the
    flattened latents, starting at flat index ``rows.start * n + cols.start``.
    """
    if n > BLOCK_ELEMENTS:
        for b in range(batch):
            for c0 in range(0, n, BLOCK_ELEMENTS):
                yield slice(b, b + 1), slice(c0, min(c0 + BLOCK_ELEMENTS, n))
    else:
        per_block = BLOCK_ELEMENTS // n
        for r0 in range(0, batch, per_block):
            yield slice(r0, min(r0 + per_block, batch)), slice(0, n)


def _mean(x: torch.Tensor, v: torch.Tensor, a_x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``fma(a_x, x, k * v)`` of a block (a new tensor), as the kernels round it: the one definition of
    the mean here. For an Euler step (``a_x = 1``) it is ``x + round(k * v)``, diffusers' step."""
    return torch.mul(v, k).addcmul_(x, a_x)


def _guide_(m: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``m + c g`` in place on a block's fresh mean: the step's guided mean, and the guided log-prob's
    (forward and backward), so that they round identically."""
    return m.addcmul_(g, c)


def _row_sums_of_squares(d: torch.Tensor) -> torch.Tensor:
    """``sum_j d[r, j]^2`` per row of a fresh ``[R, L]`` block (squared in place).

    torch splits a long single-output reduction between threads, which makes its bits depend on the
    thread count. Here each piece of ``SUM_WIDTH`` elements of a row is reduced whole by one thread,
    then the few partials of a row (fewer than torch's parallel grain) one after another.
    """
    d.square_()
    length = d.shape[1]
    if length <= SUM_WIDTH:
        return d.sum(1)
    whole = length - length % SUM_WIDTH
    partials = d[:, :whole].unflatten(1, (-1, SUM_WIDTH)).sum(2)
    if whole < length:
        partials = torch.cat([partials, d[:, whole:].sum(1, keepdim=True)], 1)
    return partials.sum(1)


def _residual_sums(x_next: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_j (x_next - m)^2`` per row of a block; ``x_next`` as stored (any float dtype)."""
    return _row_sums_of_squares(torch.sub(x_next, m))


def _log_prob(total: torch.Tensor, var: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``-total / (2 var n) - log(var) / 2 - log(2 pi) / 2`` per sample (float64), 0 where ``var == 0``."""
    var = var.to(torch.float64)
    stochastic = var > 0
    safe = torch.where(stochastic, var, torch.ones_like(var))
    log_prob = -total / (2 * safe * n) - 0.5 * torch.log(safe) - _HALF_LOG_2PI
    return torch.where(stochastic, log_prob, torch.zeros_like(log_prob)).to(dtype)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every latent-sized output comes from here (tests poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _column(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1)


# Same formula: ops.sde.sde_step_reference (spec), kernels.sde.sde_step_forward (Triton).
def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    reward_grad: Optional[torch.Tensor],
    guidance_scale: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    seed: int,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    guided_logprob: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(x_next, log_prob or None, x0_pred)`` of one step; inputs validated by ``ops.sde_step``.

    ``sigma``, ``sigma_next``, ``guidance_scale``: ``[B]`` tensors; ``noise=None`` draws
    ``tl.randn(seed, i)`` (``philox_randn``) block by block.
    """
    batch = x.shape[0]
    n = x.numel() // batch
    ct = compute_dtype(x)
    a_x, k, var = (_column(c) for c in coefficients(sigma, sigma_next, schedule, scale, sigma_max, ct))
    neg_sigma = _column(-sigma.to(ct))
    std = var.sqrt()
    c = _column(guidance_scale.to(ct)) if reward_grad is not None else None
    x2, v2 = x.reshape(batch, n), v.reshape(batch, n)
    g2 = reward_grad.reshape(batch, n) if reward_grad is not None else None
    e2 = noise.reshape(batch, n) if noise is not None else None
    x_next = _alloc((batch, n), x.dtype, x.device)
    x0_pred = _alloc((batch, n), x.dtype, x.device)
    stochastic = schedule != "ode"
    total = torch.zeros(batch, dtype=torch.float64, device=x.device) if stochastic else None

    for rows, cols in blocks(batch, n):
        xb, vb = x2[rows, cols].to(ct), v2[rows, cols].to(ct)
        # x - round(sigma * v), as diffusers and the reference round it (addcmul would fuse).
        torch.add(torch.mul(vb, neg_sigma[rows]), xb, out=x0_pred[rows, cols])
        m = _mean(xb, vb, a_x[rows], k[rows])
        m_g = m
        if g2 is not None:
            gb = g2[rows, cols].to(ct)
            m_g = _guide_(m, gb, c[rows]) if guided_logprob else torch.addcmul(m, gb, c[rows])
        out = x_next[rows, cols]
        if not stochastic:
            out.copy_(m_g)
            continue
        if e2 is not None:
            eps = e2[rows, cols].to(ct)
        else:
            count = (rows.stop - rows.start) * (cols.stop - cols.start)
            eps = philox_randn(seed, count, x.device, offset=rows.start * n + cols.start).view(
                -1, cols.stop - cols.start
            )
            eps = eps.to(ct)
        torch.addcmul(m_g, eps, std[rows], out=out)
        # The log-prob is taken at x_next as stored (rounded to the output dtype).
        total[rows].add_(_residual_sums(out, m))

    log_prob = _log_prob(total, var.reshape(-1), n, ct) if stochastic else None
    return x_next.view(x.shape), log_prob, x0_pred.view(x.shape)


# Same formula: ops.sde.sde_log_prob_reference (spec), kernels.sde.sde_log_prob_forward (Triton).
def sde_log_prob(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(log_prob, kl or None)`` ``[B]`` (float32; float64 for float64 ``x``), the same bits as the step's.

    With ``reward_grad`` (``guidance_scale`` ``[B]``) the density is around ``mean + c g``, as the step's
    with ``guided_logprob``. ``kl = k^2 sum_j (v - v_ref)^2 / (2 var N)`` (0 where ``var == 0``).
    """
    batch = x.shape[0]
    n = x.numel() // batch
    ct = compute_dtype(x)
    a_x, k, var = coefficients(sigma, sigma_next, schedule, scale, sigma_max, ct)
    a_col, k_col = _column(a_x), _column(k)
    x2, v2, xn2 = x.reshape(batch, n), v.reshape(batch, n), x_next.reshape(batch, n)
    r2 = v_ref.reshape(batch, n) if v_ref is not None else None
    g2 = reward_grad.reshape(batch, n) if reward_grad is not None else None
    c = _column(guidance_scale.to(ct)) if g2 is not None else None
    total = torch.zeros(batch, dtype=torch.float64, device=x.device)
    total_kl = torch.zeros_like(total) if r2 is not None else None

    for rows, cols in blocks(batch, n):
        vb = v2[rows, cols].to(ct)
        m = _mean(x2[rows, cols].to(ct), vb, a_col[rows], k_col[rows])
        if g2 is not None:
            _guide_(m, g2[rows, cols].to(ct), c[rows])
        total[rows].add_(_residual_sums(xn2[rows, cols], m))
        if r2 is not None:
            total_kl[rows].add_(_row_sums_of_squares(torch.sub(vb, r2[rows, cols])))

    log_prob = _log_prob(total, var, n, ct)
    if total_kl is None:
        return log_prob, None
    var64 = var.to(torch.float64)
    safe = torch.where(var64 > 0, var64, torch.ones_like(var64))
    kl = torch.where(var64 > 0, k.to(torch.float64) ** 2 * total_kl / (2 * safe * n), torch.zeros_like(var64))
    return log_prob, kl.to(log_prob.dtype)


# Same gradient: ops.sde.sde_log_prob_reference (autograd), kernels.sde.sde_log_prob_backward (Triton).
def sde_log_prob_backward(
    grad_log_prob: Optional[torch.Tensor],
    grad_kl: Optional[torch.Tensor],
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    schedule: str,
    scale: float,
    sigma_max: Optional[float],
    reward_grad: Optional[torch.Tensor] = None,
    guidance_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``grad_v`` (dtype of ``v``) for upstream ``[B]`` gradients (None counts as zero); with
    ``reward_grad`` the residual is taken from ``mean + c g`` (a constant shift: no other change)."""
    batch = x.shape[0]
    n = x.numel() // batch
    ct = compute_dtype(x)
    a_x, k, var = coefficients(sigma, sigma_next, schedule, scale, sigma_max, ct)
    # A deterministic sample (var == 0) has log-prob 0 and no gradient.
    stochastic = var > 0
    inv = torch.where(stochastic, 1 / (torch.where(stochastic, var, torch.ones_like(var)) * n), torch.zeros_like(var))
    g_lp = torch.zeros_like(var) if grad_log_prob is None else grad_log_prob.to(ct)
    c_lp = _column(g_lp * k * inv)
    c_kl = _column(grad_kl.to(ct) * k * k * inv) if v_ref is not None and grad_kl is not None else None
    a_col, k_col = _column(a_x), _column(k)
    x2, v2, xn2 = x.reshape(batch, n), v.reshape(batch, n), x_next.reshape(batch, n)
    r2 = v_ref.reshape(batch, n) if c_kl is not None else None
    g2 = reward_grad.reshape(batch, n) if reward_grad is not None else None
    c = _column(guidance_scale.to(ct)) if g2 is not None else None
    grad_v = _alloc((batch, n), v.dtype, v.device)

    for rows, cols in blocks(batch, n):
        vb = v2[rows, cols].to(ct)
        m = _mean(x2[rows, cols].to(ct), vb, a_col[rows], k_col[rows])
        if g2 is not None:
            _guide_(m, g2[rows, cols].to(ct), c[rows])
        residual = torch.sub(xn2[rows, cols], m)
        if r2 is None:
            torch.mul(residual, c_lp[rows], out=grad_v[rows, cols])
        else:
            residual.mul_(c_lp[rows])
            torch.addcmul(residual, torch.sub(vb, r2[rows, cols]), c_kl[rows], out=grad_v[rows, cols])
    return grad_v.view(v.shape)
