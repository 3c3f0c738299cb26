"""Adapter from a ``diffusers`` flow transformer (Wan2.1 first) to the sampler's ``velocity_fn``.

``DiffusersFlowModel(transformer)(x, sigma, cond) -> v`` runs
``transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.prompt_embeds,
**cond.kwargs)`` in the transformer's dtype, with true classifier-free guidance as one batched
forward of the conditional and unconditional halves. Works for transformers with this call signature:
``WanTransformer3DModel`` (Wan2.1/2.2), ``SD3Transformer2DModel`` (with ``pooled_projections`` in
``cond.kwargs``), ``HunyuanVideoTransformer3DModel`` and the like. FLUX, which takes packed latents and
position ids, needs its own adapter.

Attention runs through diffusers' attention dispatcher: flash-attn or xformers when installed
(``ModelMixin.set_attention_backend``), PyTorch's scaled-dot-product attention otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from euphonium._checks import check_float

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
# Model weights dtypes a config may name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _attention_backend_names() -> tuple:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(b.value for b in AttentionBackendName)


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The compute dtype of a model: diffusers' ``ModelMixin.dtype`` (which skips the modules Wan
    keeps in float32, e.g. its time embedder) or else the dtype of the first floating parameter."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    raise ValueError("transformer has no floating-point parameters")


def select_attention_backend(transformer: torch.nn.Module, backend: str = "auto") -> str:
    """Set the attention backend of ``transformer`` and return its name.

    ``backend="auto"``: ``flash`` (flash-attn installed, parameters on CUDA in fp16/bf16), else
    ``xformers`` (installed, on CUDA), else ``native`` (``torch.nn.functional.scaled_dot_product_attention``,
    diffusers' default, left untouched). Any other name is one of diffusers' ``AttentionBackendName``
    values (``native``, ``flash``, ``xformers``, ``sage``, ``flex``, ...) and is set as asked; diffusers
    raises if its package is missing.
    """
    if not isinstance(backend, str):
        raise TypeError(f"attention_backend must be a string, got {type(backend).__name__}")
    backend = backend.lower()
    names = _attention_backend_names()
    if backend != "auto" and backend not in names:
        raise ValueError(f"attention_backend must be 'auto' or one of diffusers' backends {names}, got {backend!r}")
    if not hasattr(transformer, "set_attention_backend"):
        if backend in ("auto", "native"):
            return "native"
        raise ValueError(
            f"attention_backend {backend!r} needs a diffusers ModelMixin with set_attention_backend (diffusers >= 0.35)"
        )
    if backend != "auto":
        transformer.set_attention_backend(backend)
        return backend

    from diffusers.utils import is_flash_attn_available, is_xformers_available

    param = next(transformer.parameters(), None)
    on_cuda = param is not None and param.device.type == "cuda"
    candidates = []
    if on_cuda and _module_dtype(transformer) in (torch.float16, torch.bfloat16) and is_flash_attn_available():
        candidates.append("flash")
    if on_cuda and is_xformers_available():
        candidates.append("xformers")
    for name in candidates:
        try:
            transformer.set_attention_backend(name)
        except RuntimeError as err:  # diffusers' requirement check: installed but too old
            logger.warning("attention backend %r is installed but unusable (%s); trying the next one", name, err)
            continue
        return name
    return "native"


def call_transformer(
    transformer: torch.nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor,
    embeds: torch.Tensor,
    kwargs: Mapping[str, Any],
) -> torch.Tensor:
    """``transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, **kwargs)[0]`` with ``x``,
    ``embeds`` and the floating-point ``kwargs`` cast to the transformer's dtype and ``timestep`` kept as given:
    the policy's velocity call, and the backbone PRM's call of the same transformer."""
    dtype = _module_dtype(transformer)
    extra = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    out = transformer(
        hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype), return_dict=False, **extra
    )
    return out[0]


@dataclass
class Conditioning:
    """Text conditioning of a batch for :class:`DiffusersFlowModel`.

    Attributes:
        prompt_embeds: ``[B, L, D]`` text-encoder output, passed as ``encoder_hidden_states``.
        negative_prompt_embeds: ``[B, L, D]`` embeddings of the negative (usually empty) prompt; needed
            for classifier-free guidance. Same ``L`` as ``prompt_embeds`` (Wan pads both to 512 tokens).
        kwargs: further forward arguments, the same for both CFG halves unless ``negative_kwargs`` is
            given (e.g. ``encoder_hidden_states_image`` for Wan I2V, ``pooled_projections`` for SD3,
            ``attention_kwargs``). Tensors with a leading batch dimension ``B`` are batched for CFG.
        negative_kwargs: the unconditional half's values of ``kwargs`` keys, where they differ.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor] = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    negative_kwargs: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_embeds, torch.Tensor) or not self.prompt_embeds.is_floating_point():
            raise TypeError("Conditioning.prompt_embeds must be a floating-point tensor [B, L, D]")
        if self.prompt_embeds.dim() < 2 or self.prompt_embeds.shape[0] == 0:
            raise ValueError(
                "Conditioning.prompt_embeds must be [B, L, D] with a non-empty batch, got "
                f"{tuple(self.prompt_embeds.shape)}"
            )
        neg = self.negative_prompt_embeds
        if neg is not None:
            if not isinstance(neg, torch.Tensor) or not neg.is_floating_point():
                raise TypeError("Conditioning.negative_prompt_embeds must be a floating-point tensor [B, L, D]")
            if neg.shape != self.prompt_embeds.shape:
                raise ValueError(
                    "Conditioning.negative_prompt_embeds must have the shape of prompt_embeds "
                    f"{tuple(self.prompt_embeds.shape)} "
                    f"(pad both to one length), got {tuple(neg.shape)}"
                )
        if self.negative_kwargs is not None:
            extra = sorted(set(self.negative_kwargs) - set(self.kwargs))
            if extra:
                raise ValueError(f"Conditioning.negative_kwargs has keys {extra} that kwargs lacks")

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def select(self, index: Union[torch.Tensor, Sequence[int], slice]) -> "Conditioning":
        """The conditioning of a subset of the batch (batched tensors in ``kwargs`` are indexed too)."""
        b = self.batch_size
        pick = lambda t: t[index] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == b else t  # noqa: E731
        return dataclasses.replace(
            self,
            prompt_embeds=self.prompt_embeds[index],
            negative_prompt_embeds=None if self.negative_prompt_embeds is None else self.negative_prompt_embeds[index],
            kwargs={k: pick(v) for k, v in self.kwargs.items()},
            negative_kwargs=None
            if self.negative_kwargs is None
            else {k: pick(v) for k, v in self.negative_kwargs.items()},
        )


