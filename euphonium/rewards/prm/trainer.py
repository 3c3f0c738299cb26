"""Training a PRM: offline (:meth:`PRMTrainer.fit`: MSE or pairwise Bradley-Terry on noised latents at
sampled sigmas, held-out evaluation, checkpoints, a progress bar) and the online refresh the RL
trainer calls with fresh rollouts (:meth:`PRMTrainer.update`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from euphonium import checkpointing as cp
from euphonium._checks import check_choice, check_float, check_int, check_positive
from euphonium.rewards.prm.data import PRMDataset, noise_latents, spearman, split_conditioning
from euphonium.rewards.prm.model import LatentRewardModel, pool_prompt_embeds

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
            minimum = 0 if name in ("warmup_steps", "checkpoint_every", "seed") else 2 if name == "batch_size" else 1
            check_int(f"PRMTrainConfig.{name}", getattr(self, name), minimum=minimum)
        for name in ("lr", "online_lr"):
            check_positive(f"PRMTrainConfig.{name}", getattr(self, name))
        for name in ("weight_decay", "grad_clip", "aux_weight"):
            check_positive(f"PRMTrainConfig.{name}", getattr(self, name), allow_zero=True)
        check_choice("PRMTrainConfig.loss", self.loss, LOSSES)
        check_choice("PRMTrainConfig.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("sigma_min", "sigma_max"):
            check_float(f"PRMTrainConfig.{name}", getattr(self, name), minimum=0, maximum=1)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(
                f"PRMTrainConfig needs 0 <= sigma_min < sigma_max <= 1, got {self.sigma_min}, {self.sigma_max}"
            )
        if not isinstance(self.eval_sigmas, (tuple, list)) or not self.eval_sigmas:
            raise ValueError(
                f"PRMTrainConfig.eval_sigmas must be a non-empty list of values in [0, 1], got {self.eval_sigmas!r}"
            )
        self.eval_sigmas = tuple(
            check_float(f"PRMTrainConfig.eval_sigmas[{i}]", s, minimum=0, maximum=1)
            for i, s in enumerate(self.eval_sigmas)
        )

    @classmethod
    def from_dict(cls, values: Dict) -> "PRMTrainConfig":
        """A config from a dict (e.g. JSON); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PRMTrainConfig field(s) {unknown}; fields are {sorted(known)}")
        return cls(**values)


