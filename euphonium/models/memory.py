"""Computed (not measured) activation memory of one training forward of a diffusers flow transformer.

:func:`activation_memory` reads a transformer's ``config.json`` values (``WanTransformer3DModel``,
``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``HunyuanVideoTransformer3DModel``) and a video
size, and counts the tensors autograd keeps for the backward pass of one sample, at 2 bytes a value
(bf16), with and without gradient checkpointing.

Tokens. ``latent frames = (F - 1) / t + 1`` (``t`` the VAE's temporal stride, 4 for Wan and
HunyuanVideo; images have one frame), latent ``H / s x W / s`` (``s`` = 8), cut into the transformer's
patches (Wan ``(1, 2, 2)``, HunyuanVideo 2 x 2 and ``patch_size_t``, SD3 2 x 2, FLUX's 2 x 2 packing
done before its transformer): ``N`` image/video tokens; ``T`` text tokens (the padded prompt length).

Per block, per token, with ``d`` the hidden width and ``f`` the FFN width (values of width ``d`` or ``f``):

- attention sub-block, ``8d`` (+ ``2d`` with q/k RMS norms): the norm's input, the normalised and the
  adaLN-modulated tensors (the latter is the Q/K/V projections' input), q and k before their norm,
  q, k, v, the attention output (the out-projection's input) and the out-projection's output
  (multiplied by the adaLN gate);
- FFN sub-block, ``4d + 2f``: the norm's input, normalised, modulated (the up-projection's input),
  the GELU's input and output (the down-projection's input), the down-projection's output (gated);
- Wan's cross-attention, ``5d`` per video token (its norm's input and output, q before and after its
  norm, the attention output) and ``3d`` per text token (k before and after its norm, v);
- FLUX/HunyuanVideo single-stream block, ``11d + 3f``: the attention sub-block's tensors up to the
  attention output (``9d``), the MLP branch's GELU input and output (``2f``), the concatenated
  ``[attention, MLP]`` tensor (``d + f``, the out-projection's input) and the out-projection's gated
  output (``d``).

Blocks: Wan ``num_layers x`` (attention + cross-attention + FFN) over ``N``; SD3 ``num_layers x``
joint blocks over ``N + T`` (each stream has its own attention and FFN sub-block; the dual-attention
layers add a second attention sub-block over ``N``); FLUX and HunyuanVideo ``num_layers`` such joint
blocks and ``num_single_layers`` single-stream blocks over ``N + T``.

Without checkpointing every block's tensors are kept. With diffusers' gradient checkpointing (per
block) only each block's inputs (the ``N`` or ``N + T`` hidden states) are kept, plus one block's tensors
while backward recomputes it: ``sum(inputs) + max(block)``.

Assumptions: flash or memory-efficient attention (the score matrix is not stored: SDPA's math path
would add ``heads x N^2`` values per block); bf16 tensors (norms' float32 upcasts, RoPE tables, the
timestep and text embedders, the patch embedding and the final projection, dropout-free, not counted;
SD3's last block, whose text stream stops after attention, and HunyuanVideo's two token-refiner
blocks over ``T`` tokens are counted as full blocks and not at all, respectively); one sample (a
training forward with classifier-free guidance runs two). Gradients flowing through backward and the
allocator's fragmentation come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Tuple

BYTES_PER_VALUE = 2  # bf16


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes of one sample's training forward (see the module docstring for the count)."""

    tokens: int  # N: image/video tokens
    text_tokens: int  # T
    blocks: Tuple[int, ...]  # bytes kept inside each block, in order
    block_inputs: Tuple[int, ...]  # bytes of each block's inputs

    @property
    def without_checkpointing(self) -> int:
        return sum(self.blocks)

    @property
    def with_checkpointing(self) -> int:
        return sum(self.block_inputs) + max(self.blocks)


def _attention(d: int, qk_norm: bool) -> int:
    return 8 * d + (2 * d if qk_norm else 0)


def _ffn(d: int, f: int) -> int:
    return 4 * d + 2 * f


def _grid(size: int, stride: int, patch: int, key: str) -> int:
    if not isinstance(size, int) or size <= 0 or size % (stride * patch):
        raise ValueError(f"{key} must be a positive multiple of {stride * patch} (VAE stride x patch), got {size}")
    return size // (stride * patch)


