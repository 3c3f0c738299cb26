"""The latent process reward model: ``r_p(x_sigma, sigma, prompt_embeds) -> [B]``.

A small noise-aware, text-conditioned 3D-conv network (diffusers ``ModelMixin``: ``save_pretrained``
/ ``from_pretrained`` write and read safetensors and a JSON config). Any module with the same call
signature works in its place for guidance.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin

from euphonium._checks import check_float_tensor, per_sample

# --------------------------------------------------------------------------------------------------
# The model


def pool_prompt_embeds(prompt_embeds: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pooled prompt embedding ``[B, D]``: masked mean over tokens of ``[B, L, D]``; ``[B, D]`` passes through.

    ``pooled[b] = sum_l m[b, l] e[b, l] / max(sum_l m[b, l], 1)`` with ``m = prompt_mask`` (``[B, L]``,
    bool or 0/1; all ones when ``None``). Computed in float32.

    Text encoders that zero their padding (Wan's UMT5 states, the toy encoder) give, unmasked, the
    masked mean times ``n_tokens / L``; :class:`LatentRewardModel` layer-normalises the pooled
    embedding, which removes that scale, so the sampler can pass its ``[B, L, D]`` states as they are.
    """
    check_float_tensor("prompt_embeds", prompt_embeds, min_dim=2)
    if prompt_embeds.dim() == 2:
        if prompt_mask is not None:
            raise ValueError("prompt_mask is only meaningful with per-token prompt_embeds [B, L, D]")
        return prompt_embeds.float()
    if prompt_embeds.dim() != 3:
        raise ValueError(f"prompt_embeds must be [B, L, D] tokens or a pooled [B, D], got {tuple(prompt_embeds.shape)}")
    if prompt_mask is None:
        return prompt_embeds.float().mean(dim=1)
    if prompt_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(
            f"prompt_mask must have shape {tuple(prompt_embeds.shape[:2])} ([B, L]), got {tuple(prompt_mask.shape)}"
        )
    m = prompt_mask.to(device=prompt_embeds.device, dtype=torch.float32).unsqueeze(-1)
    return (prompt_embeds.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def _pad_to_multiple(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    # Zero-pad the end of F, H, W so a strided patch conv sees every frame (Wan has 21 latent frames).
    pad = []
    for size, s in zip(reversed(x.shape[2:]), reversed(stride)):
        pad += [0, (-size) % s]
    return F.pad(x, pad) if any(pad) else x


class _ResBlock(nn.Module):
    """``x + Conv3d(SiLU(FiLM(GroupNorm(x), cond)))``; FiLM starts at the identity (zero-initialised)."""

    def __init__(self, channels: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.film = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond)[:, :, None, None, None].chunk(2, dim=1)
        return x + self.conv(F.silu(self.norm(x) * (1 + scale) + shift))


class LatentRewardModel(ModelMixin, ConfigMixin):
    """Noise-aware, text-conditioned latent reward model ``r_p(x_sigma, sigma, prompt_embeds) -> [B]``.

    Architecture (all sizes in the config):

    - condition ``c = TimestepEmbedding(sinusoid(1000 * sigma)) + MLP(LayerNorm(pool(prompt_embeds)))``
      (diffusers' timestep embedding, the Wan timestep convention ``t = 1000 sigma``);
    - trunk: a patch embedding ``Conv3d(in_channels, channels[0], patch_size, stride=patch_size)``,
      then per stage ``blocks[i]`` residual blocks ``x + Conv3d_3x3x3(SiLU(FiLM_c(GroupNorm(x))))``,
      stages joined by a stride-2 ``Conv3d`` (kernel 2) that widens to ``channels[i + 1]``;
    - head: ``h = mean_{F,H,W} SiLU(GroupNorm(x))``, ``q = Linear(text)``, ``s = MLP([h, h * q, c])``;
    - output ``r = reward_mean + reward_std * s``: ``s`` is the reward in standard units and the two
      buffers (set by :class:`PRMTrainer` from its training data) give it the outcome reward's scale,
      so that ``grad_x r`` is in reward units per latent unit.
    - ``aux_rewards``: names of outcome reward parts (e.g. the toy terms ``color``, ``shape``) the
      head also predicts, in standard units (:meth:`score_all`), as auxiliary regression targets
      during training: they give the trunk a direct signal for each attribute. ``forward`` returns
      the total reward only.

    Call: ``x_sigma [B, C, F, H, W]`` (any float dtype, computed in the parameters' dtype), ``sigma``
    a float or ``[B]`` tensor in [0, 1], ``prompt_embeds`` per-token ``[B, L, D]`` (pooled inside by
    a mean over tokens, masked by ``prompt_mask [B, L]`` when given) or already pooled ``[B, D]``.
    Returns ``[B]`` float32 (float64 for a float64 model). Samples are independent (GroupNorm, no
    batch statistics), so ``grad_x sum_b r[b]`` is each sample's own gradient.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        text_dim: int = 64,
        channels: Tuple[int, ...] = (32, 64),
        blocks: Tuple[int, ...] = (2, 2),
        patch_size: Tuple[int, int, int] = (2, 2, 2),
        cond_dim: int = 128,
        sigma_freq_dim: int = 128,
        norm_groups: int = 8,
        aux_rewards: Tuple[str, ...] = (),
    ):
        super().__init__()
        channels, blocks, patch_size = tuple(channels), tuple(blocks), tuple(patch_size)
        if len(set(aux_rewards)) != len(aux_rewards) or not all(isinstance(a, str) and a for a in aux_rewards):
            raise ValueError(f"aux_rewards must be distinct non-empty names, got {aux_rewards}")
        if len(channels) != len(blocks) or not channels:
            raise ValueError(f"channels and blocks need one entry per stage, got {channels} and {blocks}")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (F, H, W), got {patch_size}")
        for c in channels:
            if c % norm_groups:
                raise ValueError(
                    f"every entry of channels must be divisible by norm_groups={norm_groups}, got {channels}"
                )
        self.stem = nn.Conv3d(in_channels, channels[0], patch_size, stride=patch_size)
        self.sigma_proj = Timesteps(sigma_freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.sigma_embed = TimestepEmbedding(sigma_freq_dim, cond_dim)
        self.text_embed = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(_ResBlock(c, cond_dim, norm_groups) for _ in range(n)) for c, n in zip(channels, blocks)
        )
        self.downs = nn.ModuleList(nn.Conv3d(a, b, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        self.out_norm = nn.GroupNorm(norm_groups, channels[-1])
        self.text_query = nn.Linear(cond_dim, channels[-1])
        self.head = nn.Sequential(
            nn.Linear(2 * channels[-1] + cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, 1 + len(aux_rewards))
        )
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))
        self.register_buffer("reward_stats_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("aux_mean", torch.zeros(len(aux_rewards)))
        self.register_buffer("aux_std", torch.ones(len(aux_rewards)))

    def set_reward_stats(
        self,
        mean: float,
        std: float,
        aux_mean: Optional[Sequence[float]] = None,
        aux_std: Optional[Sequence[float]] = None,
    ) -> None:
        """Set the output scale ``r = mean + std * s`` (``std > 0``) and, with ``aux_rewards``, the
        standardisation of each auxiliary target (``aux_mean``, ``aux_std``: one entry per name)."""
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"reward stats need a finite mean and a positive std, got mean={mean}, std={std}")
        n = len(self.config.aux_rewards)
        if n and (aux_mean is None or aux_std is None or len(aux_mean) != n or len(aux_std) != n):
            raise ValueError(f"aux_mean and aux_std need one entry for each of {list(self.config.aux_rewards)}")
        self.reward_mean.fill_(mean)
        self.reward_std.fill_(std)
        if n:
            aux_std = torch.as_tensor(aux_std, dtype=self.aux_std.dtype)
            if not bool(torch.isfinite(aux_std).all() & (aux_std > 0).all()):
                raise ValueError(f"aux_std must be finite and positive, got {aux_std.tolist()}")
            self.aux_mean.copy_(torch.as_tensor(aux_mean))
            self.aux_std.copy_(aux_std)
        self.reward_stats_fitted.fill_(True)

    def _check(self, x, sigma, prompt_embeds) -> torch.Tensor:
        check_float_tensor("x_sigma", x, min_dim=5)
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x_sigma must have shape [B, {self.config.in_channels}, F, H, W], got {tuple(x.shape)}")
        sigma = per_sample("sigma", sigma, x.shape[0], x.device)
        check_float_tensor("prompt_embeds", prompt_embeds, min_dim=2)
        if prompt_embeds.shape[0] != x.shape[0] or prompt_embeds.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"prompt_embeds must be [{x.shape[0]}, L, {self.config.text_dim}] or "
                f"[{x.shape[0]}, {self.config.text_dim}], got {tuple(prompt_embeds.shape)}"
            )
        return sigma

    def score_all(
        self, x_sigma: torch.Tensor, sigma, prompt_embeds: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Head outputs in standard units ``[B, 1 + len(aux_rewards)]``: the total, then each auxiliary part."""
        sigma = self._check(x_sigma, sigma, prompt_embeds)
        dtype = self.stem.weight.dtype
        text = self.text_embed(pool_prompt_embeds(prompt_embeds, prompt_mask).to(dtype))
        cond = self.sigma_embed(self.sigma_proj(1000 * sigma).to(dtype)) + text
        h = self.stem(_pad_to_multiple(x_sigma.to(dtype), self.config.patch_size))
        for i, stage in enumerate(self.stages):
            if i:
                h = self.downs[i - 1](_pad_to_multiple(h, (2, 2, 2)))
            for block in stage:
                h = block(h, cond)
        h = F.silu(self.out_norm(h)).mean(dim=(2, 3, 4))
        q = self.text_query(text)
        # float32 for low-precision weights; float64 models (gradient checks) stay float64.
        return self.head(torch.cat([h, h * q, cond], dim=1)).to(torch.promote_types(dtype, torch.float32))

    def score(
        self, x_sigma: torch.Tensor, sigma, prompt_embeds: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The reward in standard units ``s [B]`` float32 (``forward`` returns ``mean + std * s``)."""
        return self.score_all(x_sigma, sigma, prompt_embeds, prompt_mask)[:, 0]

    def forward(
        self, x_sigma: torch.Tensor, sigma, prompt_embeds: torch.Tensor, prompt_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.reward_mean + self.reward_std * self.score(x_sigma, sigma, prompt_embeds, prompt_mask)
