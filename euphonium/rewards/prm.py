"""The latent process reward model (PRM): ``r_p(x_sigma, sigma, prompt_embeds) -> [B]``, and training it.

A PRM scores a noisy latent ``x_sigma = (1 - sigma) x0 + sigma eps`` by the outcome reward the
clean clip ``x0`` is expected to get. The sampler adds ``c * grad_x r_p`` to the SDE mean at guided
steps (DESIGN.md section 2), so the PRM has to be noise-aware, text-conditioned and cheap to
differentiate.

- :class:`LatentRewardModel`: a small 3D-conv network (diffusers ``ModelMixin``: ``save_pretrained`` /
  ``from_pretrained`` write and read safetensors + a JSON config).
- :class:`PRMDataset`: ``(x0, pooled prompt embedding, outcome reward)`` triples, from rollouts of
  the base model (:func:`collect_rollouts`) or a saved file.
- :class:`PRMTrainer`: offline training (:meth:`PRMTrainer.fit`: MSE or pairwise Bradley-Terry on
  noised latents at sampled sigmas, held-out evaluation, checkpoints, a progress bar) and the online
  refresh the RL trainer calls with fresh rollouts (:meth:`PRMTrainer.update`).
- ``python -m euphonium.rewards.prm {collect,train,report}``: the same on the toy world.

Any module with the call signature ``prm(x_sigma [B, C, F, H, W], sigma [B], prompt_embeds) -> [B]``
works in place of :class:`LatentRewardModel` for guidance.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class PRMDataset:
    """Outcome-labelled clean latents: the training data of a PRM.

    Attributes:
        x0: ``[N, C, F, H, W]`` clean latents (float32 or bfloat16; what the rollouts ended at).
        prompt_embeds: ``[N, D]`` pooled prompt embeddings (:func:`pool_prompt_embeds` of what the
            PRM is called with at guidance time); pooled so that a sample stores ``D`` numbers, not
            ``L x D`` (a Wan prompt is 512 x 4096).
        rewards: ``[N]`` float32 outcome rewards of the decoded ``x0`` (the regression target).
        prompts: the ``N`` prompt strings, or ``None``.
        parts: optional named outcome rewards ``{name: [N]}`` (reported, not trained on).
    """

    x0: torch.Tensor
    prompt_embeds: torch.Tensor
    rewards: torch.Tensor
    prompts: Optional[List[str]] = None
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        check_float_tensor("x0", self.x0, min_dim=5)
        n = self.x0.shape[0]
        if self.x0.dim() != 5:
            raise ValueError(f"x0 must have shape [N, C, F, H, W], got {tuple(self.x0.shape)}")
        check_float_tensor("prompt_embeds", self.prompt_embeds, min_dim=2)
        if self.prompt_embeds.dim() != 2 or self.prompt_embeds.shape[0] != n:
            raise ValueError(
                f"prompt_embeds must be pooled [N={n}, D] (see pool_prompt_embeds), got "
                f"{tuple(self.prompt_embeds.shape)}"
            )
        check_float_tensor("rewards", self.rewards)
        if self.rewards.shape != (n,):
            raise ValueError(f"rewards must have shape [{n}], got {tuple(self.rewards.shape)}")
        if not bool(torch.isfinite(self.rewards).all()):
            bad = int((~torch.isfinite(self.rewards)).nonzero()[0])
            raise ValueError(f"rewards has a non-finite value at sample {bad}")
        self.rewards = self.rewards.float()
        if self.prompts is not None:
            if len(self.prompts) != n:
                raise ValueError(f"prompts has {len(self.prompts)} entries for {n} samples")
            self.prompts = list(self.prompts)
        for name, values in self.parts.items():
            if not isinstance(values, torch.Tensor) or values.shape != (n,):
                raise ValueError(
                    f"parts[{name!r}] must be a [{n}] tensor, got "
                    f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
                )

    def __len__(self) -> int:
        return self.x0.shape[0]

    def subset(self, index: Union[torch.Tensor, Sequence[int]]) -> "PRMDataset":
        """The samples at ``index`` (a list or 1-D int tensor), as a new dataset."""
        index = torch.as_tensor(index, dtype=torch.long)
        return PRMDataset(
            x0=self.x0[index],
            prompt_embeds=self.prompt_embeds[index],
            rewards=self.rewards[index],
            prompts=[self.prompts[i] for i in index.tolist()] if self.prompts is not None else None,
            parts={k: v[index] for k, v in self.parts.items()},
        )

    def split(self, held_out_fraction: float, seed: int = 0) -> Tuple["PRMDataset", "PRMDataset"]:
        """A random ``(train, held_out)`` split; ``held_out`` has ``round(fraction * N)`` samples (>= 1)."""
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
        n = len(self)
        n_held = max(1, round(held_out_fraction * n))
        if n_held >= n:
            raise ValueError(f"a dataset of {n} samples is too small to hold out {held_out_fraction:.0%}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[n_held:]), self.subset(perm[:n_held])

    @staticmethod
    def concat(datasets: Sequence["PRMDataset"]) -> "PRMDataset":
        """One dataset holding the samples of ``datasets`` in order (parts kept where all have them)."""
        if not datasets:
            raise ValueError("datasets must be non-empty")
        prompts = None
        if all(d.prompts is not None for d in datasets):
            prompts = [p for d in datasets for p in d.prompts]
        common = set.intersection(*(set(d.parts) for d in datasets))
        return PRMDataset(
            x0=torch.cat([d.x0 for d in datasets]),
            prompt_embeds=torch.cat([d.prompt_embeds for d in datasets]),
            rewards=torch.cat([d.rewards for d in datasets]),
            prompts=prompts,
            parts={k: torch.cat([d.parts[k] for d in datasets]) for k in sorted(common)},
        )

    def save(self, path: Union[str, Path]) -> Path:
        """Write one ``.safetensors`` file (tensors; prompts in its JSON metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "x0": self.x0.contiguous(),
            "prompt_embeds": self.prompt_embeds.contiguous(),
            "rewards": self.rewards.contiguous(),
        }
        tensors.update({f"parts.{k}": v.contiguous() for k, v in self.parts.items()})
        metadata = {"format": "euphonium.prm_dataset.v1"}
        if self.prompts is not None:
            metadata["prompts"] = json.dumps(self.prompts)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PRMDataset":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no PRM dataset at {path}")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != "euphonium.prm_dataset.v1":
            raise ValueError(f"{path} is not a PRM dataset written by PRMDataset.save (metadata {metadata})")
        tensors = load_file(str(path))
        prompts = json.loads(metadata["prompts"]) if "prompts" in metadata else None
        parts = {k[len("parts.") :]: v for k, v in tensors.items() if k.startswith("parts.")}
        return cls(
            x0=tensors["x0"],
            prompt_embeds=tensors["prompt_embeds"],
            rewards=tensors["rewards"],
            prompts=prompts,
            parts=parts,
        )


