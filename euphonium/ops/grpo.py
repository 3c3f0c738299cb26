"""Clipped GRPO loss (fused forward/backward on CUDA) and the dual-reward Euphonium objective.

Per element ``e`` (a sample, or a sample and a trained denoising step)::

    ratio_e = exp(log_prob_e - old_log_prob_e)
    A_e     = clamp(advantage_e, -adv_clip, adv_clip)
    L       = mean_e max(-A_e * ratio_e, -A_e * clamp(ratio_e, 1 - clip_range, 1 + clip_range))
              + kl_coef * mean_e kl_e

``clip_range`` is tiny (1e-4 by default) because the log-prob of a step is a per-element mean
over the latent, so ratios stay very close to 1.

Every backend follows the same rules at the edges:

- NaN in an element's log-prob, old log-prob, advantage or kl gives NaN in the loss, in that
  element's gradient and in every statistic it enters (``clip_frac`` included): never clipped away.
- Elements are evaluated in the compute dtype (fp32; float64 for float64 inputs on the reference
  and PyTorch paths). A log ratio above ``log(max)`` (~88.7 in fp32) overflows the ratio to inf;
  the loss then takes the exact max of the two branches as the math does: the clipped term
  ``-A (1 + clip_range)`` with zero gradient where ``A > 0``, ``+inf`` (gradient ``+inf``) where
  ``A < 0``, and 0 where ``A = 0`` (never ``0 * inf = NaN``); ``approx_kl``, ``ratio_mean`` and
  ``ratio_max_dev`` are inf. Any value beyond the dtype's range is likewise +-inf, never NaN.
- Means are sums of ``x / n``, so they do not overflow where the plain sum would (+-3e38 terms).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from euphonium._checks import check_bool, check_float_tensor, check_like, check_positive, check_same_device
from euphonium.ops._backend import resolve
from euphonium.ops.advantages import group_advantages
from euphonium.ops.distributed import gather_group_advantages

STAT_NAMES = ("clip_frac", "approx_kl", "ratio_mean", "ratio_max_dev", "policy_loss", "kl")


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip: Optional[float] = 5.0,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Clipped GRPO surrogate loss and its statistics.

    ``L = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range))) + kl_coef * mean(kl)``
    with ``ratio = exp(log_prob - old_log_prob)`` and ``A = clamp(advantages, -adv_clip, adv_clip)``.

    Args:
        log_prob: ``[B]`` or ``[B, K]`` log-probs under the current policy (differentiable).
        old_log_prob: the rollout's log-probs, shape of ``log_prob`` (treated as a constant).
        advantages: shape of ``log_prob``, or ``[B]`` broadcast over the ``K`` steps (a constant).
        clip_range: ``eps_c > 0`` of the ratio clip.
        adv_clip: clamp of the advantages (None: no clamp).
        kl: optional per-element KL penalty, shape of ``log_prob`` (differentiable).
        kl_coef: weight of ``mean(kl)``.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-d float32 tensor (float64 for float64 inputs on the reference
        path) differentiable in ``log_prob`` and ``kl``; ``stats`` a dict of Python floats read with
        one device sync: ``clip_frac`` (fraction with ``|ratio - 1| > clip_range``), ``approx_kl``
        (mean of ``(ratio - 1) - log ratio``), ``ratio_mean``, ``ratio_max_dev`` (max ``|ratio - 1|``),
        ``policy_loss`` (the clipped term) and ``kl`` (``mean(kl)``, 0 without ``kl``). ``ratio - 1``
        and ``approx_kl`` come from a Taylor series for ``|log ratio| < 0.1``: in fp32 the direct
        differences would cancel at the ratios GRPO sees (``|log ratio| ~ 1e-4``).
        On CUDA forward and backward are each one fused Triton kernel, on the CPU a custom autograd
        function of PyTorch ops; both backwards recompute the ratio from the inputs rather than
        saving it (the eager reference keeps about ten element-sized tensors for autograd).
    """
    loss, stats = grpo_loss_tensors(
        log_prob, old_log_prob, advantages, clip_range=clip_range, adv_clip=adv_clip, kl=kl, kl_coef=kl_coef
    )
    return loss, dict(zip(STAT_NAMES, stats.tolist()))


