"""Evaluation of the policy itself: deterministic ODE samples of a fixed prompt and noise set.

The same clips every time, with the EMA weights where there are any, so the evaluation curve shows
the policy's change without the noise of each step's prompt draw or of the training sampler's SDE.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from euphonium.sampler import SamplerConfig, rollout
from euphonium.train.distributed import RankReducer
from euphonium.train.ema import EMA
from euphonium.train.logging import save_video_grid
from euphonium.train.policy import Policy


def ode_sampler(sampler: SamplerConfig) -> SamplerConfig:
    """The training sampler's schedule as a deterministic ODE sampler: no noise, no guidance, no window."""
    return sampler.replace(
        schedule="ode",
        guidance=False,
        same_initial_noise=False,
        sde_window=None,
        sde_window_size=None,
        sde_window_range=None,
    )


class Evaluator:
    """ODE samples of the policy and the mean rewards of the fixed evaluation set.

    ``reward_columns(parts) -> {name: [B]}`` turns a reward set's parts into the logged columns. ``rank`` of
    ``world`` is this process's share of the set, summed over the ranks of ``group`` (None: all ranks).
    """

    def __init__(
        self,
        policy: Policy,
        velocity_model,
        sampler: SamplerConfig,
        rewards: Callable,
        reward_columns: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]],
        eval_set: List[str],
        noise_generator: torch.Generator,
        *,
        ema: Optional[EMA],
        device: torch.device,
        rank: int,
        world: int,
        batch: int,
        group=None,
    ):
        self.policy, self.velocity_model, self.sampler = policy, velocity_model, ode_sampler(sampler)
        self.rewards, self.reward_columns = rewards, reward_columns
        self.eval_set, self.noise_generator = eval_set, noise_generator
        self.ema, self.device, self.rank, self.world, self.batch = ema, device, rank, world, batch
        self.reducer = RankReducer(world, device, group)
        self._noise: Optional[torch.Tensor] = None
        # The first clips of this rank's share of the last evaluation (uint8, CPU) and their prompts, for
        # the loggers (MetricsLogger.log_clips); keep_clips = 0 keeps none.
        self.keep_clips = 4
        self.last_clips: Optional[Tuple[torch.Tensor, List[str]]] = None

    def sample(self, prompts: List[str], **noise) -> torch.Tensor:
        """Videos of ``prompts`` from the ODE sampler with the EMA weights, if any; ``noise``:
        :func:`~euphonium.sampler.rollout`'s ``noise=`` (initial latents) or ``shape=`` and ``seed=``."""
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            traj = rollout(self.velocity_model, self.policy.encode(prompts), self.sampler, device=self.device, **noise)
            videos = self.policy.decode(traj.x0)
        if hasattr(self.policy.transformer, "reshard"):
            # FSDP2 keeps the root's parameters unsharded after a forward with no backward to follow;
            # a checkpoint's optimizer-state gather needs the sharded ones registered again.
            self.policy.transformer.reshard()
        return videos

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Mean rewards of the fixed evaluation set (``eval_prompts`` clips, the same noise every time).

        The set's prompts and initial noise do not depend on the number of ranks: rank ``r`` samples
        clips ``r, r + world, ...`` in batches of at most the training batch per rank. Every rank runs
        the same number of batches (FSDP forwards are collectives): a shorter share is padded with
        repeats of its last clip, which are not counted. The means are over the whole set.
        """
        n = len(self.eval_set)
        if self._noise is None:
            # Drawn once for the whole set, so the set does not depend on the number of ranks.
            self._noise = torch.randn((n, *self.policy.latent_shape), generator=self.noise_generator)
        mine = list(range(self.rank, n, self.world))
        share = -(-n // self.world)
        index = mine + mine[-1:] * (share - len(mine))
        counted = torch.tensor([1.0] * len(mine) + [0.0] * (share - len(mine)))
        sums: Dict[str, float] = {}
        for start in range(0, share, self.batch):
            rows = index[start : start + self.batch]
            prompts = [self.eval_set[i] for i in rows]
            videos = self.sample(prompts, noise=self._noise[rows])
            if start == 0 and self.keep_clips:
                kept = (videos[: self.keep_clips].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
                self.last_clips = (kept, prompts[: self.keep_clips])
            weight = counted[start : start + len(rows)].to(videos.device)
            for key, value in self.reward_columns(self.rewards(videos, prompts).parts).items():
                sums[key] = sums.get(key, 0.0) + float((value * weight).sum())
        sums = self.reducer.sum(sums)
        return {key: value / n for key, value in sums.items()}

    @torch.no_grad()
    def save_samples(self, prompts: List[str], path: Path, *, seed: int) -> Optional[Path]:
        """ODE samples of ``prompts`` as GIF and PNG grids at ``path``.

        Every rank samples (FSDP forwards all-gather the weights, so rank 0 cannot run them alone); rank 0 writes.
        """
        videos = self.sample(prompts, shape=(len(prompts), *self.policy.latent_shape), seed=seed)
        return save_video_grid(videos, prompts, path) if self.rank == 0 else None