def noise_latents(
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``x_sigma = (1 - sigma) * x0 + sigma * eps`` (the flow-matching forward process), float32.

    ``x0 [B, ...]``, ``sigma [B]``; ``eps`` is ``noise`` or drawn from ``generator``.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    s = sigma.float().view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0.float() + s * noise.float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two ``[N]`` tensors (ties get their average rank); NaN if one is constant."""

    def ranks(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().double().flatten().cpu()
        values, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)
        # Tied values share the mean of the ranks they occupy: first rank + (count - 1) / 2.
        counts = counts.double()
        first = torch.cumsum(counts, 0) - counts
        return (first + (counts - 1) / 2)[inverse]

    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two tensors of equal size >= 2, got {a.numel()} and {b.numel()}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# Training

LOSSES = ("mse", "bradley_terry")
LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


@dataclass
class PRMTrainConfig:
    """Settings of :class:`PRMTrainer` (validated; errors name the field).

    Each training example is ``(x_sigma, sigma, prompt)`` with ``sigma ~ U[sigma_min, sigma_max]``
    and ``x_sigma = (1 - sigma) x0 + sigma eps`` freshly drawn every time, labelled with the outcome
    reward of ``x0``.

    Offline (:meth:`PRMTrainer.fit`):
        steps, batch_size, lr, weight_decay, warmup_steps, lr_schedule (diffusers ``get_scheduler``
        name), grad_clip (max global grad norm; 0 disables).
        loss: ``mse``: ``mean((s - (r - mu) / sd)^2)`` with ``s`` the model's standard-unit score and
            ``(mu, sd)`` the training rewards' mean and std; ``bradley_terry``: pairs ``(i, j)`` of a
            batch at a shared sigma, ``mean(softplus(-sign(r_i - r_j) (s_i - s_j)))`` over pairs with
            ``r_i != r_j`` (ranks only: the output's scale is then arbitrary).
        eval_every: evaluate on the held-out set every this many steps (and at the end).
        eval_sigmas: noise levels of the held-out evaluation (fixed noise, so numbers are comparable).
        checkpoint_every: write ``checkpoints/step-N`` every this many steps (0: never);
        keep_checkpoints: how many to keep.
        seed: seeds the sigmas, the noise and the batches.
        aux_weight: weight of the auxiliary part regression when the model has ``aux_rewards``.

    Online refresh (:meth:`PRMTrainer.update`):
        buffer_size: the replay buffer keeps the most recent this many rollouts.
        online_steps: optimiser steps per ``update`` call, each on ``batch_size`` samples drawn from
            the buffer; online_lr: their learning rate (constant).
    """

    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    grad_clip: float = 1.0
    loss: str = "mse"
    sigma_min: float = 0.0
    sigma_max: float = 1.0
    eval_every: int = 250
    eval_sigmas: Tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.95)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    aux_weight: float = 1.0
    buffer_size: int = 4096
    online_steps: int = 4
    online_lr: float = 2e-4

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "warmup_steps",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "seed",
            "buffer_size",
            "online_steps",
        ):
            value = getattr(self, name)
            minimum = 0 if name in ("warmup_steps", "checkpoint_every", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"PRMTrainConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"PRMTrainConfig.batch_size must be >= 2, got {self.batch_size}")
        for name in ("lr", "online_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"PRMTrainConfig.{name} must be a positive number, got {value!r}")
        for name in ("weight_decay", "grad_clip", "aux_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"PRMTrainConfig.{name} must be a number >= 0, got {value!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"PRMTrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"PRMTrainConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.sigma_min < self.sigma_max <= 1:
            raise ValueError(
                f"PRMTrainConfig needs 0 <= sigma_min < sigma_max <= 1, got {self.sigma_min}, {self.sigma_max}"
            )
        self.eval_sigmas = tuple(float(s) for s in self.eval_sigmas)
        if not self.eval_sigmas or not all(0 <= s <= 1 for s in self.eval_sigmas):
            raise ValueError(f"PRMTrainConfig.eval_sigmas must be non-empty values in [0, 1], got {self.eval_sigmas}")

    @classmethod
    def from_dict(cls, values: Dict) -> "PRMTrainConfig":
        """A config from a dict (e.g. JSON); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PRMTrainConfig field(s) {unknown}; fields are {sorted(known)}")
        return cls(**values)


def _standardize(rewards: torch.Tensor, model: LatentRewardModel) -> torch.Tensor:
    return (rewards.float() - model.reward_mean) / model.reward_std


def prm_loss(
    model: LatentRewardModel,
    x0: torch.Tensor,
    prompt_embeds: torch.Tensor,
    rewards: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    loss: str = "mse",
    aux: Optional[torch.Tensor] = None,
    aux_weight: float = 1.0,
) -> torch.Tensor:
    """The PRM training loss on one batch (scalar; formulas in :class:`PRMTrainConfig`).

    ``x0 [B, C, F, H, W]`` is noised to ``x_sigma`` with ``sigma [B]`` and ``noise``. For
    ``bradley_terry`` sample ``i`` is paired with ``i + B // 2``; they should share their sigma.
    ``aux [B, P]``: the model's ``aux_rewards`` targets; adds ``aux_weight * mean((s_aux - z_aux)^2)``
    (``z`` standardised by the model's ``aux_mean``/``aux_std``).
    """
    scores = model.score_all(noise_latents(x0, sigma, noise), sigma, prompt_embeds)
    score = scores[:, 0]
    target = _standardize(rewards.to(score.device), model)
    if loss == "mse":
        out = F.mse_loss(score, target)
    elif loss == "bradley_terry":
        half = score.shape[0] // 2
        diff = score[:half] - score[half : 2 * half]
        order = torch.sign(target[:half] - target[half : 2 * half])
        valid = order != 0
        out = F.softplus(-order[valid] * diff[valid]).mean() if bool(valid.any()) else (score * 0).sum()
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if aux is not None and scores.shape[1] > 1:
        aux_target = (aux.to(scores.device).float() - model.aux_mean) / model.aux_std
        out = out + aux_weight * F.mse_loss(scores[:, 1:], aux_target)
    return out


class PRMTrainer:
    """Trains a :class:`LatentRewardModel` offline (:meth:`fit`) and online during RL (:meth:`update`).

    Args:
        model: the PRM to train in place (its device and dtype are used).
        config: :class:`PRMTrainConfig` (default settings if ``None``).
        output_dir: where ``metrics.jsonl`` and checkpoints go (``None``: nothing is written).
    """

    def __init__(
        self,
        model: LatentRewardModel,
        config: Optional[PRMTrainConfig] = None,
        output_dir: Union[str, Path, None] = None,
    ):
        if not isinstance(model, LatentRewardModel):
            raise TypeError(f"model must be a LatentRewardModel, got {type(model).__name__}")
        self.model = model
        self.config = config if config is not None else PRMTrainConfig()
        if not isinstance(self.config, PRMTrainConfig):
            raise TypeError(f"config must be a PRMTrainConfig, got {type(self.config).__name__}")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.device = model.stem.weight.device
        self.step = 0
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.online_optimizer: Optional[torch.optim.Optimizer] = None
        self.buffer: Optional[PRMDataset] = None

    # -- shared pieces ---------------------------------------------------------------------------

    def _aux_targets(self, data: PRMDataset) -> Optional[torch.Tensor]:
        """``[N, P]`` targets of the model's ``aux_rewards`` from ``data.parts``, or None if any is missing."""
        names = self.model.config.aux_rewards
        if not names or not all(n in data.parts for n in names):
            return None
        return torch.stack([data.parts[n].float() for n in names], dim=1)

    def _fit_reward_stats(self, data: PRMDataset) -> None:
        if bool(self.model.reward_stats_fitted):
            return

        def stats(values: torch.Tensor) -> Tuple[float, float]:
            std = float(values.float().std()) if values.numel() > 1 else 0.0
            return float(values.float().mean()), std if std > 1e-8 else 1.0

        mean, std = stats(data.rewards)
        aux = self._aux_targets(data)
        if self.model.config.aux_rewards and aux is None:
            raise ValueError(
                f"the PRM predicts aux_rewards {list(self.model.config.aux_rewards)} but the data has "
                f"parts {sorted(data.parts)}"
            )
        aux_stats = [stats(aux[:, j]) for j in range(aux.shape[1])] if aux is not None else []
        self.model.set_reward_stats(mean, std, [m for m, _ in aux_stats], [s for _, s in aux_stats])

    def _draw_batch(self, data: PRMDataset, batch_size: int):
        cfg = self.config
        index = torch.randint(len(data), (batch_size,), generator=self.generator)
        u = torch.rand(batch_size if cfg.loss == "mse" else (batch_size + 1) // 2, generator=self.generator)
        sigma = cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * u
        if cfg.loss == "bradley_terry":  # pairs (i, i + B/2) share their sigma
            sigma = torch.cat([sigma, sigma])[:batch_size]
        noise = torch.randn((batch_size, *data.x0.shape[1:]), generator=self.generator)
        to = dict(device=self.device)
        aux = self._aux_targets(data)
        return dict(
            x0=data.x0[index].to(**to),
            prompt_embeds=data.prompt_embeds[index].to(**to),
            rewards=data.rewards[index].to(**to),
            sigma=sigma.to(**to),
            noise=noise.to(**to),
            aux=aux[index].to(**to) if aux is not None else None,
        )

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, data: PRMDataset, batch_size: int) -> float:
        self.model.train()
        loss = prm_loss(
            self.model, **self._draw_batch(data, batch_size), loss=self.config.loss, aux_weight=self.config.aux_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        optimizer.step()
        # Leave no .grad behind: the same module is differentiated inside rollouts (ops.reward_grad).
        optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return loss.item()

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, data: PRMDataset, sigma: float, *, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """PRM rewards ``[N]`` (float32, CPU) of ``data`` noised to ``sigma`` with noise fixed by ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, len(data), batch_size):
            x0 = data.x0[start : start + batch_size]
            noise = torch.randn(x0.shape, generator=gen)
            s = torch.full((x0.shape[0],), float(sigma), device=self.device)
            x = noise_latents(x0.to(self.device), s, noise.to(self.device))
            out.append(self.model(x, s, data.prompt_embeds[start : start + batch_size].to(self.device)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(
        self, data: PRMDataset, sigmas: Optional[Sequence[float]] = None, *, seed: int = 0
    ) -> Dict[str, float]:
        """Held-out metrics at fixed noise: per sigma the MSE in standard units and the Spearman
        correlation of PRM scores with the outcome rewards, and their means over sigmas.

        Returns ``{"mse": .., "spearman": .., "mse@<sigma>": .., "spearman@<sigma>": ..}``.
        """
        sigmas = self.config.eval_sigmas if sigmas is None else tuple(sigmas)
        out: Dict[str, float] = {}
        target = _standardize(data.rewards.to(self.device), self.model).cpu()
        for i, sigma in enumerate(sigmas):
            pred = self.predict(data, sigma, seed=seed + i)
            score = _standardize(pred.to(self.device), self.model).cpu()
            out[f"mse@{sigma:g}"] = float(F.mse_loss(score, target))
            out[f"spearman@{sigma:g}"] = spearman(pred, data.rewards)
        out["mse"] = float(np.mean([out[f"mse@{s:g}"] for s in sigmas]))
        out["spearman"] = float(np.nanmean([out[f"spearman@{s:g}"] for s in sigmas]))
        return out

    # -- offline training ------------------------------------------------------------------------

    def fit(
        self, train: PRMDataset, held_out: Optional[PRMDataset] = None, *, progress: bool = True, resume: bool = False
    ) -> List[Dict[str, float]]:
        """Train for ``config.steps`` optimiser steps on ``train``; evaluate on ``held_out``.

        Sets the model's reward scale from ``train`` if it has none yet. With ``output_dir`` set,
        appends one JSON line per evaluation to ``metrics.jsonl`` and writes checkpoints;
        ``resume=True`` continues from the newest checkpoint there. Returns the evaluation records
        (``step``, ``train_loss`` = mean loss since the last record, held-out metrics, wall ``seconds``
        and process ``cpu_seconds`` since the start).
        """
        if not isinstance(train, PRMDataset):
            raise TypeError(f"train must be a PRMDataset, got {type(train).__name__}")
        cfg = self.config
        from diffusers.optimization import get_scheduler

        scheduler = get_scheduler(
            cfg.lr_schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
        )
        if resume:
            if self.output_dir is None:
                raise ValueError("resume=True needs the trainer's output_dir")
            latest = self.latest_checkpoint()
            if latest is None:
                raise FileNotFoundError(f"resume=True but {self.output_dir / 'checkpoints'} holds no checkpoint")
            self.load_checkpoint(latest, scheduler)
        self._fit_reward_stats(train)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        history: List[Dict[str, float]] = []
        losses: List[float] = []
        start_time, cpu_start = time.perf_counter(), time.process_time()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="prm", disable=not progress)
        while self.step < cfg.steps:
            losses.append(self._optimizer_step(self.optimizer, train, cfg.batch_size))
            scheduler.step()
            self.step += 1
            bar.update(1)
            if self.step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                record = {
                    "step": self.step,
                    "train_loss": float(np.mean(losses)),
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - start_time,
                    "cpu_seconds": time.process_time() - cpu_start,
                }
                losses = []
                if held_out is not None:
                    record.update({f"held_out/{k}": v for k, v in self.evaluate(held_out).items()})
                    bar.write(
                        f"step {self.step}: train loss {record['train_loss']:.4f}, held-out mse "
                        f"{record['held_out/mse']:.4f}, spearman {record['held_out/spearman']:.3f}"
                    )
                history.append(record)
                if self.output_dir is not None:
                    with open(self.output_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
            if cfg.checkpoint_every and self.output_dir is not None and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(scheduler)
        bar.close()
        return history

    # -- online refresh --------------------------------------------------------------------------

    def update(
        self,
        x0: torch.Tensor,
        prompt_embeds: torch.Tensor,
        rewards: torch.Tensor,
        prompt_mask: Optional[torch.Tensor] = None,
        parts: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Dict[str, float]:
        """Online refresh with fresh rollouts: add them to the replay buffer, take
        ``config.online_steps`` optimiser steps on batches drawn from it.

        Args:
            x0: final latents of the rollouts ``[B, C, F, H, W]`` (any float dtype; stored detached).
            prompt_embeds: what the PRM is conditioned on at guidance time, ``[B, L, D]`` (pooled
                here, masked by ``prompt_mask [B, L]`` if given) or ``[B, D]``.
            rewards: ``[B]`` outcome rewards of the decoded ``x0``.
            parts: the named outcome rewards ``{name: [B]}`` (e.g. ``RewardOutput.parts``); needed to
                keep training a PRM's ``aux_rewards`` heads (without them only the total is trained
                while such samples are in the buffer).

        Returns ``{"prm/loss": mean training loss, "prm/spearman_fresh": Spearman of the PRM's scores
        on the fresh batch (at training sigmas, before this update) with its rewards,
        "prm/buffer_size": ..}``. The model is left in eval mode with no ``.grad``.
        """
        pooled = pool_prompt_embeds(prompt_embeds, prompt_mask)
        fresh = PRMDataset(
            x0=x0.detach().float().cpu(),
            prompt_embeds=pooled.detach().cpu(),
            rewards=rewards.detach().float().cpu(),
            parts={k: v.detach().float().cpu() for k, v in (parts or {}).items()},
        )
        if fresh.prompt_embeds.shape[1] != self.model.config.text_dim:
            raise ValueError(
                f"prompt_embeds has dim {fresh.prompt_embeds.shape[1]}, the PRM expects {self.model.config.text_dim}"
            )
        self._fit_reward_stats(fresh)
        stats: Dict[str, float] = {}
        if len(fresh) >= 2:
            with torch.no_grad():
                sigma = self.config.sigma_min + (self.config.sigma_max - self.config.sigma_min) * torch.rand(
                    len(fresh), generator=self.generator
                )
                x = noise_latents(fresh.x0, sigma, generator=self.generator).to(self.device)
                pred = self.model(x, sigma.to(self.device), fresh.prompt_embeds.to(self.device))
            stats["prm/spearman_fresh"] = spearman(pred, fresh.rewards)
        self.buffer = fresh if self.buffer is None else PRMDataset.concat([self.buffer, fresh])
        if len(self.buffer) > self.config.buffer_size:
            self.buffer = self.buffer.subset(torch.arange(len(self.buffer) - self.config.buffer_size, len(self.buffer)))
        if self.online_optimizer is None:
            self.online_optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=self.config.online_lr, weight_decay=self.config.weight_decay
            )
        batch = min(self.config.batch_size, max(2, len(self.buffer)))
        losses = [
            self._optimizer_step(self.online_optimizer, self.buffer, batch) for _ in range(self.config.online_steps)
        ]
        stats["prm/loss"] = float(np.mean(losses))
        stats["prm/buffer_size"] = float(len(self.buffer))
        return stats

    # -- checkpoints -----------------------------------------------------------------------------

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest complete ``checkpoints/step-N`` under ``output_dir``, or ``None``."""
        if self.output_dir is None or not (self.output_dir / "checkpoints").is_dir():
            return None
        done = [
            p
            for p in (self.output_dir / "checkpoints").glob("step-*")
            if (p / "trainer.pt").is_file() and p.name[len("step-") :].isdigit()
        ]
        return max(done, key=lambda p: int(p.name[len("step-") :]), default=None)

    def save_checkpoint(self, scheduler=None) -> Path:
        """Write ``output_dir/checkpoints/step-N`` (model + optimiser, scheduler, step, RNG) atomically."""
        if self.output_dir is None:
            raise ValueError("save_checkpoint needs the trainer's output_dir")
        root = self.output_dir / "checkpoints"
        final, tmp = root / f"step-{self.step}", root / f".step-{self.step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp / "model")
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "generator": self.generator.get_state(),
            },
            tmp / "trainer.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kept = sorted(
            (p for p in root.glob("step-*") if p.name[len("step-") :].isdigit()),
            key=lambda p: int(p.name[len("step-") :]),
        )
        for old in kept[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def load_checkpoint(self, path: Union[str, Path], scheduler=None) -> None:
        """Restore model weights, optimiser, scheduler, step and RNG from a checkpoint directory."""
        path = Path(path)
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        loaded = LatentRewardModel.from_pretrained(path / "model")
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


# --------------------------------------------------------------------------------------------------
# On-policy data from rollouts

SampleFn = Callable[[List[str]], Tuple[torch.Tensor, ...]]


def collect_rollouts(
    sample_fn: SampleFn,
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    reward_fn: Callable,
    prompts: Sequence[str],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> PRMDataset:
    """Label rollouts of a model with outcome rewards: the PRM's on-policy training data.

    For each chunk of ``batch_size`` prompts: ``sample_fn(prompts) -> (x0, prompt_embeds)`` or
    ``(x0, prompt_embeds, prompt_mask)`` (final latents ``[b, C, F, H, W]`` and what the PRM is
    conditioned on at guidance time), ``videos = decode_fn(x0)`` (``[b, F, C, H, W]`` in [0, 1]),
    ``reward_fn(videos, prompts)`` (``[b]``, or a :class:`~euphonium.rewards.base.RewardOutput` whose
    ``total`` is the target and whose parts are kept). Returns a :class:`PRMDataset` on the CPU
    (prompt embeddings pooled by :func:`pool_prompt_embeds`).
    """
    from euphonium.rewards.base import RewardOutput, check_reward_values

    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be non-empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="rollouts", disable=not progress):
        batch = prompts[start : start + batch_size]
        with torch.no_grad():
            out = sample_fn(batch)
            if not isinstance(out, tuple) or len(out) not in (2, 3):
                raise TypeError("sample_fn must return (x0, prompt_embeds) or (x0, prompt_embeds, prompt_mask)")
            x0, embeds = out[0], out[1]
            pooled = pool_prompt_embeds(embeds, out[2] if len(out) == 3 else None)
            rewards = reward_fn(decode_fn(x0), batch)
        parts = {}
        if isinstance(rewards, RewardOutput):
            parts = {k: v.float().cpu() for k, v in rewards.parts.items()}
            rewards = rewards.total
        rewards = check_reward_values("reward_fn", rewards, len(batch), batch)
        chunks.append(
            PRMDataset(
                x0=x0.detach().float().cpu(),
                prompt_embeds=pooled.detach().cpu(),
                rewards=rewards.cpu(),
                prompts=batch,
                parts=parts,
            )
        )
    return PRMDataset.concat(chunks)


# --------------------------------------------------------------------------------------------------
# The toy world: shipped PRM, on-policy data, quality report

TOY_PRM_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy_prm"
# Euphonium's published sampler without guidance: the base model's rollouts through every noise level
# are the PRM's training data. (The trainer's toy default, euphonium_fast, queries the PRM at the
# high-noise states of its first-half SDE window: the PRM takes any (x_sigma, sigma).)
TOY_SAMPLER = "euphonium"


def load_toy_prm(path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> LatentRewardModel:
    """The PRM trained on the toy world (``euphonium/assets/toy_prm`` by default), in eval mode."""
    path = Path(path) if path is not None else TOY_PRM_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no PRM at {path}: config.json is missing (train one with `python -m euphonium.rewards.prm train`)"
        )
    return LatentRewardModel.from_pretrained(path).to(device).eval()


def toy_sampler_config(**overrides):
    """The toy data sampler: ``preset("euphonium")`` with guidance off and independent initial noise."""
    from euphonium.sde import preset

    return preset(TOY_SAMPLER, **{"guidance": False, "same_initial_noise": False, **overrides})


def toy_sample_fn(transformer, text_encoder, config=None, seed: int = 0) -> SampleFn:
    """``sample_fn`` for :func:`collect_rollouts`: rollouts of the toy base model (``euphonium.sde.rollout``).

    Returns ``(traj.x0, text_encoder.encode(prompts))``: the final step's ``x0`` prediction (what the
    trainer decodes) and the token embeddings the sampler hands the PRM.
    """
    from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
    from euphonium.models.toy import world
    from euphonium.sde import rollout

    config = config if config is not None else toy_sampler_config()
    velocity = DiffusersFlowModel(transformer)
    generator = torch.Generator().manual_seed(seed)

    def sample(prompts: List[str]):
        embeds = text_encoder.encode(prompts)
        shape = (len(prompts), world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH)
        traj = rollout(velocity, Conditioning(prompt_embeds=embeds), config, shape=shape, seed=generator)
        return traj.x0.float(), embeds

    return sample


def collect_toy_rollouts(
    num_samples: int,
    *,
    seed: int = 0,
    base_model: Union[str, Path, None] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> PRMDataset:
    """``num_samples`` on-policy toy rollouts (prompts drawn with ``seed``) labelled with the toy rewards.

    The target is the toy ``combined`` reward; each term is kept in ``parts``.
    """
    from euphonium.models.toy import latents_to_video, load_toy_model, sample_prompts
    from euphonium.rewards import toy_reward_set

    transformer, text_encoder = load_toy_model(base_model)
    prompts = sample_prompts(num_samples, seed)
    return collect_rollouts(
        toy_sample_fn(transformer, text_encoder, seed=seed),
        latents_to_video,
        toy_reward_set(),
        prompts,
        batch_size=batch_size,
        progress=progress,
    )


def relabel_toy_prompts(
    data: PRMDataset, copies: int, *, seed: int = 0, base_model: Union[str, Path, None] = None
) -> PRMDataset:
    """``copies`` relabelled copies of every toy clip in ``data`` (:func:`relabel_prompts`), prompts
    drawn uniformly with ``seed``, embedded by the toy text encoder, scored with the toy rewards."""
    from euphonium.models.toy import latents_to_video, load_toy_model, sample_prompts
    from euphonium.rewards import toy_reward_set

    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be a positive integer, got {copies!r}")
    _, text_encoder = load_toy_model(base_model)
    return PRMDataset.concat(
        [
            relabel_prompts(
                data, sample_prompts(len(data), seed + k), text_encoder.encode, latents_to_video, toy_reward_set()
            )
            for k in range(copies)
        ]
    )


def relabel_prompts(
    data: PRMDataset,
    prompts: Sequence[str],
    encode_fn: Callable[[List[str]], torch.Tensor],
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    reward_fn: Callable,
    *,
    batch_size: int = 256,
) -> PRMDataset:
    """The clips of ``data`` paired with other prompts and scored again (prompt-relabelling augmentation).

    Sample ``i`` keeps ``x0[i]`` and gets ``prompts[i]``, ``encode_fn(prompts) -> [b, L, D] or [b, D]``
    (pooled) and the outcome reward ``reward_fn(decode_fn(x0), prompts)`` (a ``[b]`` tensor or a
    :class:`~euphonium.rewards.base.RewardOutput`). Because an outcome reward is a function of the clip
    and the prompt, these labels are exact: the PRM sees the same clip scored against many prompts,
    which teaches it the agreement between text and video rather than the prompts' base rates. Use
    it on the training split only (relabelled copies of held-out clips would leak them).
    """
    from euphonium.rewards.base import RewardOutput, check_reward_values

    prompts = list(prompts)
    if len(prompts) != len(data):
        raise ValueError(f"prompts must have one entry per sample ({len(data)}), got {len(prompts)}")
    chunks = []
    for start in range(0, len(data), batch_size):
        batch = prompts[start : start + batch_size]
        x0 = data.x0[start : start + batch_size]
        with torch.no_grad():
            pooled = pool_prompt_embeds(encode_fn(batch)).cpu()
            rewards = reward_fn(decode_fn(x0), batch)
        parts = {}
        if isinstance(rewards, RewardOutput):
            parts = {k: v.float().cpu() for k, v in rewards.parts.items()}
            rewards = rewards.total
        rewards = check_reward_values("reward_fn", rewards, len(batch), batch)
        chunks.append(PRMDataset(x0=x0, prompt_embeds=pooled, rewards=rewards.cpu(), prompts=batch, parts=parts))
    return PRMDataset.concat(chunks)


SIGMA_BUCKETS: Tuple[Tuple[float, float], ...] = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


@torch.no_grad()
def correlation_by_sigma(
    prm: Callable,
    data: PRMDataset,
    buckets: Sequence[Tuple[float, float]] = SIGMA_BUCKETS,
    *,
    draws: int = 2,
    seed: int = 0,
    batch_size: int = 256,
) -> List[Dict[str, float]]:
    """Spearman (and Pearson) correlation between ``prm(x_sigma, sigma, prompt)`` and the outcome reward.

    Per bucket ``[lo, hi]``: every sample of ``data`` is noised ``draws`` times at
    ``sigma ~ U[lo, hi]`` (``x_sigma = (1 - sigma) x0 + sigma eps``, seeded), and the correlation is
    taken over all ``N * draws`` pairs. Returns one dict per bucket.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(prm.parameters()).device if isinstance(prm, nn.Module) else torch.device("cpu")
    rows = []
    for lo, hi in buckets:
        preds, targets = [], []
        for _ in range(draws):
            for start in range(0, len(data), batch_size):
                x0 = data.x0[start : start + batch_size]
                sigma = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)
                x = noise_latents(x0, sigma, torch.randn(x0.shape, generator=gen))
                preds.append(
                    prm(x.to(device), sigma.to(device), data.prompt_embeds[start : start + batch_size].to(device))
                    .float()
                    .cpu()
                )
                targets.append(data.rewards[start : start + batch_size])
        p, t = torch.cat(preds), torch.cat(targets)
        pearson = float(torch.corrcoef(torch.stack([p.double(), t.double()]))[0, 1])
        rows.append(
            {"sigma_lo": lo, "sigma_hi": hi, "n": int(p.numel()), "spearman": spearman(p, t), "pearson": pearson}
        )
    return rows


@torch.no_grad()
def guided_step_effect(
    prm: Callable,
    transformer,
    text_encoder,
    prompts: Sequence[str],
    *,
    lambdas: Sequence[float] = (0.01, 1.0, 100.0, 1000.0),
    steps: Optional[Sequence[int]] = None,
    config=None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> List[Dict[str, float]]:
    """Does one PRM-guided SDE step raise the true final reward, against the same step unguided?

    For each batch of prompts the toy base model samples with ``config`` (default
    :func:`toy_sampler_config`: the RL sampler, guidance off) up to each step ``k`` in ``steps``
    (default: the preset's guided steps). There, with ``g = grad_x prm(x_k, sigma_k, prompt)`` from
    ``ops.reward_grad`` and one shared noise ``eps``, it takes the step
    ``ops.sde_step(x_k, v, ..., reward_grad=g, guidance_scale=lambda * delta, noise=eps)`` for every
    ``lambda`` and once unguided, finishes every branch with the same deterministic Euler (ODE) steps
    (after the last step the step's output is final), decodes, and scores with the toy combined
    reward. The main trajectory continues from the unguided step.

    Returns one dict per ``(step, lambda)`` and one per ``lambda`` pooled over steps (``step = -1``):
    ``improved`` / ``worse`` (fraction of samples whose guided reward is strictly above / below the
    unguided one), ``mean_delta`` and its standard error ``stderr_delta``, ``mean_grad_norm`` (per-sample
    L2 norm of ``g``) and ``mean_shift_rms`` (RMS of ``lambda * delta * g`` per element).
    """
    from euphonium import ops
    from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
    from euphonium.models.toy import world
    from euphonium.rewards import toy_reward_set
    from euphonium.sde import guidance_coefficient, shifted_sigmas

    config = config if config is not None else toy_sampler_config()
    steps = list(steps) if steps is not None else config.replace(guidance=True).guidance_steps()
    if not steps or not all(0 <= k < config.num_steps for k in steps):
        raise ValueError(f"steps must be step indices in [0, {config.num_steps}), got {steps}")
    lambdas = [float(lam) for lam in lambdas]
    sigmas = shifted_sigmas(config.num_steps, config.shift).tolist()
    sde = dict(schedule=config.schedule, noise_level=config.noise_level)
    velocity = DiffusersFlowModel(transformer)
    reward_fn = toy_reward_set()
    gen = torch.Generator().manual_seed(seed)
    deltas: Dict[Tuple[int, float], List[torch.Tensor]] = {(k, lam): [] for k in steps for lam in lambdas}
    grad_norms: Dict[int, List[torch.Tensor]] = {k: [] for k in steps}
    prompts = list(prompts)

    def finish(x, embeds, first):
        # Deterministic Euler steps first .. N-1; after the last step x itself is final.
        cond = Conditioning(prompt_embeds=embeds)
        for i in range(first, config.num_steps):
            v = velocity(x, torch.full((x.shape[0],), sigmas[i]), cond)
            x = ops.sde_step(x, v, sigmas[i], sigmas[i + 1], schedule="ode", noise_level=0.0).x_next
        return x

    chunks = range(0, len(prompts), batch_size)
    for start in tqdm(chunks, desc="guided steps", disable=not progress):
        batch = prompts[start : start + batch_size]
        b = len(batch)
        embeds = text_encoder.encode(batch)
        cond = Conditioning(prompt_embeds=embeds)
        x = torch.randn((b, world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH), generator=gen)
        for i in range(max(steps) + 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            v = velocity(x, torch.full((b,), sigma), cond)
            eps = torch.randn(x.shape, generator=gen)
            unguided = ops.sde_step(x, v, sigma, sigma_next, noise=eps, **sde).x_next
            if i in steps:
                _, g = ops.reward_grad(prm, x, torch.full((b,), sigma), embeds)
                grad_norms[i].append(g.flatten(1).norm(dim=1))
                branches = [unguided] + [
                    ops.sde_step(
                        x,
                        v,
                        sigma,
                        sigma_next,
                        noise=eps,
                        reward_grad=g,
                        guidance_scale=guidance_coefficient(sigma, sigma_next, form="lambda", lam=lam),
                        **sde,
                    ).x_next
                    for lam in lambdas
                ]
                final = finish(torch.cat(branches), embeds.repeat(len(branches), 1, 1), i + 1)
                scores = reward_fn(world.latents_to_video(final), batch * len(branches)).total.view(len(branches), b)
                for j, lam in enumerate(lambdas):
                    deltas[(i, lam)].append(scores[j + 1] - scores[0])
            x = unguided

    rows = []
    for k in steps + [-1]:
        for lam in lambdas:
            ks = steps if k == -1 else [k]
            d = torch.cat([t for s in ks for t in deltas[(s, lam)]]).double()
            norms = torch.cat([t for s in ks for t in grad_norms[s]]).double()
            coefs = [guidance_coefficient(sigmas[s], sigmas[s + 1], form="lambda", lam=lam) for s in ks]
            numel = world.CHANNELS * world.NUM_FRAMES * world.HEIGHT * world.WIDTH
            rows.append(
                {
                    "step": k,
                    "sigma": sigmas[k] if k >= 0 else float("nan"),
                    "lambda": lam,
                    "n": int(d.numel()),
                    "improved": float((d > 0).double().mean()),
                    "worse": float((d < 0).double().mean()),
                    "mean_delta": float(d.mean()),
                    "stderr_delta": float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0,
                    "mean_grad_norm": float(norms.mean()),
                    "mean_shift_rms": float(np.mean(coefs)) * float(norms.mean()) / math.sqrt(numel),
                }
            )
    return rows


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _floats(text: str) -> Tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _training_data(args) -> PRMDataset:
    datasets = [PRMDataset.load(p) for p in args.data or []]
    if args.rollouts:
        datasets.append(collect_toy_rollouts(args.rollouts, seed=args.seed, base_model=args.base_model))
    if not datasets:
        raise SystemExit("error: give --data FILE (a saved PRMDataset) and/or --rollouts N (toy base-model rollouts)")
    data = PRMDataset.concat(datasets)
    if args.save_data:
        data.save(args.save_data)
    return data


def _cmd_collect(args) -> None:
    data = collect_toy_rollouts(args.num_samples, seed=args.seed, base_model=args.base_model)
    data.save(args.out)
    print(
        f"wrote {len(data)} rollouts to {args.out} (reward mean {float(data.rewards.mean()):.4f}, "
        f"std {float(data.rewards.std()):.4f})"
    )


def _cmd_train(args) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    data = _training_data(args)
    train, held_out = data.split(args.held_out_fraction, seed=args.seed)
    if args.relabel:
        train = PRMDataset.concat(
            [train, relabel_toy_prompts(train, args.relabel, seed=args.seed + 1, base_model=args.base_model)]
        )
    torch.manual_seed(args.seed)  # the PRM's initialisation
    if args.init:
        model = LatentRewardModel.from_pretrained(args.init)
    else:
        model = LatentRewardModel(
            in_channels=data.x0.shape[1],
            text_dim=data.prompt_embeds.shape[1],
            channels=_ints(args.channels),
            blocks=_ints(args.blocks),
            patch_size=_ints(args.patch_size),
            aux_rewards=tuple(a for a in args.aux_rewards.split(",") if a),
        )
    config = PRMTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        loss=args.loss,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        aux_weight=args.aux_weight,
    )
    trainer = PRMTrainer(model, config, output_dir=args.output_dir)
    history = trainer.fit(train, held_out, resume=args.resume)
    model.save_pretrained(args.output_dir)
    summary = {
        "command": "python -m euphonium.rewards.prm " + shlex.join(args.argv),
        # CPU seconds alongside wall seconds: on a shared machine the wall time mostly measures the load.
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "torch_threads": torch.get_num_threads(),
        "train_samples": len(train),
        "held_out_samples": len(held_out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "reward_mean": float(model.reward_mean),
        "reward_std": float(model.reward_std),
        "final": history[-1] if history else {},
    }
    (Path(args.output_dir) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _markdown_report(report: Dict) -> str:
    lines = [
        "# Toy PRM quality report",
        "",
        f"PRM: `{report['prm']}`; held-out data: {report['held_out']}; machine: {report['machine']}.",
        "",
        "## Spearman correlation of the PRM with the true outcome reward, per noise level",
        "",
        "| sigma | n | Spearman | Pearson |",
        "|---|---|---|---|",
    ]
    for row in report["correlation"]:
        lines.append(
            f"| [{row['sigma_lo']:g}, {row['sigma_hi']:g}] | {row['n']} | {row['spearman']:.3f} | "
            f"{row['pearson']:.3f} |"
        )
    lines += [
        "",
        "## One guided SDE step vs the same step unguided (same noise, then the same ODE steps)",
        "",
        f"Sampler: `{report['sampler']}`; guidance_scale = lambda * delta; {report['guided_prompts']} prompts.",
        "",
        "| step | sigma | lambda | improved | worse | mean reward change (± s.e.) | mean shift RMS |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["guided_step"]:
        step = "all" if row["step"] < 0 else str(row["step"])
        sigma = "" if row["step"] < 0 else f"{row['sigma']:.3f}"
        lines.append(
            f"| {step} | {sigma} | {row['lambda']:g} | {row['improved']:.3f} | {row['worse']:.3f} | "
            f"{row['mean_delta']:+.2e} ± {row['stderr_delta']:.1e} | {row['mean_shift_rms']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def _plot_report(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = report["correlation"]
    centres = [(r["sigma_lo"] + r["sigma_hi"]) / 2 for r in rows]
    a.plot(centres, [r["spearman"] for r in rows], "o-", label="Spearman")
    a.plot(centres, [r["pearson"] for r in rows], "s--", label="Pearson")
    a.axhline(0.8, color="grey", lw=0.8, ls=":")
    a.set_xlabel("sigma (bucket centre)")
    a.set_ylabel("correlation with true reward")
    a.set_ylim(0, 1)
    a.legend()
    a.set_title("PRM vs outcome reward (held out)")
    pooled = [r for r in report["guided_step"] if r["step"] < 0]
    lams = [r["lambda"] for r in pooled]
    b.semilogx(lams, [r["improved"] for r in pooled], "o-", label="improved")
    b.semilogx(lams, [r["worse"] for r in pooled], "s--", label="worse")
    b.axhline(0.5, color="grey", lw=0.8, ls=":")
    b.set_xlabel("lambda (guidance_scale = lambda * delta)")
    b.set_ylabel("fraction of guided steps")
    b.set_ylim(0, 1)
    b.legend()
    b.set_title("one guided step vs unguided")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd_report(args) -> None:
    import platform

    from euphonium.models.toy import load_toy_model, sample_prompts

    start = time.perf_counter()
    prm = load_toy_prm(args.prm)
    if args.data:
        data, held_out = PRMDataset.concat([PRMDataset.load(p) for p in args.data]), ", ".join(args.data)
    else:
        data = collect_toy_rollouts(args.rollouts, seed=args.seed, base_model=args.base_model)
        held_out = f"{args.rollouts} fresh base-model rollouts (seed {args.seed})"
    correlation = correlation_by_sigma(prm, data, draws=args.draws, seed=args.seed)
    transformer, text_encoder = load_toy_model(args.base_model)
    config = toy_sampler_config()
    guided = guided_step_effect(
        prm,
        transformer,
        text_encoder,
        sample_prompts(args.guided_prompts, args.seed + 1),
        lambdas=_floats(args.lambdas),
        config=config,
        seed=args.seed + 1,
    )
    report = {
        "command": "python -m euphonium.rewards.prm " + shlex.join(args.argv),
        "prm": str(args.prm) if args.prm else "euphonium/assets/toy_prm (committed)",
        "held_out": held_out,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "sampler": f"{TOY_SAMPLER} preset, guidance off: {config.schedule} noise_level={config.noise_level}, "
        f"{config.num_steps} steps, shift={config.shift}",
        "guided_prompts": args.guided_prompts,
        "correlation": correlation,
        "guided_step": guided,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown_report(report))
    _plot_report(report, out / "report.png")
    print(_markdown_report(report))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m euphonium.rewards.prm {collect,train,report}`` (``--help`` on each)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m euphonium.rewards.prm",
        description="Train and evaluate latent process reward models (toy world).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="save on-policy toy rollouts labelled with the exact toy rewards")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", default=None, help="toy base model folder (default: the committed one)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(fn=_cmd_collect)
    collect = p

    p = sub.add_parser("train", help="train a LatentRewardModel on saved data and/or fresh toy rollouts")
    p.add_argument(
        "--output-dir", required=True, help="the trained PRM (save_pretrained), metrics.jsonl, training.json"
    )
    p.add_argument("--data", nargs="*", help="saved PRMDataset files (collect / PRMDataset.save)")
    p.add_argument("--rollouts", type=int, default=0, help="also collect this many toy base-model rollouts")
    p.add_argument("--base-model", default=None, help="toy base model folder (default: the committed one)")
    p.add_argument("--save-data", default=None, help="save the training data (all of it, before the split) here")
    p.add_argument("--held-out-fraction", type=float, default=0.1)
    p.add_argument(
        "--relabel",
        type=int,
        default=0,
        help="add this many prompt-relabelled copies of each training clip (toy rewards; training split only)",
    )
    p.add_argument("--init", default=None, help="start from this PRM folder instead of a fresh model")
    p.add_argument("--channels", default="32,64", help="channels per stage")
    p.add_argument("--blocks", default="2,2", help="residual blocks per stage")
    p.add_argument("--patch-size", default="2,2,2", help="patch size (F,H,W)")
    p.add_argument("--aux-rewards", default="", help="comma-separated reward parts to predict as auxiliary targets")
    defaults = PRMTrainConfig()
    for name in ("steps", "batch_size", "warmup_steps", "eval_every", "checkpoint_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "sigma_min", "sigma_max", "aux_weight"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.set_defaults(fn=_cmd_train)
    train = p

    p = sub.add_parser("report", help="quality report: correlation per sigma, guided-step effect")
    p.add_argument("--prm", default=None, help="PRM folder (default: the committed toy PRM)")
    p.add_argument("--out", default="docs/prm", help="folder for report.json, report.md, report.png")
    p.add_argument("--data", nargs="*", help="held-out PRMDataset files (default: fresh rollouts)")
    p.add_argument("--rollouts", type=int, default=1024, help="fresh held-out rollouts when --data is not given")
    p.add_argument("--seed", type=int, default=1000, help="seed of the held-out rollouts (training used others)")
    p.add_argument("--draws", type=int, default=2, help="noise draws per sample and sigma bucket")
    p.add_argument("--guided-prompts", type=int, default=512)
    p.add_argument(
        "--lambdas", default="0.01,1,100,1000,10000", help="guidance lambdas (guidance_scale = lambda * delta)"
    )
    p.add_argument("--base-model", default=None, help="toy base model folder (default: the committed one)")
    p.set_defaults(fn=_cmd_report)
    report = p

    argv = list(sys.argv[1:] if argv is None else argv)
    for p in (collect, train, report):
        p.add_argument(
            "--threads",
            type=int,
            default=0,
            help="torch CPU threads (0: torch's default; 1 is often fastest on a busy machine)",
        )
    args = parser.parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fn(args)


if __name__ == "__main__":
    main()
