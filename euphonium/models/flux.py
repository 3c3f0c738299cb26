"""FLUX.1 as ``FluxPipeline`` computes it outside its transformer, and its transformer on one-frame video latents.

- :class:`FluxTextEncoder`: ``FluxPipeline.encode_prompt``: T5's last hidden state (no attention mask)
  as ``encoder_hidden_states``, CLIP's ``pooler_output`` as ``pooled_projections``, and the embedded
  guidance input ``guidance = guidance_scale`` per sample (FLUX.1-dev is guidance-distilled: no CFG
  needed). Cached per prompt.
- :class:`FluxTransformer`: ``FluxTransformer2DModel`` on latents ``[B, C, 1, h, w]``: packed into 2x2
  patches ``[B, h/2 * w/2, 4C]`` with ``FluxPipeline._pack_latents``' permutation, image position ids
  ``(0, row, col)`` and zero text ids as ``_prepare_latent_image_ids``/``encode_prompt`` make them,
  ``timestep / 1000`` as the pipeline passes it, and the result unpacked. Packing is a permutation, so
  the sampler's SDE and log-densities on unpacked latents equal those on packed ones.
- Decoding is SD3's (:func:`euphonium.models.sd3.sd3_decode`: ``/ scaling_factor + shift_factor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import NUM_TRAIN_TIMESTEPS, Conditioning


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4C]``, ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, h/2 * w/2, 4C]`` -> ``[B, C, h, w]``, ``FluxPipeline._unpack_latents`` at latent size ``h x w``."""
    b, _, channels = latents.shape
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[h * w, 3]`` position ids ``(0, row, col)`` of the packed grid, ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxTextEncoder:
    """CLIP pooled and T5 prompt embeddings as ``FluxPipeline.encode_prompt`` computes them, cached.

    ``encoder(prompts) -> Conditioning(t5 [B, L, D], kwargs={"pooled_projections": [B, P], "guidance": [B]})``;
    ``guidance`` (float32, as the pipeline makes it) is there only when the transformer embeds guidance
    (``guidance_embeds``: FLUX.1-dev); FLUX.1-schnell gets none.
    """

    def __init__(
        self,
        root: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_sequence_length: int,
        guidance_scale: float,
        guidance_embeds: bool,
    ):
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        root = Path(root)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2")
        self.clip = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval()
        self.t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype).to(device).eval()
        self.clip.requires_grad_(False)
        self.t5.requires_grad_(False)
        self.clip_length = self.tokenizer.model_max_length
        self.length = max_sequence_length
        self.guidance_scale = float(guidance_scale) if guidance_embeds else None
        self.device = device
        self.cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _embed(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt"
        )
        pooled = self.clip(tokens.input_ids.to(self.device), output_hidden_states=False).pooler_output
        tokens = self.tokenizer_2(
            prompts, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        embeds = self.t5(tokens.input_ids.to(self.device), output_hidden_states=False)[0]
        return embeds.to(self.t5.dtype), pooled.to(self.clip.dtype)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            embeds, pooled = self._embed(new)
            for i, prompt in enumerate(new):
                self.cache[prompt] = (embeds[i], pooled[i])
        embeds = torch.stack([self.cache[p][0] for p in prompts])
        kwargs = {"pooled_projections": torch.stack([self.cache[p][1] for p in prompts])}
        if self.guidance_scale is not None:
            kwargs["guidance"] = torch.full((len(prompts),), self.guidance_scale, device=embeds.device)
        return Conditioning(embeds, kwargs=kwargs)


class FluxTransformer(FlowTransformer):
    """``FluxTransformer2DModel`` on one-frame latents ``[B, C, 1, h, w]`` (packed, ids made, timestep / 1000)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__({"transformer": transformer}, ("transformer",))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = False,
        guidance: Any = None,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor]:
        if hidden_states.dim() != 5 or hidden_states.shape[2] != 1:
            raise ValueError(f"FluxTransformer takes latents [B, C, 1, h, w], got {tuple(hidden_states.shape)}")
        b, c, _, h, w = hidden_states.shape
        dtype = hidden_states.dtype
        out = self.transformer(
            hidden_states=pack_latents(hidden_states[:, :, 0]),
            timestep=timestep / NUM_TRAIN_TIMESTEPS,
            guidance=guidance if self.transformer.config.guidance_embeds else None,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=hidden_states.device, dtype=dtype),
            img_ids=latent_image_ids(h // 2, w // 2, hidden_states.device, dtype),
            return_dict=False,
            **kwargs,
        )[0]
        return (unpack_latents(out, h, w).unsqueeze(2),)