def strict_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` as strict JSON can hold it: a non-finite float becomes None (null) and its key is listed
    under ``non_finite`` (with a warning), as the RL trainer's logger writes its rows."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    warnings.warn(
        f"metrics.jsonl step {record.get('step')}: non-finite {', '.join(f'{k}={record[k]}' for k in bad)} "
        "written as null",
        stacklevel=3,
    )
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "non_finite": bad}


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

    ``x0 [B, C, F, H, W]`` is noised to ``x_sigma`` with ``sigma [B]`` and ``noise``; ``prompt_embeds``: what the
    model is called with (:meth:`PRMDataset.condition`: a backbone PRM's may be a Conditioning). For
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


def trainable_prm(model) -> bool:
    """``model`` is a PRM :class:`PRMTrainer` can train: a :class:`LatentRewardModel` or a backbone PRM."""
    return isinstance(model, LatentRewardModel) or getattr(model, "kind", None) == "backbone"


class PRMTrainer:
    """Trains a :class:`LatentRewardModel` offline (:meth:`fit`) and online during RL (:meth:`update`).

    Args:
        model: the PRM to train in place (its device and dtype are used).
        config: :class:`PRMTrainConfig` (default settings if ``None``).
        output_dir: where ``metrics.jsonl`` and checkpoints go (``None``: nothing is written).
        distributed: every rank of the initialised ``torch.distributed`` group holds a replica of the PRM and
            calls the trainer in step (the RL trainer under ``torchrun``): the replicas are kept identical.
            Each rank adds its own rollouts to its own replay buffer and draws its own batch of
            ``batch_size`` from it (its own sigmas and noise: seed ``config.seed + rank``); the gradients are
            averaged over the ranks before each optimiser step (an ``all_reduce``), so a step is one step on
            the ranks' batches together
            (``world * batch_size`` states, each rank weighted equally). An unfitted reward scale is fitted
            on every rank's fresh rewards together, and ``update``'s statistics are those of all ranks.
    """

    def __init__(
        self,
        model: LatentRewardModel,
        config: Optional[PRMTrainConfig] = None,
        output_dir: Union[str, Path, None] = None,
        *,
        distributed: bool = False,
    ):
        if not trainable_prm(model):
            raise TypeError(f"model must be a LatentRewardModel or a BackbonePRM, got {type(model).__name__}")
        if distributed and not dist.is_initialized():
            raise ValueError("distributed=True needs an initialised torch.distributed process group (torchrun)")
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.model = model
        # The backbone PRM trains its head and adapter, never the (shared, frozen) base weights.
        params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.parameters()
        self.params = list(params)
        self.config = config if config is not None else PRMTrainConfig()
        if not isinstance(self.config, PRMTrainConfig):
            raise TypeError(f"config must be a PRMTrainConfig, got {type(self.config).__name__}")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.device = model.reward_mean.device
        self.step = 0
        self.generator = torch.Generator().manual_seed(self.config.seed + self.rank)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
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

        mean, std = stats(self._gather(data.rewards))
        aux = self._aux_targets(data)
        aux = self._gather(aux) if aux is not None else None
        if self.model.config.aux_rewards and aux is None:
            raise ValueError(
                f"the PRM predicts aux_rewards {list(self.model.config.aux_rewards)} but the data has "
                f"parts {sorted(data.parts)}"
            )
        aux_stats = [stats(aux[:, j]) for j in range(aux.shape[1])] if aux is not None else []
        self.model.set_reward_stats(mean, std, [m for m, _ in aux_stats], [s for _, s in aux_stats])

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every rank concatenated in rank order (a collective); itself in one process."""
        if self.world == 1:
            return values
        parts: List[Any] = [None] * self.world
        dist.all_gather_object(parts, values.detach().cpu())
        return torch.cat(parts).to(values.device)

    def _average_gradients(self) -> None:
        """The mean of the replicas' gradients on every rank (one ``all_reduce`` per dtype)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        for dtype in sorted({g.dtype for g in grads}, key=str):
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            flat /= self.world
            for g, value in zip(group, flat.split([g.numel() for g in group])):
                g.copy_(value.view_as(g))

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
            prompt_embeds=data.condition(index, self.device),
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
        if self.world > 1:
            self._average_gradients()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        optimizer.step()
        # Leave no .grad behind: the same module is differentiated inside rollouts (ops.reward_grad).
        optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        return loss.item()

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self, data: PRMDataset, sigma: float, *, seed: int = 0, batch_size: Optional[int] = None
    ) -> torch.Tensor:
        """PRM rewards ``[N]`` (float32, CPU) of ``data`` noised to ``sigma`` with noise fixed by ``seed``
        (in batches of ``batch_size``: default 256, the backbone PRM's ``eval_batch_size``)."""
        batch_size = batch_size or getattr(self.model, "eval_batch_size", 256)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for start in range(0, len(data), batch_size):
            x0 = data.x0[start : start + batch_size]
            noise = torch.randn(x0.shape, generator=gen)
            s = torch.full((x0.shape[0],), float(sigma), device=self.device)
            x = noise_latents(x0.to(self.device), s, noise.to(self.device))
            cond = data.condition(slice(start, start + batch_size), self.device)
            out.append(self.model(x, s, cond).float().cpu())
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
        appends one JSON line per evaluation to ``metrics.jsonl`` (strict JSON: a non-finite value is
        ``null``, its key listed under ``non_finite``; each line appended whole or not at all, and a
        line torn by a kill dropped when the next fit starts) and writes checkpoints;
        ``resume=True`` continues from the newest checkpoint there (the rows logged after it dropped).
        Returns the evaluation records
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
            self._clean_metrics(after=self.step if resume else None)
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
                    line = json.dumps(strict_record(record), allow_nan=False)
                    cp.append_line(self.output_dir / "metrics.jsonl", line)
            if cfg.checkpoint_every and self.output_dir is not None and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(scheduler)
        bar.close()
        return history

    def _clean_metrics(self, after: Optional[int]) -> None:
        """Rewrite ``metrics.jsonl`` atomically without a line torn by a kill (skipped with a warning) and,
        on resume (``after``: the checkpoint's step), without the rows logged after that checkpoint,
        which the resumed run logs again. Nothing is rewritten when there is nothing to drop."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        keep = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                if line.strip():
                    where = "its last line" if number == len(lines) else f"line {number}"
                    warnings.warn(
                        f"{path}: dropping {where}, which is not a JSON object (torn by a kill?)", stacklevel=3
                    )
                continue
            if after is None or not isinstance(row.get("step"), int) or row["step"] <= after:
                keep.append(line + "\n")
        if "".join(keep) != text:
            cp.atomic_write(path, "".join(keep))

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
                here, masked by ``prompt_mask [B, L]`` if given) or ``[B, D]``, or the policy's Conditioning
                of the rollouts (the conv PRM keeps its text embeddings, the backbone PRM also its ``kwargs``).
            rewards: ``[B]`` outcome rewards of the decoded ``x0``.
            parts: the named outcome rewards ``{name: [B]}`` (e.g. ``RewardOutput.parts``); needed to
                keep training a PRM's ``aux_rewards`` heads (without them only the total is trained
                while such samples are in the buffer).

        Returns ``{"prm/loss": mean training loss, "prm/spearman_fresh": Spearman of the PRM's scores
        on the fresh batch (at training sigmas, before this update) with its rewards,
        "prm/buffer_size": ..}`` (``distributed``: the loss averaged over the ranks, the Spearman over
        every rank's fresh rollouts, the buffer this rank's). The model is left in eval mode with no ``.grad``.
        """
        embeds, kwargs = split_conditioning(prompt_embeds)
        pooled = getattr(self.model, "prepare_prompt_embeds", pool_prompt_embeds)(embeds, prompt_mask)
        fresh = PRMDataset(
            x0=x0.detach().float().cpu(),
            prompt_embeds=pooled.detach().cpu(),
            rewards=rewards.detach().float().cpu(),
            parts={k: v.detach().float().cpu() for k, v in (parts or {}).items()},
            cond_kwargs={k: v.detach().cpu() for k, v in kwargs.items()}
            if getattr(self.model, "reads_conditioning", False)
            else {},
        )
        if fresh.prompt_embeds.shape[-1] != self.model.config.text_dim:
            raise ValueError(
                f"prompt_embeds has dim {fresh.prompt_embeds.shape[-1]}, the PRM expects {self.model.config.text_dim}"
            )
        self._fit_reward_stats(fresh)
        stats: Dict[str, float] = {}
        if len(fresh) >= 2:
            with torch.no_grad():
                sigma = self.config.sigma_min + (self.config.sigma_max - self.config.sigma_min) * torch.rand(
                    len(fresh), generator=self.generator
                )
                x = noise_latents(fresh.x0, sigma, generator=self.generator).to(self.device)
                pred = self.model(x, sigma.to(self.device), fresh.condition(slice(None), self.device))
            stats["prm/spearman_fresh"] = spearman(self._gather(pred.float().cpu()), self._gather(fresh.rewards))
        self.buffer = fresh if self.buffer is None else PRMDataset.concat([self.buffer, fresh])
        if len(self.buffer) > self.config.buffer_size:
            self.buffer = self.buffer.subset(torch.arange(len(self.buffer) - self.config.buffer_size, len(self.buffer)))
        if self.online_optimizer is None:
            self.online_optimizer = torch.optim.AdamW(
                self.params, lr=self.config.online_lr, weight_decay=self.config.weight_decay
            )
        batch = min(self.config.batch_size, max(2, len(self.buffer)))
        losses = [
            self._optimizer_step(self.online_optimizer, self.buffer, batch) for _ in range(self.config.online_steps)
        ]
        loss = torch.tensor(float(np.mean(losses)), dtype=torch.float64)
        stats["prm/loss"] = float(self._gather(loss.view(1)).mean())
        stats["prm/buffer_size"] = float(len(self.buffer))
        return stats

    # -- checkpoints -----------------------------------------------------------------------------

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest usable ``checkpoints/step-N`` under ``output_dir``, or ``None`` when there is none.

        Each checkpoint is checked completely first (:meth:`read_checkpoint`); a newer one that fails is
        skipped with a warning naming the file and the reason. Checkpoints exist but none is usable:
        :class:`euphonium.checkpointing.CheckpointError` (one line).
        """
        if self.output_dir is None:
            return None
        found = cp.newest_valid(self.output_dir / "checkpoints", self.read_checkpoint)
        return None if found is None else found[0]

    def save_checkpoint(self, scheduler=None) -> Path:
        """Write ``output_dir/checkpoints/step-N`` (model + optimiser, scheduler, step, RNG) atomically.

        The folder is built under a temporary name and renamed when complete (with a manifest of its
        files' sizes and hashes); a failure (a full disk) leaves nothing of it and raises
        :class:`euphonium.checkpointing.WriteError`. Leftovers of killed writers are removed first;
        afterwards only the newest ``keep_checkpoints`` are kept.
        """
        if self.output_dir is None:
            raise ValueError("save_checkpoint needs the trainer's output_dir")
        root = self.output_dir / "checkpoints"
        cp.remove_orphans(root)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": self.generator.get_state(),
        }
        final = root / f"step-{self.step}"
        with cp.atomic_directory(final) as ckpt:
            ckpt.current = "model"
            self.model.save_pretrained(ckpt.path / "model")
            ckpt.write("trainer.pt", lambda f: torch.save(state, f))
        cp.rotate(root, self.config.keep_checkpoints, newest=self.step)
        return final

    @staticmethod
    def read_checkpoint(path: Union[str, Path]) -> Dict:
        """The checked contents of checkpoint ``path``: ``state`` (from ``trainer.pt``, read with
        ``weights_only=True``, so a crafted pickle cannot run code) and ``model``. Raises
        :class:`euphonium.checkpointing.CheckpointError` naming the file and the reason."""
        path = Path(path)
        cp.verify_manifest(path)
        file = path / "trainer.pt"
        if not file.is_file() or file.stat().st_size == 0:
            raise cp.CheckpointError(f"{file}: {'missing' if not file.is_file() else 'empty'}")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise cp.CheckpointError(f"{file}: cannot be read safely ({cp.describe_load_error(err)})") from None
        if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "generator"} <= set(state):
            raise cp.CheckpointError(f"{file}: not a PRM trainer state")
        try:
            from euphonium.rewards.prm.backbone import load_prm

            model = load_prm(path / "model")
        except Exception as err:
            raise cp.CheckpointError(f"{path / 'model'}: cannot be loaded ({cp.one_line(err)})") from None
        for name, value in model.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise cp.CheckpointError(f"{path / 'model'}: {name} has non-finite values")
        return {"state": state, "model": model}

    def load_checkpoint(self, path: Union[str, Path], scheduler=None) -> None:
        """Restore model weights, optimiser, scheduler, step and RNG from a checkpoint directory
        (checked completely first: :meth:`read_checkpoint`)."""
        loaded = self.read_checkpoint(path)
        state = loaded["state"]
        self.model.load_state_dict(loaded["model"].state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
