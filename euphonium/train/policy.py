"""What the trainer trains, per model family: a :class:`Policy` built from a config.

- ``model.kind=toy``: the committed toy video world (:mod:`euphonium.toy`).
- ``model.kind=wan``: a local diffusers Wan text-to-video pipeline folder (what
  ``WanPipeline.save_pretrained`` writes, e.g. ``Wan2.1-T2V-1.3B-Diffusers``): ``transformer/``
  (trained), ``vae/`` (``AutoencoderKLWan``), ``text_encoder/`` (UMT5) and ``tokenizer/`` (frozen).
  Prompt embeddings are computed once per prompt and cached; latents are decoded as ``WanPipeline``
  does (un-normalised with the VAE's ``latents_mean``/``latents_std``). A Wan2.2 A14B folder
  (``transformer_2/`` and ``boundary_ratio`` in ``model_index.json``) trains ``model.expert`` of its
  two experts, switched per sample at the pipeline's boundary (:class:`euphonium.models.wan22.WanExperts`).
- ``model.kind=sd3``: a local ``StableDiffusion3Pipeline`` folder (SD3.5 Medium/Large):
  :mod:`euphonium.models.sd3` encodes (CLIP-L, CLIP-G, T5; pooled projections) and decodes as the
  pipeline does. Images are videos of one frame: latents ``[C, 1, h, w]``, decoded ``[B, 1, 3, H, W]``.
- ``model.kind=flux``: a local ``FluxPipeline`` folder (FLUX.1-dev/schnell): :mod:`euphonium.models.flux`
  (CLIP pooled + T5, the embedded guidance input ``model.guidance_scale``, latents packed into 2x2
  patches with position ids inside the transformer's call; decoded as SD3).
- ``model.kind=hunyuan_video``: a local ``HunyuanVideoPipeline`` folder: :mod:`euphonium.models.hunyuan_video`
  (the prompt template into Llama, cropped, with its mask; CLIP pooled; the embedded guidance input
  ``model.guidance_scale * 1000``; decoded with ``AutoencoderKLHunyuanVideo``).

Everything that can be checked from the config alone (folders, sizes, prompts, the PRM's shapes) is
checked before any weights load (:func:`check_model_config`). Every family's LoRA goes through
:func:`check_lora`: a target that attached no adapter is an error naming it.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import DTYPES, Conditioning
from euphonium.models.wan import WanTextEncoder
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
from euphonium.toy.mixture import MixtureOraclePRM, default_world, load_mixture_model
from euphonium.toy.mixture import latents_to_video as mixture_latents_to_video
from euphonium.toy.mixture.prm import load_mixture_prm
from euphonium.toy.rewards import ToyOraclePRM
from euphonium.toy.world import parse_prompt
from euphonium.train.config import ConfigError, TrainConfig
from euphonium.train.prompts import cached_text_encoder, state_digest

logger = logging.getLogger(__name__)

# Families whose samples are images: one frame ([B, 1, 3, H, W] for the rewards), model.num_frames unused.
IMAGE_KINDS = ("sd3", "flux")


@dataclass
class Policy:
    """What the trainer needs from a model family (toy world or a diffusers pipeline folder).

    transformer: the diffusers flow transformer being trained, or a
        :class:`~euphonium.models.adapter.FlowTransformer` over the family's transformer(s).
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
    """The prompts of a run: ``config.prompts``, or for an embedded world (when None) its whole prompt set.

    An embedded world's prompts must be its own; a prompt outside it is a :class:`ConfigError`.
    """
    if config.model.kind == "mixture":
        world = default_world()
        if config.prompts is None:
            return list(world.prompts)
        try:
            world.prompt_index(config.prompts)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"prompts: {err}") from None
        return list(config.prompts)
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
    if config.model.kind == "mixture":
        return default_world().video_shape
    frames = 1 if config.model.kind in IMAGE_KINDS else config.model.num_frames
    return (frames, 3, config.model.height, config.model.width)


def check_model_config(config: TrainConfig) -> Dict[str, Any]:
    """Everything about the run's model family that can be checked before any weights load (see each
    family's ``check_*_config``); ``{}`` for the toy world. Raises :class:`ConfigError` naming the key."""
    kind = config.model.kind
    if kind in ("toy", "mixture"):
        return {}
    return _FAMILIES[kind][0](config)


