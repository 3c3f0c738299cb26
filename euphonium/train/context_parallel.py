"""Context parallelism (``context_parallel: N``): each sample's tokens split over N ranks, by diffusers.

diffusers' ``ModelMixin.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` does the work
for the transformer classes that declare a ``_cp_plan`` (Wan, FLUX): the tokens are split over the N ranks of
a context-parallel group after the patch embedding, attention trades tokens for heads (Ulysses all-to-all:
each rank attends over the whole sequence with 1/N of the heads) and the output projection is all-gathered,
so every rank of the group gets the whole velocity. Ring attention is not offered: diffusers runs it only
with the flash or cuDNN attention backends (PyTorch's SDPA backend cannot return the log-sum-exp it needs).

What the trainer adds (:class:`RankLayout`):

- W ranks form a (W / N) x N mesh: ranks ``d N .. d N + N - 1`` are context-parallel group ``d`` and share
  data rank ``d`` of W / N. Everything drawn per rank (prompts, rollout noise, minibatch order, evaluation
  share) is drawn per data rank, so the members of a group run the same forwards on the same data, as the
  collectives inside attention need; advantages and evaluation sums are taken over one rank per group.
- Gradients: each rank's backward gives the part of each weight's gradient that flows through its own
  tokens (the output gather's backward hands each rank its own slice), so the sum over a group is the
  sample's gradient. DDP or FSDP2 over all W ranks average, which is 1 / N of the data-parallel mean: the
  trainer scales the loss's backward by N (and logs the unscaled loss), and clipping sees the exact gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from euphonium.models.adapter import FlowTransformer
from euphonium.train.config import ConfigError, TrainConfig

# model.kind -> the diffusers transformer class the family trains (the toy world's is a small Wan).
_TRANSFORMER_CLASSES = {
    "toy": "WanTransformer3DModel",
    "wan": "WanTransformer3DModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel",
}


def _has_plan(class_name: Optional[str]) -> bool:
    import diffusers

    return class_name is not None and getattr(getattr(diffusers, class_name), "_cp_plan", None) is not None


def check_context_parallel(config: TrainConfig, world: int) -> None:
    """Raise :class:`ConfigError` when ``config.context_parallel`` cannot run on ``world`` ranks here, before
    any weights load: N must divide the ranks, the family's transformer needs diffusers' ``_cp_plan`` and
    diffusers places each rank on an accelerator (with none it would divide by a device count of zero)."""
    n = config.context_parallel
    if n == 1:
        return
    if world % n:
        raise ConfigError(f"context_parallel ({n}) must divide the ranks ({world}, torchrun --nproc_per_node)")
    kind = config.model.kind
    name = _TRANSFORMER_CLASSES.get(kind)
    if not _has_plan(name):
        supported = sorted(k for k, v in _TRANSFORMER_CLASSES.items() if _has_plan(v))
        raise ConfigError(
            f"context_parallel={n}: model.kind={kind} ({name or 'not a diffusers transformer'}) has no "
            f"context-parallel plan in diffusers (_cp_plan); kinds with one: {', '.join(supported)}"
        )
    if torch.accelerator.device_count() < 1:
        raise ConfigError(
            f"context_parallel={n} needs an accelerator per rank (diffusers' context parallelism places each rank "
            "on a CUDA/XPU device); this machine has none"
        )


@dataclass
class RankLayout:
    """Which data a rank works on (see the module docstring).

    ``data_rank`` of ``data_world`` (``rank // N`` of ``W // N``); ``data_group``: the ranks of this rank's
    position in every context-parallel group, over which advantages and evaluation sums are taken (None: the
    world); ``mesh``: diffusers' ``("data", "ring", "ulysses")`` device mesh (None without context parallelism).
    """

    degree: int
    data_rank: int
    data_world: int
    data_group: Optional[dist.ProcessGroup] = None
    mesh: Optional[object] = None


def rank_layout(rank: int, world: int, degree: int, device: torch.device) -> RankLayout:
    """The layout of ``rank`` of ``world`` with context-parallel groups of ``degree`` ranks (a collective
    when ``degree > 1``: every rank builds the mesh)."""
    if degree == 1:
        return RankLayout(1, rank, world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // degree, 1, degree), mesh_dim_names=("data", "ring", "ulysses"))
    return RankLayout(degree, rank // degree, world // degree, mesh["data"].get_group(), mesh)


def diffusers_models(transformer: torch.nn.Module) -> List[torch.nn.Module]:
    """The diffusers transformers inside a policy's transformer (Wan2.2: both experts, the frozen one too)."""
    if isinstance(transformer, FlowTransformer):
        return [getattr(transformer, name) for name in transformer.model_names]
    return [transformer]


def _tokens_per_sample(model: torch.nn.Module, latent_shape: tuple, text_tokens: int) -> Dict[str, int]:
    """The sequence lengths ``model``'s ``_cp_plan`` splits, for the classes whose inputs are known here."""
    _, frames, height, width = latent_shape
    name = type(model).__name__
    if name == "WanTransformer3DModel":
        pt, ph, pw = model.config.patch_size
        return {"video tokens": (frames // pt) * (height // ph) * (width // pw)}
    if name == "FluxTransformer2DModel":
        # 2x2 packed latents; the text is padded to model.max_sequence_length tokens (models/flux.py).
        return {"image tokens": (height // 2) * (width // 2), "text tokens (model.max_sequence_length)": text_tokens}
    return {}


def check_transformer(model: torch.nn.Module, degree: int, latent_shape: tuple, text_tokens: int) -> None:
    """Raise :class:`ConfigError` unless Ulysses attention over ``degree`` ranks fits ``model``: ``degree``
    must divide its attention heads and every sequence its ``_cp_plan`` splits (``latent_shape`` ``(C, F, H,
    W)`` of one sample, ``text_tokens`` its padded prompt length)."""
    name = type(model).__name__
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if heads is not None and heads % degree:
        raise ConfigError(
            f"context_parallel ({degree}) must divide the attention heads of {name} ({heads}): Ulysses attention "
            "splits the heads over the ranks"
        )
    for what, count in _tokens_per_sample(model, latent_shape, text_tokens).items():
        if count % degree:
            raise ConfigError(
                f"context_parallel ({degree}) must divide the {what} of one sample of {name} ({count}; latent shape "
                f"{tuple(latent_shape)}): change the video size"
            )


def enable_context_parallel(
    layout: RankLayout,
    transformers: List[torch.nn.Module],
    *,
    prm: Optional[torch.nn.Module],
    latent_shape: tuple,
    text_tokens: int,
) -> None:
    """Turn on diffusers' Ulysses attention over ``layout``'s groups in every diffusers transformer of
    ``transformers`` (the policy's, the frozen reference's). Call it after LoRA, gradient checkpointing and
    the attention backend are set and before DDP/FSDP2 wraps the policy.

    A backbone PRM sharing the policy's transformer is refused: it averages the hidden states of the whole
    sequence before ``proj_out``, where each rank holds its own slice only. A PRM of its own runs unsplit.
    """
    from diffusers import ContextParallelConfig

    if prm is not None and any(getattr(prm, "transformer", None) in diffusers_models(t) for t in transformers):
        raise ConfigError(
            "context_parallel > 1 with a backbone PRM sharing the policy's transformer (prm_path on the model's "
            "own base, LoRA) is not supported: the PRM pools hidden states that context parallelism splits over "
            "the ranks; use a conv PRM or context_parallel=1"
        )
    for transformer in transformers:
        for model in diffusers_models(transformer):
            check_transformer(model, layout.degree, latent_shape, text_tokens)
            try:
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=layout.degree, mesh=layout.mesh))
            except ValueError as err:  # an attention backend without context parallelism
                raise ConfigError(f"context_parallel={layout.degree} (model.attention_backend): {err}") from None