def latent_frames(num_frames: int, temporal_stride: int) -> int:
    """``(F - 1) / t + 1``: the latent frames of ``F`` frames under a causal video VAE of temporal stride ``t``."""
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % temporal_stride:
        raise ValueError(f"num_frames must be 1 + a multiple of {temporal_stride}, got {num_frames}")
    return (num_frames - 1) // temporal_stride + 1


def activation_memory(
    class_name: str,
    config: Mapping[str, Any],
    *,
    num_frames: int,
    height: int,
    width: int,
    text_tokens: int,
    spatial_stride: int = 8,
    temporal_stride: int = 4,
) -> ActivationMemory:
    """The activation memory of one sample through the transformer ``class_name`` with ``config`` (its
    ``config.json`` values) at ``num_frames x height x width`` pixels and ``text_tokens`` prompt tokens.

    Images (SD3, FLUX) take ``num_frames=1``. Raises ``ValueError`` for an unknown class or a size that
    the VAE's strides and the patch do not divide.
    """
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    c = dict(config)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    t = text_tokens
    if class_name == "WanTransformer3DModel":
        p_t, p_h, p_w = c["patch_size"]
        frames = latent_frames(num_frames, temporal_stride)
        if frames % p_t:
            raise ValueError(f"num_frames gives {frames} latent frames, not a multiple of the patch's {p_t}")
        n = frames // p_t * _grid(height, spatial_stride, p_h, "height") * _grid(width, spatial_stride, p_w, "width")
        per_token = _attention(d, bool(c.get("qk_norm"))) + 5 * d + _ffn(d, c["ffn_dim"])
        blocks = [n * per_token + t * 3 * d] * c["num_layers"]
        inputs = [n * d] * c["num_layers"]
    elif class_name == "SD3Transformer2DModel":
        _check_image(num_frames, class_name)
        p = c["patch_size"]
        n = _grid(height, spatial_stride, p, "height") * _grid(width, spatial_stride, p, "width")
        attention = _attention(d, bool(c.get("qk_norm")))
        joint = (n + t) * (attention + _ffn(d, 4 * d))
        dual = set(c.get("dual_attention_layers") or ())
        blocks = [joint + (n * attention if i in dual else 0) for i in range(c["num_layers"])]
        inputs = [(n + t) * d] * c["num_layers"]
    elif class_name in ("FluxTransformer2DModel", "HunyuanVideoTransformer3DModel"):
        if class_name == "FluxTransformer2DModel":
            _check_image(num_frames, class_name)
            f = 4 * d
            # FluxPipeline packs 2 x 2 latent patches before the transformer (its own patch_size is 1).
            n = _grid(height, spatial_stride, 2, "height") * _grid(width, spatial_stride, 2, "width")
        else:
            f = int(c.get("mlp_ratio", 4.0) * d)
            p, p_t = c["patch_size"], c.get("patch_size_t", 1)
            frames = latent_frames(num_frames, temporal_stride)
            if frames % p_t:
                raise ValueError(f"num_frames gives {frames} latent frames, not a multiple of patch_size_t {p_t}")
            n = frames // p_t * _grid(height, spatial_stride, p, "height") * _grid(width, spatial_stride, p, "width")
        joint = (n + t) * (_attention(d, True) + _ffn(d, f))
        single = (n + t) * (11 * d + 3 * f)
        blocks = [joint] * c["num_layers"] + [single] * c["num_single_layers"]
        inputs = [(n + t) * d] * (c["num_layers"] + c["num_single_layers"])
    else:
        raise ValueError(
            f"class_name must be one of WanTransformer3DModel, SD3Transformer2DModel, FluxTransformer2DModel, "
            f"HunyuanVideoTransformer3DModel, got {class_name!r}"
        )
    return ActivationMemory(n, t, _bytes(blocks), _bytes(inputs))


def _check_image(num_frames: int, class_name: str) -> None:
    if num_frames != 1:
        raise ValueError(f"num_frames must be 1 for the image transformer {class_name}, got {num_frames}")


def _bytes(values: Sequence[int]) -> Tuple[int, ...]:
    return tuple(v * BYTES_PER_VALUE for v in values)


__all__ = ["ActivationMemory", "activation_memory", "latent_frames"]