def build_policy(config: TrainConfig, device: torch.device) -> Policy:
    """Load the model family named by ``config.model.kind`` (toy world or a local pipeline folder).

    The transformer's ``add_adapter`` is followed by :func:`check_lora`, so the trainer's LoRA (whatever
    calls it) fails on a target that matched no layer instead of training fewer adapters than asked.
    """
    if config.model.kind == "toy":
        transformer, text_encoder = load_toy_model(config.model.path, device=device, dtype=DTYPES[config.model.dtype])
        text_encoder.requires_grad_(False)

        text = cached_text_encoder(
            config,
            lambda: text_encoder.encode,
            device,
            kind="toy",
            encoder="ToyTextEncoder",
            weights=state_digest(text_encoder) if config.embedding_cache else None,
            dtype=config.model.dtype,
        )

        @torch.no_grad()
        def encode(prompts):
            embeds = text(list(prompts))
            return Conditioning(
                embeds,
                negative_prompt_embeds=text([""] * len(prompts)) if config.model.cfg_scale > 1 else None,
            )

        prm = None
        if config.needs_prm and config.prm_path == "oracle":
            warnings.warn(
                "prm_path=oracle on the toy video world is a proxy: the exact toy reward of the frozen base "
                "model's one-step clean estimate, not E[r | x_sigma] (only the mixture world's oracle is exact)",
                stacklevel=2,
            )
            base, base_encoder = load_toy_model(config.model.path, device=device)
            prm = ToyOraclePRM(base, base_encoder, weights=config.rewards.get("toy", {}).get("weights"))
        elif config.needs_prm:
            prm = load_toy_prm(config.prm_path, device=device)
        return Policy(
            transformer,
            encode,
            lambda x: latents_to_video(x.float()),
            (CHANNELS, NUM_FRAMES, HEIGHT, WIDTH),
            training_prompts(config),
            prm,
        )
    if config.model.kind == "mixture":
        return _mixture_policy(config, device)
    policy = _FAMILIES[config.model.kind][1](config, device)
    check_lora_on_add(policy.transformer)
    return policy


def _mixture_policy(config: TrainConfig, device: torch.device) -> Policy:
    """The analytic mixture world (:mod:`euphonium.toy.mixture`): its MLP flow model, fully fine-tuned;
    ``prm_path``: None for the committed learned PRM, ``oracle`` for the exact ``E[r | x_sigma]``."""
    world = default_world()
    transformer = load_mixture_model(config.model.path, device=device, dtype=DTYPES[config.model.dtype])

    def encode(prompts):
        negative = world.encode([""] * len(prompts)).to(device) if config.model.cfg_scale > 1 else None
        return Conditioning(world.encode(list(prompts)).to(device), negative_prompt_embeds=negative)

    prm = None
    if config.needs_prm:
        prm = MixtureOraclePRM(world) if config.prm_path == "oracle" else load_mixture_prm(config.prm_path, device)
    return Policy(transformer, encode, mixture_latents_to_video, world.latent_shape, training_prompts(config), prm)


# ----------------------------------------------------------------------------------------------
# LoRA: adapters per target, zero is an error
# ----------------------------------------------------------------------------------------------


