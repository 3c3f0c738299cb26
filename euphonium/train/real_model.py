"""A real diffusers Wan2.1 text-to-video pipeline folder as a trainer :class:`Policy`.

The folder is what ``WanPipeline.save_pretrained`` writes (e.g. ``Wan2.1-T2V-1.3B-Diffusers``):
``transformer/`` (trained), ``vae/`` (``AutoencoderKLWan``), ``text_encoder/`` (UMT5) and
``tokenizer/`` (frozen). Prompt embeddings are computed once per prompt and cached; latents are
decoded as ``WanPipeline`` does (un-normalised with the VAE's ``latents_mean``/``latents_std``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from euphonium.models.diffusers import Conditioning
from euphonium.train.config import ConfigError, TrainConfig

_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_wan_folder(path: str) -> Path:
    """``path`` as a Path if it is a diffusers Wan pipeline folder, else a ConfigError saying what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model.path {path}: no such directory")
    missing = [sub for sub in _SUBFOLDERS if not (root / sub).is_dir()]
    if missing or not (root / "transformer" / "config.json").is_file():
        raise ConfigError(f"model.path {path} is not a diffusers Wan pipeline folder: missing "
                          f"{', '.join(missing) or 'transformer/config.json'} (expected {', '.join(_SUBFOLDERS)})")
    return root


class WanTextEncoder:
    """UMT5 prompt embeddings as ``WanPipeline`` computes them (zero past each prompt's tokens), cached."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.model = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.length = max_sequence_length
        self.cache: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: List[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            tokens = self.tokenizer(new, padding="max_length", max_length=self.length, truncation=True,
                                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            mask = tokens.attention_mask.to(self.device)
            hidden = self.model(tokens.input_ids.to(self.device), mask).last_hidden_state
            hidden = hidden * mask[..., None].to(hidden.dtype)
            for prompt, h in zip(new, hidden):
                self.cache[prompt] = h
        return torch.stack([self.cache[p] for p in prompts])


def build_wan_policy(config: TrainConfig, device: torch.device):
    """The :class:`~euphonium.train.trainer.Policy` of a local Wan2.1 pipeline folder."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from euphonium.rewards.prm import LatentRewardModel
    from euphonium.train.trainer import Policy

    root = check_wan_folder(config.model.path)
    if not config.prompts:
        raise ConfigError("prompts must list the training prompts for model.kind=wan")
    if config.algorithm == "euphonium" and not config.prm_path:
        raise ConfigError("algorithm=euphonium with model.kind=wan needs prm_path (a LatentRewardModel folder)")
    dtype = _DTYPES[config.model.dtype]
    transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype).to(device)
    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    text = WanTextEncoder(root, device, dtype, config.model.max_sequence_length)

    t_scale, s_scale = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if (config.model.num_frames - 1) % t_scale:
        raise ConfigError(f"model.num_frames - 1 must be divisible by {t_scale}, got {config.model.num_frames}")
    patch = transformer.config.patch_size
    for key, size in (("height", config.model.height), ("width", config.model.width)):
        if size % (s_scale * patch[1]):
            raise ConfigError(f"model.{key} must be a multiple of {s_scale * patch[1]}, got {size}")
    latent_shape = (transformer.config.in_channels, (config.model.num_frames - 1) // t_scale + 1,
                    config.model.height // s_scale, config.model.width // s_scale)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)

    def encode(prompts):
        embeds = text(list(prompts))
        negative = text([""] * len(prompts)) if config.model.cfg_scale > 1 else None
        return Conditioning(embeds, negative_prompt_embeds=negative)

    @torch.no_grad()
    def decode(latents):
        video = vae.decode(latents.float() * std + mean, return_dict=False)[0]  # [B, C, F, H, W] in [-1, 1]
        return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).contiguous()

    prm = None
    if config.algorithm == "euphonium":
        prm = LatentRewardModel.from_pretrained(config.prm_path).to(device).eval()
    return Policy(transformer, encode, decode, latent_shape, list(config.prompts), prm)
