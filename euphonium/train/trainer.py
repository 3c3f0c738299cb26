"""The thin GRPO trainer: one readable loop over ``euphonium.ops`` and the sampler.

One step (docs/DESIGN.md section 3)::

    prompts (groups of G) -> rollouts (PRM guidance at the configured steps) -> decode x0
    -> outcome rewards (each named reward normalised on its own) and process rewards
    -> advantages (ops.gather_group_advantages: groups may span ranks)
    -> for a random subset of each sample's SDE steps: new velocity, ops.sde_log_prob,
       ops.dual_reward_loss (+ KL to the reference, + explicit distillation toward the guided mean)
    -> clip, AdamW step (skipped on a non-finite loss or gradient) -> log -> checkpoint
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from euphonium import checkpointing as cp
from euphonium import ops
from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
from euphonium.presets import GUIDED_ALGORITHMS
from euphonium.rewards import RewardOutput, RewardSet, build_reward
from euphonium.sampler import Trajectory, preset, rollout
from euphonium.train import checkpoint as ckpt
from euphonium.train import objective
from euphonium.train.config import ConfigError, TrainConfig, check_device
from euphonium.train.context_parallel import check_context_parallel, enable_context_parallel, rank_layout
from euphonium.train.distributed import (
    FullOptimizerState,
    RankReducer,
    check_groups_fit_ranks,
    full_tensor,
    init_distributed,
    place_like,
    wrap_for_training,
)
from euphonium.train.ema import EMA
from euphonium.train.evaluation import Evaluator
from euphonium.train.experts import check_trained_steps, trained_steps
from euphonium.train.logging import MetricsLogger, plot_reward_curve
from euphonium.train.policy import build_policy, check_model_config, training_prompts, video_shape
from euphonium.train.prompts import eval_set_size, evaluation_set, prompt_metadata
from euphonium.train.rng import RandomStreams


class Trainer:
    """GRPO training of a flow-matching video model (see the module docstring for one step)."""

    def __init__(self, config: TrainConfig, output_dir: str, *, resume: bool = False):
        self.config = config.validate()
        check_device(config)
        self.output_dir = Path(output_dir)
        self.rank, self.world, self.device = init_distributed()
        if config.device != "auto":
            self.device = torch.device(config.device)
        self.is_main = self.rank == 0
        # A folder another run or the user wrote is refused; a run's own one is continued only with resume.
        has_run = ckpt.check_output_dir(self.output_dir, resume, announce=self.is_main)
        if self.is_main:
            ckpt.remove_orphans(self.output_dir)  # what a kill or a full disk left half-written
        # The checkpoint to continue is chosen (every file checked) and matched against the config
        # before anything is built: a corrupt newest one falls back to an older one with a warning.
        self._resume_from = ckpt.find_checkpoint(self.output_dir, warn=self.is_main) if resume and has_run else None
        if self._resume_from is not None:
            ckpt.check_compatible(self._resume_from[0], self._resume_from[1]["config"], config)
        elif resume and has_run and self.is_main:
            print(f"--resume: {self.output_dir} has no checkpoint yet; starting from step 0", file=sys.stderr)
        check_context_parallel(config, self.world)
        # Data is split over data ranks: one per context-parallel group, whose members share it (context_parallel.py).
        self.layout = rank_layout(self.rank, self.world, config.context_parallel, self.device)
        data_world = self.layout.data_world
        batch = config.prompts_per_step * config.group_size
        if batch % data_world:
            raise ConfigError(
                f"prompts_per_step * group_size ({batch}) must be divisible by the number of data ranks ({data_world}: "
                "ranks / context_parallel)"
            )
        self.local_batch = batch // data_world
        # Over all ranks: a context-parallel group's members log the same values, so these are the data ranks' means.
        self.reducer = RankReducer(self.world, self.device)
        self.rng = RandomStreams(config.seed)
        if config.eval_every and eval_set_size(config) < data_world:
            raise ConfigError(
                f"eval_prompts ({config.eval_prompts}) must be >= the number of data ranks ({data_world})"
            )

        overrides = dict(config.sampler)
        if config.algorithm not in GUIDED_ALGORITHMS and overrides.get("guidance"):
            raise ConfigError(
                f"sampler.guidance is the euphonium algorithms'; algorithm={config.algorithm} samples without it"
            )
        try:
            self.sampler = preset(config.algorithm, **overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"sampler: {err}") from None
        check_groups_fit_ranks(self.local_batch, config.group_size, self.sampler)

        checked = check_model_config(config)  # a bad model folder fails here, before rewards or weights load
        check_trained_steps(config, self.sampler, checked.get("boundary_ratio"))
        self._part_names = self._build_rewards()
        self.policy = build_policy(config, self.device)
        if self.sampler.guidance and self.policy.prm is None:
            raise ConfigError(f"algorithm={config.algorithm} needs a process reward model: set prm_path")
        eval_set = evaluation_set(config, self.policy.prompts, self.rng.generator("eval_prompts"))
        self._setup_training()
        self.evaluator = Evaluator(
            self.policy,
            self.rollout_model,
            self.sampler,
            self._eval_scores,
            self._reward_columns,
            eval_set,
            self.rng.generator("eval_noise"),
            ema=self.ema,
            device=self.device,
            rank=self.layout.data_rank,
            world=self.layout.data_world,
            group=self.layout.data_group,
            batch=self.local_batch,
        )
        self.step = 0
        self.bad_steps = 0
        if self._resume_from is not None:
            self._resume(*self._resume_from)
            self._resume_from = (self._resume_from[0], None)  # the loaded tensors are not needed any more
        self.logger = MetricsLogger(self.output_dir, enabled=self.is_main, loggers=config.loggers, wandb=config.wandb)

    # ------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------

    def _setup_training(self) -> None:
        config = self.config
        transformer = self.policy.transformer
        if config.model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.reference = None
        if config.model.lora_rank > 0:
            from peft import LoraConfig

            transformer.requires_grad_(False)
            # peft draws the adapter's initial weights from the global RNG: seed it from the run's seed
            # (the same on every rank) without disturbing the caller's RNG state.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.rng.seed("lora_init"))
                transformer.add_adapter(
                    LoraConfig(
                        r=config.model.lora_rank,
                        lora_alpha=config.model.lora_alpha or config.model.lora_rank,
                        target_modules=list(config.model.lora_targets),
                        init_lora_weights="gaussian",
                    )
                )
            # LoRA weights train in fp32 whatever the frozen base's dtype.
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        elif config.kl_coef > 0 or (config.distill_coef > 0 and config.distill_target == "reference"):
            # Full fine-tuning keeps a frozen copy as the reference policy (LoRA disables its adapter).
            self.reference = copy.deepcopy(transformer).requires_grad_(False).eval()
        transformer.train()
        self.trainable_names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise ConfigError("nothing to train: the model has no trainable parameters")

        self.rollout_model = DiffusersFlowModel(
            transformer, cfg_scale=config.model.cfg_scale, attention_backend=config.model.attention_backend
        )
        if config.context_parallel > 1:
            enable_context_parallel(
                self.layout,
                [transformer] + ([self.reference] if self.reference is not None else []),
                prm=self.policy.prm,
                latent_shape=self.policy.latent_shape,
                text_tokens=config.model.max_sequence_length,
            )
        self.wrapped = wrap_for_training(transformer, config.parallel, self.world, self.device)
        # Training forwards go through the DDP/FSDP wrapper (gradient all-reduce); the adapter is shared.
        self.train_model = copy.copy(self.rollout_model)
        self.train_model.transformer = self.wrapped

        params = [p for p in transformer.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps, weight_decay=config.weight_decay
        )
        warmup = config.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.ema = EMA(self.trainable_names, params, config.ema_decay) if config.ema_decay else None
        self.prm_trainer = None
        if config.prm_refresh_every and self.policy.prm is not None:
            from euphonium.rewards.prm import PRMTrainConfig, PRMTrainer, trainable_prm

            if not trainable_prm(self.policy.prm):
                raise ConfigError(
                    f"prm_refresh_every needs a trainable PRM (conv or backbone); prm_path={config.prm_path} is not one"
                )

            shared = getattr(self.policy.prm, "transformer", None) is transformer
            if shared and self.world > 1 and config.parallel == "fsdp":
                # The PRM's adapter would be sharded with the policy's blocks: a 2-rank gloo run of it hung.
                raise ConfigError(
                    "prm_refresh_every with a backbone PRM sharing the policy's transformer needs parallel=ddp"
                )
            # Under torchrun every rank refreshes its replica on its own rollouts with the gradients averaged
            # over the ranks (PRMTrainer's distributed mode): the replicas stay identical.
            self.prm_trainer = PRMTrainer(
                self.policy.prm,
                PRMTrainConfig(lr=config.prm_refresh_lr, batch_size=config.prm_refresh_batch_size),
                distributed=self.world > 1,
            )

    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        named = dict(self.policy.transformer.named_parameters())
        return {name: full_tensor(named[name].detach()) for name in self.trainable_names}

    def _checkpoint_optimizer(self):
        """The optimizer as checkpoints see it: itself, or under FSDP its full (unsharded) states."""
        sharded = any(hasattr(p, "full_tensor") for p in self.params)
        return FullOptimizerState(self.policy.transformer, self.optimizer) if sharded else self.optimizer

    def _resume(self, path: Path, loaded: Dict) -> None:
        """Continue from checkpoint ``path`` (already read and checked by :func:`ckpt.find_checkpoint`)."""
        named = dict(self.policy.transformer.named_parameters())
        missing = set(self.trainable_names) - set(loaded["trainable"])
        if missing:
            raise ConfigError(
                f"checkpoint {path} lacks trainable weights {sorted(missing)[:5]}: a different model or LoRA setting?"
            )
        for name in self.trainable_names:
            saved, param = tuple(loaded["trainable"][name].shape), tuple(full_tensor(named[name].detach()).shape)
            if saved != param:
                raise ConfigError(
                    f"checkpoint {path} holds {name} of shape {list(saved)}, this model's is {list(param)}: "
                    "a different model or LoRA setting"
                )
        ckpt.apply_checkpoint(loaded, optimizer=self._checkpoint_optimizer(), scheduler=self.scheduler)
        with torch.no_grad():
            for name, value in loaded["trainable"].items():
                named[name].copy_(place_like(value, named[name]))
        if self.ema is not None:
            # A checkpoint without EMA (it was off) starts the average at the resumed weights, not the base's.
            source = loaded["ema"] if loaded["ema"] is not None else loaded["trainable"]
            self.ema.shadow = {k: place_like(source[k], v) for k, v in self.ema.shadow.items()}
        self.step = int(loaded["state"]["step"])
        if self.is_main:
            print(f"resumed from {path} at step {self.step}")
            saved = loaded["config"]
            changed = sorted(k for k, v in self.config.to_dict().items() if k != "max_steps" and saved.get(k) != v)
            if changed:
                warnings.warn(
                    f"resuming {path} with settings that differ from the checkpoint's config.json: "
                    f"{', '.join(changed)} (pass the run's --config and overrides to continue it "
                    "unchanged)",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------

    def _sample_prompts(self) -> tuple:
        """This rank's prompts and global group ids for this step (all ranks draw the same batch)."""
        config = self.config
        gen = self.rng.generator("prompts", step=self.step)
        chosen = torch.randint(len(self.policy.prompts), (config.prompts_per_step,), generator=gen).tolist()
        start = self.layout.data_rank * self.local_batch
        global_ids = torch.arange(start, start + self.local_batch) // config.group_size
        prompts = [self.policy.prompts[chosen[g]] for g in global_ids.tolist()]
        return prompts, global_ids.to(self.device)

    @torch.no_grad()
    def _rollout(self, prompts: List[str]) -> tuple:
        cond = self.policy.encode(prompts)
        td = self.config.process_advantage == "td"
        traj = rollout(
            self.rollout_model,
            cond,
            self.sampler,
            shape=(len(prompts), *self.policy.latent_shape),
            prm=self.policy.prm if self.sampler.guidance or td else None,
            score_states=td,
            # A group that spans ranks is sampled by several processes; init refuses the settings that
            # would need its members to share noise (check_groups_fit_ranks).
            group_size=self.config.group_size if self.local_batch % self.config.group_size == 0 else 1,
            seed=self.rng.seed("rollout", step=self.step, rank=self.layout.data_rank),
            device=self.device,
        )
        return traj, cond

    def _step_loss(
        self,
        traj: Trajectory,
        cond: Conditioning,
        rows: torch.Tensor,
        cols: torch.Tensor,
        outcome: Dict[str, torch.Tensor],
        process: Optional[torch.Tensor],
    ) -> tuple:
        """Loss of samples ``rows`` at their recorded SDE steps ``cols`` (one per sample)."""
        config = self.config
        x = traj.latents[rows, cols]
        x_next = traj.latents[rows, cols + 1]
        steps = traj.sde_steps[cols]
        sigma, sigma_next = traj.sigmas[steps], traj.sigmas[steps + 1]
        guided = traj.guided[cols]
        # Under the guided mean the step's own g and c give the rollout's log-prob bit for bit.
        guidance = traj.guidance_at(rows, cols) if traj.logprob_mean == "guided" else {}
        sub_cond = cond.select(rows)
        v = self.train_model(x, sigma, sub_cond)
        v_ref = None
        if config.kl_coef > 0 or (config.distill_coef > 0 and config.distill_target == "reference"):
            with torch.no_grad():
                v_ref = self._reference_velocity(x, sigma, sub_cond)
        sde = dict(schedule=traj.schedule, noise_level=traj.noise_level, sigma_max=traj.sigma_max)
        kl_ref = v_ref if config.kl_coef > 0 else None
        out = ops.sde_log_prob(x, v, x_next, sigma, sigma_next, v_ref=kl_ref, **sde, **guidance)
        log_prob, kl = out if kl_ref is not None else (out, None)
        old = traj.log_prob[rows, cols]
        loss, stats = ops.dual_reward_loss(
            log_prob[:, None],
            old[:, None],
            {k: a[rows] for k, a in outcome.items()},
            None if process is None else process[rows, cols][:, None],
            outcome_weights=self.outcome_weights,
            process_weight=config.process_weight,
            combine=config.combine,
            clip_range=config.clip_range,
            adv_clip=config.adv_clip,
            kl=None if kl is None else kl[:, None],
            kl_coef=config.kl_coef,
        )
        shift = traj.shift_at(rows, cols)
        if config.distill_coef > 0 and shift is not None and bool(guided.any()):
            anchor = v_ref if config.distill_target == "reference" else v.detach()
            distill = objective.distill_loss(x, v, anchor, shift, guided, sigma, sigma_next, sde)
            loss = loss + config.distill_coef * distill
            stats = {**stats, "distill_loss": float(distill.detach())}
        return loss, stats

    def _reference_velocity(self, x, sigma, cond):
        if self.reference is not None:
            model = copy.copy(self.rollout_model)
            model.transformer = self.reference
            return model(x, sigma, cond)
        self.policy.transformer.disable_adapters()
        try:
            return self.rollout_model(x, sigma, cond)
        finally:
            self.policy.transformer.enable_adapters()

    def _update(self, traj: Trajectory, cond: Conditioning, outcome, process) -> Dict[str, float]:
        """``inner_epochs`` passes over the rollouts, each ``updates_per_step`` optimizer updates on
        minibatches of the batch in a fixed order; returns the logged statistics of the first pass.

        Each sample trains ``timestep_fraction`` of its trainable steps (never the last step, whose noise
        cannot reach the decoded sample; with one Wan2.2 expert trained, only the steps it handles:
        :func:`~euphonium.train.experts.trained_steps`). The first update is on-policy (``ratio_max_dev``, checked
        against ``on_policy_tolerance``); later ones see ratios away from 1, where the clip acts
        (``clip_frac``).
        """
        config = self.config
        batch = traj.log_prob.shape[0]
        steps = trained_steps(self.policy.transformer, traj).cpu()
        k = steps.numel()
        n_train = max(1, round(k * config.timestep_fraction))
        gen = self.rng.generator("minibatches", step=self.step, rank=self.layout.data_rank)
        logs: Dict[str, float] = {}
        for epoch in range(config.inner_epochs):
            draws = [torch.randperm(k, generator=gen)[:n_train] for _ in range(batch)]
            cols = steps[torch.stack(draws)].to(self.device)
            order = torch.randperm(batch, generator=gen).to(self.device)
            sums: Dict[str, float] = {}
            first_dev, grad_norms, skipped = 0.0, [], 0.0
            minibatches = order.chunk(config.updates_per_step)
            for u, minibatch in enumerate(minibatches):
                stats, grad_norm = self._optimizer_update(traj, cond, cols, minibatch, outcome, process)
                for key, value in stats.items():
                    if key != "ratio_max_dev":
                        sums[key] = sums.get(key, 0.0) + value / len(minibatches)
                if u == 0:
                    first_dev = stats["ratio_max_dev"]
                grad_norms.append(grad_norm)
                skipped += float(not math.isfinite(grad_norm) or not math.isfinite(stats["loss"]))
            if epoch == 0:
                # Statistics of the global batch: means over ranks and the largest deviation on any rank.
                sums, first_dev = self.reducer.mean(sums), self.reducer.max(first_dev)
                logs.update({"ratio_max_dev": first_dev, **sums, "grad_norm": sum(grad_norms) / len(grad_norms)})
                logs["skipped"] = skipped
                if first_dev > config.on_policy_tolerance and self.is_main:
                    warnings.warn(
                        f"step {self.step + 1}: the first update is not on-policy: max |ratio - 1| = "
                        f"{first_dev:.3g} > {config.on_policy_tolerance} (on_policy_tolerance). Usual causes: a "
                        "training batch composed differently from the rollout batch (batch-size-dependent kernels) "
                        "or low precision (bf16 velocities); check model.dtype and micro_batches.",
                        stacklevel=2,
                    )
        return logs

    def _optimizer_update(self, traj, cond, cols, minibatch, outcome, process) -> tuple:
        """One optimizer update on the samples ``minibatch`` (``micro_batches`` accumulated chunks) at
        their steps ``cols``; returns its mean statistics and the gradient norm. A non-finite loss or
        gradient skips the update; ``max_bad_steps`` in a row stop the run."""
        config = self.config
        n_train = cols.shape[1]
        chunks = minibatch.chunk(config.micro_batches)
        total = n_train * len(chunks)
        sums: Dict[str, float] = {}
        max_dev = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for j in range(n_train):
            for c, rows in enumerate(chunks):
                last = j == n_train - 1 and c == len(chunks) - 1
                sync = (
                    contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
                )
                with sync:
                    loss, stats = self._step_loss(traj, cond, rows, cols[rows, j], outcome, process)
                    # Context parallelism: each rank's gradient is its tokens' share, and DDP/FSDP average
                    # over all ranks, so N times the loss makes the average the data ranks' mean gradient.
                    (loss * config.context_parallel / total).backward()
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / total
                for key in ("clip_frac", "approx_kl", "ratio_mean", "kl", "distill_loss"):
                    if key in stats:
                        sums[key] = sums.get(key, 0.0) + stats[key] / total
                max_dev = max(max_dev, stats["ratio_max_dev"])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm))
        if math.isfinite(grad_norm) and math.isfinite(sums["loss"]):
            self.optimizer.step()
            self._check_weights_finite()
            if self.ema is not None:
                self.ema.update()
            self.bad_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            warnings.warn(
                f"step {self.step + 1}: non-finite loss ({sums['loss']}) or gradient norm ({grad_norm}); "
                f"update skipped ({self.bad_steps} in a row, abort at {config.max_bad_steps})",
                stacklevel=3,
            )
            if self.bad_steps >= config.max_bad_steps:
                last = ckpt.latest_checkpoint(self.output_dir)
                raise ckpt.RunAborted(
                    f"{self.bad_steps} non-finite updates in a row at step {self.step + 1}; stopping. "
                    f"Last good checkpoint: {last or 'none yet'}"
                )
        self.scheduler.step()  # warm-up counts optimizer updates
        return {**sums, "ratio_max_dev": max_dev}, grad_norm

    def _check_weights_finite(self) -> None:
        """Stop the run when an update made a trained weight NaN or infinite (every rank agrees)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        peaks = [p.detach().abs().amax().float() for p in local if p.numel()]
        finite = bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True
        if self.reducer.max(float(not finite)) == 0:
            return
        names = [n for n, p in zip(self.trainable_names, local) if p.numel() and not bool(torch.isfinite(p).all())]
        last = ckpt.latest_checkpoint(self.output_dir)
        raise ckpt.RunAborted(
            f"step {self.step + 1}: the update made the weights non-finite ({', '.join(names[:3]) or 'on another rank'}"
            f"{', ...' if len(names) > 3 else ''}; grad norm was finite: lr or the optimizer state?); stopping. "
            f"Last good checkpoint: {last or 'none yet'}"
        )

    def train_step(self) -> Dict[str, float]:
        """One GRPO step; returns the metrics written to ``metrics.jsonl``."""
        start = time.perf_counter()
        prompts, group_ids = self._sample_prompts()
        traj, cond = self._rollout(prompts)
        with torch.no_grad():
            videos = self.policy.decode(traj.x0)
            rewards = self.rewards(videos, prompts)
        outcome, process = objective.advantages(
            self.config,
            self.outcome_weights,
            rewards,
            traj,
            group_ids,
            distributed=self.layout.data_world > 1,
            process_group=self.layout.data_group,
        )
        logs = self._update(traj, cond, outcome, process)
        if self.prm_trainer is not None and (self.step + 1) % self.config.prm_refresh_every == 0:
            logs.update(self.prm_trainer.update(traj.x0, cond, rewards.total, parts=rewards.parts))

        means = {key: float(value.mean()) for key, value in self._reward_columns(rewards.parts).items()}
        scored = traj.guided if self.config.process_advantage != "td" else traj.trainable
        if self.policy.prm is not None and bool(scored.any()):
            means["process_reward_mean"] = float(traj.process_reward[:, scored].mean())
        if traj.guidance_rho is not None:
            # What the guidance did, whatever its form: the shift in noise stds and the PRM gradient's norm.
            means["guidance/rho"] = float(traj.guidance_rho.mean())
            means["guidance/grad_norm"] = float(traj.guidance_grad_norm.mean())
        means = self.reducer.mean(means)
        self.step += 1
        return {
            "step": self.step,
            **means,
            **logs,
            "lr": self.scheduler.get_last_lr()[0],
            "world_size": self.world,
            "seconds": time.perf_counter() - start,
        }

    def _reward_columns(self, parts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-sample ``reward_mean`` (the trained outcome rewards' weighted mean) and ``reward/<part>``."""
        weight_sum = sum(self.outcome_weights.values())
        columns = {"reward_mean": sum(w * parts[n] for n, w in self.outcome_weights.items()) / weight_sum}
        columns.update({f"reward/{name}": v for name, v in parts.items()})
        return columns

    # ------------------------------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------------------------------

    @property
    def outcome_weights(self) -> Dict[str, float]:
        """The named outcome rewards trained on (weight > 0) and their weights."""
        weights = self.config.reward_weights
        if weights is None:
            return {name: 1.0 for name in self._part_names}
        return {name: w for name, w in weights.items() if w > 0}

    def train(self) -> Path:
        """Run to ``config.max_steps``; returns the output directory."""
        config = self.config
        if self.is_main:
            ckpt.mark_run(self.output_dir)  # first: the folder is this run's from now on
            # Every value the run uses, and which ones came from the algorithm's bundle rather than the config.
            resolved = {**config.to_dict(), "from_algorithm": config.from_algorithm}
            resolved["resolved_sampler"] = dataclasses.asdict(self.sampler)
            cp.atomic_write(self.output_dir / "config.json", json.dumps(resolved, indent=1))
            self.logger.log_config(resolved)
            if self._resume_from is not None:
                # A kill right after a checkpoint's rename left one more than keep_checkpoints.
                cp.rotate(self.output_dir / "checkpoints", config.keep_checkpoints, newest=self.step)
            # A resumed run redoes the steps after its checkpoint (and the step-0 evaluation when there
            # was none): their earlier rows go, so each step is logged once.
            self.logger.truncate("metrics", after=self.step)
            self.logger.truncate("eval", after=self.step if self.step else -1)
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not self.is_main, desc="euphonium.train")
        postfix = {}
        try:
            if config.eval_every and self.step == 0:
                postfix["eval"] = self._log_eval()
            while self.step < config.max_steps:
                metrics = self.train_step()
                self.logger.log(metrics)
                bar.update(1)
                postfix.update(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3g}")
                if config.eval_every and (self.step % config.eval_every == 0 or self.step == config.max_steps):
                    postfix["eval"] = self._log_eval()
                bar.set_postfix(postfix)
                if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                    self.save()
        finally:
            bar.close()  # an error then starts on a line of its own
        if self.is_main:
            plot_reward_curve(self.output_dir / "metrics.jsonl", self.output_dir / "reward_curve.png")
            self.logger.log_image("reward_curve", self.output_dir / "reward_curve.png", self.step)
        self.save_samples(self.output_dir / "samples")
        self.logger.close()
        return self.output_dir

    def _build_rewards(self) -> List[str]:
        """Build the outcome rewards and return their part names, found by scoring one blank video.

        Runs before any model weights load, so a misnamed reward or a ``reward_weights`` entry that
        names no part (or misses one) is a :class:`ConfigError` before the heavy work starts.
        """
        config = self.config
        prompts = training_prompts(config)
        try:
            self.rewards = RewardSet(
                {name: build_reward(name, **kwargs) for name, kwargs in config.rewards.items()},
                weights=config.reward_weights,
                prompt_metadata=prompt_metadata(config),
            )
            with torch.no_grad():
                parts = self.rewards(torch.zeros(1, *video_shape(config), device=self.device), prompts[:1]).parts
        except (TypeError, ValueError) as err:
            raise ConfigError(f"rewards / reward_weights: {err}") from None
        self._part_names = list(parts)
        self.eval_only = None
        if config.eval_rewards:
            try:
                self.eval_only = RewardSet(
                    {name: build_reward(name, **kwargs) for name, kwargs in config.eval_rewards.items()},
                    prompt_metadata=prompt_metadata(config),
                )
                with torch.no_grad():
                    self.eval_only(torch.zeros(1, *video_shape(config), device=self.device), prompts[:1])
            except (TypeError, ValueError) as err:
                raise ConfigError(f"eval_rewards: {err}") from None
        if not self.outcome_weights:
            raise ConfigError("reward_weights gives no reward a positive weight: nothing to train on")
        return self._part_names

    def _eval_scores(self, videos: torch.Tensor, prompts: List[str]) -> RewardOutput:
        """The trained rewards of evaluation clips, and the ``eval_rewards`` as ``eval_only/<part>`` parts."""
        out = self.rewards(videos, prompts)
        if self.eval_only is None:
            return out
        extra = self.eval_only(videos, prompts).parts
        return RewardOutput(out.total, {**out.parts, **{f"eval_only/{k}": v for k, v in extra.items()}})

    def save(self) -> Optional[Path]:
        """Checkpoint the current step (rank 0 writes; every rank takes part in gathering FSDP shards)."""
        state = self._trainable_state()
        optimizer = self._checkpoint_optimizer()
        if isinstance(optimizer, FullOptimizerState):
            optimizer.gather()
        ema = None if self.ema is None else {k: full_tensor(v) for k, v in self.ema.shadow.items()}
        if not self.is_main:
            return None
        return ckpt.save_checkpoint(
            self.output_dir,
            self.step,
            trainable=state,
            optimizer=optimizer,
            scheduler=self.scheduler,
            ema=ema,
            config=self.config.to_dict(),
            extra={"world_size": self.world},
            keep=self.config.keep_checkpoints,
        )

    def save_samples(self, path: Path) -> Optional[Path]:
        """ODE samples of the first ``num_eval_samples`` prompts with the trained (EMA, if any) weights."""
        prompts = self.policy.prompts[: self.config.num_eval_samples]
        return self.evaluator.save_samples(prompts, path, seed=self.config.seed)

    def evaluate(self) -> Dict[str, float]:
        """Mean rewards of the fixed evaluation set (:meth:`Evaluator.evaluate`)."""
        return self.evaluator.evaluate()

    def _log_eval(self) -> str:
        metrics = self.evaluate()
        self.logger.log({"step": self.step, **metrics}, name="eval")
        if self.evaluator.last_clips is not None:
            self.logger.log_clips(self.step, *self.evaluator.last_clips)
        return f"{metrics['reward_mean']:.3f}"