def _lora_scopes(transformer: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Where LoRA goes: each trained transformer of a FlowTransformer (Wan2.2: each trained expert), else the model."""
    if isinstance(transformer, FlowTransformer):
        return transformer.trained_modules()
    return {"transformer": transformer}


def lora_counts(module: torch.nn.Module, targets: Iterable[str], adapter_name: str = "default") -> Dict[str, int]:
    """How many layers of ``module`` carry a LoRA adapter ``adapter_name`` per target name.

    A layer counts for a target as peft matches ``target_modules`` given as names: its module name is
    the target or ends with ``"." + target`` (``to_out.0`` matches ``blocks.3.attn1.to_out.0``).
    """
    from peft.tuners.lora import LoraLayer

    adapted = [name for name, m in module.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    return {t: sum(1 for name in adapted if name == t or name.endswith("." + t)) for t in sorted(targets)}


def _layer_name(name: str) -> Optional[str]:
    """A linear layer's name as a LoRA target (``to_out.0`` for a list item), the base layer's for a LoRA
    layer's ``base_layer``, None for the adapter's own ``lora_A``/``lora_B`` layers."""
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        return None
    if parts[-1] == "base_layer":
        parts = parts[:-1]
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def check_lora(
    transformer: torch.nn.Module, targets: Iterable[str], adapter_name: str = "default"
) -> Dict[str, Dict[str, int]]:
    """Adapters per target in each trained transformer (``{"transformer": {"to_q": 30, ...}}``; Wan2.2:
    one entry per trained expert). A target with no adapter in one of them is a :class:`ConfigError`
    naming the targets and the linear layers the model has."""
    targets = sorted(targets)
    counts = {}
    for where, module in _lora_scopes(transformer).items():
        counts[where] = lora_counts(module, targets, adapter_name)
        zero = [t for t, n in counts[where].items() if n == 0]
        if zero:
            names = {_layer_name(name) for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
            linear = sorted(names - {None})
            raise ConfigError(
                f"model.lora_targets {zero} attached no LoRA adapter to {where} ({type(module).__name__}; "
                f"its linear layers are named {', '.join(linear)})"
            )
    logger.info("LoRA adapters per target: %s", counts)
    return counts


def check_lora_on_add(transformer: torch.nn.Module) -> None:
    """Make ``transformer.add_adapter(config)`` run :func:`check_lora` on ``config.target_modules`` after
    adding (peft's own error for targets that match nothing at all becomes a ConfigError too)."""
    add = transformer.add_adapter

    def add_adapter(adapter_config, adapter_name: str = "default"):
        try:
            add(adapter_config, adapter_name=adapter_name)
        except ValueError as err:
            if "not found in the base model" not in str(err):
                raise
            raise ConfigError(f"model.lora_targets: {err}") from None
        targets = adapter_config.target_modules
        check_lora(transformer, [targets] if isinstance(targets, str) else targets, adapter_name)

    transformer.add_adapter = add_adapter


# ----------------------------------------------------------------------------------------------
# Shared checks of pipeline folders
# ----------------------------------------------------------------------------------------------


def check_pipeline_folder(path: str, subfolders: Dict[str, str], family: str) -> Path:
    """``path`` as a Path if it holds each ``subfolders[sub]`` file, else a ConfigError saying what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model.path {path}: no such directory")
    missing = [f"{sub}/{name}" for sub, name in subfolders.items() if not (root / sub / name).is_file()]
    if missing:
        hint = (
            " (this looks like one component's folder: give the pipeline folder above it)"
            if (root / "config.json").is_file()
            else ""
        )
        raise ConfigError(
            f"model.path {path} is not a diffusers {family} pipeline folder: missing {', '.join(missing)}{hint}"
        )
    return root


def _read_config(folder: Path, key: str, expected_class) -> Dict[str, Any]:
    """The JSON config of a diffusers component folder, checked to be an ``expected_class`` (a name or names)."""
    try:
        values = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key} {folder}: unreadable config.json ({err})") from None
    name = values.get("_class_name") if isinstance(values, dict) else None
    expected = (expected_class,) if isinstance(expected_class, str) else tuple(expected_class)
    if name not in expected:
        raise ConfigError(f"{key} {folder} holds a {name or 'non-diffusers model'}, expected a {' or '.join(expected)}")
    return values


def _model_index(root: Path) -> Dict[str, Any]:
    """``model_index.json`` of a pipeline folder ({} when absent: older folders)."""
    path = root / "model_index.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.path {root}: unreadable model_index.json ({err})") from None


def _config_value(cls: type, values: Dict[str, Any], key: str) -> Any:
    """``values[key]``, or the default of ``cls.__init__`` that ``from_pretrained`` fills in when it is absent
    (older Wan VAE configs have no ``scale_factor_*`` keys)."""
    if key in values:
        return values[key]
    return inspect.signature(cls.__init__).parameters[key].default


def _check_prompts(config: TrainConfig) -> None:
    if not config.prompts:
        raise ConfigError(f"prompts must list the training prompts for model.kind={config.model.kind}")


def _check_prm(config: TrainConfig, in_channels: int, text_dim: int, what: str) -> None:
    """The PRM folder of a run that needs one exists and fits the latents' channels and the embeddings' width."""
    if not config.needs_prm:
        return
    kind = config.model.kind
    if not config.prm_path:
        raise ConfigError(
            f"algorithm={config.algorithm} with model.kind={kind} needs prm_path (a LatentRewardModel folder)"
        )
    prm_dir = Path(config.prm_path)
    if (prm_dir / "prm_kind.json").is_file():
        from euphonium.rewards.prm.backbone import check_backbone_folder

        try:
            check_backbone_folder(prm_dir, in_channels, text_dim)
        except (ValueError, OSError) as err:
            raise ConfigError(f"prm_path {config.prm_path}: {err}") from None
        return
    if not (prm_dir / "config.json").is_file():
        raise ConfigError(f"prm_path {config.prm_path} is not a saved LatentRewardModel folder (no config.json)")
    prm = _read_config(prm_dir, "prm_path", "LatentRewardModel")
    for key, want in (("in_channels", in_channels), ("text_dim", text_dim)):
        if prm.get(key) != want:
            raise ConfigError(
                f"prm_path {config.prm_path} has {key}={prm.get(key)} but the model needs {want} "
                f"({what}): a PRM trained for another model?"
            )


def _check_size(key: str, size: int, multiple: int, why: str) -> None:
    if size <= 0 or size % multiple:
        raise ConfigError(f"model.{key} must be a positive multiple of {multiple} ({why}), got {size}")


def _load_prm(
    config: TrainConfig, device: torch.device, transformer: Optional[torch.nn.Module] = None
) -> Optional[torch.nn.Module]:
    """The run's PRM folder, either kind. A backbone PRM whose base is the policy's own transformer folder shares
    ``transformer`` when the policy trains LoRA (its base weights stay frozen: one copy in memory, adapters
    switched); otherwise it loads its own copy of the base."""
    if not config.needs_prm:
        return None
    from euphonium.rewards.prm.backbone import backbone_base, load_prm, prm_kind, same_folder

    if prm_kind(config.prm_path) != "backbone":
        return load_prm(config.prm_path, device)
    base = json.loads((Path(config.prm_path) / "prm_kind.json").read_text())["base_path"]
    # The same base folder: the pipeline's transformer/, or Wan2.2's pipeline folder (the policy's WanExperts).
    share = (
        transformer is not None and config.model.lora_rank > 0 and same_folder(base, backbone_base(config.model.path))
    )
    shared = transformer if share else None
    return load_prm(config.prm_path, device, transformer=shared, dtype=DTYPES[config.model.dtype])


def _encoder(text: Callable[[List[str]], Any], cfg: bool) -> Callable[[List[str]], Conditioning]:
    """``prompts -> Conditioning`` from a family's cached text encoder ``text(prompts) -> Conditioning``
    (its kwargs, e.g. pooled embeddings); with CFG the empty prompt's as the negative half."""

    def encode(prompts):
        cond = text(list(prompts))
        if not cfg:
            return cond
        negative = text([""] * len(prompts))
        return Conditioning(
            cond.prompt_embeds,
            negative_prompt_embeds=negative.prompt_embeds,
            kwargs=cond.kwargs,
            negative_kwargs=negative.kwargs or None,
        )

    return encode


def _cached_family_text(config: TrainConfig, device: torch.device, cls: type, root: Path, *args: Any) -> Callable:
    """``cls(root, device, dtype, max_sequence_length, *args)`` (a family's text encoder returning a Conditioning)
    behind the run's embedding cache (:func:`cached_text_encoder`), named by its class, folder, length, dtype and
    ``args`` (the embedded guidance scale, which the Conditioning carries)."""
    model = config.model
    return cached_text_encoder(
        config,
        lambda: cls(root, device, DTYPES[model.dtype], model.max_sequence_length, *args),
        device,
        kind=model.kind,
        encoder=cls.__name__,
        path=root,
        max_sequence_length=model.max_sequence_length,
        dtype=model.dtype,
        args=json.dumps(args),
    )


# ----------------------------------------------------------------------------------------------
# Wan2.1 and Wan2.2 A14B
# ----------------------------------------------------------------------------------------------

# The file each component folder must hold (what from_pretrained reads first).
_SUBFOLDERS = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
}


def check_wan_folder(path: str) -> Path:
    """``path`` as a Path if it is a diffusers Wan pipeline folder, else a ConfigError saying what is missing."""
    return check_pipeline_folder(path, _SUBFOLDERS, "Wan")


def _wan_experts(root: Path, config: TrainConfig) -> Optional[float]:
    """The ``boundary_ratio`` of a two-expert (Wan2.2 A14B) folder, None for a one-expert one; checks
    ``model.expert`` and ``transformer_2/`` against the folder."""
    index = _model_index(root)
    entry = index.get("transformer_2")
    two = (isinstance(entry, list) and entry and entry[-1] is not None) or (root / "transformer_2").is_dir()
    if index.get("expand_timesteps"):
        raise ConfigError(
            f"model.path {root}: a Wan2.2 TI2V pipeline (expand_timesteps: per-token timesteps) is not supported"
        )
    if not two:
        if config.model.expert != "both":
            raise ConfigError(
                f"model.expert={config.model.expert} needs a two-expert Wan2.2 A14B folder; {root} has one transformer"
            )
        return None
    if not (root / "transformer_2" / "config.json").is_file():
        raise ConfigError(
            f"model.path {root}: model_index.json names transformer_2 but transformer_2/config.json is missing"
        )
    ratio = index.get("boundary_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ConfigError(
            f"model.path {root}: a two-expert Wan folder needs boundary_ratio in (0, 1) "
            f"in model_index.json, got {ratio!r}"
        )
    return float(ratio)


def check_wan_config(config: TrainConfig) -> Dict[str, Any]:
    """Everything about a ``model.kind=wan`` run that can be checked before any weights load.

    Checks the pipeline folder (Wan2.2 A14B: ``transformer_2/`` and ``boundary_ratio``, ``model.expert``),
    the prompts, the PRM folder and its sizes against the model's, and the video size against the
    VAE's strides (``num_frames = 1 + k * scale_factor_temporal``, height and width multiples of
    ``scale_factor_spatial * patch``). Returns ``root`` (the folder), ``boundary_ratio`` (None for one
    expert), the VAE's ``scale_factor_temporal``/``scale_factor_spatial`` and ``latent_shape``
    ``(z_dim, 1 + (num_frames - 1) // t, height // s, width // s)``; raises :class:`ConfigError`
    naming the key otherwise.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    model = config.model
    root = check_wan_folder(model.path)
    _check_prompts(config)
    boundary_ratio = _wan_experts(root, config)
    transformer = _read_config(root / "transformer", "model.path transformer/", "WanTransformer3DModel")
    vae = _read_config(root / "vae", "model.path vae/", "AutoencoderKLWan")
    z_dim = _config_value(AutoencoderKLWan, vae, "z_dim")
    experts = [("transformer", transformer)]
    if boundary_ratio is not None:
        second = _read_config(root / "transformer_2", "model.path transformer_2/", "WanTransformer3DModel")
        experts.append(("transformer_2", second))
    for name, values in experts:
        in_channels = _config_value(WanTransformer3DModel, values, "in_channels")
        if in_channels != z_dim:
            raise ConfigError(
                f"model.path {root}: {name} takes {in_channels} input channels but the VAE's latents "
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
        _check_size(key, size, s_scale * patch[1], f"VAE stride {s_scale} x patch {patch[1]}")
    text_dim = json.loads((root / "text_encoder" / "config.json").read_text()).get("d_model")
    _check_prm(config, z_dim, text_dim, "VAE latent channels / text encoder d_model")
    latent_shape = (z_dim, (model.num_frames - 1) // t_scale + 1, model.height // s_scale, model.width // s_scale)
    return {
        "root": root,
        "boundary_ratio": boundary_ratio,
        "scale_factor_temporal": t_scale,
        "scale_factor_spatial": s_scale,
        "latent_shape": latent_shape,
    }


def build_wan_policy(config: TrainConfig, device: torch.device):
    """The :class:`Policy` of a local Wan2.1 folder, or of a Wan2.2 A14B one (its two experts as one
    :class:`~euphonium.models.wan22.WanExperts`, ``model.expert`` trained)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    checked = check_wan_config(config)
    root = checked["root"]
    dtype = DTYPES[config.model.dtype]
    transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype).to(device)
    if checked["boundary_ratio"] is not None:
        from euphonium.models.wan22 import WanExperts

        transformer_2 = WanTransformer3DModel.from_pretrained(root / "transformer_2", torch_dtype=dtype).to(device)
        transformer = WanExperts(transformer, transformer_2, checked["boundary_ratio"], expert=config.model.expert)
    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    text = cached_text_encoder(
        config,
        lambda: WanTextEncoder(root, device, dtype, config.model.max_sequence_length),
        device,
        kind="wan",
        encoder="WanTextEncoder",
        path=root / "text_encoder",
        max_sequence_length=config.model.max_sequence_length,
        dtype=config.model.dtype,
    )
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

    prm = _load_prm(config, device, transformer)
    return Policy(transformer, encode, decode, checked["latent_shape"], list(config.prompts), prm)


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5
# ----------------------------------------------------------------------------------------------

