"""What the trainer trains, per model family: a :class:`Policy` built from a config.

- ``model.kind=toy``: the committed toy video world (:mod:`euphonium.toy`).
- ``model.kind=wan``: a local diffusers Wan2.1 text-to-video pipeline folder (what
  ``WanPipeline.save_pretrained`` writes, e.g. ``Wan2.1-T2V-1.3B-Diffusers``): ``transformer/``
  (trained), ``vae/`` (``AutoencoderKLWan``), ``text_encoder/`` (UMT5) and ``tokenizer/`` (frozen).
  Prompt embeddings are computed once per prompt and cached; latents are decoded as ``WanPipeline``
  does (un-normalised with the VAE's ``latents_mean``/``latents_std``).

Everything that can be checked from the config alone (folders, sizes, prompts, the PRM's shapes) is
checked before any weights load.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from euphonium.models.diffusers import DTYPES, Conditioning
from euphonium.models.wan import WanTextEncoder
from euphonium.presets import GUIDED_ALGORITHMS
from euphonium.rewards.prm import LatentRewardModel
from euphonium.toy import (
    CHANNELS,
    HEIGHT,
    NUM_FRAMES,
    WIDTH,
    all_prompts,
    latents_to_video,
    load_toy_model,
    load_toy_prm,
)
from euphonium.toy.world import parse_prompt
from euphonium.train.config import ConfigError, TrainConfig


@dataclass
class Policy:
    """What the trainer needs from a model family (toy world or a diffusers Wan pipeline).

    transformer: the diffusers flow transformer being trained.
    encode: ``prompts -> Conditioning`` (cached text embeddings; negative embeddings for CFG).
    decode: ``latents [B, ...] -> videos [B, F, C, H, W]`` in [0, 1].
    latent_shape: latent shape of one sample (without the batch dimension).
    prompts: the training prompts.
    prm: the process reward model ``prm(x_sigma, sigma, prompt_embeds) -> [B]`` or None.
    """

    transformer: torch.nn.Module
    encode: Callable[[List[str]], Conditioning]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple
    prompts: List[str]
    prm: Optional[torch.nn.Module]


def training_prompts(config: TrainConfig) -> List[str]:
    """The prompts of a run: ``config.prompts``, or for the toy world (when None) its whole prompt set.

    Toy prompts must follow the toy grammar; a prompt outside it is a :class:`ConfigError`.
    """
    if config.model.kind != "toy":
        return list(config.prompts or [])

    if config.prompts is None:
        return all_prompts()
    for prompt in config.prompts:
        try:
            parse_prompt(prompt)
        except ValueError as err:
            raise ConfigError(f"prompts: {err}") from None
    return list(config.prompts)


def video_shape(config: TrainConfig) -> tuple:
    """``(F, C, H, W)`` of one decoded video, known from the config alone (no weights needed)."""
    if config.model.kind == "toy":
        return (NUM_FRAMES, CHANNELS, HEIGHT, WIDTH)
    return (config.model.num_frames, 3, config.model.height, config.model.width)


def build_policy(config: TrainConfig, device: torch.device) -> Policy:
    """Load the model family named by ``config.model.kind`` (toy world or a local Wan2.1 folder)."""
    if config.model.kind == "toy":
        transformer, text_encoder = load_toy_model(config.model.path, device=device, dtype=DTYPES[config.model.dtype])
        text_encoder.requires_grad_(False)

        @torch.no_grad()
        def encode(prompts):
            embeds = text_encoder.encode(list(prompts))
            return Conditioning(
                embeds,
                negative_prompt_embeds=text_encoder.encode([""] * len(prompts)) if config.model.cfg_scale > 1 else None,
            )

        prm = load_toy_prm(config.prm_path, device=device) if config.algorithm in GUIDED_ALGORITHMS else None
        return Policy(
            transformer,
            encode,
            lambda x: latents_to_video(x.float()),
            (CHANNELS, NUM_FRAMES, HEIGHT, WIDTH),
            training_prompts(config),
            prm,
        )
    return build_wan_policy(config, device)


# The file each component folder must hold (what from_pretrained reads first).
_SUBFOLDERS = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
}


def check_wan_folder(path: str) -> Path:
    """``path`` as a Path if it is a diffusers Wan pipeline folder, else a ConfigError saying what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model.path {path}: no such directory")
    missing = [f"{sub}/{name}" for sub, name in _SUBFOLDERS.items() if not (root / sub / name).is_file()]
    if missing:
        hint = (
            " (this looks like one component's folder: give the pipeline folder above it)"
            if (root / "config.json").is_file()
            else ""
        )
        raise ConfigError(
            f"model.path {path} is not a diffusers Wan pipeline folder: missing {', '.join(missing)}{hint}"
        )
    return root


def _read_config(folder: Path, key: str, expected_class: str) -> Dict[str, Any]:
    """The JSON config of a diffusers component folder, checked to be an ``expected_class``."""
    try:
        values = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key} {folder}: unreadable config.json ({err})") from None
    name = values.get("_class_name") if isinstance(values, dict) else None
    if name != expected_class:
        raise ConfigError(f"{key} {folder} holds a {name or 'non-diffusers model'}, expected a {expected_class}")
    return values


