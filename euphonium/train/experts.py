"""Which recorded steps a training update uses, with Wan2.2's experts in mind.

A step whose noise reaches the decoded sample is trainable (:attr:`~euphonium.sampler.Trajectory.trainable`).
With one Wan2.2 expert trained (``model.expert=high|low``) the frozen expert's steps carry no gradient: the
update trains only the steps the trained expert handles (:func:`trained_steps`), and a sampler whose rollouts
could record none of them is refused before any weights load (:func:`check_trained_steps`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from euphonium.models.wan22 import expert_handles
from euphonium.sampler import SamplerConfig, Trajectory
from euphonium.schedules import shifted_sigmas
from euphonium.train.config import ConfigError, TrainConfig


def trained_steps(transformer: torch.nn.Module, traj: Trajectory) -> torch.Tensor:
    """``[k]`` int64: the recorded steps (columns of ``traj``) an update trains, in order: the trainable ones,
    and for a model with ``trains_sigma`` (:class:`~euphonium.models.wan22.WanExperts`) those whose noise
    level a trained expert handles. Raises ``RuntimeError`` when there is none."""
    mask = traj.trainable
    trains_sigma = getattr(transformer, "trains_sigma", None)
    if trains_sigma is not None:
        mask = mask & trains_sigma(traj.sigma).to(mask.device)
    steps = mask.nonzero().flatten()
    if steps.numel() == 0:
        raise RuntimeError(
            "the rollout recorded no trainable SDE step (check the sampler's SDE window"
            + (" and model.expert)" if trains_sigma is not None else ")")
        )
    return steps


def _windows(sampler: SamplerConfig) -> List[Tuple[int, int]]:
    """Every SDE window a rollout of ``sampler`` can draw."""
    if sampler.sde_window is not None:
        return [tuple(sampler.sde_window)]
    if sampler.sde_window_size is not None:
        lo, hi = sampler.sde_window_range or (0, sampler.num_steps)
        return [(s, s + sampler.sde_window_size) for s in range(lo, hi - sampler.sde_window_size + 1)]
    return [(0, sampler.num_steps)]


def check_trained_steps(config: TrainConfig, sampler: SamplerConfig, boundary_ratio: Optional[float]) -> None:
    """A ConfigError when a Wan2.2 run trains one expert (``boundary_ratio`` not None, ``model.expert`` high or
    low) and some SDE window the sampler can draw holds no trainable step of that expert (the last step is
    never trained)."""
    expert = config.model.expert
    if boundary_ratio is None or expert == "both" or sampler.schedule == "ode":
        return
    n = sampler.num_steps
    handled = expert_handles(shifted_sigmas(n, sampler.shift)[:-1], boundary_ratio, expert)
    steps = [i for i in range(n - 1) if handled[i]]
    empty = [w for w in _windows(sampler) if not any(w[0] <= i < w[1] for i in steps)]
    if not empty:
        return
    which = "high-noise (transformer)" if expert == "high" else "low-noise (transformer_2)"
    hint = (
        f" (e.g. sampler.sde_window_range=[{steps[0]}, {steps[-1] + 1}])"
        if steps and sampler.sde_window_size is not None and steps[-1] + 1 - steps[0] >= sampler.sde_window_size
        else ""
    )
    raise ConfigError(
        f"model.expert={expert} trains the {which} expert, which handles trainable steps {steps} of the "
        f"sampler's {n} (shift {sampler.shift}, boundary {boundary_ratio}), but the SDE window {empty[0]} holds "
        f"none of them and the frozen expert's steps carry no gradient: put sampler.sde_window or "
        f"sde_window_range on its steps{hint}"
    )
