"""Outcome rewards on decoded videos and process reward models on noisy latents.

Outcome rewards share one interface, ``reward(videos [B, F, C, H, W] in [0, 1], prompts) -> [B]``
(:mod:`euphonium.rewards.base`); :class:`RewardSet` combines named rewards and returns the weighted
total with every part. Built in: DDPO's JPEG (in)compressibility, a CLIP text-video score from a
local ``CLIPModel`` folder, and :class:`CallableReward` for any callable or ``nn.Module``. The toy
world's exact rewards are registered as ``toy`` (:mod:`euphonium.toy.rewards`).

The process reward model (:mod:`euphonium.rewards.prm`) scores noisy latents,
``prm(x_sigma, sigma, prompt_embeds) -> [B]``; its gradient guides the sampler.
"""

# The model and judge rewards register in build_reward on import (transformers loads in their constructors).
from euphonium.rewards import aesthetic, hpsv2, image_reward, pickscore, videoalign, vlm_judge  # noqa: F401
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

# The PRM package loads lazily (PEP 562): importing the outcome rewards should not pull in diffusers.
_PRM_NAMES = (
    "LatentRewardModel",
    "PRMDataset",
    "PRMTrainConfig",
    "PRMTrainer",
    "collect_rollouts",
    "pool_prompt_embeds",
    "spearman",
)


def __getattr__(name: str):
    if name in _PRM_NAMES:
        from euphonium.rewards import prm

        return getattr(prm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The embedded worlds live above this layer (euphonium.toy): registered by name, imported when built.
register_reward("toy", "euphonium.toy.rewards:toy_reward_fn")
register_reward("mixture", "euphonium.toy.mixture:mixture_reward_fn")

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
    "available_rewards",
    "build_reward",
    "check_reward_values",
    "check_videos",
    "collect_rollouts",
    "jpeg_size_kb",
    "pool_prompt_embeds",
    "register_reward",
    "spearman",
]
