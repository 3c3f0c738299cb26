"""Stable Diffusion 3 / 3.5 as ``StableDiffusion3Pipeline`` computes it outside its transformer, and its transformer
on one-frame video latents.

- :class:`SD3TextEncoder`: the prompt embeddings of ``StableDiffusion3Pipeline.encode_prompt``: the two CLIP
  encoders' penultimate hidden states side by side, zero-padded to the T5 width, followed by T5's
  last hidden state (no attention mask, as the pipeline), and the two CLIP projections side by side as
  ``pooled_projections``. Cached per prompt.
- :class:`SD3Transformer`: ``SD3Transformer2DModel`` called on latents ``[B, C, 1, h, w]`` (images are
  one-frame videos here), timestep ``sigma * 1000`` as the pipeline passes ``scheduler.timesteps``.
- :func:`sd3_decode`: ``latents / scaling_factor + shift_factor``, the VAE, ``(x / 2 + 0.5).clamp(0, 1)``
  (the pipeline's ``VaeImageProcessor.postprocess``), as ``[B, 1, 3, H, W]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import Conditioning


class SD3TextEncoder:
    """CLIP-L, CLIP-G and T5 prompt embeddings as ``StableDiffusion3Pipeline.encode_prompt`` computes them.

    ``encoder(prompts) -> Conditioning(prompt_embeds [B, 77 + L, D_t5], kwargs={"pooled_projections": [B, P]})``
    with ``L = max_sequence_length`` (the pipeline's, default 256) and the CLIP length the first
    tokenizer's ``model_max_length`` (77), as the pipeline reads it.
    """

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        root = Path(root)
        self.tokenizers = [AutoTokenizer.from_pretrained(root / f) for f in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        self.clips = [
            CLIPTextModelWithProjection.from_pretrained(root / f, torch_dtype=dtype).to(device).eval()
            for f in ("text_encoder", "text_encoder_2")
        ]
        self.t5 = T5EncoderModel.from_pretrained(root / "text_encoder_3", torch_dtype=dtype).to(device).eval()
        for model in (*self.clips, self.t5):
            model.requires_grad_(False)
        self.clip_length = self.tokenizers[0].model_max_length
        self.length = max_sequence_length
        self.device = device
        self.cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _clip(self, index: int, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizers[index](
            prompts, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt"
        )
        out = self.clips[index](tokens.input_ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.clips[0].dtype), out[0]

    def _t5(self, prompts: List[str]) -> torch.Tensor:
        tokens = self.tokenizers[2](
            prompts,
            padding="max_length",
            max_length=self.length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return self.t5(tokens.input_ids.to(self.device))[0].to(self.t5.dtype)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            clip_l, pooled_l = self._clip(0, new)
            clip_g, pooled_g = self._clip(1, new)
            t5 = self._t5(new)
            clip = torch.cat([clip_l, clip_g], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds = torch.cat([clip, t5], dim=-2)
            pooled = torch.cat([pooled_l, pooled_g], dim=-1)
            for i, prompt in enumerate(new):
                self.cache[prompt] = (embeds[i], pooled[i])
        embeds = torch.stack([self.cache[p][0] for p in prompts])
        pooled = torch.stack([self.cache[p][1] for p in prompts])
        return Conditioning(embeds, kwargs={"pooled_projections": pooled})


class SD3Transformer(FlowTransformer):
    """``SD3Transformer2DModel`` on one-frame latents ``[B, C, 1, h, w]`` (the frame axis is dropped and restored)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__({"transformer": transformer}, ("transformer",))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor]:
        if hidden_states.dim() != 5 or hidden_states.shape[2] != 1:
            raise ValueError(f"SD3Transformer takes latents [B, C, 1, h, w], got {tuple(hidden_states.shape)}")
        out = self.transformer(
            hidden_states=hidden_states[:, :, 0],
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
            **kwargs,
        )[0]
        return (out.unsqueeze(2),)


@torch.no_grad()
def sd3_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, 1, h, w]`` latents -> ``[B, 1, 3, H, W]`` images in [0, 1], as ``StableDiffusion3Pipeline``
    (and ``FluxPipeline``, after unpacking) decode: un-scale, un-shift, VAE, ``postprocess``."""
    latents = latents[:, :, 0].to(vae.dtype)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).float()[:, None]
