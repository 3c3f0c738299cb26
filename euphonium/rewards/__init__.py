"""Outcome rewards on decoded videos and process reward models on noisy latents.

Outcome rewards share one interface, ``reward(videos [B, F, C, H, W] in [0, 1], prompts) -> [B]``
(:mod:`euphonium.rewards.base`); :class:`RewardSet` combines named rewards and returns the weighted
total with every part. Built in: the toy world's exact rewards (:func:`toy_reward_set`), DDPO's JPEG
(in)compressibility, a CLIP text-video score from a local ``CLIPModel`` folder, and
:class:`CallableReward` for any callable or ``nn.Module``.

The process reward model (:mod:`euphonium.rewards.prm`) scores noisy latents,
``prm(x_sigma, sigma, prompt_embeds) -> [B]``; its gradient guides the sampler.
"""

from typing import Mapping, Optional

from euphonium.rewards.base import (
    CallableReward,
    Reward,
    RewardOutput,
    RewardSet,
    available_rewards,
    build_reward,
    check_reward_values,
    check_videos,
    register_reward,
)
from euphonium.rewards.clip import ClipScore
from euphonium.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb

# The PRM module loads lazily (PEP 562): `python -m euphonium.rewards.prm` must not find it already
# imported by this package, and importing the outcome rewards should not pull in diffusers.
_PRM_NAMES = (
    "TOY_PRM_DIR",
    "LatentRewardModel",
    "PRMDataset",
    "PRMTrainConfig",
    "PRMTrainer",
    "collect_rollouts",
    "load_toy_prm",
    "pool_prompt_embeds",
    "spearman",
)


def __getattr__(name: str):
    if name in _PRM_NAMES:
        from euphonium.rewards import prm

        return getattr(prm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _toy_rewards(weights: Optional[Mapping[str, float]] = None):
    from euphonium.rewards.toy import toy_rewards

    def toy(videos, prompts):
        return toy_rewards(videos, prompts, weights=weights)

    return toy


def toy_reward_set(weights: Optional[Mapping[str, float]] = None) -> RewardSet:
    """The toy world's exact rewards as a :class:`RewardSet` (see :mod:`euphonium.rewards.toy`).

    ``total`` is the toy ``combined`` reward, ``sum_k w_k r_k / sum_k w_k`` with ``weights`` over
    ``color``, ``shape``, ``size``, ``direction``, ``smoothness`` (default: the toy defaults); every
    term is also returned in ``parts`` (weight 0 in the set, so it is logged, not counted twice).
    """
    from euphonium.rewards.toy import TERMS

    return RewardSet({"toy": _toy_rewards(weights)}, weights={"combined": 1.0, **{t: 0.0 for t in TERMS}})


register_reward("toy", _toy_rewards)

__all__ = [
    "CallableReward",
    "ClipScore",
    "JpegCompressibility",
    "JpegIncompressibility",
    "LatentRewardModel",
    "PRMDataset",
    "PRMTrainConfig",
    "PRMTrainer",
    "Reward",
    "RewardOutput",
    "RewardSet",
    "TOY_PRM_DIR",
    "available_rewards",
    "build_reward",
    "check_reward_values",
    "check_videos",
    "collect_rollouts",
    "jpeg_size_kb",
    "load_toy_prm",
    "pool_prompt_embeds",
    "register_reward",
    "spearman",
    "toy_reward_set",
]
