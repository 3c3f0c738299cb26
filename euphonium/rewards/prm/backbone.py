"""The backbone PRM: the model family's own transformer with a small reward head on its pooled hidden states.

``r_p(x_sigma, sigma, cond) = reward_mean + reward_std * head(mean_tokens(h_L))`` where ``h_L`` is the
transformer's last-block output (the input of its ``norm_out``, captured by a forward pre-hook: the hidden
states before the output modulation, projection and unpatchify), averaged over the image / video tokens (in
SD3's and FLUX's joint blocks and HunyuanVideo's dual- and single-stream blocks the text tokens run in their
own stream, which ``norm_out`` does not see). The transformer is called exactly as the policy calls it
(:func:`~euphonium.models.diffusers.call_transformer` on the family adapter: FLUX's packed latents, position
ids and ``timestep / 1000``, SD3's one-frame latents), with ``timestep = 1000 sigma`` and the policy's
``Conditioning`` of the batch, which the sampler passes as ``prm_cond`` (``reads_conditioning``): its
per-token ``prompt_embeds`` as ``encoder_hidden_states`` and its ``kwargs`` (SD3's and FLUX's
``pooled_projections``, the embedded ``guidance`` of FLUX.1-dev and HunyuanVideo, HunyuanVideo's
``encoder_attention_mask``). With CFG the PRM reads the conditional half only. So the PRM is noise- and
text-conditioned by construction; its training data keeps the same conditioning (the shards' ``prompt_tokens``
and ``cond.<name>``, :class:`~euphonium.rewards.prm.PRMDataset`'s ``cond_kwargs``).

The base weights are frozen; ``lora_rank > 0`` tunes a peft LoRA adapter named ``prm`` on them. The transformer
is not a submodule (``parameters()`` / ``state_dict()`` hold the head, the reward scale and the adapter only):
with a LoRA policy the PRM wraps the policy's own transformer (:func:`load_prm` with ``transformer=``), so one
frozen copy of the base weights serves both, the active adapter switched for the PRM's calls and restored after.

Families: Wan2.1 (``WanTransformer3DModel``: ``norm_out`` after the blocks, ``text_dim`` per-token text), SD3.5
(``SD3Transformer2DModel``, ``joint_attention_dim``), FLUX.1 (``FluxTransformer2DModel``, ``joint_attention_dim``;
its ``in_channels`` count the packed 2x2 patches, four times the latent channels), HunyuanVideo
(``HunyuanVideoTransformer3DModel``, ``text_embed_dim``; its text passes the token refiner first) and
Wan2.2 A14B (its two experts behind :class:`~euphonium.models.wan22.WanExperts`, called as the policy calls them:
each noisy state is read by the expert the pipeline uses at its sigma, the high-noise one at
``t = 1000 sigma >= 1000 boundary_ratio``, the low-noise one below; one head reads both experts' pooled hidden
states, and the PRM's adapter is on both. The alternative, one chosen expert at every sigma, would read a state
with an expert that never denoises at that noise level and, to share the base, would tie the PRM to the expert
the policy trains).

Cost per RL step (computed from the configs, not measured): each guided step of a rollout calls the PRM once
with a gradient with respect to ``x``, one transformer forward and one backward (about 3 forwards), so the
``euphonium`` preset's 4 guided steps (12-15 of 16) add about 12 forward-equivalents per rollout, +75% over the
16 of an unguided rollout (Wan2.1 1.3B at 33x480x832: 72 TFLOP per forward per sample). Shared weights add only
the adapter and the head to memory (rank 64 on q/k/v/o of both attentions: 47 M fp32 parameters, 0.19 GB; head
0.4 M) where a separate copy would add the base again (2.8 GB bf16 for 1.3B, 28 GB for 14B); the backward at a
guided step needs activations as in training (under gradient checkpointing about 2.3 GB per sample for 1.3B),
freed before the next step. Switching adapters is a Python loop over the peft layers (no weights move). Under
gradient checkpointing the blocks recomputed in backward run under the PRM's adapter state (the checkpoint's
``context_fn``), so the guidance gradient is the PRM's, not the policy's.

A saved folder holds ``prm_kind.json`` (``kind: backbone``, the base transformer folder, the settings),
``head.safetensors`` (head and reward scale) and, with LoRA, ``adapter.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

from euphonium._checks import check_float_tensor, per_sample
from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import NUM_TRAIN_TIMESTEPS, Conditioning, call_transformer
from euphonium.models.flux import FluxTransformer
from euphonium.models.hunyuan_video import HunyuanVideoTransformer
from euphonium.models.sd3 import SD3Transformer

PRM_KIND_FILE = "prm_kind.json"
KINDS = ("conv", "backbone")


@dataclasses.dataclass(frozen=True)
class _Family:
    text_key: str  # the config key of the per-token text width
    packed: int  # latent channels per input channel: FLUX packs 2x2 patches (in_channels = 4 C)
    adapter: Optional[type]  # the FlowTransformer the policy calls it through (None: called as is)
    conditioning: Tuple[str, ...]  # the Conditioning.kwargs it needs besides the text (and guidance if embedded)


# The diffusers transformers whose last hidden states are read.
_FAMILIES = {
    "WanTransformer3DModel": _Family("text_dim", 1, None, ()),
    "SD3Transformer2DModel": _Family("joint_attention_dim", 1, SD3Transformer, ("pooled_projections",)),
    "FluxTransformer2DModel": _Family("joint_attention_dim", 4, FluxTransformer, ("pooled_projections",)),
    "HunyuanVideoTransformer3DModel": _Family(
        "text_embed_dim", 1, HunyuanVideoTransformer, ("encoder_attention_mask", "pooled_projections")
    ),
}
BACKBONE_CLASSES = tuple(_FAMILIES)
# Wan2.2 A14B's pipeline folder: its two experts and their switch (the base of a two-expert backbone PRM).
EXPERTS_CLASS = "WanExperts"


def prm_kind(path: Union[str, Path]) -> str:
    """``conv`` (a :class:`~euphonium.rewards.prm.LatentRewardModel` folder) or ``backbone`` (``prm_kind.json``)."""
    file = Path(path) / PRM_KIND_FILE
    if file.is_file():
        kind = json.loads(file.read_text()).get("kind")
        if kind not in KINDS:
            raise ValueError(f"{file}: kind must be one of {KINDS}, got {kind!r}")
        return kind
    return "conv"


def _lora_layers(transformer: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def _family_call(transformer: nn.Module) -> nn.Module:
    """``transformer`` as the policy calls it: a bare SD3, FLUX or HunyuanVideo transformer in its family's
    :class:`~euphonium.models.adapter.FlowTransformer` (the same weights), anything else as it is."""
    family = _FAMILIES.get(type(transformer).__name__)
    return family.adapter(transformer) if family is not None and family.adapter is not None else transformer


def _backbones(transformer: nn.Module) -> Dict[str, nn.Module]:
    """The diffusers transformers the PRM reads, by name: the transformer itself, or those of a family adapter
    (Wan2.2's two experts, the one of SD3, FLUX or HunyuanVideo)."""
    name = type(transformer).__name__
    if isinstance(transformer, FlowTransformer):
        found = {n: getattr(transformer, n) for n in transformer.model_names}
    elif name in BACKBONE_CLASSES:
        found = {"": transformer}
    else:
        raise ValueError(f"the backbone PRM supports {', '.join(BACKBONE_CLASSES + (EXPERTS_CLASS,))}, got a {name}")
    for key, model in found.items():
        if type(model).__name__ not in BACKBONE_CLASSES or not hasattr(model, "norm_out"):
            raise ValueError(f"the backbone PRM reads {BACKBONE_CLASSES}, got a {type(model).__name__} as {key!r}")
    return found


def backbone_base(pipeline: Union[str, Path]) -> Path:
    """The base a backbone PRM of the pipeline folder ``pipeline`` records: the folder itself when it holds
    Wan2.2's two experts (``transformer_2/``), else its ``transformer/``."""
    pipeline = Path(pipeline)
    return pipeline if (pipeline / "transformer_2" / "config.json").is_file() else pipeline / "transformer"


def load_base(base: Union[str, Path], dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    """The transformer a backbone PRM reads, from its base (see :func:`backbone_base`): a transformer folder of one
    of ``BACKBONE_CLASSES`` (in its family's adapter, as the policy calls it), or a two-expert Wan2.2 pipeline
    folder as a ``WanExperts`` (``boundary_ratio`` from its ``model_index.json``)."""
    import diffusers

    base = Path(base)
    if (base / "model_index.json").is_file():
        from euphonium.models.wan22 import WanExperts

        experts = [
            diffusers.WanTransformer3DModel.from_pretrained(base / n, torch_dtype=dtype)
            for n in ("transformer", "transformer_2")
        ]
        ratio = json.loads((base / "model_index.json").read_text()).get("boundary_ratio")
        model = WanExperts(*experts, ratio)
    else:
        name = json.loads((base / "config.json").read_text()).get("_class_name")
        if name not in BACKBONE_CLASSES:
            raise ValueError(f"{base} holds a {name}, not one of {BACKBONE_CLASSES}")
        model = _family_call(getattr(diffusers, name).from_pretrained(base, torch_dtype=dtype))
    return model if device is None else model.to(device)


class BackbonePRM(nn.Module):
    """``prm(x_sigma [B, C, F, H, W], sigma [B], cond) -> [B]`` float32 (see the module doc).

    ``cond``: the policy's :class:`~euphonium.models.diffusers.Conditioning` of the batch (its conditional half:
    ``prompt_embeds`` and ``kwargs``), or per-token ``prompt_embeds [B, L, D]`` alone for a family that needs no
    more (Wan).

    Args:
        transformer: the family's transformer as the policy holds it (its family adapter, e.g.
            ``FluxTransformer``, or Wan2.2's ``WanExperts``; a bare SD3, FLUX or HunyuanVideo transformer is put in
            its adapter), frozen here; shared when it is the policy's.
        base_path: its folder, Wan2.2's pipeline folder (:func:`backbone_base`; recorded when saving, :func:`load_prm`
            loads it from there when not shared).
        lora_rank, lora_alpha, lora_targets: the PRM's own LoRA adapter (``lora_rank=0``: frozen backbone).
        head_dim: width of the reward head's hidden layer.
        aux_rewards: reward parts also predicted (standard units), as :class:`LatentRewardModel`'s.
        adapter_name: the peft adapter's name (must differ from the policy's ``default``).
    """

    kind = "backbone"
    eval_batch_size = 8  # PRMTrainer.predict's chunks: full transformer forwards
    reads_conditioning = True  # the sampler passes it the whole Conditioning (sampler._prm_condition)

    def __init__(
        self,
        transformer: nn.Module,
        *,
        base_path: Union[str, Path],
        lora_rank: int = 0,
        lora_alpha: Optional[int] = None,
        lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        head_dim: int = 256,
        aux_rewards: Sequence[str] = (),
        adapter_name: str = "prm",
    ):
        super().__init__()
        transformer = _family_call(transformer)
        name = type(transformer).__name__
        backbones = _backbones(transformer)
        if adapter_name == "default":
            raise ValueError("adapter_name 'default' is the policy's LoRA; give the PRM's adapter another name")
        configs = [b.config for b in backbones.values()]
        cfg = configs[0]
        family = _FAMILIES[type(next(iter(backbones.values()))).__name__]
        for key in ("in_channels", family.text_key, "num_attention_heads", "attention_head_dim"):
            if len({c[key] for c in configs}) > 1:
                raise ValueError(f"the experts of a backbone PRM must agree on {key}, got {[c[key] for c in configs]}")
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        self.conditioning = family.conditioning + (("guidance",) if cfg.get("guidance_embeds") else ())
        self.config = SimpleNamespace(
            base_path=str(base_path),
            base_class=name,
            in_channels=cfg.in_channels // family.packed,
            text_dim=cfg[family.text_key],
            lora_rank=int(lora_rank),
            lora_alpha=int(lora_alpha or lora_rank),
            lora_targets=list(lora_targets),
            head_dim=int(head_dim),
            aux_rewards=tuple(aux_rewards),
            adapter_name=adapter_name,
        )
        object.__setattr__(self, "transformer", transformer)  # not a submodule: shared, never saved with the PRM
        object.__setattr__(self, "backbones", backbones)
        self.head = nn.Sequential(
            nn.LayerNorm(inner), nn.Linear(inner, head_dim), nn.SiLU(), nn.Linear(head_dim, 1 + len(aux_rewards))
        )
        nn.init.zeros_(self.head[-1].weight)  # starts at the training rewards' mean
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))
        self.register_buffer("reward_stats_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("aux_mean", torch.zeros(len(aux_rewards)))
        self.register_buffer("aux_std", torch.ones(len(aux_rewards)))
        transformer.requires_grad_(False)
        if lora_rank:
            self._add_adapter()

    # -- the adapter ---------------------------------------------------------------------------

    def _add_adapter(self) -> None:
        from peft import LoraConfig

        tr, c = self.transformer, self.config
        layers = _lora_layers(tr)
        state = {id(m): (m.active_adapters, m.disable_adapters) for m in layers}
        grads = {id(p): p.requires_grad for p in tr.parameters()}
        lora = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, target_modules=c.lora_targets)
        # On every expert, whichever the policy trains; the class's add_adapter: build_policy may wrap the instance's.
        for backbone in self.backbones.values():
            type(backbone).add_adapter(backbone, lora, c.adapter_name)
        # diffusers' add_adapter activates the new adapter everywhere (and peft flips requires_grad): restore
        # the policy's state; the PRM switches to its adapter inside its own calls only.
        for m in _lora_layers(tr):
            # A layer the policy has no adapter on yet gets none active (peft applies no LoRA), not the PRM's.
            active, disabled = state.get(id(m), ([], False))
            m._active_adapter, m._disable_adapters = list(active), disabled
        for p in tr.parameters():
            if id(p) in grads:
                p.requires_grad_(grads[id(p)])
        for p in self.adapter_parameters().values():
            p.data = p.data.float()
            p.requires_grad_(True)
        if not self.adapter_parameters():
            raise ValueError(f"lora_targets {c.lora_targets} attached no LoRA adapter to the {c.base_class}")

    def adapter_parameters(self) -> Dict[str, nn.Parameter]:
        """The PRM adapter's weights by name (``blocks.0.attn1.to_q.lora_A.weight``: the adapter name removed)."""
        tag = f".{self.config.adapter_name}."
        if not self.config.lora_rank:
            return {}
        return {n.replace(tag, "."): p for n, p in self.transformer.named_parameters() if tag in n and "lora_" in n}

    def trainable_parameters(self) -> List[nn.Parameter]:
        """What a PRM trainer optimises: the head and, with LoRA, the adapter (never the base weights)."""
        return list(self.head.parameters()) + list(self.adapter_parameters().values())

    @contextlib.contextmanager
    def _own_adapter(self) -> Iterator[None]:
        """The PRM's adapter active (or, frozen, every adapter off) for the call; the previous state restored.

        Set on each peft layer directly: peft's ``set_adapter`` / ``enable_adapters`` would also flip the
        ``requires_grad`` flags the policy's optimiser relies on.
        """
        layers = _lora_layers(self.transformer)
        saved = [(m, m._active_adapter, m._disable_adapters) for m in layers]
        try:
            for m in layers:
                if self.config.lora_rank:
                    m._active_adapter, m._disable_adapters = [self.config.adapter_name], False
                else:
                    m._disable_adapters = True
            yield
        finally:
            for m, active, disabled in saved:
                m._active_adapter, m._disable_adapters = active, disabled

    # -- the call ------------------------------------------------------------------------------

    def prepare_prompt_embeds(self, prompt_embeds: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None):
        """What the PRM's training data keeps of the conditioning: the per-token embeddings (masked tokens zeroed)."""
        if prompt_embeds.dim() != 3:
            raise ValueError(
                f"the backbone PRM needs per-token prompt_embeds [B, L, D], got {tuple(prompt_embeds.shape)}"
            )
        if prompt_mask is not None:
            prompt_embeds = prompt_embeds * prompt_mask.to(prompt_embeds.dtype).unsqueeze(-1)
        return prompt_embeds

    def _split(self, cond, batch: int) -> Tuple[torch.Tensor, Mapping[str, Any]]:
        """``(prompt_embeds, kwargs)`` of ``cond`` (a Conditioning or per-token embeddings), checked."""
        embeds, kwargs = (cond.prompt_embeds, cond.kwargs) if isinstance(cond, Conditioning) else (cond, {})
        missing = [k for k in self.conditioning if k not in kwargs]
        if missing:
            raise ValueError(
                f"the backbone PRM of a {self.config.base_class} needs the policy's Conditioning with kwargs "
                f"{list(self.conditioning)}; {missing} missing (got {type(cond).__name__})"
            )
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] != batch:
                raise ValueError(f"cond.kwargs[{key!r}] has {value.shape[0]} rows for a batch of {batch}")
        return embeds, kwargs

    def score_all(self, x_sigma: torch.Tensor, sigma, cond, prompt_mask=None) -> torch.Tensor:
        """Head outputs in standard units ``[B, 1 + len(aux_rewards)]`` float32."""
        check_float_tensor("x_sigma", x_sigma, min_dim=5)
        c = self.config
        if x_sigma.dim() != 5 or x_sigma.shape[1] != c.in_channels:
            raise ValueError(f"x_sigma must have shape [B, {c.in_channels}, F, H, W], got {tuple(x_sigma.shape)}")
        sigma = per_sample("sigma", sigma, x_sigma.shape[0], x_sigma.device)
        prompt_embeds, kwargs = self._split(cond, x_sigma.shape[0])
        embeds = self.prepare_prompt_embeds(prompt_embeds, prompt_mask)
        if embeds.shape[0] != x_sigma.shape[0] or embeds.shape[-1] != c.text_dim:
            raise ValueError(f"prompt_embeds must be [{x_sigma.shape[0]}, L, {c.text_dim}], got {tuple(embeds.shape)}")
        tr = self.transformer
        if self.training and torch.is_grad_enabled():
            for p in self.adapter_parameters().values():
                p.requires_grad_(True)  # the policy's set_adapter may have turned them off
        timestep = sigma.float() * NUM_TRAIN_TIMESTEPS
        captured: Dict[str, torch.Tensor] = {}
        hooks, saved_fns = [], {}

        # A checkpointed block is recomputed during backward, after this call has restored the policy's adapter
        # state: recompute it under the PRM's own (else the gradient would be the policy's, or fail).
        def checkpointed(block, *args):
            return torch.utils.checkpoint.checkpoint(
                block.__call__,
                *args,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), self._own_adapter()),
            )

        for key, backbone in self.backbones.items():
            hooks.append(
                backbone.norm_out.register_forward_pre_hook(lambda m, args, key=key: captured.__setitem__(key, args[0]))
            )
            if getattr(backbone, "gradient_checkpointing", False):
                saved_fns[key] = backbone._gradient_checkpointing_func
                backbone._gradient_checkpointing_func = checkpointed
        try:
            with self._own_adapter():
                call_transformer(tr, x_sigma, timestep, embeds, kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            for key, fn in saved_fns.items():
                self.backbones[key]._gradient_checkpointing_func = fn
        # [b, tokens, inner] -> [b, inner]: the image / video tokens only (the joint blocks' text stream is apart).
        pooled = {key: h.float().mean(dim=1) for key, h in captured.items()}
        if len(pooled) == 1:
            features = next(iter(pooled.values()))
        else:  # WanExperts split a batch mixing noise levels: each expert's rows back to their samples
            high = tr.high_noise(timestep)
            features = pooled["transformer"].new_zeros((x_sigma.shape[0], pooled["transformer"].shape[1]))
            for key, rows in (("transformer", high), ("transformer_2", ~high)):
                features = features.index_put((rows.nonzero().flatten(),), pooled[key])
        return self.head(features.to(self.head[1].weight.dtype)).float()

    def score(self, x_sigma, sigma, cond, prompt_mask=None) -> torch.Tensor:
        return self.score_all(x_sigma, sigma, cond, prompt_mask)[:, 0]

    def forward(self, x_sigma, sigma, cond, prompt_mask=None) -> torch.Tensor:
        return self.reward_mean + self.reward_std * self.score(x_sigma, sigma, cond, prompt_mask)

    def set_reward_stats(self, mean: float, std: float, aux_mean=None, aux_std=None) -> None:
        """The output scale ``r = mean + std * s`` and the auxiliary targets' standardisation."""
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"reward stats need a finite mean and a positive std, got mean={mean}, std={std}")
        n = len(self.config.aux_rewards)
        if n and (aux_mean is None or aux_std is None or len(aux_mean) != n or len(aux_std) != n):
            raise ValueError(f"aux_mean and aux_std need one entry for each of {list(self.config.aux_rewards)}")
        self.reward_mean.fill_(mean)
        self.reward_std.fill_(std)
        if n:
            self.aux_mean.copy_(torch.as_tensor(aux_mean))
            self.aux_std.copy_(torch.as_tensor(aux_std))
        self.reward_stats_fitted.fill_(True)

    # -- state and files -----------------------------------------------------------------------

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        state.update({f"adapter.{n}": p.detach() for n, p in self.adapter_parameters().items()})
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {k: v for k, v in state_dict.items() if not k.startswith("adapter.")}
        adapter = {k[len("adapter.") :]: v for k, v in state_dict.items() if k.startswith("adapter.")}
        params = self.adapter_parameters()
        if strict and set(adapter) != set(params):
            raise RuntimeError(f"adapter weights do not match: {sorted(set(adapter) ^ set(params))[:4]}")
        with torch.no_grad():
            for name, value in adapter.items():
                params[name].copy_(value)
        return super().load_state_dict(own, strict=strict, assign=assign)

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(self.config).items() if k not in ("in_channels", "text_dim")}
        settings["aux_rewards"] = list(settings["aux_rewards"])
        (path / PRM_KIND_FILE).write_text(json.dumps({"kind": "backbone", **settings}, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in super().state_dict().items()}
        save_file(state, str(path / "head.safetensors"))
        adapter = {k: v.detach().float().contiguous() for k, v in self.adapter_parameters().items()}
        if adapter:
            save_file(adapter, str(path / "adapter.safetensors"))
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path],
        *,
        transformer: Optional[nn.Module] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "BackbonePRM":
        """A saved backbone PRM; its base transformer loaded from the recorded folder unless ``transformer`` (the
        policy's, shared) is given. Returned in eval mode."""
        path = Path(path)
        settings = json.loads((path / PRM_KIND_FILE).read_text())
        if settings.get("kind") != "backbone":
            raise ValueError(f"{path} is not a backbone PRM folder")
        if transformer is None:
            transformer = load_base(settings["base_path"], dtype or torch.float32, device)
        prm = cls(
            transformer,
            base_path=settings["base_path"],
            lora_rank=settings["lora_rank"],
            lora_alpha=settings["lora_alpha"],
            lora_targets=settings["lora_targets"],
            head_dim=settings["head_dim"],
            aux_rewards=settings["aux_rewards"],
            adapter_name=settings["adapter_name"],
        )
        state = load_file(str(path / "head.safetensors"))
        if (path / "adapter.safetensors").is_file():
            state.update({f"adapter.{k}": v for k, v in load_file(str(path / "adapter.safetensors")).items()})
        prm.load_state_dict(state)
        if device is not None:
            prm.to(device)
        return prm.eval()