_SD3_SUBFOLDERS = {
    "transformer": "config.json",
    "vae": "config.json",
    **{f"text_encoder{s}": "config.json" for s in ("", "_2", "_3")},
    **{f"tokenizer{s}": "tokenizer_config.json" for s in ("", "_2", "_3")},
}


def _image_latent_shape(config: TrainConfig, vae: Dict[str, Any], channels: int, patch: int) -> tuple:
    """``(C, 1, H / s, W / s)`` for an ``AutoencoderKL`` of stride ``s = 2 ** (len(block_out_channels) - 1)``
    (the pipelines' ``vae_scale_factor``); height and width must be multiples of ``s * patch``."""
    stride = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
    for key in ("height", "width"):
        _check_size(key, getattr(config.model, key), stride * patch, f"VAE stride {stride} x patch {patch}")
    return (channels, 1, config.model.height // stride, config.model.width // stride)


def check_sd3_config(config: TrainConfig) -> Dict[str, Any]:
    """A ``model.kind=sd3`` run before weights load: the ``StableDiffusion3Pipeline`` folder (transformer, VAE,
    two CLIP and one T5 encoder with their tokenizers), prompts, image size (multiples of the VAE's stride
    times the patch) and PRM. Returns ``root`` and ``latent_shape`` ``(C, 1, H / 8, W / 8)``."""
    from diffusers import SD3Transformer2DModel

    root = check_pipeline_folder(config.model.path, _SD3_SUBFOLDERS, "StableDiffusion3")
    _check_prompts(config)
    transformer = _read_config(root / "transformer", "model.path transformer/", "SD3Transformer2DModel")
    vae = _read_config(root / "vae", "model.path vae/", "AutoencoderKL")
    in_channels = _config_value(SD3Transformer2DModel, transformer, "in_channels")
    if vae.get("latent_channels") != in_channels:
        raise ConfigError(
            f"model.path {root}: the transformer takes {in_channels} latent channels, "
            f"the VAE makes {vae.get('latent_channels')}"
        )
    patch = _config_value(SD3Transformer2DModel, transformer, "patch_size")
    latent_shape = _image_latent_shape(config, vae, in_channels, patch)
    text_dim = _config_value(SD3Transformer2DModel, transformer, "joint_attention_dim")
    _check_prm(config, in_channels, text_dim, "VAE latent channels / the transformer's joint_attention_dim")
    return {"root": root, "latent_shape": latent_shape}


def build_sd3_policy(config: TrainConfig, device: torch.device) -> Policy:
    """The :class:`Policy` of a local ``StableDiffusion3Pipeline`` folder (SD3.5): the transformer trained as
    :class:`~euphonium.models.sd3.SD3Transformer`, CFG with the empty prompt's embeddings and pooled projections."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from euphonium.models.sd3 import SD3TextEncoder, SD3Transformer, sd3_decode

    checked = check_sd3_config(config)
    root = checked["root"]
    dtype = DTYPES[config.model.dtype]
    transformer = SD3Transformer(
        SD3Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype).to(device)
    )
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    text = _cached_family_text(config, device, SD3TextEncoder, root)
    return Policy(
        transformer,
        _encoder(text, config.model.cfg_scale > 1),
        lambda latents: sd3_decode(vae, latents),
        checked["latent_shape"],
        list(config.prompts),
        _load_prm(config, device, transformer),
    )


# ----------------------------------------------------------------------------------------------
# FLUX.1
# ----------------------------------------------------------------------------------------------

_FLUX_SUBFOLDERS = {
    "transformer": "config.json",
    "vae": "config.json",
    **{f"text_encoder{s}": "config.json" for s in ("", "_2")},
    **{f"tokenizer{s}": "tokenizer_config.json" for s in ("", "_2")},
}


def check_flux_config(config: TrainConfig) -> Dict[str, Any]:
    """A ``model.kind=flux`` run before weights load: the ``FluxPipeline`` folder (transformer, VAE, CLIP and T5
    with their tokenizers), prompts, image size (multiples of twice the VAE's stride: latents are packed in
    2x2 patches) and PRM. Returns ``root``, ``latent_shape`` ``(C, 1, H / 8, W / 8)`` and ``guidance_embeds``."""
    from diffusers import FluxTransformer2DModel

    root = check_pipeline_folder(config.model.path, _FLUX_SUBFOLDERS, "Flux")
    _check_prompts(config)
    transformer = _read_config(root / "transformer", "model.path transformer/", "FluxTransformer2DModel")
    vae = _read_config(root / "vae", "model.path vae/", "AutoencoderKL")
    in_channels = _config_value(FluxTransformer2DModel, transformer, "in_channels")
    channels = vae.get("latent_channels")
    if in_channels != 4 * channels:
        raise ConfigError(
            f"model.path {root}: the transformer takes {in_channels} packed channels, the VAE's 2x2 patches "
            f"have {4 * channels} (Fill/Canny/Depth transformers with image inputs are not supported)"
        )
    latent_shape = _image_latent_shape(config, vae, channels, 2)
    text_dim = _config_value(FluxTransformer2DModel, transformer, "joint_attention_dim")
    _check_prm(config, channels, text_dim, "VAE latent channels / the transformer's joint_attention_dim")
    guidance_embeds = _config_value(FluxTransformer2DModel, transformer, "guidance_embeds")
    return {"root": root, "latent_shape": latent_shape, "guidance_embeds": guidance_embeds}


def build_flux_policy(config: TrainConfig, device: torch.device) -> Policy:
    """The :class:`Policy` of a local ``FluxPipeline`` folder: the transformer trained as
    :class:`~euphonium.models.flux.FluxTransformer`, guidance ``model.guidance_scale`` as its embedded input."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from euphonium.models.flux import FluxTextEncoder, FluxTransformer
    from euphonium.models.sd3 import sd3_decode

    checked = check_flux_config(config)
    root = checked["root"]
    model = config.model
    dtype = DTYPES[model.dtype]
    transformer = FluxTransformer(
        FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype).to(device)
    )
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    text = _cached_family_text(config, device, FluxTextEncoder, root, model.guidance_scale, checked["guidance_embeds"])
    return Policy(
        transformer,
        _encoder(text, model.cfg_scale > 1),
        lambda latents: sd3_decode(vae, latents),
        checked["latent_shape"],
        list(config.prompts),
        _load_prm(config, device, transformer),
    )


