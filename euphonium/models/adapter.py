"""One module over one or more diffusers transformers, called as :class:`DiffusersFlowModel` calls a transformer.

A family whose transformer takes other inputs than ``(hidden_states [B, C, F, H, W], timestep = sigma * 1000,
encoder_hidden_states, **kwargs)`` (FLUX's packed latents and ``timestep / 1000``, SD3's image latents) or
that has several transformers (Wan2.2's two experts) is wrapped in a :class:`FlowTransformer` subclass.
Its ``forward`` does the family's packing; everything the trainer does to a transformer (gradient
checkpointing, ``add_adapter``, ``enable_adapters``/``disable_adapters``, attention backends, FSDP's
``blocks``) is passed on to the transformers it trains.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

# The block lists of diffusers' transformers (FSDP shards each block).
_BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "token_refiner")


class FlowTransformer(torch.nn.Module):
    """Base class: the diffusers transformers ``models`` (registered by name) of which ``trained`` are trained.

    The others are frozen here (``requires_grad_(False)``) and get no adapter. Subclasses define
    ``forward(hidden_states, timestep, encoder_hidden_states, return_dict=False, **kwargs) -> (v,)``.
    """

    def __init__(self, models: Dict[str, torch.nn.Module], trained: Sequence[str]):
        super().__init__()
        if not models:
            raise ValueError("FlowTransformer needs at least one transformer")
        unknown = sorted(set(trained) - set(models))
        if unknown or not trained:
            raise ValueError(f"trained must name some of {sorted(models)}, got {list(trained)}")
        for name, model in models.items():
            self.add_module(name, model)
        self.model_names = tuple(models)
        self.trained = tuple(name for name in models if name in trained)
        for name in self.model_names:
            if name not in self.trained:
                getattr(self, name).requires_grad_(False)

    def trained_modules(self) -> Dict[str, torch.nn.Module]:
        """The transformers that are trained, by attribute name (where ``add_adapter`` puts LoRA layers)."""
        return {name: getattr(self, name) for name in self.trained}

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (diffusers' ``ModelMixin.dtype`` of the first transformer)."""
        return getattr(self, self.model_names[0]).dtype

    @property
    def blocks(self) -> List[torch.nn.Module]:
        """Every transformer block of every model (what FSDP shards one by one)."""
        found = []
        for name in self.model_names:
            model = getattr(self, name)
            for attr in _BLOCK_LISTS:
                found.extend(getattr(model, attr, None) or [])
        return found

    def set_attention_backend(self, backend: str) -> None:
        for name in self.model_names:
            getattr(self, name).set_attention_backend(backend)

    def enable_gradient_checkpointing(self) -> None:
        for model in self.trained_modules().values():
            model.enable_gradient_checkpointing()

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        for model in self.trained_modules().values():
            model.add_adapter(adapter_config, adapter_name=adapter_name)

    def enable_adapters(self) -> None:
        for model in self.trained_modules().values():
            model.enable_adapters()

    def disable_adapters(self) -> None:
        for model in self.trained_modules().values():
            model.disable_adapters()

    def _keep_in_graph(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` joined to the trained weights with a zero gradient, when grad mode is on, some weights
        train and ``out`` came from frozen weights only (e.g. a batch that only the frozen Wan2.2 expert
        saw): the loss then still has a graph (its gradient is exactly zero) instead of failing in backward."""
        if not torch.is_grad_enabled() or out.requires_grad:
            return out
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return out
        return out + torch.stack([p.sum() for p in params]).sum().to(out.dtype) * 0
