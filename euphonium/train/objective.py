"""The trainer's objective beyond the ops' GRPO loss: the advantages it trains on and the explicit
distillation loss (docs/DESIGN.md, section 4)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from euphonium import ops
from euphonium.rewards import RewardOutput
from euphonium.sampler import Trajectory
from euphonium.train.config import TrainConfig


def advantages(
    config: TrainConfig,
    outcome_weights: Dict[str, float],
    rewards: RewardOutput,
    traj: Trajectory,
    group_ids: torch.Tensor,
    *,
    distributed: bool,
    process_group=None,
) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Outcome advantages per trained reward and ``[B, K]`` process advantages (None without process
    credit), each group-normalised over the whole batch (groups may span the ranks of ``process_group``,
    None: all ranks).

    ``state``: the PRM score of each guided step's input. ``td``: the change of the PRM score across
    each trainable step, ``r_p(x_{k+1}) - r_p(x_k)``; the state after the last trainable step fixes
    the decoded sample (only deterministic steps, or the untrained last step, follow), so the outcome
    reward the PRM predicts (``rewards.total``) stands in for its score.
    """
    outcome_rewards = {name: rewards.parts[name] for name in outcome_weights}
    form, process_rewards, mask = config.process_advantage, None, None
    if config.process_weight > 0 and form == "state" and bool(traj.guided.any()):
        process_rewards, mask = traj.process_reward, traj.guided
    elif config.process_weight > 0 and form == "td" and traj.num_sde_steps:
        n = int(traj.trainable.sum())  # the trainable steps are the first n recorded ones
        process_rewards = torch.cat([traj.process_reward[:, :n], rewards.total.float()[:, None]], dim=1)
        mask = torch.ones(n, dtype=torch.bool, device=process_rewards.device)
    outcome, process = ops.dual_reward_advantages(
        outcome_rewards,
        process_rewards,
        guided=mask,
        process_form=form if form in ("state", "td") else "state",
        group_ids=group_ids,
        eps=config.adv_eps,
        global_std=config.adv_global_std,
        distributed=distributed,
        process_group=process_group,
    )
    if process is not None and process.shape[1] < traj.num_sde_steps:
        # TD credit covers the trainable steps; the last step, never trained, gets none.
        process = torch.cat([process, process.new_zeros(process.shape[0], traj.num_sde_steps - process.shape[1])], 1)
    return outcome, process


def distill_loss(x, v, anchor, shift, guided, sigma, sigma_next, sde):
    """``mean((mean_theta - sg(mean(anchor) + c g))^2) / (2 std^2)`` over guided samples, not weighted by
    advantages (docs/DESIGN.md): ``anchor`` is the reference's velocity (``distill_target=reference``)
    or the policy's own, detached (``policy``).

    Written with the fused log-prob: ``log N(y; mean_theta, std)`` at ``y = mean_theta`` (a constant:
    zero residual) minus at ``y = target`` is the loss exactly.
    """
    with torch.no_grad():
        zeros = torch.zeros_like(x)
        target = ops.sde_step(x, anchor, sigma, sigma_next, noise=zeros, **sde).x_next.float() + shift
        own = ops.sde_step(x, v.detach(), sigma, sigma_next, noise=zeros, **sde).x_next.float()
    at_mean = ops.sde_log_prob(x, v, own, sigma, sigma_next, **sde)
    at_target = ops.sde_log_prob(x, v, target, sigma, sigma_next, **sde)
    per_sample = (at_mean - at_target) * guided.float()
    return per_sample.sum() / guided.float().sum()