# ----------------------------------------------------------------------------------------------
# HunyuanVideo
# ----------------------------------------------------------------------------------------------

_HUNYUAN_SUBFOLDERS = {
    "transformer": "config.json",
    "vae": "config.json",
    **{f"text_encoder{s}": "config.json" for s in ("", "_2")},
    **{f"tokenizer{s}": "tokenizer_config.json" for s in ("", "_2")},
}


def check_hunyuan_video_config(config: TrainConfig) -> Dict[str, Any]:
    """A ``model.kind=hunyuan_video`` run before weights load: the ``HunyuanVideoPipeline`` folder (transformer,
    VAE, Llama and CLIP with their tokenizers), prompts, video size against the VAE's strides and the patch
    (``num_frames = 1 + k * temporal_compression_ratio``) and PRM. Returns ``root`` and ``latent_shape``."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    model = config.model
    root = check_pipeline_folder(model.path, _HUNYUAN_SUBFOLDERS, "HunyuanVideo")
    _check_prompts(config)
    transformer = _read_config(root / "transformer", "model.path transformer/", "HunyuanVideoTransformer3DModel")
    vae = _read_config(root / "vae", "model.path vae/", "AutoencoderKLHunyuanVideo")
    channels = _config_value(AutoencoderKLHunyuanVideo, vae, "latent_channels")
    in_channels = _config_value(HunyuanVideoTransformer3DModel, transformer, "in_channels")
    if in_channels != channels or transformer.get("image_condition_type"):
        raise ConfigError(
            f"model.path {root}: the transformer takes {in_channels} channels, the VAE makes {channels} "
            "(image-to-video transformers are not supported)"
        )
    t_scale = _config_value(AutoencoderKLHunyuanVideo, vae, "temporal_compression_ratio")
    s_scale = _config_value(AutoencoderKLHunyuanVideo, vae, "spatial_compression_ratio")
    patch = _config_value(HunyuanVideoTransformer3DModel, transformer, "patch_size")
    patch_t = _config_value(HunyuanVideoTransformer3DModel, transformer, "patch_size_t")
    frames = (model.num_frames - 1) // t_scale + 1
    if model.num_frames < 1 or (model.num_frames - 1) % t_scale or frames % patch_t:
        raise ConfigError(
            f"model.num_frames must be 1 + a multiple of {t_scale} (the VAE's temporal stride) giving a multiple "
            f"of {patch_t} latent frames, got {model.num_frames}"
        )
    for key in ("height", "width"):
        _check_size(key, getattr(model, key), s_scale * patch, f"VAE stride {s_scale} x patch {patch}")
    text_dim = _config_value(HunyuanVideoTransformer3DModel, transformer, "text_embed_dim")
    _check_prm(config, channels, text_dim, "VAE latent channels / the transformer's text_embed_dim")
    return {"root": root, "latent_shape": (channels, frames, model.height // s_scale, model.width // s_scale)}


def build_hunyuan_video_policy(config: TrainConfig, device: torch.device) -> Policy:
    """The :class:`Policy` of a local ``HunyuanVideoPipeline`` folder: the transformer trained as
    :class:`~euphonium.models.hunyuan_video.HunyuanVideoTransformer`, guidance ``model.guidance_scale`` embedded."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    from euphonium.models.hunyuan_video import (
        HunyuanVideoTextEncoder,
        HunyuanVideoTransformer,
        hunyuan_video_decode,
    )

    checked = check_hunyuan_video_config(config)
    root = checked["root"]
    model = config.model
    dtype = DTYPES[model.dtype]
    transformer = HunyuanVideoTransformer(
        HunyuanVideoTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype).to(device)
    )
    # Decoded under no_grad; its weights keep requires_grad as in the pipeline: on the CPU, PyTorch's conv3d
    # takes another kernel for weights that do not require grad, and the videos would differ in the last bits.
    vae = AutoencoderKLHunyuanVideo.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    text = _cached_family_text(config, device, HunyuanVideoTextEncoder, root, model.guidance_scale)
    return Policy(
        transformer,
        _encoder(text, model.cfg_scale > 1),
        lambda latents: hunyuan_video_decode(vae, latents),
        checked["latent_shape"],
        list(config.prompts),
        _load_prm(config, device, transformer),
    )


# kind -> (check before weights load, build)
_FAMILIES = {
    "wan": (check_wan_config, build_wan_policy),
    "sd3": (check_sd3_config, build_sd3_policy),
    "flux": (check_flux_config, build_flux_policy),
    "hunyuan_video": (check_hunyuan_video_config, build_hunyuan_video_policy),
}
