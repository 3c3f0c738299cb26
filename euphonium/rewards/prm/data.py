"""PRM training data: ``(x0, pooled prompt embedding, outcome reward)`` triples (the backbone PRM's: per-token
embeddings and the family's further conditioning), from rollouts or a file, and the measures of a PRM's quality
on such data (Spearman per noise level).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from euphonium._checks import check_float, check_float_tensor, check_int
from euphonium.models.diffusers import Conditioning
from euphonium.rewards.base import RewardOutput, check_reward_values
from euphonium.rewards.prm.model import pool_prompt_embeds

# --------------------------------------------------------------------------------------------------
# Data


@dataclass
class PRMDataset:
    """Outcome-labelled clean latents: the training data of a PRM.

    Attributes:
        x0: ``[N, C, F, H, W]`` clean latents (float32 or bfloat16; what the rollouts ended at).
        prompt_embeds: ``[N, D]`` pooled prompt embeddings (:func:`pool_prompt_embeds` of what the
            PRM is called with at guidance time); pooled so that a sample stores ``D`` numbers, not
            ``L x D`` (a Wan prompt is 512 x 4096); per-token ``[N, L, D]`` for the backbone PRM, which
            reads the tokens through the transformer's own cross-attention.
        rewards: ``[N]`` float32 outcome rewards of the decoded ``x0`` (the regression target).
        prompts: the ``N`` prompt strings, or ``None``.
        parts: optional named outcome rewards ``{name: [N]}`` (reported, not trained on).
        cond_kwargs: the backbone PRM's further conditioning per sample ``{name: [N, ...]}``: the policy's
            ``Conditioning.kwargs`` (SD3's and FLUX's ``pooled_projections``, their embedded ``guidance``,
            HunyuanVideo's ``encoder_attention_mask``); a PRM is then called with :meth:`condition`'s Conditioning.
    """

    x0: torch.Tensor
    prompt_embeds: torch.Tensor
    rewards: torch.Tensor
    prompts: Optional[List[str]] = None
    parts: Dict[str, torch.Tensor] = field(default_factory=dict)
    cond_kwargs: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        check_float_tensor("x0", self.x0, min_dim=5)
        n = self.x0.shape[0]
        if self.x0.dim() != 5:
            raise ValueError(f"x0 must have shape [N, C, F, H, W], got {tuple(self.x0.shape)}")
        check_float_tensor("prompt_embeds", self.prompt_embeds, min_dim=2)
        if self.prompt_embeds.dim() not in (2, 3) or self.prompt_embeds.shape[0] != n:
            raise ValueError(
                f"prompt_embeds must be pooled [N={n}, D] (see pool_prompt_embeds) or per-token [N, L, D], got "
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
        for name, values in self.cond_kwargs.items():
            if not isinstance(values, torch.Tensor) or values.dim() < 1 or values.shape[0] != n:
                raise ValueError(f"cond_kwargs[{name!r}] must be a tensor with {n} rows (one per sample)")
        if self.cond_kwargs and self.prompt_embeds.dim() != 3:
            raise ValueError("cond_kwargs go with per-token prompt_embeds [N, L, D] (the backbone PRM's data)")

    def __len__(self) -> int:
        return self.x0.shape[0]

    def condition(self, index: Union[slice, torch.Tensor, Sequence[int]], device=None) -> Any:
        """What a PRM is called with for the samples at ``index``: their ``prompt_embeds``, or with ``cond_kwargs``
        a :class:`~euphonium.models.diffusers.Conditioning` of both (on ``device``)."""
        embeds = self.prompt_embeds[index].to(device)
        if not self.cond_kwargs:
            return embeds
        return Conditioning(embeds, kwargs={k: v[index].to(device) for k, v in self.cond_kwargs.items()})

    def subset(self, index: Union[torch.Tensor, Sequence[int]]) -> "PRMDataset":
        """The samples at ``index`` (a list or 1-D int tensor), as a new dataset."""
        index = torch.as_tensor(index, dtype=torch.long)
        return PRMDataset(
            x0=self.x0[index],
            prompt_embeds=self.prompt_embeds[index],
            rewards=self.rewards[index],
            prompts=[self.prompts[i] for i in index.tolist()] if self.prompts is not None else None,
            parts={k: v[index] for k, v in self.parts.items()},
            cond_kwargs={k: v[index] for k, v in self.cond_kwargs.items()},
        )

    def split(self, held_out_fraction: float, seed: int = 0) -> Tuple["PRMDataset", "PRMDataset"]:
        """A random ``(train, held_out)`` split; ``held_out`` has ``round(fraction * N)`` samples (>= 1)."""
        check_float("held_out_fraction", held_out_fraction, minimum=0, maximum=1, min_open=True, max_open=True)
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
        keys = {tuple(sorted(d.cond_kwargs)) for d in datasets}
        if len(keys) > 1:
            raise ValueError(f"datasets must carry the same cond_kwargs (the same model family), got {sorted(keys)}")
        return PRMDataset(
            x0=torch.cat([d.x0 for d in datasets]),
            prompt_embeds=torch.cat([d.prompt_embeds for d in datasets]),
            rewards=torch.cat([d.rewards for d in datasets]),
            prompts=prompts,
            parts={k: torch.cat([d.parts[k] for d in datasets]) for k in sorted(common)},
            cond_kwargs={k: torch.cat([d.cond_kwargs[k] for d in datasets]) for k in datasets[0].cond_kwargs},
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
        tensors.update({f"cond.{k}": v.contiguous() for k, v in self.cond_kwargs.items()})
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
            cond_kwargs={k[len("cond.") :]: v for k, v in tensors.items() if k.startswith("cond.")},
        )


def split_conditioning(cond: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(prompt_embeds, kwargs)`` of the policy's :class:`~euphonium.models.diffusers.Conditioning` (its
    conditional half, what a PRM reads; every kwarg a tensor with one row per sample, else ValueError), or
    ``(cond, {})`` of a tensor."""
    if not isinstance(cond, Conditioning):
        return cond, {}
    batch = cond.batch_size
    for key, value in cond.kwargs.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != batch:
            raise ValueError(
                f"Conditioning.kwargs[{key!r}] must be a tensor with one row per sample ({batch}) to be kept as "
                f"PRM data, got {type(value).__name__}"
            )
    return cond.prompt_embeds, dict(cond.kwargs)


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

    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be non-empty")
    check_int("batch_size", batch_size, minimum=1)
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
                cond = data.condition(slice(start, start + batch_size), device)
                preds.append(prm(x.to(device), sigma.to(device), cond).float().cpu())
                targets.append(data.rewards[start : start + batch_size])
        p, t = torch.cat(preds), torch.cat(targets)
        pearson = float(torch.corrcoef(torch.stack([p.double(), t.double()]))[0, 1])
        rows.append(
            {"sigma_lo": lo, "sigma_hi": hi, "n": int(p.numel()), "spearman": spearman(p, t), "pearson": pearson}
        )
    return rows