def check_backbone_folder(path: Union[str, Path], in_channels: int, text_dim: int) -> Dict:
    """The settings of a backbone PRM folder whose base transformer takes latents of ``in_channels`` channels and
    text of width ``text_dim`` (else ValueError saying what differs)."""
    path = Path(path)
    settings = json.loads((path / PRM_KIND_FILE).read_text())
    base = Path(settings.get("base_path", ""))
    two = (base / "model_index.json").is_file()
    for folder in (base / "transformer", base / "transformer_2") if two else (base,):
        if not (folder / "config.json").is_file():
            raise ValueError(f"{path}: its base transformer folder {folder} has no config.json")
        values = json.loads((folder / "config.json").read_text())
        if values.get("_class_name") not in BACKBONE_CLASSES:
            raise ValueError(f"{path}: base {folder} holds a {values.get('_class_name')}, not a {BACKBONE_CLASSES}")
        family = _FAMILIES[values["_class_name"]]
        channels = values.get("in_channels", 0) // family.packed  # FLUX's in_channels counts packed 2x2 patches
        text_key = family.text_key
        for key, have, want in (("latent channels", channels, in_channels), (text_key, values.get(text_key), text_dim)):
            if have != want:
                raise ValueError(f"{path}: its base transformer has {key}={have} but the model needs {want}")
    return settings


def load_prm(
    path: Union[str, Path],
    device: Union[str, torch.device, None] = None,
    *,
    transformer: Optional[nn.Module] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A PRM folder of either kind (``prm_kind.json`` decides), in eval mode. ``transformer``: a backbone PRM
    shares it instead of loading its base (it must be the same weights: the policy's frozen base)."""
    if prm_kind(path) == "backbone":
        return BackbonePRM.from_pretrained(path, transformer=transformer, device=device, dtype=dtype)
    from euphonium.rewards.prm.model import LatentRewardModel

    model = LatentRewardModel.from_pretrained(path)
    return (model.to(device) if device is not None else model).eval()


def same_folder(a: Union[str, Path], b: Union[str, Path]) -> bool:
    return Path(a).resolve() == Path(b).resolve()
