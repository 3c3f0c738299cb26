"""The toy world's process reward model: the committed PRM, its on-policy training data, and the
guided-step measure of its report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from euphonium import ops
from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
from euphonium.rewards.prm import LatentRewardModel, PRMDataset, SampleFn, collect_rollouts, relabel_prompts
from euphonium.sampler import guidance_coefficient, ode_steps, preset, rollout, shifted_sigmas
from euphonium.toy import world
from euphonium.toy.model import load_toy_model
from euphonium.toy.rewards import toy_reward_set
from euphonium.toy.world import latents_to_video, sample_prompts

# --------------------------------------------------------------------------------------------------
# The toy world: shipped PRM, on-policy data, quality report

TOY_PRM_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy_prm"
# Euphonium's published sampler without guidance: the base model's rollouts through every noise level
# are the PRM's training data. (The trainer's toy default, euphonium_fast, queries the PRM at the
# high-noise states of its first-half SDE window: the PRM takes any (x_sigma, sigma).)
TOY_SAMPLER = "euphonium"


def load_toy_prm(path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> LatentRewardModel:
    """The PRM trained on the toy world (``euphonium/assets/toy_prm`` by default), in eval mode."""
    path = Path(path) if path is not None else TOY_PRM_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no PRM at {path}: config.json is missing (train one with `python -m euphonium.prm train`)"
        )
    return LatentRewardModel.from_pretrained(path).to(device).eval()


def toy_sampler_config(**overrides):
    """The toy data sampler: ``preset("euphonium")`` with guidance off and independent initial noise."""

    return preset(TOY_SAMPLER, **{"guidance": False, "same_initial_noise": False, **overrides})


def toy_sample_fn(transformer, text_encoder, config=None, seed: int = 0) -> SampleFn:
    """``sample_fn`` for :func:`collect_rollouts`: rollouts of the toy base model (``euphonium.sampler.rollout``).

    Returns ``(traj.x0, text_encoder.encode(prompts))``: the final step's ``x0`` prediction (what the
    trainer decodes) and the token embeddings the sampler hands the PRM.
    """

    config = config if config is not None else toy_sampler_config()
    velocity = DiffusersFlowModel(transformer)
    generator = torch.Generator().manual_seed(seed)

    def sample(prompts: List[str]):
        embeds = text_encoder.encode(prompts)
        shape = (len(prompts), world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
        traj = rollout(velocity, Conditioning(prompt_embeds=embeds), config, shape=shape, seed=generator)
        return traj.x0.float(), embeds

    return sample


def collect_toy_rollouts(
    num_samples: int,
    *,
    seed: int = 0,
    base_model: Union[str, Path, None] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> PRMDataset:
    """``num_samples`` on-policy toy rollouts (prompts drawn with ``seed``) labelled with the toy rewards.

    The target is the toy ``combined`` reward; each term is kept in ``parts``.
    """

    transformer, text_encoder = load_toy_model(base_model)
    prompts = sample_prompts(num_samples, seed)
    return collect_rollouts(
        toy_sample_fn(transformer, text_encoder, seed=seed),
        latents_to_video,
        toy_reward_set(),
        prompts,
        batch_size=batch_size,
        progress=progress,
    )


def relabel_toy_prompts(
    data: PRMDataset, copies: int, *, seed: int = 0, base_model: Union[str, Path, None] = None
) -> PRMDataset:
    """``copies`` relabelled copies of every toy clip in ``data`` (:func:`relabel_prompts`), prompts
    drawn uniformly with ``seed``, embedded by the toy text encoder, scored with the toy rewards."""

    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive integer, got {copies!r}")
    _, text_encoder = load_toy_model(base_model)
    return PRMDataset.concat(
        [
            relabel_prompts(
                data, sample_prompts(len(data), seed + k), text_encoder.encode, latents_to_video, toy_reward_set()
            )
            for k in range(copies)
        ]
    )


@torch.no_grad()
def guided_step_effect(
    prm: Callable,
    transformer,
    text_encoder,
    prompts: Sequence[str],
    *,
    lambdas: Sequence[float] = (0.01, 1.0, 100.0, 1000.0),
    steps: Optional[Sequence[int]] = None,
    config=None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> List[Dict[str, float]]:
    """Does one PRM-guided SDE step raise the true final reward, against the same step unguided?

    For each batch of prompts the toy base model samples with ``config`` (default
    :func:`toy_sampler_config`: the RL sampler, guidance off) up to each step ``k`` in ``steps``
    (default: the preset's guided steps). There, with ``g = grad_x prm(x_k, sigma_k, prompt)`` from
    ``ops.reward_grad`` and one shared noise ``eps``, it takes the step
    ``ops.sde_step(x_k, v, ..., reward_grad=g, guidance_scale=lambda * delta, noise=eps)`` for every
    ``lambda`` and once unguided, finishes every branch with the same deterministic Euler (ODE) steps
    (after the last step the step's output is final), decodes, and scores with the toy combined
    reward. The main trajectory continues from the unguided step.

    Returns one dict per ``(step, lambda)`` and one per ``lambda`` pooled over steps (``step = -1``):
    ``improved`` / ``worse`` (fraction of samples whose guided reward is strictly above / below the
    unguided one), ``mean_delta`` and its standard error ``stderr_delta``, ``mean_grad_norm`` (per-sample
    L2 norm of ``g``) and ``mean_shift_rms`` (RMS of ``lambda * delta * g`` per element).
    """

    config = config if config is not None else toy_sampler_config()
    steps = list(steps) if steps is not None else config.replace(guidance=True).guidance_steps()
    if not steps or not all(0 <= k < config.num_steps for k in steps):
        raise ValueError(f"steps must be step indices in [0, {config.num_steps}), got {steps}")
    lambdas = [float(lam) for lam in lambdas]
    sigmas = shifted_sigmas(config.num_steps, config.shift).tolist()
    sde = dict(schedule=config.schedule, noise_level=config.noise_level)
    velocity = DiffusersFlowModel(transformer)
    reward_fn = toy_reward_set()
    gen = torch.Generator().manual_seed(seed)
    deltas: Dict[Tuple[int, float], List[torch.Tensor]] = {(k, lam): [] for k in steps for lam in lambdas}
    grad_norms: Dict[int, List[torch.Tensor]] = {k: [] for k in steps}
    prompts = list(prompts)

    def finish(x, embeds, first):
        # Deterministic Euler steps first .. N-1; after the last step x itself is final.
        return ode_steps(velocity, Conditioning(prompt_embeds=embeds), x, sigmas, start=first)

    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="guided steps", disable=not progress):
        batch = prompts[start : start + batch_size]
        b = len(batch)
        embeds = text_encoder.encode(batch)
        cond = Conditioning(prompt_embeds=embeds)
        x = torch.randn((b, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH), generator=gen)
        for i in range(max(steps) + 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            v = velocity(x, torch.full((b,), sigma), cond)
            eps = torch.randn(x.shape, generator=gen)
            unguided = ops.sde_step(x, v, sigma, sigma_next, noise=eps, **sde).x_next
            if i in steps:
                _, g = ops.reward_grad(prm, x, torch.full((b,), sigma), embeds)
                grad_norms[i].append(g.flatten(1).norm(dim=1))
                branches = [unguided] + [
                    ops.sde_step(
                        x,
                        v,
                        sigma,
                        sigma_next,
                        noise=eps,
                        reward_grad=g,
                        guidance_scale=guidance_coefficient(sigma, sigma_next, form="lambda", lam=lam),
                        **sde,
                    ).x_next
                    for lam in lambdas
                ]
                final = finish(torch.cat(branches), embeds.repeat(len(branches), 1, 1), i + 1)
                scores = reward_fn(world.latents_to_video(final), batch * len(branches)).total.view(len(branches), b)
                for j, lam in enumerate(lambdas):
                    deltas[(i, lam)].append(scores[j + 1] - scores[0])
            x = unguided

    rows = []
    for k in steps + [-1]:
        for lam in lambdas:
            ks = steps if k == -1 else [k]
            d = torch.cat([t for s in ks for t in deltas[(s, lam)]]).double()
            norms = torch.cat([t for s in ks for t in grad_norms[s]]).double()
            coefs = [guidance_coefficient(sigmas[s], sigmas[s + 1], form="lambda", lam=lam) for s in ks]
            numel = world.CHANNELS * world.NUM_FRAMES * world.HEIGHT * world.WIDTH
            rows.append(
                {
                    "step": k,
                    "sigma": sigmas[k] if k >= 0 else float("nan"),
                    "lambda": lam,
                    "n": int(d.numel()),
                    "improved": float((d > 0).double().mean()),
                    "worse": float((d < 0).double().mean()),
                    "mean_delta": float(d.mean()),
                    "stderr_delta": float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0,
                    "mean_grad_norm": float(norms.mean()),
                    "mean_shift_rms": float(np.mean(coefs)) * float(norms.mean()) / math.sqrt(numel),
                }
            )
    return rows
