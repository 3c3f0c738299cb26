"""The mixture world's learned PRM: a :class:`~euphonium.rewards.prm.LatentRewardModel` trained by the
library's :class:`~euphonium.rewards.prm.PRMTrainer` on rollouts of the base model, and its comparison
with the exact :class:`~euphonium.toy.mixture.world.MixtureOraclePRM`.

The latents are ``[B, D, 1, 1, 1]``, so the PRM's patch is ``(1, 1, 1)``, its input channels are the
``D`` coordinates and its 3x3x3 convolutions act on one voxel (a residual MLP with FiLM conditioning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from euphonium.rewards.prm import LatentRewardModel, PRMDataset, PRMTrainConfig, PRMTrainer, collect_rollouts
from euphonium.rewards.prm.data import noise_latents, spearman
from euphonium.sampler import SamplerConfig
from euphonium.toy.mixture.model import ASSET_DIR, sample_mixture
from euphonium.toy.mixture.world import (
    MixtureOraclePRM,
    MixtureWorld,
    default_world,
    latents_to_video,
    mixture_reward_set,
)

PRM_DIR = ASSET_DIR / "prm"


def build_mixture_prm(world: Optional[MixtureWorld] = None, seed: int = 0, **overrides) -> LatentRewardModel:
    """A fresh :class:`LatentRewardModel` sized for the world's ``[B, D, 1, 1, 1]`` latents and ``E``-wide prompts."""
    world = world if world is not None else default_world()
    config = dict(
        in_channels=world.dim,
        text_dim=world.config.embed_dim,
        channels=(64,),
        blocks=(3,),
        patch_size=(1, 1, 1),
        cond_dim=64,
        sigma_freq_dim=64,
        norm_groups=8,
    )
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LatentRewardModel(**config)


def load_mixture_prm(
    path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu"
) -> LatentRewardModel:
    """The learned mixture PRM (``path=None``: the committed ``euphonium/assets/mixture/prm``), in eval mode."""
    path = Path(path) if path is not None else PRM_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no mixture PRM at {path}: config.json is missing")
    return LatentRewardModel.from_pretrained(path).to(device).eval()


def collect_mixture_rollouts(
    model: torch.nn.Module,
    num_samples: int,
    *,
    world: Optional[MixtureWorld] = None,
    config: Optional[SamplerConfig] = None,
    seed: int = 0,
    batch_size: int = 1024,
) -> PRMDataset:
    """``num_samples`` rollouts of ``model`` (prompts cycled in order), labelled with the ``combined`` reward.

    The library's :func:`~euphonium.rewards.prm.collect_rollouts` with :func:`sample_mixture` (default:
    the ``euphonium_fast`` preset's steps and shift, ODE) and :func:`mixture_reward_set` (parts kept).
    """
    world = world if world is not None else default_world()
    prompts = [world.prompts[i % world.num_prompts] for i in range(num_samples)]
    calls = iter(range(10**9))

    def sample_fn(batch):
        traj, embeds = sample_mixture(model, batch, world=world, config=config, seed=seed * 1_000_003 + next(calls))
        return traj.x0, embeds

    return collect_rollouts(
        sample_fn, latents_to_video, mixture_reward_set(), prompts, batch_size=batch_size, progress=False
    )


def train_mixture_prm(
    data: PRMDataset,
    *,
    world: Optional[MixtureWorld] = None,
    config: Optional[PRMTrainConfig] = None,
    held_out: Optional[PRMDataset] = None,
    output_dir: Union[str, Path, None] = None,
    seed: int = 0,
) -> Dict[str, object]:
    """Fit :func:`build_mixture_prm` to ``data`` with :class:`PRMTrainer`; returns ``{"prm", "history"}``."""
    config = config if config is not None else PRMTrainConfig(steps=2000, batch_size=256, eval_every=500, seed=seed)
    prm = build_mixture_prm(world, seed)
    trainer = PRMTrainer(prm, config, output_dir=output_dir)
    history = trainer.fit(data, held_out, progress=False)
    return {"prm": prm.eval(), "history": history}


@torch.no_grad()
def compare_with_oracle(
    prm: torch.nn.Module,
    data: PRMDataset,
    *,
    world: Optional[MixtureWorld] = None,
    sigmas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 0.9),
    seed: int = 0,
) -> List[Dict[str, float]]:
    """Per ``sigma``: the learned PRM against the oracle on ``data``'s ``x0`` noised with fixed noise.

    Rows: ``sigma``, ``pearson`` and ``spearman`` (PRM vs oracle), ``rmse`` (PRM - oracle),
    ``oracle_rmse_to_reward`` (oracle vs the outcome reward of each ``x0``: the irreducible noise).
    """
    world = world if world is not None else default_world()
    oracle = MixtureOraclePRM(world)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        s = torch.full((len(data),), float(sigma))
        x = noise_latents(data.x0, s, torch.randn(data.x0.shape, generator=gen))
        ours = prm(x, s, data.prompt_embeds).double()
        exact = oracle(x, s, data.prompt_embeds).double()
        pearson = float(torch.corrcoef(torch.stack([ours, exact]))[0, 1])
        rows.append(
            {
                "sigma": float(sigma),
                "pearson": pearson,
                "spearman": spearman(ours, exact),
                "rmse": float(((ours - exact) ** 2).mean().sqrt()),
                "oracle_rmse_to_reward": float(((exact - data.rewards.double()) ** 2).mean().sqrt()),
            }
        )
    return rows
