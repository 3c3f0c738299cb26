"""A minimal GRPO loop on the mixture world, from the library's sampler and ops alone.

Not the trainer (:mod:`euphonium.train`, which runs the same world through its policy interface):
this loop exists so that the world's RL signal can be checked in isolation and in seconds. One step::

    prompts (groups of G) -> rollout(DiffusersFlowModel(model), preset) (PRM guidance if given)
    -> decode -> mixture rewards (combined) -> ops.group_advantages
    -> per recorded SDE step: v = model(x_j), traj.recompute_log_prob(j, v) (ops.sde_log_prob),
       ops.grpo_loss -> mean over steps -> clip, AdamW

Evaluation: the mean rewards of a fixed set (every prompt ``eval_per_prompt`` times, fixed initial
noise, the preset's steps and shift as deterministic Euler steps), as the trainer evaluates.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from euphonium import ops
from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
from euphonium.sampler import preset, rollout
from euphonium.toy.mixture.model import mixture_sampler_config
from euphonium.toy.mixture.world import MixtureWorld, default_world, latents_to_video, mixture_rewards


@dataclass
class MixtureGRPOConfig:
    """Settings of :func:`mixture_grpo` (``algorithm``: a :func:`euphonium.sampler.preset` name)."""

    algorithm: str = "flow_grpo_fast"
    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 3e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    ema_decay: Optional[float] = None
    eval_every: int = 20
    eval_per_prompt: int = 16
    seed: int = 0
    guidance_lambda: float = 0.01


@torch.no_grad()
def evaluate_mixture(
    model: torch.nn.Module, world: MixtureWorld, noise: torch.Tensor, prompts: List[str], algorithm: str
) -> Dict[str, float]:
    """Mean ``combined``/``mode``/``component`` of ODE samples from fixed ``noise`` ``[N, D, 1, 1, 1]``."""
    config = mixture_sampler_config(algorithm)
    traj = rollout(DiffusersFlowModel(model), Conditioning(prompt_embeds=world.encode(prompts)), config, noise=noise)
    parts = mixture_rewards(latents_to_video(traj.x0), prompts, world=world)
    return {k: float(v.mean()) for k, v in parts.items()}


def mixture_grpo(
    model: torch.nn.Module,
    config: Optional[MixtureGRPOConfig] = None,
    *,
    world: Optional[MixtureWorld] = None,
    prm: Optional[torch.nn.Module] = None,
    progress: bool = False,
) -> Dict[str, object]:
    """GRPO fine-tuning of (a copy of) ``model``, all weights; returns ``{"model", "history", "evals"}``.

    ``prm`` (e.g. :class:`~euphonium.toy.mixture.world.MixtureOraclePRM`) turns on the preset's PRM
    guidance (``guidance=True``, ``guidance_lambda``); without it the preset samples unguided.
    ``history``: per step ``reward`` (the batch's mean combined reward), ``loss``, ``seconds``;
    ``evals``: ``step`` and the fixed set's mean rewards (step 0 = the base model; every ``eval_every``
    steps and the last).
    """
    config = config if config is not None else MixtureGRPOConfig()
    world = world if world is not None else default_world()
    model = copy.deepcopy(model).float().train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.ema_decay else None
    guided = prm is not None
    sampler = preset(
        config.algorithm, guidance=guided, **({"guidance_lambda": config.guidance_lambda} if guided else {})
    )
    if not guided and sampler.guidance:
        sampler = sampler.replace(guidance=False)
    velocity = DiffusersFlowModel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    eval_prompts = [p for p in world.prompts for _ in range(config.eval_per_prompt)]
    eval_noise = torch.randn((len(eval_prompts), *world.latent_shape), generator=torch.Generator().manual_seed(1234))
    evals = [{"step": 0, **evaluate_mixture(model, world, eval_noise, eval_prompts, config.algorithm)}]
    history = []
    g = config.group_size
    for step in range(1, config.steps + 1):
        start = time.perf_counter()
        chosen = torch.randint(world.num_prompts, (config.prompts_per_step,), generator=gen).tolist()
        prompts = [world.prompts[i] for i in chosen for _ in range(g)]
        cond = Conditioning(prompt_embeds=world.encode(prompts))
        model.eval()
        traj = rollout(
            velocity, cond, sampler, shape=(len(prompts), *world.latent_shape), prm=prm, group_size=g, seed=gen
        )
        model.train()
        with torch.no_grad():
            reward = mixture_rewards(latents_to_video(traj.x0), prompts, world=world)["combined"]
        adv = ops.group_advantages(reward, group_size=g)
        optimizer.zero_grad(set_to_none=True)
        k = traj.num_sde_steps
        total = 0.0
        for j in range(k):
            sigma = torch.full((len(prompts),), float(traj.sigma[j]))
            v = velocity(traj.x[:, j], sigma, cond)
            log_prob = traj.recompute_log_prob(j, v)
            loss, _ = ops.grpo_loss(
                log_prob, traj.log_prob[:, j], adv, clip_range=config.clip_range, adv_clip=config.adv_clip
            )
            (loss / k).backward()
            total += float(loss.detach()) / k
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - config.ema_decay)
        history.append(
            {"step": step, "reward": float(reward.mean()), "loss": total, "seconds": time.perf_counter() - start}
        )
        if step == config.steps or (config.eval_every and step % config.eval_every == 0):
            evals.append(
                {"step": step, **evaluate_mixture(ema or model, world, eval_noise, eval_prompts, config.algorithm)}
            )
            if progress:
                print(f"step {step}: eval {evals[-1]}", flush=True)
    final = (ema or model).eval()
    return {"model": final, "history": history, "evals": evals}
