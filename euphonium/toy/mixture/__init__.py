"""The analytic mixture world: per-prompt Gaussian mixtures in ``D`` dimensions with an exact oracle PRM.

- :mod:`.world`: the mixtures (:class:`MixtureWorld`, :func:`build_mixture_world`), prompts and their
  embeddings, latents <-> "videos", the outcome rewards (``build_reward("mixture")`` target
  :func:`mixture_reward_fn`) and the exact oracle PRM :class:`MixtureOraclePRM`.
- :mod:`.model`: the MLP flow model (:class:`MixtureFlowModel`, called like a diffusers transformer),
  its pretraining and the committed weights, sampling through the library's sampler, base rates.
- :mod:`.prm`: the learned PRM (the library's ``LatentRewardModel`` and ``PRMTrainer``) and its
  comparison with the oracle.
- :mod:`.grpo`: a minimal GRPO loop from the sampler and ops (a check of the RL signal).

``python -m euphonium.toy.mixture {pretrain, rates, grpo}``.
"""

from euphonium.toy.mixture.model import (
    ASSET_DIR,
    MODEL_DIR,
    MixtureFlowModel,
    MixturePretrainConfig,
    build_mixture_model,
    load_mixture_model,
    measure_base_rates,
    mixture_sampler_config,
    oracle_calibration,
    pretrain_mixture_model,
    sample_mixture,
)
from euphonium.toy.mixture.world import (
    DEFAULT_REWARD_WEIGHTS,
    REWARD_PARTS,
    TARGET,
    MixtureOraclePRM,
    MixtureWorld,
    MixtureWorldConfig,
    build_mixture_world,
    default_world,
    latents_to_video,
    mixture_reward_fn,
    mixture_reward_set,
    mixture_rewards,
    video_to_latents,
)

__all__ = [
    "ASSET_DIR",
    "DEFAULT_REWARD_WEIGHTS",
    "MODEL_DIR",
    "REWARD_PARTS",
    "TARGET",
    "MixtureFlowModel",
    "MixtureOraclePRM",
    "MixturePretrainConfig",
    "MixtureWorld",
    "MixtureWorldConfig",
    "build_mixture_model",
    "build_mixture_world",
    "default_world",
    "latents_to_video",
    "load_mixture_model",
    "measure_base_rates",
    "mixture_reward_fn",
    "mixture_reward_set",
    "mixture_rewards",
    "mixture_sampler_config",
    "oracle_calibration",
    "pretrain_mixture_model",
    "sample_mixture",
    "video_to_latents",
]