def grpo_loss_tensors(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip: Optional[float] = 5.0,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`grpo_loss` without the host sync: the stats as a ``[6]`` tensor in ``STAT_NAMES`` order."""
    check_float_tensor("log_prob", log_prob)
    if log_prob.dim() > 2 or log_prob.numel() == 0:
        raise ValueError(f"log_prob must be [B] or [B, K] with K >= 1, got shape {tuple(log_prob.shape)}")
    check_like("old_log_prob", old_log_prob, "log_prob", log_prob)
    check_float_tensor("advantages", advantages)
    if advantages.shape != log_prob.shape and advantages.shape != log_prob.shape[:1]:
        raise ValueError(
            f"advantages must have the shape of log_prob {tuple(log_prob.shape)} or [{log_prob.shape[0]}] "
            f"(one per sample, broadcast over steps), got {tuple(advantages.shape)}"
        )
    check_same_device("advantages", advantages, "log_prob", log_prob)
    if kl is not None:
        check_like("kl", kl, "log_prob", log_prob)
    clip_range = check_positive("clip_range", clip_range)
    adv_clip = check_positive("adv_clip", adv_clip, allow_none=True)
    kl_coef = check_positive("kl_coef", kl_coef, allow_zero=True)

    backend = resolve(log_prob.device, torch_path=True, kernels="grpo_loss")
    if backend == "reference":
        return grpo_loss_ref(
            log_prob, old_log_prob, advantages, clip_range=clip_range, adv_clip=adv_clip, kl=kl, kl_coef=kl_coef
        )
    if backend == "torch":
        return _GRPOLossTorch.apply(
            log_prob, old_log_prob.detach(), advantages.detach(), kl, clip_range, adv_clip, kl_coef
        )
    return _GRPOLoss.apply(
        log_prob.contiguous(),
        old_log_prob.detach().contiguous(),
        advantages.detach().contiguous(),
        kl.contiguous() if kl is not None else None,
        clip_range,
        adv_clip,
        kl_coef,
    )


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, kl, clip_range, adv_clip, kl_coef):
        from euphonium.kernels.grpo_loss import grpo_loss_forward

        loss, stats = grpo_loss_forward(
            log_prob, old_log_prob, advantages, kl, clip_range=clip_range, adv_clip=adv_clip, kl_coef=kl_coef
        )
        ctx.save_for_backward(log_prob, old_log_prob, advantages, kl)
        ctx.config = (clip_range, adv_clip, kl_coef)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        from euphonium.kernels.grpo_loss import grpo_loss_backward

        log_prob, old_log_prob, advantages, kl = ctx.saved_tensors
        clip_range, adv_clip, kl_coef = ctx.config
        dlogp, dkl = grpo_loss_backward(
            grad_loss,
            log_prob,
            old_log_prob,
            advantages,
            kl if ctx.needs_input_grad[3] else None,
            clip_range=clip_range,
            adv_clip=adv_clip,
            kl_coef=kl_coef,
        )
        return dlogp if ctx.needs_input_grad[0] else None, None, None, dkl, None, None, None


def _ratio_and_advantage(log_prob, old_log_prob, advantages, adv_clip):
    """fp32 (float64 for float64 inputs) ``log ratio``, ``ratio`` and clamped advantages, ``[B, 1]`` when per sample."""
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    log_ratio = torch.sub(log_prob.to(dtype), old_log_prob.to(dtype))
    adv = advantages.to(dtype)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    if adv.dim() < log_ratio.dim():
        adv = adv.unsqueeze(1)
    return log_ratio, torch.exp(log_ratio), adv


def _flat(ratio, clipped, adv):
    """Where the clipped branch of the max is taken (constant in ``log_prob``): ``A > 0`` above the
    clip range, ``A < 0`` below it, and ``A = 0`` (both branches 0, also for an overflowed ratio).
    Decided by signs, not by the product ``A (ratio - clip)``, which can underflow; NaN is never flat."""
    flat = ((adv > 0) & (ratio > clipped)) | ((adv < 0) & (ratio < clipped))
    return flat | ((adv == 0) & (ratio == ratio))


# Same formula: ops.grpo.grpo_loss_ref (spec), kernels.grpo_loss.grpo_loss_forward (Triton, via _GRPOLoss).
class _GRPOLossTorch(torch.autograd.Function):
    """The PyTorch path: the kernels' forward and backward in torch ops. Saves only the inputs; the
    backward recomputes the ratio: ``d L / d log_prob = -A ratio / n`` except where the clipped
    branch wins (``_flat``), ``d L / d kl = kl_coef / n``."""

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, kl, clip_range, adv_clip, kl_coef):
        log_ratio, ratio, adv = _ratio_and_advantage(log_prob, old_log_prob, advantages, adv_clip)
        n = log_ratio.numel()
        clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
        terms = torch.where(_flat(ratio, clipped, adv), clipped, ratio).mul_(adv.neg())
        policy = terms.div_(n).sum()
        kl_mean = kl.to(policy.dtype).div(n).sum() if kl is not None else torch.zeros_like(policy)
        loss = policy + kl_coef * kl_mean if kl is not None else policy
        # Per element [|ratio - 1| > clip_range, approx KL, ratio - 1], their means in one reduction. In
        # float64 expm1 is exact enough that expm1(x) - x needs no series (the reference's fp32 one):
        # three ops where the series takes fifteen, which is most of the time of a small batch. A ratio
        # that overflowed the compute dtype counts as inf, as on the other paths.
        x = log_ratio.to(torch.float64)
        terms = torch.empty((3,) + x.shape, dtype=torch.float64, device=x.device)
        ratio_minus_1 = torch.expm1(x, out=terms[2]).masked_fill_(ratio == torch.inf, torch.inf)
        torch.sub(ratio_minus_1, x, out=terms[1]).masked_fill_(ratio_minus_1 == torch.inf, torch.inf)
        dev = ratio_minus_1.abs()
        torch.gt(dev, clip_range, out=terms[0])
        means = terms.reshape(3, -1).mean(1).to(policy.dtype)
        max_dev = dev.max().to(policy.dtype)
        clip_frac = torch.where(max_dev.isnan(), max_dev, means[0])  # a NaN ratio: NaN, not "unclipped"
        stats = torch.stack([clip_frac, means[1], means[2] + 1, max_dev, policy, kl_mean])
        ctx.save_for_backward(log_prob, old_log_prob, advantages)
        ctx.config = (clip_range, adv_clip, kl_coef, kl is not None and kl.requires_grad)
        ctx.kl_like = (kl.shape, kl.dtype) if kl is not None else None
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        log_prob, old_log_prob, advantages = ctx.saved_tensors
        clip_range, adv_clip, kl_coef, kl_grad = ctx.config
        _, ratio, adv = _ratio_and_advantage(log_prob, old_log_prob, advantages, adv_clip)
        g = grad_loss.to(ratio.dtype) / log_prob.numel()
        flat = _flat(ratio, ratio.clamp(1 - clip_range, 1 + clip_range), adv)
        # -A g first: -A ratio alone can overflow where the gradient, a 1/N of it, is finite.
        grad_lp = ratio.mul_(adv.mul(-g)).masked_fill_(flat, 0.0).to(log_prob.dtype)
        grad_kl = None
        if kl_grad:
            shape, dtype = ctx.kl_like
            grad_kl = (g * kl_coef).to(dtype).expand(shape).contiguous()
        return grad_lp, None, None, grad_kl, None, None, None


# Same formula: ops.grpo._GRPOLossTorch (PyTorch path), kernels.grpo_loss.grpo_loss_forward (Triton).
def grpo_loss_ref(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip: Optional[float] = 5.0,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of :func:`grpo_loss_tensors` (the spec), differentiable through autograd."""
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    lp = log_prob.to(dtype)
    adv = advantages.detach().to(dtype)
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    if adv.dim() < lp.dim():
        adv = adv.unsqueeze(1)
    log_ratio = lp - old_log_prob.detach().to(dtype)
    n = log_ratio.numel()
    with torch.no_grad():
        # Where the ratio overflows to inf and A >= 0 the max is the clipped term (A > 0) or 0 (A = 0),
        # both flat: exp is taken at 0 there, so that 0 * inf (NaN) is neither in the value nor in
        # exp's backward. A bound one below log(max) catches every overflow; below it nothing changes.
        overflow = (log_ratio >= math.log(torch.finfo(dtype).max) - 1) & (adv >= 0)
    ratio = torch.exp(log_ratio.masked_fill(overflow, 0.0))
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    terms = torch.maximum(-adv * ratio, -adv * clipped)
    terms = torch.where(overflow, -adv * (1 + clip_range), terms)
    policy = (terms / n).sum()
    kl_mean = (kl.to(dtype) / n).sum() if kl is not None else torch.zeros((), dtype=dtype, device=lp.device)
    loss = policy + kl_coef * kl_mean if kl is not None else policy
    with torch.no_grad():
        ratio_minus_1, approx_kl = ratio_stats(log_ratio)
        dev = ratio_minus_1.abs()
        max_dev = dev.max()
        clip_frac = (dev > clip_range).to(dtype).mean()
        stats = torch.stack(
            [
                torch.where(max_dev.isnan(), max_dev, clip_frac),  # a NaN ratio: NaN, not "unclipped"
                (approx_kl / n).sum(),
                1 + (ratio_minus_1 / n).sum(),
                max_dev,
                policy,
                kl_mean,
            ]
        )
    return loss, stats


def ratio_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``exp(x) - 1`` and ``exp(x) - 1 - x`` accurate near 0 (Taylor series for ``|x| < 0.1``, where
    both cancel) and for large ``|x|`` (``exp(x) - 1`` directly; an overflowed one stays inf)."""
    series = x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    small = x.abs() < 0.1
    em1 = torch.where(small, x + series, torch.exp(x) - 1)
    return em1, torch.where(small, series, torch.where(em1 == torch.inf, em1, em1 - x))


# No trio of its own: one ops.advantages.group_advantages (or ops.distributed.gather_group_advantages) call.
def dual_reward_advantages(
    outcome_rewards: Mapping[str, torch.Tensor],
    process_rewards: Optional[torch.Tensor] = None,
    *,
    guided: Optional[torch.Tensor] = None,
    process_form: str = "state",
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
    unbiased: bool = True,
    global_std: bool = False,
    clip: Optional[float] = None,
    distributed: bool = False,
    process_group=None,
) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Group-relative advantages of every named outcome reward and of the process rewards.

    With ``groupnorm(c)[b] = (c[b] - mean_group(c)) / (std_group(c) + eps)`` (:func:`group_advantages`
    of a column ``c`` with the given grouping and options) and ``m[k] = guided[k]``:

    - outcome: ``A_o[name] = groupnorm(r_o[name])`` for each ``[B]`` outcome reward;
    - ``process_form="state"`` (default): ``process_rewards`` is ``[B, K]``, the PRM's score at each
      of the ``K`` recorded steps, and ``A_p[:, k] = groupnorm(r_p[:, k])``;
    - ``process_form="td"``: ``process_rewards`` is ``[B, K + 1]``, the PRM's scores of the states
      before and after each of the ``K`` steps (``r_p[:, k]`` before step ``k``, ``r_p[:, k + 1]``
      after it), and ``A_p[:, k] = groupnorm(r_p[:, k + 1] - r_p[:, k])``: the credit of step ``k``
      is the change of the process reward it made, not the level it started from (which the
      step's own action cannot change);

    in both forms ``A_p[:, k] = 0`` where ``m[k]`` is False (no process credit at that step: its
    entries, and in the TD form the states that only such steps use, are ignored and may hold
    anything, NaN included). All columns go through one :func:`group_advantages` call (one launch).

    ``distributed=True``: the samples of a group may live on different ranks. The columns of every
    rank in ``process_group`` (default: the world) are gathered exactly as
    :func:`~euphonium.ops.gather_group_advantages` gathers them (``group_ids`` global ids,
    ``group_size`` contiguous groups of the concatenated batch, ``global_std`` over all ranks), one
    gather and one launch, and this rank's rows come back: the values a single process computes on
    the concatenated batch. It is a collective: every rank calls it, and non-finite rewards on any
    rank raise the same ValueError on every rank. Without ``torch.distributed`` initialised (or with
    one rank) it is the single-process computation.

    Returns:
        ``(outcome, process)``: a dict of ``[B]`` advantages keyed like ``outcome_rewards``, and the
        ``[B, K]`` process advantages (None without ``process_rewards``).
    """
    if process_form not in ("state", "td"):
        raise ValueError(f"process_form must be 'state' or 'td', got {process_form!r}")
    check_bool("distributed", distributed)
    names = _check_named("outcome_rewards", outcome_rewards, allow_empty=process_rewards is not None)
    columns = []
    for name in names:
        r = check_float_tensor(f"outcome_rewards[{name!r}]", outcome_rewards[name])
        if r.dim() != 1:
            raise ValueError(f"outcome_rewards[{name!r}] must be [B], got shape {tuple(r.shape)}")
        columns.append(r.unsqueeze(1))
    td = process_form == "td"
    if process_rewards is not None:
        check_float_tensor("process_rewards", process_rewards)
        if td and (process_rewards.dim() != 2 or process_rewards.shape[1] < 1):
            raise ValueError(
                "process_rewards must be [B, K+1] (the states before and after each of K steps) for "
                f"process_form='td', got shape {tuple(process_rewards.shape)}"
            )
        if process_rewards.dim() != 2:
            raise ValueError(f"process_rewards must be [B, K], got shape {tuple(process_rewards.shape)}")
    batch = columns[0].shape[0] if columns else process_rewards.shape[0]
    for name, col in zip((f"outcome_rewards[{n!r}]" for n in names), columns):
        if col.shape[0] != batch:
            raise ValueError(f"{name} has batch size {col.shape[0]}, expected {batch} like the first reward")
        check_same_device(name, col, "the first reward", columns[0])
    ref = columns[0] if columns else process_rewards
    if process_rewards is not None:
        if process_rewards.shape[0] != batch:
            raise ValueError(
                f"process_rewards has batch size {process_rewards.shape[0]}, expected {batch} like the first reward"
            )
        check_same_device("process_rewards", process_rewards, "the first reward", ref)
    dtype = torch.promote_types(torch.float32, ref.dtype)

    error = None
    stacked = torch.cat([c.to(dtype) for c in columns], dim=1) if columns else None
    bad = ~torch.isfinite(stacked) if columns else None
    if columns and bool(bad.any()):
        sample, col = bad.nonzero()[0].tolist()
        error = f"outcome_rewards[{names[col]!r}] has non-finite values (first at sample {sample})"
    if process_rewards is not None:
        steps = process_rewards.shape[1] - 1 if td else process_rewards.shape[1]
        mask = _guided_mask(guided, steps, process_rewards)
        r = process_rewards.to(dtype)
        if td:
            # State j is used by step j (before) and step j - 1 (after).
            used = torch.zeros((1, steps + 1), dtype=torch.bool, device=r.device)
            used[:, :-1] |= mask
            used[:, 1:] |= mask
            bad_p = ~torch.isfinite(r) & used
            values = torch.where(mask, r[:, 1:] - r[:, :-1], torch.zeros_like(r[:, 1:]))
            what = "state"
        else:
            bad_p = ~torch.isfinite(r) & mask
            values = torch.where(mask, r, torch.zeros_like(r))
            what = "step"
        if error is None and bool(bad_p.any()):
            sample, col = bad_p.nonzero()[0].tolist()
            error = f"process_rewards at {what} {col} has non-finite values (first at sample {sample})"
        overflow = ~torch.isfinite(values)
        if error is None and bool(overflow.any()):
            sample, k = overflow.nonzero()[0].tolist()
            error = f"process_rewards: the TD difference r[:, {k + 1}] - r[:, {k}] overflows (first at sample {sample})"
        stacked = values if stacked is None else torch.cat([stacked, values], dim=1)

    options = dict(group_size=group_size, group_ids=group_ids, eps=eps, unbiased=unbiased)
    options.update(global_std=global_std, clip=clip)
    gather = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    if gather:
        error = _agree_on_error(error, ref.device, process_group)
    if error is not None:
        raise ValueError(error)
    if gather:
        adv = gather_group_advantages(stacked, process_group=process_group, **options)
    else:
        adv = group_advantages(stacked, **options)
    outcome = {name: adv[:, i] for i, name in enumerate(names)}
    # Unguided columns are all zero, so their advantages are exactly zero (all-equal groups).
    process = adv[:, len(names) :] if process_rewards is not None else None
    return outcome, process


def _agree_on_error(error: Optional[str], device: torch.device, process_group) -> Optional[str]:
    """The first rank's error message on every rank (None when no rank has one): one small
    all-reduce, and a gather of the messages only when some rank has one."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
    if not flag.item():
        return None
    messages = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(messages, error, group=process_group)
    rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
    return f"{message} on rank {rank}"


# No trio of its own: one clipped term per reward through ops.grpo.grpo_loss_tensors.
def dual_reward_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    outcome_advantages: Mapping[str, torch.Tensor],
    process_advantages: Optional[torch.Tensor] = None,
    *,
    outcome_weights: Optional[Mapping[str, float]] = None,
    process_weight: float = 1.0,
    guided: Optional[torch.Tensor] = None,
    combine: str = "separate",
    clip_range: float = 1e-4,
    adv_clip: Optional[float] = 5.0,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The Euphonium dual-reward GRPO objective over outcome (pixel) and process (latent) advantages.

    With ``L_clip(A)`` the clipped surrogate of :func:`grpo_loss` (advantages clamped to
    ``+-adv_clip``), ``w_n`` the outcome weights, ``w_p = process_weight`` and ``m[k] = guided[k]``:

    - ``combine="separate"`` (upstream's form): one clipped term per reward,
      ``L = sum_n w_n * L_clip(A_o[n]) + w_p * L_clip(A_p * m) + kl_coef * mean(kl)``;
    - ``combine="sum"``: one summed advantage,
      ``L = L_clip(sum_n w_n * A_o[n] + w_p * A_p * m) + kl_coef * mean(kl)``.

    Args:
        log_prob, old_log_prob: ``[B]`` or ``[B, K]`` (``[B, K]`` when process advantages are given).
        outcome_advantages: named ``[B]`` advantages (broadcast over ``K``), e.g. from
            :func:`dual_reward_advantages`.
        process_advantages: optional ``[B, K]`` advantages of the process reward per trained step.
        outcome_weights: a weight per outcome name (same keys; default 1 each).
        process_weight: ``w_p``.
        guided: optional bool ``[K]``: steps that had guidance (and a process reward); ``A_p`` is zero
            elsewhere.
        combine: ``"separate"`` or ``"sum"``.
        clip_range, adv_clip, kl, kl_coef: as in :func:`grpo_loss`.

    Returns:
        ``(loss, stats)``: the loss (0-d, differentiable in ``log_prob`` and ``kl``) and the stats of
        :func:`grpo_loss` (the ratio statistics do not depend on the advantages), where
        ``policy_loss`` is the weighted total and, for ``"separate"``, ``policy_loss/<name>`` (and
        ``policy_loss/process``) each unweighted term; one device sync in all.
    """
    if combine not in ("separate", "sum"):
        raise ValueError(f"combine must be 'separate' or 'sum', got {combine!r}")
    names = _check_named("outcome_advantages", outcome_advantages, allow_empty=process_advantages is not None)
    if outcome_weights is None:
        outcome_weights = {name: 1.0 for name in names}
    if not isinstance(outcome_weights, Mapping) or set(outcome_weights) != set(names):
        got = sorted(outcome_weights) if isinstance(outcome_weights, Mapping) else type(outcome_weights).__name__
        raise ValueError(f"outcome_weights must give a weight for exactly the outcome names {sorted(names)}, got {got}")
    weights = {
        name: check_positive(f"outcome_weights[{name!r}]", outcome_weights[name], allow_zero=True) for name in names
    }
    process_weight = check_positive("process_weight", process_weight, allow_zero=True)
    kl_coef = check_positive("kl_coef", kl_coef, allow_zero=True)
    check_float_tensor("log_prob", log_prob)
    for name in names:
        adv = check_float_tensor(f"outcome_advantages[{name!r}]", outcome_advantages[name])
        if adv.shape != log_prob.shape[:1]:
            raise ValueError(
                f"outcome_advantages[{name!r}] must be [B] = [{log_prob.shape[0]}] (one per sample), "
                f"got {tuple(adv.shape)}"
            )

    terms = [(name, outcome_advantages[name], weights[name]) for name in names]
    if process_advantages is not None:
        check_float_tensor("process_advantages", process_advantages)
        if log_prob.dim() != 2 or process_advantages.shape != log_prob.shape:
            raise ValueError(
                f"process_advantages must be [B, K] with the shape of log_prob {tuple(log_prob.shape)}, "
                f"got {tuple(process_advantages.shape)}"
            )
        mask = _guided_mask(guided, process_advantages.shape[1], process_advantages)
        terms.append(
            ("process", torch.where(mask, process_advantages, torch.zeros_like(process_advantages)), process_weight)
        )
    elif guided is not None:
        raise ValueError("guided is given but process_advantages is None")
    options = dict(clip_range=clip_range, adv_clip=adv_clip)

    if combine == "sum":
        total = sum(w * _as_step_advantage(a, log_prob) for _, a, w in terms)
        loss, stats = grpo_loss_tensors(log_prob, old_log_prob, total, kl=kl, kl_coef=kl_coef, **options)
        return loss, dict(zip(STAT_NAMES, stats.tolist()))

    losses, term_stats = [], []
    for _, adv, _ in terms:
        term_loss, s = grpo_loss_tensors(log_prob, old_log_prob, adv, **options)
        losses.append(term_loss)
        term_stats.append(s)
    loss = sum(w * term for (_, _, w), term in zip(terms, losses))
    policy = loss.detach()
    kl_mean = torch.zeros_like(policy)
    if kl is not None:
        check_like("kl", kl, "log_prob", log_prob)
        kl_mean = kl.to(loss.dtype).mean()
        loss = loss + kl_coef * kl_mean
    values = torch.cat(
        [term_stats[0][:4], policy.reshape(1), kl_mean.detach().reshape(1), torch.stack([s[4] for s in term_stats])]
    ).tolist()
    stats = dict(zip(STAT_NAMES, values[:6]))
    stats.update({f"policy_loss/{name}": v for (name, _, _), v in zip(terms, values[6:])})
    return loss, stats


def _check_named(arg: str, named, *, allow_empty: bool):
    if not isinstance(named, Mapping):
        raise TypeError(f"{arg} must be a mapping from reward names to tensors, got {type(named).__name__}")
    names = list(named)
    if not names and not allow_empty:
        raise ValueError(f"{arg} is empty and there are no process rewards: nothing to optimise")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{arg} keys must be reward names (str), got {name!r}")
        if name == "process":
            raise ValueError(f"{arg}: 'process' is reserved for the process reward; rename that outcome reward")
    return names


def _guided_mask(guided, steps: int, ref: torch.Tensor) -> torch.Tensor:
    """``[1, K]`` bool mask of guided steps (all True when ``guided`` is None)."""
    if guided is None:
        return torch.ones((1, steps), dtype=torch.bool, device=ref.device)
    if not isinstance(guided, torch.Tensor) or guided.dtype != torch.bool:
        raise TypeError(
            f"guided must be a bool tensor of shape [{steps}], got "
            f"{guided.dtype if isinstance(guided, torch.Tensor) else type(guided).__name__}"
        )
    if guided.shape != (steps,):
        raise ValueError(f"guided must have shape [{steps}] (one flag per step), got {tuple(guided.shape)}")
    check_same_device("guided", guided, "the process rewards", ref)
    return guided.unsqueeze(0)


def _as_step_advantage(adv: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """Advantages as ``log_prob``'s shape (``[B]`` broadcast over ``K``) for summing terms."""
    if adv.dim() == 1 and log_prob.dim() == 2:
        return adv.unsqueeze(1).expand_as(log_prob)
    return adv