def _config_value(cls: type, values: Dict[str, Any], key: str) -> Any:
    """``values[key]``, or the default of ``cls.__init__`` that ``from_pretrained`` fills in when it is absent
    (older Wan VAE configs have no ``scale_factor_*`` keys)."""
    if key in values:
        return values[key]
    return inspect.signature(cls.__init__).parameters[key].default


def check_wan_config(config: TrainConfig) -> Dict[str, Any]:
    """Everything about a ``model.kind=wan`` run that can be checked before any weights load.

    Checks the pipeline folder, the prompts, the PRM folder and its sizes against the model's, and
    the video size against the VAE's strides (``num_frames = 1 + k * scale_factor_temporal``, height
    and width multiples of ``scale_factor_spatial * patch``). Returns ``root`` (the folder), the
    VAE's ``scale_factor_temporal``/``scale_factor_spatial`` and ``latent_shape``
    ``(z_dim, 1 + (num_frames - 1) // t, height // s, width // s)``; raises :class:`ConfigError`
    naming the key otherwise.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    model = config.model
    root = check_wan_folder(model.path)
    if not config.prompts:
        raise ConfigError("prompts must list the training prompts for model.kind=wan")
    transformer = _read_config(root / "transformer", "model.path transformer/", "WanTransformer3DModel")
    vae = _read_config(root / "vae", "model.path vae/", "AutoencoderKLWan")
    z_dim = _config_value(AutoencoderKLWan, vae, "z_dim")
    in_channels = _config_value(WanTransformer3DModel, transformer, "in_channels")
    if in_channels != z_dim:
        raise ConfigError(
            f"model.path {root}: the transformer takes {in_channels} input channels but the VAE's latents "
            f"have {z_dim} (image-to-video transformers are not supported)"
        )
    t_scale = _config_value(AutoencoderKLWan, vae, "scale_factor_temporal")
    s_scale = _config_value(AutoencoderKLWan, vae, "scale_factor_spatial")
    patch = _config_value(WanTransformer3DModel, transformer, "patch_size")
    if model.num_frames < 1 or (model.num_frames - 1) % t_scale:
        raise ConfigError(
            f"model.num_frames must be 1 + a multiple of {t_scale} (the VAE's temporal stride), got {model.num_frames}"
        )
    for key, size in (("height", model.height), ("width", model.width)):
        if size <= 0 or size % (s_scale * patch[1]):
            raise ConfigError(
                f"model.{key} must be a positive multiple of {s_scale * patch[1]} "
                f"(VAE stride {s_scale} x patch {patch[1]}), got {size}"
            )

    if config.algorithm in GUIDED_ALGORITHMS:
        if not config.prm_path:
            raise ConfigError(
                f"algorithm={config.algorithm} with model.kind=wan needs prm_path (a LatentRewardModel folder)"
            )
        prm_dir = Path(config.prm_path)
        if not (prm_dir / "config.json").is_file():
            raise ConfigError(f"prm_path {config.prm_path} is not a saved LatentRewardModel folder (no config.json)")
        prm = _read_config(prm_dir, "prm_path", "LatentRewardModel")
        text_dim = json.loads((root / "text_encoder" / "config.json").read_text()).get("d_model")
        for key, want in (("in_channels", z_dim), ("text_dim", text_dim)):
            if prm.get(key) != want:
                raise ConfigError(
                    f"prm_path {config.prm_path} has {key}={prm.get(key)} but the model needs {want} "
                    "(VAE latent channels / text encoder d_model): a PRM trained for another model?"
                )
    latent_shape = (z_dim, (model.num_frames - 1) // t_scale + 1, model.height // s_scale, model.width // s_scale)
    return {
        "root": root,
        "scale_factor_temporal": t_scale,
        "scale_factor_spatial": s_scale,
        "latent_shape": latent_shape,
    }


def build_wan_policy(config: TrainConfig, device: torch.device):
    """The :class:`Policy` of a local Wan2.1 pipeline folder."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    checked = check_wan_config(config)
    root = checked["root"]
    dtype = DTYPES[config.model.dtype]
    transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype).to(device)
    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    text = WanTextEncoder(root, device, dtype, config.model.max_sequence_length)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    # WanPipeline divides by 1 / std rather than multiplying by std; the same rounding gives the same video.
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)

    def encode(prompts):
        embeds = text(list(prompts))
        negative = text([""] * len(prompts)) if config.model.cfg_scale > 1 else None
        return Conditioning(embeds, negative_prompt_embeds=negative)

    @torch.no_grad()
    def decode(latents):
        video = vae.decode(latents.float() / inv_std + mean, return_dict=False)[0]  # [B, C, F, H, W] in [-1, 1]
        return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).contiguous()

    prm = None
    if config.algorithm in GUIDED_ALGORITHMS:
        prm = LatentRewardModel.from_pretrained(config.prm_path).to(device).eval()
    return Policy(transformer, encode, decode, checked["latent_shape"], list(config.prompts), prm)
