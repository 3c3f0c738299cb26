"""HunyuanVideo as ``HunyuanVideoPipeline`` computes it outside its transformer.

- :class:`HunyuanVideoTextEncoder`: ``HunyuanVideoPipeline.encode_prompt``: each prompt put into the
  prompt template (diffusers' ``DEFAULT_PROMPT_TEMPLATE``, a Llama-3 chat turn asking to describe the
  video), tokenized to ``max_sequence_length + crop_start`` tokens, the Llama hidden state
  ``num_hidden_layers_to_skip + 1`` from the top (the third from last), the template's first
  ``crop_start`` tokens cropped from it and its attention mask; CLIP's ``pooler_output`` (77 tokens) as
  ``pooled_projections``. The transformer's inputs ``encoder_attention_mask`` and ``pooled_projections``
  in the transformer's dtype (as the pipeline casts them) and the embedded guidance input
  ``guidance = guidance_scale * 1000`` computed in that dtype as the pipeline does. Cached per prompt.
- :func:`hunyuan_video_decode`: ``latents / scaling_factor``, the VAE, ``VideoProcessor.postprocess_video``
  (``(x / 2 + 0.5).clamp(0, 1)``) as ``[B, F, 3, H, W]``.

``HunyuanVideoTransformer3DModel`` takes ``(hidden_states [B, C, F, h, w], timestep = sigma * 1000, ...)``
as :class:`~euphonium.models.diffusers.DiffusersFlowModel` calls it; :class:`HunyuanVideoTransformer` only
passes the call on (and gives FSDP its two block lists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import Conditioning


def default_prompt_template() -> Dict[str, Any]:
    """diffusers' ``DEFAULT_PROMPT_TEMPLATE`` of HunyuanVideo (``template`` with one ``{}``, ``crop_start`` 95)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return dict(DEFAULT_PROMPT_TEMPLATE)


class HunyuanVideoTextEncoder:
    """Llama (templated, cropped, masked) and CLIP pooled embeddings as ``HunyuanVideoPipeline`` computes them.

    ``encoder(prompts) -> Conditioning(llama [B, L, D], kwargs={"encoder_attention_mask": [B, L],
    "pooled_projections": [B, P], "guidance": [B]})`` with ``L = max_sequence_length`` (the pipeline's
    default 256); the kwargs in ``transformer_dtype``.
    """

    def __init__(
        self,
        root: Path,
        device: torch.device,
        dtype: torch.dtype,
        max_sequence_length: int,
        guidance_scale: float,
        *,
        transformer_dtype: Optional[torch.dtype] = None,
        prompt_template: Optional[Dict[str, Any]] = None,
        num_hidden_layers_to_skip: int = 2,
    ):
        from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

        root = Path(root)
        self.template = prompt_template or default_prompt_template()
        if self.template.get("crop_start") is None:
            raise ValueError("prompt_template needs its crop_start (the template's tokens before the prompt)")
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2")
        self.llama = LlamaModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval()
        self.clip = CLIPTextModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype).to(device).eval()
        self.llama.requires_grad_(False)
        self.clip.requires_grad_(False)
        self.length = max_sequence_length
        self.skip = num_hidden_layers_to_skip
        self.guidance_scale = float(guidance_scale)
        self.dtype = transformer_dtype or dtype
        self.device = device
        self.cache: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _llama(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        crop = self.template["crop_start"]
        tokens = self.tokenizer(
            [self.template["template"].format(p) for p in prompts],
            max_length=self.length + crop,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            return_attention_mask=True,
        )
        mask = tokens.attention_mask.to(self.device)
        out = self.llama(input_ids=tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True)
        embeds = out.hidden_states[-(self.skip + 1)].to(self.llama.dtype)
        if crop > 0:
            embeds, mask = embeds[:, crop:], mask[:, crop:]
        return embeds, mask

    def _clip(self, prompts: List[str]) -> torch.Tensor:
        tokens = self.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.clip(tokens.input_ids.to(self.device), output_hidden_states=False).pooler_output

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            embeds, mask = self._llama(new)
            pooled = self._clip(new)
            for i, prompt in enumerate(new):
                self.cache[prompt] = (embeds[i], mask[i], pooled[i])
        rows = [self.cache[p] for p in prompts]
        embeds = torch.stack([r[0] for r in rows]).to(self.dtype)
        kwargs = {
            "encoder_attention_mask": torch.stack([r[1] for r in rows]).to(self.dtype),
            "pooled_projections": torch.stack([r[2] for r in rows]).to(self.dtype),
            "guidance": torch.tensor([self.guidance_scale] * len(prompts), dtype=self.dtype, device=embeds.device)
            * 1000.0,
        }
        return Conditioning(embeds, kwargs=kwargs)


@torch.no_grad()
def hunyuan_video_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, f, h, w]`` latents -> ``[B, F, 3, H, W]`` videos in [0, 1], as ``HunyuanVideoPipeline`` decodes."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    video = vae.decode(latents, return_dict=False)[0]
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).float().contiguous()


class HunyuanVideoTransformer(FlowTransformer):
    """``HunyuanVideoTransformer3DModel`` called as is (its dual- and single-stream blocks are FSDP's ``blocks``)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__({"transformer": transformer}, ("transformer",))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = False, **kwargs: Any):
        return self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
            **kwargs,
        )
