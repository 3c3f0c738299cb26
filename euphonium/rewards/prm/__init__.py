"""The latent process reward model (PRM) and training it.

A PRM scores a noisy latent ``x_sigma = (1 - sigma) x0 + sigma eps`` by the outcome reward the clean
clip ``x0`` is expected to get, ``r_p(x_sigma, sigma, prompt_embeds) -> [B]`` (the backbone PRM: the policy's
whole ``Conditioning`` for ``prompt_embeds``). The sampler adds
``c * grad_x r_p`` to the SDE mean at guided steps (docs/DESIGN.md), so a PRM has to be noise-aware,
text-conditioned and cheap to differentiate.

- :mod:`.model`: :class:`LatentRewardModel` and :func:`pool_prompt_embeds`.
- :mod:`.data`: :class:`PRMDataset`, :func:`collect_rollouts`, :func:`relabel_prompts`, quality measures.
- :mod:`.trainer`: :class:`PRMTrainConfig`, :class:`PRMTrainer` (trains either kind).
- :mod:`.backbone`: :class:`BackbonePRM` (the family's transformer with a reward head), :func:`load_prm` (a PRM
  folder of either kind: ``prm_kind.json`` says ``backbone``, else a ``LatentRewardModel``).
- :mod:`.shards`: :func:`collect_shards` (rollouts of any configured model, resumable shards),
  :func:`load_shards`, the report's :func:`calibration_by_sigma` and :func:`guided_step_win_rate`.

The command line (collect, train, report) is ``python -m euphonium.prm``.
"""

from euphonium.rewards.prm.backbone import BackbonePRM, load_prm, prm_kind
from euphonium.rewards.prm.data import (
    SIGMA_BUCKETS,
    PRMDataset,
    SampleFn,
    collect_rollouts,
    correlation_by_sigma,
    noise_latents,
    relabel_prompts,
    spearman,
)
from euphonium.rewards.prm.model import LatentRewardModel, pool_prompt_embeds
from euphonium.rewards.prm.trainer import LOSSES, LR_SCHEDULES, PRMTrainConfig, PRMTrainer, prm_loss, trainable_prm

__all__ = [
    "BackbonePRM",
    "LOSSES",
    "LR_SCHEDULES",
    "SIGMA_BUCKETS",
    "LatentRewardModel",
    "PRMDataset",
    "PRMTrainConfig",
    "PRMTrainer",
    "SampleFn",
    "collect_rollouts",
    "correlation_by_sigma",
    "load_prm",
    "noise_latents",
    "pool_prompt_embeds",
    "prm_kind",
    "prm_loss",
    "relabel_prompts",
    "spearman",
    "trainable_prm",
]