class DiffusersFlowModel:
    """``velocity_fn(x, sigma, cond) -> v`` over a diffusers flow transformer.

    ``v = transformer(x, timestep=sigma * 1000, encoder_hidden_states=cond.prompt_embeds)`` with ``x``
    and the embeddings cast to the transformer's dtype and the timestep kept in float32 (as diffusers'
    pipelines pass ``scheduler.timesteps``). With ``cfg_scale = w > 1``:
    ``v = v_u + w * (v_c - v_u)``, ``v_c`` and ``v_u`` from ONE forward of the batch ``[x; x]`` with
    ``[prompt_embeds; negative_prompt_embeds]``, combined in float32. ``cfg_scale = 1`` runs the
    conditional half only. ``v`` is returned in the transformer's dtype, shape of ``x``. Gradients flow
    when called under grad mode (the trainer's forward); the sampler calls it under ``no_grad``.

    Args:
        transformer: e.g. ``WanTransformer3DModel``; ``eval()`` mode is the caller's choice.
        cfg_scale: classifier-free guidance weight ``w >= 1`` (Flow-GRPO samples Wan with 4.5;
            DanceGRPO and Euphonium with none).
        attention_backend: see :func:`select_attention_backend` (``"auto"``: flash-attn, xformers, SDPA).
    """

    def __init__(self, transformer: torch.nn.Module, *, cfg_scale: float = 1.0, attention_backend: str = "auto"):
        if not isinstance(transformer, torch.nn.Module):
            raise TypeError(
                f"transformer must be a torch.nn.Module (a diffusers transformer), got {type(transformer).__name__}"
            )
        # 1 disables classifier-free guidance.
        cfg_scale = check_float("cfg_scale", cfg_scale, minimum=1)
        self.transformer = transformer
        self.cfg_scale = cfg_scale
        self.attention_backend = select_attention_backend(transformer, attention_backend)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        model_class: Optional[type] = None,
        subfolder: Optional[str] = "transformer",
        torch_dtype: torch.dtype = torch.bfloat16,
        **kwargs: Any,
    ) -> "DiffusersFlowModel":
        """Load ``model_class`` (default ``WanTransformer3DModel``) from a local diffusers folder.

        ``path`` is a pipeline folder (with ``subfolder="transformer"``) or a transformer folder
        (``subfolder=None``); ``kwargs`` go to the adapter (``cfg_scale``, ``attention_backend``).
        """
        if model_class is None:
            from diffusers import WanTransformer3DModel as model_class
        transformer = model_class.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)
        return cls(transformer, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (the rollout keeps its latents in it by default)."""
        return _module_dtype(self.transformer)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def _forward(
        self, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, kwargs: Mapping[str, Any]
    ) -> torch.Tensor:
        return call_transformer(self.transformer, x, timestep, embeds, kwargs)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity ``v`` ``[B, ...]`` at latents ``x`` ``[B, ...]`` and noise levels ``sigma`` ``[B]``."""
        if not isinstance(cond, Conditioning):
            raise TypeError(f"cond must be a euphonium.models.diffusers.Conditioning, got {type(cond).__name__}")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise TypeError("x must be a floating-point latent tensor [B, ...]")
        batch = x.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"cond.prompt_embeds has batch size {cond.batch_size} but x has {batch}")
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.full((batch,), float(sigma), dtype=torch.float32, device=x.device)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be a [B] = [{batch}] tensor, got shape {tuple(sigma.shape)}")
        timestep = sigma.to(device=x.device, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS

        if self.cfg_scale == 1.0:
            return self._forward(x, timestep, cond.prompt_embeds, cond.kwargs)
        if cond.negative_prompt_embeds is None:
            raise ValueError(
                f"cond.negative_prompt_embeds is required for classifier-free guidance (cfg_scale={self.cfg_scale})"
            )
        negative_kwargs = {**cond.kwargs, **(cond.negative_kwargs or {})}
        kwargs = {k: _cat_batch(v, negative_kwargs[k], batch) for k, v in cond.kwargs.items()}
        both = self._forward(
            torch.cat([x, x]),
            torch.cat([timestep, timestep]),
            torch.cat([cond.prompt_embeds, cond.negative_prompt_embeds]),
            kwargs,
        )
        v_cond, v_uncond = both.float().chunk(2)
        return (v_uncond + self.cfg_scale * (v_cond - v_uncond)).to(both.dtype)


def _cat_batch(positive: Any, negative: Any, batch: int) -> Any:
    """Stack a forward argument of the two CFG halves along the batch, when it is a batched tensor."""
    if isinstance(positive, torch.Tensor) and positive.dim() >= 1 and positive.shape[0] == batch:
        return torch.cat([positive, negative])
    return positive


__all__ = ["Conditioning", "DiffusersFlowModel", "NUM_TRAIN_TIMESTEPS", "call_transformer", "select_attention_backend"]
