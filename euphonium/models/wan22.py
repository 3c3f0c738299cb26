"""Wan2.2 A14B: two ``WanTransformer3DModel`` experts switched by noise level, as ``WanPipeline`` switches them.

``WanPipeline`` with ``transformer_2`` and ``boundary_ratio`` set computes
``boundary_timestep = boundary_ratio * num_train_timesteps`` and calls ``transformer`` (the high-noise
expert) at every timestep ``t >= boundary_timestep`` and ``transformer_2`` (low noise) below it.
:class:`WanExperts` makes that choice per sample from the timestep ``sigma * 1000`` it is called with, so a
training batch mixing noise levels sends each sample to its own expert, and a rollout step (one noise
level) calls exactly the expert the pipeline calls. Text encoding and decoding are Wan2.1's
(:mod:`euphonium.models.wan`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import NUM_TRAIN_TIMESTEPS

EXPERTS = {"both": ("transformer", "transformer_2"), "high": ("transformer",), "low": ("transformer_2",)}


def _pick(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value[index]
    return value


def expert_handles(sigma: torch.Tensor, boundary_ratio: float, expert: str) -> torch.Tensor:
    """``[...]`` bool: which noise levels ``sigma`` reach a trained expert (all for ``expert='both'``): the
    high-noise ``transformer`` takes ``t = sigma * 1000 >= boundary_ratio * 1000``, ``transformer_2`` the rest."""
    high = sigma.to(torch.float32) * NUM_TRAIN_TIMESTEPS >= boundary_ratio * NUM_TRAIN_TIMESTEPS
    if expert == "both":
        return torch.ones_like(high)
    return high if expert == "high" else ~high


class WanExperts(FlowTransformer):
    """``transformer`` (high noise) and ``transformer_2`` (low noise) behind one call.

    Args:
        transformer, transformer_2: the pipeline's two ``WanTransformer3DModel`` experts.
        boundary_ratio: the pipeline's ``boundary_ratio`` (``model_index.json``; 0.875 for Wan2.2 T2V A14B).
        expert: which experts train: ``both``, ``high`` (``transformer``) or ``low`` (``transformer_2``);
            the other is frozen and gets no adapter.
        num_train_timesteps: the scheduler's (1000), as the pipeline multiplies the ratio by it.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        transformer_2: torch.nn.Module,
        boundary_ratio: float,
        *,
        expert: str = "both",
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    ):
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {sorted(EXPERTS)}, got {expert!r}")
        if isinstance(boundary_ratio, bool) or not isinstance(boundary_ratio, (int, float)):
            raise TypeError(f"boundary_ratio must be a number, got {boundary_ratio!r}")
        if not 0 < boundary_ratio < 1:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
        super().__init__({"transformer": transformer, "transformer_2": transformer_2}, EXPERTS[expert])
        self.expert = expert
        self.boundary_ratio = boundary_ratio
        # The pipeline's expression: a Python float compared with the float32 timestep tensor.
        self.boundary_timestep = boundary_ratio * num_train_timesteps

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which samples the high-noise expert ``transformer`` denoises (``t >= boundary``)."""
        return timestep >= self.boundary_timestep

    def trains_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: which noise levels reach a trained expert (all when ``expert='both'``)."""
        return expert_handles(sigma, self.boundary_ratio, self.expert)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Sequence[torch.Tensor]:
        if timestep.dim() != 1 or timestep.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"WanExperts needs one timestep per sample [B], got {tuple(timestep.shape)} "
                f"for a batch of {hidden_states.shape[0]}"
            )
        high = self.high_noise(timestep)
        batch = hidden_states.shape[0]
        call = dict(return_dict=False, **kwargs)
        if bool(high.all()) or not bool(high.any()):
            model = self.transformer if bool(high.all()) else self.transformer_2
            out = model(
                hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states, **call
            )[0]
        else:
            out = None
            for model, index in (
                (self.transformer, high.nonzero().flatten()),
                (self.transformer_2, (~high).nonzero().flatten()),
            ):
                part = model(
                    hidden_states=hidden_states[index],
                    timestep=timestep[index],
                    encoder_hidden_states=encoder_hidden_states[index],
                    return_dict=False,
                    **{k: _pick(v, index, batch) for k, v in kwargs.items()},
                )[0]
                if out is None:
                    out = part.new_empty((batch, *part.shape[1:]))
                out = out.index_put((index,), part)
        return (self._keep_in_graph(out),)
