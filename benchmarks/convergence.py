"""Convergence study v2: do TD process credit and PRM guidance speed up alignment, and by how much?

``python benchmarks/convergence.py --world mixture [--methods ...] [--seeds ...] [--steps N] [--ablations]
[--out FILE]`` trains each method (an algorithm bundle of ``euphonium/presets.py``) through the real
trainer (:class:`euphonium.train.Trainer`, the packaged config of the world: ``configs/mixture.yaml``'s
8 prompts x group 8 per step, 256 evaluation prompts) and measures **the policy itself**: the trainer's
fixed-set evaluation (:meth:`Trainer.evaluate`, what ``eval.jsonl`` holds: unguided ODE samples of a
fixed prompt and noise set, the method's own steps and shift) before training and every
``--eval-every`` steps. Everything below is declared here, before any run:

- **Methods**: the ladder ``grpo_fast -> td_fast -> euphonium_fast`` (one addition per rung: TD
  process credit, then rho guidance with log-probs under the guided mean); the published ``euphonium``
  against ``dance_grpo_eu`` (its sampler without guidance or process credit) and ``dance_grpo``;
  ``flow_grpo`` and ``flow_grpo_fast``. Every setting not named is the world config's, the same for all
  (``timestep_fraction = 1``, AdamW, 5 warm-up steps, no EMA). The PRM: the mixture's exact oracle
  ``E[r | x_sigma]`` (``prm_path=oracle``) and, for the methods of ``LEARNED_PRM[world]``, the committed
  learned PRM (``prm_path=null``; the ``+learned_prm`` entries). A method that uses no PRM (no guidance, no process
  credit) is the same run under either PRM, so its learned-PRM entry is its oracle run.
- **Learning rate**: per method, the best of ``LR_GRIDS[world]`` by the area under the evaluation curve on the
  held-out seed ``LR_SEED`` (not among the reported seeds); the learned-PRM entries and the ablations
  use the learning rate chosen for their oracle-PRM method (``euphonium_fast`` for the ablations).
- **Measures**: steps to the fixed absolute thresholds ``THRESHOLDS[world]`` (the first evaluation at or
  above it, linearly interpolated from the evaluation before it; "not reached" is null, counted as the
  step budget in the speedups and flagged), the area under the evaluation curve (trapezoid over the
  steps, divided by them: the mean evaluation reward over training), the KL to the base model (below)
  and the median seconds per training step (rollout, rewards, update; evaluation excluded; a busy
  shared machine: timings are noisy).
- **KL to the base** (mixture): ``KL(q_policy || q_base)`` of the two models' occupancy of the world's
  mixture components, averaged over the prompts: ``q(c | prompt)`` is the mean over ``KL_SAMPLES`` ODE
  samples per prompt (fixed noise, the same for both models) of the exact posterior ``P(c | x0)``. The
  soft assignment ``x0 -> c`` is a Markov kernel, so by the data-processing inequality this is a lower
  bound on the KL between the two sample distributions, estimated where a direct density estimate in
  24 dimensions from samples would be far noisier; it sees re-weighting of components (what RL does
  here), not a change of shape inside one. Also ``w2_coupled``: the RMS distance between the policy's
  and the base's samples from the same noise, an upper bound on their W2 distance.
- **Speedup** ``a_vs_b`` per threshold: the mean over seeds of ``steps(b) / steps(a)`` (seeds paired: a
  seed fixes the prompt draws and the evaluation set), with a bootstrap 95% interval over seeds
  (``BOOTSTRAP`` resamples, fixed RNG); and the wall-clock one (each multiplied by its seconds per step).
- **KL to the base** (toy video): the KL between the policy's and the base's path distributions under one
  fixed SDE for every method (``KL_SDE``: Flow-GRPO's, every step stochastic), estimated along the
  policy's own rollouts: by the chain rule it is the expected sum over steps of the per-step Gaussian KL
  ``||mean_policy - mean_base||^2 / (2 std^2)`` (summed over the latent's elements, in nats per clip),
  with the policy's weights as evaluated (the EMA), ``KL_SAMPLES["toy"]`` rollouts per evaluation prompt
  from a fixed seed. By the data-processing inequality it bounds the KL between the two models' clips
  from above. The held-out seed's runs, which only choose the learning rate, measure none.
- **The toy video world** (``--world toy``): the main job's config on the base model with preference
  errors, ``LR_GRIDS["toy"]``, 100 steps, the learned PRM for the methods of ``LEARNED_PRM["toy"]`` and
  the proxy oracle (``ORACLE_PRM``) for every method.
- **Ablations** (``--ablations``; mixture): variants of ``euphonium_fast`` with the oracle PRM (``ABLATIONS``).

Each (method, seed, settings) result is a file in ``--cache`` (default
``benchmarks/results/convergence_cache/<world>/``), written when the run ends: an interrupted study
continues where it stopped, and ``--no-cache`` reruns (the reruns' curves must equal the cached ones:
runs go to spawned worker processes with one torch thread, and a run's draws depend on its seed only). The
JSON is rebuilt from every cached result of the declared study; what has not run is listed under
``not_run`` and left out, never filled in.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

from benchmarks.common import RESULTS_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# -- the study, declared before any run ---------------------------------------------------------------

WORLDS: Dict[str, Dict[str, Any]] = {
    # configs/mixture.yaml: 8 prompts x group 8, eval_prompts 256; evaluation every 10 steps here.
    "mixture": dict(config="mixture", steps=100, eval_every=10, overrides=[]),
    # configs/toy.yaml (the main job: 4 prompts x group 4, 32 evaluation prompts) on the base model with
    # preference errors (docs/toy/README.md: its evaluation reward is 0.226 before training).
    "toy": dict(config=None, steps=100, eval_every=10, overrides=[]),
}
# Declared before the runs; toy: +0.07 and +0.12 above the base's 0.226 on the evaluation set (grpo_fast
# pilots at lr 1e-4 and 3e-4 reached 0.30 in about 10 steps and peaked at 0.35-0.37 by step 25-40).
THRESHOLDS: Dict[str, List[float]] = {"mixture": [0.5, 0.7], "toy": [0.30, 0.35]}
# The study's JSON per world (the first study's toy results are convergence_v1.json and ablations_v1.json).
OUTPUT: Dict[str, str] = {"mixture": "convergence_mixture.json", "toy": "convergence.json"}
# What prm_path=oracle is in each world (the learned PRM is the committed one, prm_path=null).
ORACLE_PRM: Dict[str, str] = {
    "mixture": "exact: E[r | x_sigma], the posterior of the prompted component under the data distribution",
    "toy": "a proxy, not E[r | x_sigma]: the exact reward of the base model's one-step estimate of x0 (ToyOraclePRM)",
}
# Extended upward after the first runs, while a method's choice sat at the grid's top: the mixture's
# was {1e-4, 3e-4, 1e-3} (every method chose 1e-3), then 3e-3 (seven of eight chose it); the toy's
# {3e-5, 1e-4, 3e-4} (td_fast and euphonium_fast chose 3e-4).
LR_GRIDS: Dict[str, List[float]] = {"mixture": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "toy": [3e-5, 1e-4, 3e-4, 1e-3]}
LR_SEED = 1000  # the held-out seed of the learning-rate choice (never reported)
SEEDS = [0, 1, 2, 3, 4]
# Samples per prompt for the KL to the base: mixture ODE samples (16 prompts -> 2048), toy SDE rollouts
# (32 evaluation prompts -> 128).
KL_SAMPLES: Dict[str, int] = {"mixture": 128, "toy": 4}
KL_SDE = "flow_grpo"  # the toy KL's SDE preset: 20 steps, shift 3, noise level 0.7 at every step
BOOTSTRAP = 10000

METHODS: Dict[str, List[str]] = {
    "grpo_fast": ["algorithm=grpo_fast"],
    "td_fast": ["algorithm=td_fast"],
    "euphonium_fast": ["algorithm=euphonium_fast"],
    "euphonium": ["algorithm=euphonium"],
    "dance_grpo_eu": ["algorithm=dance_grpo_eu"],
    "dance_grpo": ["algorithm=dance_grpo"],
    "flow_grpo": ["algorithm=flow_grpo"],
    "flow_grpo_fast": ["algorithm=flow_grpo_fast"],
}
# Methods that use a PRM (guidance or process credit): the ones whose learned-PRM runs differ.
USES_PRM = {"td_fast", "euphonium_fast", "euphonium"}
LADDER = ["grpo_fast", "td_fast", "euphonium_fast"]
# The methods also run with the learned PRM (besides the ladder's, the published euphonium on the toy).
LEARNED_PRM: Dict[str, List[str]] = {"mixture": LADDER, "toy": [*LADDER, "euphonium"]}
LEARNED = "+learned_prm"
SPEEDUPS: List[Tuple[str, str]] = [
    ("td_fast", "grpo_fast"),
    ("euphonium_fast", "td_fast"),
    ("euphonium_fast", "grpo_fast"),
    ("euphonium", "dance_grpo_eu"),
    ("euphonium", "dance_grpo"),
    ("euphonium_fast", "flow_grpo_fast"),
    ("euphonium_fast", "dance_grpo"),
    ("flow_grpo_fast", "flow_grpo"),
    ("td_fast" + LEARNED, "grpo_fast"),
    ("euphonium_fast" + LEARNED, "td_fast" + LEARNED),
    ("euphonium_fast" + LEARNED, "grpo_fast"),
    ("euphonium" + LEARNED, "dance_grpo_eu"),
]

# Ablations: euphonium_fast (rho 0.5, guided mean, TD credit, 1 update per step, oracle PRM) with one change.
_WIDE = ["sampler.sde_window_range=[0,9]"]  # the 3-step window anywhere in steps 0-8 (sigma 1 -> 0.25)
# name -> (the change, the PRM); "(x)" names an ablation arm that is the run of method x itself.
ABLATIONS: Dict[str, Tuple[List[str], str]] = {
    "rho_0.25": (["sampler.guidance_rho=0.25"], "oracle"),
    "rho_0.5 (euphonium_fast)": ([], "oracle"),
    "rho_1": (["sampler.guidance_rho=1.0"], "oracle"),
    "rho_2": (["sampler.guidance_rho=2.0"], "oracle"),
    "lambda_0.01": (["sampler.guidance_form=lambda", "sampler.guidance_lambda=0.01"], "oracle"),
    "no_guidance (td_fast)": ([], "oracle"),
    "credit_td (euphonium_fast)": ([], "oracle"),
    "credit_state": (["process_advantage=state"], "oracle"),
    "credit_none": (["process_advantage=none"], "oracle"),
    "logprob_guided (euphonium_fast)": ([], "oracle"),
    "logprob_unguided": (["sampler.logprob_mean=unguided"], "oracle"),
    "distill_off (euphonium_fast)": ([], "oracle"),
    "distill_on": (["distill_coef=1.0"], "oracle"),
    "window_wide_guidance_all": ([*_WIDE], "oracle"),
    "window_wide_guidance_early": ([*_WIDE, "sampler.guidance_end=4"], "oracle"),
    "window_wide_guidance_late": ([*_WIDE, "sampler.guidance_start=4"], "oracle"),
    "prm_oracle (euphonium_fast)": ([], "oracle"),
    "prm_learned (euphonium_fast+learned_prm)": ([], "learned"),
    "updates_1 (euphonium_fast)": ([], "oracle"),
    "updates_2": (["updates_per_step=2"], "oracle"),
}
ABLATION_BASE = "euphonium_fast"
ABLATION_ORDER = [  # run order when time is short: most informative first
    "rho_0.25",
    "rho_1",
    "rho_2",
    "credit_none",
    "credit_state",
    "logprob_unguided",
    "lambda_0.01",
    "updates_2",
    "distill_on",
    "window_wide_guidance_early",
    "window_wide_guidance_late",
    "window_wide_guidance_all",
]


def run_spec(
    world: str, name: str, overrides: Sequence[str], seed: int, lr: float, steps: int, prm: str
) -> Dict[str, Any]:
    """Everything that determines one run; its hash names the cache file."""
    w = WORLDS[world]
    prm_override = [f"prm_path={'oracle' if prm == 'oracle' else 'null'}"]
    return {
        "world": world,
        "name": name,
        "config": w["config"],
        "overrides": [*w["overrides"], *prm_override, *overrides, f"lr={lr}", f"seed={seed}", f"max_steps={steps}"],
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "eval_every": w["eval_every"],
        # The toy's KL came after its learning-rate runs, which are never reported: they measure none.
        "kl_samples": 0 if world == "toy" and seed == LR_SEED else KL_SAMPLES[world],
    }


def spec_key(spec: Dict[str, Any]) -> str:
    fields = {k: spec[k] for k in ("world", "config", "overrides", "steps", "eval_every", "kl_samples")}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    safe = spec["name"].split(" ")[0].replace("+", "_")
    return f"{safe}__s{spec['seed']}__lr{spec['lr']:g}__{digest}"


# -- one run ------------------------------------------------------------------------------------------


def _mixture_kl(trainer, prompts: List[str], noise, base: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Component occupancy ``q[p, c]`` of ODE samples from ``noise`` and, given the base's, the KL and W2 bound."""
    import torch

    from euphonium.toy.mixture import default_world, video_to_latents

    world = default_world()
    xs, posts = [], []
    batch = 256
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        videos = trainer.evaluator.sample(chunk, noise=noise[start : start + batch])
        x0 = video_to_latents(videos)
        xs.append(x0)
        posts.append(world.posterior(x0, 0.0, world.prompt_index(chunk)).flatten(1))
    x0, post = torch.cat(xs), torch.cat(posts)
    index = world.prompt_index(prompts)
    occupancy = torch.zeros(world.num_prompts, post.shape[1], dtype=torch.float64)
    occupancy.index_add_(0, index, post)
    occupancy = occupancy / occupancy.sum(1, keepdim=True)
    out: Dict[str, Any] = {"occupancy": occupancy, "x0": x0}
    if base is not None:
        p, q = occupancy.clamp_min(1e-12), base["occupancy"].clamp_min(1e-12)
        out["kl"] = float((p * (p / q).log()).sum(1).mean())
        out["w2_coupled"] = float(((x0 - base["x0"]) ** 2).sum(1).mean().sqrt())
    return out


def _frozen_copy(trainer):
    """The velocity model as it is now (the base, before training), frozen."""
    import copy

    model = copy.copy(trainer.rollout_model)
    model.transformer = copy.deepcopy(trainer.policy.transformer).requires_grad_(False).eval()
    return model


def _toy_path_kl(trainer, base, prompts: List[str], seed: int) -> Dict[str, Any]:
    """KL of the policy's path distribution to the base's under the ``KL_SDE`` sampler, along ``len(prompts)``
    rollouts of the policy (its evaluated weights, the EMA if any): the sum over steps of the per-step
    Gaussian KL, each :meth:`Trajectory.recompute_log_prob`'s element-mean KL times the latent's elements."""
    import contextlib

    import torch

    from euphonium.sampler import preset, rollout

    ema = trainer.evaluator.ema
    policy = trainer.rollout_model
    with torch.no_grad(), ema.swapped_in() if ema is not None else contextlib.nullcontext():
        cond = trainer.policy.encode(prompts)
        shape = (len(prompts), *trainer.policy.latent_shape)
        traj = rollout(policy, cond, preset(KL_SDE), shape=shape, seed=seed, device=trainer.device)
        elements = traj.latents[0, 0].numel()
        per_step = []
        for j in range(traj.num_sde_steps):
            x = traj.latents[:, j]
            sigma = torch.full((len(prompts),), float(traj.sigma[j]), device=x.device)
            _, kl = traj.recompute_log_prob(j, policy(x, sigma, cond), v_ref=base(x, sigma, cond))
            per_step.append(kl.double() * elements)
    per_clip = torch.stack(per_step, 1).sum(1)
    return {"kl": float(per_clip.mean()), "kl_per_step": [float(k.mean()) for k in per_step]}


def train_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One run (in its own process): the trainer's steps, its fixed-set evaluation every ``eval_every``
    steps (logged to its ``eval.jsonl`` as :meth:`Trainer.train` does) and, with ``kl_samples``, the KL to
    the base at the end (measured after the last evaluation: it draws nothing the training draws)."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(spec["seed"])  # the run's draws are its named streams; this pins anything global
    from euphonium.train.config import load_config
    from euphonium.train.trainer import Trainer

    config = load_config(spec["config"], [*spec["overrides"], "device=cpu", f"eval_every={spec['eval_every']}"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out)
        kl_prompts, kl_noise, base, toy_base = [], None, None, None
        if spec["kl_samples"] and spec["world"] == "toy":
            toy_base = _frozen_copy(trainer)
        elif spec["kl_samples"]:
            kl_prompts = [p for p in trainer.policy.prompts for _ in range(spec["kl_samples"])]
            gen = torch.Generator().manual_seed(918_273 + spec["seed"])
            kl_noise = torch.randn((len(kl_prompts), *trainer.policy.latent_shape), generator=gen)
            base = _mixture_kl(trainer, kl_prompts, kl_noise, None)
        evals = [trainer.evaluate()]
        trainer.logger.log({"step": 0, **evals[0]}, name="eval")
        rows = []
        for step in range(1, config.max_steps + 1):
            metrics = trainer.train_step()
            trainer.logger.log(metrics)
            rows.append(metrics)
            if step % spec["eval_every"] == 0 or step == config.max_steps:
                evals.append(trainer.evaluate())
                trainer.logger.log({"step": step, **evals[-1]}, name="eval")
        final = _mixture_kl(trainer, kl_prompts, kl_noise, base) if base is not None else {}
        if toy_base is not None:
            kl_prompts = [p for p in trainer.evaluator.eval_set for _ in range(spec["kl_samples"])]
            final = _toy_path_kl(trainer, toy_base, kl_prompts, 918_273 + spec["seed"])
        trainer.logger.close()
        eval_log = [json.loads(line) for line in (Path(out) / "eval.jsonl").read_text().splitlines()]
    eval_steps = [0] + [r["step"] for r in rows if r["step"] % spec["eval_every"] == 0 or r["step"] == config.max_steps]
    rho = [r["guidance/rho"] for r in rows if "guidance/rho" in r]
    return {
        "spec": spec,
        "eval_steps": eval_steps,
        "eval_reward": [e["reward_mean"] for e in evals],
        "eval_parts": {k: [e[k] for e in evals] for k in evals[0] if k.startswith("reward/")},
        "eval_jsonl_matches": [e["reward_mean"] for e in eval_log] == [e["reward_mean"] for e in evals],
        "train_reward": [r["reward_mean"] for r in rows],
        "seconds": [r["seconds"] for r in rows],
        "guidance_rho_mean": statistics.fmean(rho) if rho else None,
        "clip_frac_mean": statistics.fmean(r.get("clip_frac", 0.0) for r in rows),
        "kl_to_base": final.get("kl"),
        "w2_coupled": final.get("w2_coupled"),
        "kl_per_step": final.get("kl_per_step"),
        "from_algorithm": config.from_algorithm,
        "sampler": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(trainer.sampler).items()},
        "process_advantage": config.process_advantage,
        "updates_per_step": config.updates_per_step,
        "wall_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }


# -- measures -----------------------------------------------------------------------------------------


def steps_to_threshold(eval_steps: Sequence[int], rewards: Sequence[float], threshold: float) -> Optional[float]:
    """The first step whose evaluation is >= ``threshold``, linearly interpolated from the evaluation
    before it (the crossing between two evaluations); None if no evaluation reaches it."""
    for i, (step, value) in enumerate(zip(eval_steps, rewards)):
        if value >= threshold:
            if i == 0:
                return float(step)
            s0, v0 = eval_steps[i - 1], rewards[i - 1]
            return float(s0 + (threshold - v0) / (value - v0) * (step - s0))
    return None


def auc(eval_steps: Sequence[int], rewards: Sequence[float]) -> float:
    """Trapezoid area under the evaluation curve divided by the steps: the mean reward over training."""
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(eval_steps, eval_steps[1:], rewards, rewards[1:]))
    return area / (eval_steps[-1] - eval_steps[0])


def seed_entry(result: Dict[str, Any], thresholds: Sequence[float]) -> Dict[str, Any]:
    steps, rewards = result["eval_steps"], result["eval_reward"]
    return {
        "seed": result["spec"]["seed"],
        "eval_steps": steps,
        "eval_reward": rewards,
        "train_reward": result["train_reward"],
        "steps_to_threshold": {str(t): steps_to_threshold(steps, rewards, t) for t in thresholds},
        "auc": auc(steps, rewards),
        "kl_to_base": result["kl_to_base"],
        "w2_coupled": result["w2_coupled"],
        "seconds_per_step": statistics.median(result["seconds"][1:] or result["seconds"]),
        "guidance_rho_mean": result["guidance_rho_mean"],
        "clip_frac_mean": result["clip_frac_mean"],
        "eval_parts_final": {k: v[-1] for k, v in result["eval_parts"].items()},
    }


def speedup(a: Dict[str, Any], b: Dict[str, Any], threshold: float, budget: int) -> Optional[Dict[str, Any]]:
    """``b``'s steps over ``a``'s at ``threshold``, over the seeds both ran (paired), with a bootstrap CI."""
    import numpy as np

    key = str(threshold)
    sa = {s["seed"]: s for s in a["seeds"]}
    sb = {s["seed"]: s for s in b["seeds"]}
    seeds = sorted(set(sa) & set(sb))
    if not seeds:
        return None
    steps_a = np.array([sa[s]["steps_to_threshold"][key] or budget for s in seeds], dtype=float)
    steps_b = np.array([sb[s]["steps_to_threshold"][key] or budget for s in seeds], dtype=float)
    ratios = steps_b / np.maximum(steps_a, 1.0)
    secs_a = np.array([sa[s]["seconds_per_step"] for s in seeds])
    secs_b = np.array([sb[s]["seconds_per_step"] for s in seeds])
    wall = ratios * secs_b / secs_a
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(seeds), size=(BOOTSTRAP, len(seeds)))
    boot = ratios[picks].mean(1)
    boot_wall = wall[picks].mean(1)
    return {
        "threshold": threshold,
        "mean": float(ratios.mean()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "per_seed": [float(r) for r in ratios],
        "seeds": seeds,
        "wall_clock_mean": float(wall.mean()),
        "wall_clock_ci95": [float(np.percentile(boot_wall, 2.5)), float(np.percentile(boot_wall, 97.5))],
        "not_reached": {
            "subject": [s for s in seeds if sa[s]["steps_to_threshold"][key] is None],
            "baseline": [s for s in seeds if sb[s]["steps_to_threshold"][key] is None],
            "counted_as": budget,
        },
    }


# -- the study: jobs, cache, summary ------------------------------------------------------------------


def load_cached(cache: Path, spec: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    path = cache / f"{spec_key(spec)}.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result["spec"]["overrides"] == spec["overrides"] else None


def choose_lr(world: str, name: str, steps: int, cache: Path) -> Tuple[Optional[float], Dict[str, Any]]:
    """The grid's best learning rate by AUC on ``LR_SEED`` (ties: the smaller), None while any is missing."""
    grid = {}
    for lr in LR_GRIDS[world]:
        found = load_cached(cache, run_spec(world, name, METHODS[name], LR_SEED, lr, steps, "oracle"))
        grid[str(lr)] = None if found is None else auc(found["eval_steps"], found["eval_reward"])
    if any(v is None for v in grid.values()):
        return None, grid
    best = max(LR_GRIDS[world], key=lambda lr: (grid[str(lr)], -lr))
    return best, grid


def plan(world: str, methods: Sequence[str], seeds: Sequence[int], steps: int, ablations: bool, cache: Path):
    """The study's runs in order: (1) the LR grid, (2) the methods with the oracle PRM, (3) the PRM-using
    methods with the learned PRM, (4) the ablations. A stage needs the LR chosen in (1)."""
    grid = [run_spec(world, m, METHODS[m], LR_SEED, lr, steps, "oracle") for m in methods for lr in LR_GRIDS[world]]
    later = []
    for m in methods:
        lr, _ = choose_lr(world, m, steps, cache)
        if lr is None:
            continue
        later += [(1, run_spec(world, m, METHODS[m], s, lr, steps, "oracle")) for s in seeds]
        if m in USES_PRM and m in LEARNED_PRM[world]:
            later += [(2, run_spec(world, m + LEARNED, METHODS[m], s, lr, steps, "learned")) for s in seeds]
    if ablations and world == "mixture":
        lr, _ = choose_lr(world, ABLATION_BASE, steps, cache)
        if lr is not None:
            for name in ABLATION_ORDER:
                extra, prm = ABLATIONS[name]
                over = [*METHODS[ABLATION_BASE], *extra]
                later += [(3, run_spec(world, name, over, s, lr, steps, prm)) for s in seeds]
    later.sort(key=lambda item: item[0])  # stable: seeds in order within a stage
    return grid, [spec for _, spec in later]


def summarise(world: str, steps: int, seeds: Sequence[int], cache: Path) -> Dict[str, Any]:
    """The study's JSON from every cached result; what is missing is listed under ``not_run``."""
    thresholds = THRESHOLDS[world]
    payload: Dict[str, Any] = {
        "world": world,
        "steps": steps,
        "eval_every": WORLDS[world]["eval_every"],
        "thresholds": thresholds,
        "oracle_prm": ORACLE_PRM[world],
        "lr_grid": {
            "grid": LR_GRIDS[world],
            "seed": LR_SEED,
            "criterion": "largest AUC of the evaluation curve",
            "auc": {},
        },
        "methods": {},
        "speedups": {},
        "ablations": {},
        "not_run": [],
    }
    lrs = {}
    for m in METHODS:
        lr, grid = choose_lr(world, m, steps, cache)
        payload["lr_grid"]["auc"][m] = {"by_lr": grid, "chosen": lr}
        if lr is None:
            payload["not_run"].append(f"{m}: learning-rate grid incomplete ({grid})")
        lrs[m] = lr

    def collect(name: str, overrides: Sequence[str], lr: Optional[float], prm: str) -> Optional[Dict[str, Any]]:
        if lr is None:
            payload["not_run"].append(f"{name}: no learning rate chosen")
            return None
        entries, missing, first = [], [], None
        for s in seeds:
            found = load_cached(cache, run_spec(world, name, overrides, s, lr, steps, prm))
            if found is None:
                missing.append(s)
                continue
            first = first or found
            entries.append(seed_entry(found, thresholds))
        if missing:
            payload["not_run"].append(f"{name}: seeds {missing} not run")
        if not entries:
            return None
        return {
            "settings": {
                "overrides": [o for o in first["spec"]["overrides"] if not o.startswith(("seed=", "lr="))],
                "prm": prm,
                "from_algorithm": first["from_algorithm"],
                "process_advantage": first["process_advantage"],
                "updates_per_step": first["updates_per_step"],
                "sampler": first["sampler"],
            },
            "lr": lr,
            "seeds": entries,
        }

    for m in METHODS:
        entry = collect(m, METHODS[m], lrs[m], "oracle")
        if entry is not None:
            payload["methods"][m] = entry
        if m in LEARNED_PRM[world]:
            name = m + LEARNED
            if m in USES_PRM:
                entry = collect(name, METHODS[m], lrs[m], "learned")
            elif entry is not None:
                entry = {**entry, "settings": {**entry["settings"], "same_run_as": m, "prm": "none used"}}
            if entry is not None:
                payload["methods"][name] = entry
    for a, b in SPEEDUPS:
        if a.endswith(LEARNED) and a[: -len(LEARNED)] not in LEARNED_PRM[world]:
            continue  # not part of this world's study
        if a in payload["methods"] and b in payload["methods"]:
            rows = [speedup(payload["methods"][a], payload["methods"][b], t, steps) for t in thresholds]
            payload["speedups"][f"{a}_vs_{b}"] = [r for r in rows if r is not None]
        else:
            payload["not_run"].append(f"speedup {a}_vs_{b}: a method has no runs")
    if world == "mixture":
        base_lr = lrs[ABLATION_BASE]
        for name, (extra, prm) in ABLATIONS.items():
            same_as = name[name.index("(") + 1 : -1] if "(" in name else None
            if same_as is not None:  # that method's own runs
                entry = payload["methods"].get(same_as)
                if entry is not None:
                    entry = {**entry, "settings": {**entry["settings"], "same_run_as": same_as}}
            else:
                entry = collect(name, [*METHODS[ABLATION_BASE], *extra], base_lr, prm)
            if entry is not None:
                payload["ablations"][name] = entry
    return payload


def table(payload: Dict[str, Any], group: str = "methods") -> str:
    """A Markdown table of a payload's methods or ablations: mean (min-max) over seeds."""
    t = payload["thresholds"]
    head = (
        f"| {group[:-1]} | seeds | lr | eval step 0 -> {payload['steps']} | AUC | "
        + " | ".join(f"steps to {x} (not reached)" for x in t)
        + " | KL to base (nats) | s/step | rho |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, e in payload[group].items():
        seeds = e["seeds"]
        start = statistics.fmean(s["eval_reward"][0] for s in seeds)
        end = statistics.fmean(s["eval_reward"][-1] for s in seeds)
        cells = []
        for x in t:
            vals = [s["steps_to_threshold"][str(x)] for s in seeds]
            reached = [v for v in vals if v is not None]
            miss = len(vals) - len(reached)
            mean = statistics.fmean(v if v is not None else payload["steps"] for v in vals)
            cells.append(f"{mean:.1f} ({miss})" if miss else f"{mean:.1f}")
        kls = [s["kl_to_base"] for s in seeds if s["kl_to_base"] is not None]
        rhos = [s["guidance_rho_mean"] for s in seeds if s["guidance_rho_mean"] is not None]
        lines.append(
            f"| `{name}` | {len(seeds)} | {e['lr']:g} | {start:.3f} -> {end:.3f} | "
            f"{statistics.fmean(s['auc'] for s in seeds):.3f} | "
            + " | ".join(cells)
            + (f" | {statistics.fmean(kls):.3f} | " if kls else " | - | ")
            + f"{statistics.median(s['seconds_per_step'] for s in seeds):.3f} | "
            + (f"{statistics.fmean(rhos):.3g} |" if rhos else "- |")
        )
    return "\n".join(lines)


def speedup_table(payload: Dict[str, Any]) -> str:
    lines = [
        "| speedup | threshold | steps: mean [95% CI] | wall clock: mean [95% CI] | not reached (subject; baseline) |"
    ]
    lines.append("|---|---|---|---|---|")
    for name, rows in payload["speedups"].items():
        for r in rows:
            nr = r["not_reached"]
            lines.append(
                f"| `{name}` | {r['threshold']} | {r['mean']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | "
                f"{r['wall_clock_mean']:.2f} [{r['wall_clock_ci95'][0]:.2f}, {r['wall_clock_ci95'][1]:.2f}] | "
                f"{nr['subject'] or '-'}; {nr['baseline'] or '-'} |"
            )
    return "\n".join(lines)


def plot(payload: Dict[str, Any], path: Path, group: str, panels: Dict[str, Sequence[str]]) -> None:
    """Mean evaluation curves with min-max bands over seeds, one panel per list of names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries = payload[group]
    panels = {title: [n for n in names if n in entries] for title, names in panels.items()}
    panels = {title: names for title, names in panels.items() if names}
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels.items()):
        for name in names:
            seeds = entries[name]["seeds"]
            curves = np.array([s["eval_reward"] for s in seeds])
            x = seeds[0]["eval_steps"]
            style = "--" if LEARNED in name else "-"
            (line,) = ax.plot(x, curves.mean(0), style, marker="o", ms=3, label=f"{name} ({len(seeds)} seeds)")
            ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.12)
        for t in payload["thresholds"]:
            ax.axhline(t, color="k", ls=":", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("fixed-set evaluation reward (unguided ODE)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{payload['world']} world: mean and min-max over seeds; dotted: thresholds {payload['thresholds']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def code_version() -> Dict[str, Any]:
    """The commit of the code that ran (and whether library files differed from it)."""
    if os.environ.get("EUPHONIUM_CODE_COMMIT"):
        return {"commit": os.environ["EUPHONIUM_CODE_COMMIT"], "source": "EUPHONIUM_CODE_COMMIT (a clean export)"}
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "euphonium"], capture_output=True, text=True
        ).stdout
        return {"commit": commit.strip() or None, "library_uncommitted_changes": bool(dirty.strip())}
    except OSError:
        return {"commit": None}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="mixture")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the world's)")
    parser.add_argument("--ablations", action="store_true", help="also run the ablations (mixture)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default results/<OUTPUT[world]>)")
    parser.add_argument(
        "--cache", type=Path, default=None, help="per-run results (default results/convergence_cache/<world>)"
    )
    parser.add_argument("--no-cache", action="store_true", help="rerun even what is cached (and overwrite it)")
    parser.add_argument("--no-run", action="store_true", help="only rebuild the JSON and plots from the cache")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (default 1: one process at a time)")
    args = parser.parse_args(argv)

    world, steps = args.world, args.steps or WORLDS[args.world]["steps"]
    if LR_SEED in args.seeds:
        parser.error(f"seed {LR_SEED} is the held-out seed of the learning-rate choice")
    cache = args.cache or RESULTS_DIR / "convergence_cache" / world
    out = args.out or RESULTS_DIR / OUTPUT[world]
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    from tqdm.auto import tqdm

    def execute(specs: List[Dict[str, Any]], label: str) -> None:
        todo = [s for s in specs if args.no_cache or load_cached(cache, s) is None]
        if not todo or args.no_run:
            return
        bar = tqdm(total=len(todo), desc=f"convergence {world}: {label}")
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.workers) as pool:  # a worker runs one job after another (imports once)
            for result in pool.imap(train_one, todo):
                path = cache / f"{spec_key(result['spec'])}.json"
                path.write_text(json.dumps(result))
                bar.update(1)
                bar.set_postfix(
                    last=f"{result['spec']['name']} s{result['spec']['seed']} lr {result['spec']['lr']:g}: "
                    f"{result['eval_reward'][0]:.3f} -> {result['eval_reward'][-1]:.3f} ({result['wall_seconds']:.0f}s)"
                )
        bar.close()

    grid, _ = plan(world, args.methods, args.seeds, steps, args.ablations, cache)
    execute(grid, "learning-rate grid")
    _, later = plan(world, args.methods, args.seeds, steps, args.ablations, cache)
    execute(later, "methods" + (" and ablations" if args.ablations else ""))

    payload = summarise(world, steps, SEEDS if args.seeds == SEEDS else args.seeds, cache)
    payload.update(
        {
            "command": " ".join(["python benchmarks/convergence.py", *(argv if argv is not None else sys.argv[1:])]),
            "code": code_version(),
            "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads_per_run": 1},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "this_invocation_seconds": time.perf_counter() - start,
            "declared": {
                "thresholds": "fixed before any run (absolute evaluation rewards)",
                "steps_to_threshold": "first evaluation >= threshold, linearly interpolated from the one before",
                "auc": "trapezoid area under the evaluation curve / steps",
                "kl_to_base": f"KL(q_policy || q_base) of mixture-component occupancy, {KL_SAMPLES} ODE samples "
                "per prompt from fixed noise, exact posteriors P(c | x0); a lower bound on the KL of the sample "
                "distributions (data processing); w2_coupled: RMS distance of same-noise samples, an upper "
                "bound on W2",
                "speedup": "mean over seeds of steps(baseline) / steps(subject), seeds paired; bootstrap 95% CI "
                f"over seeds ({BOOTSTRAP} resamples); not reached = the step budget, flagged",
                "seconds_per_step": "median over a run's steps of rollout + rewards + update (no evaluation); "
                "2 shared CPU cores, noisy",
                "ablation_base": f"{ABLATION_BASE} with the oracle PRM and its chosen lr; '(euphonium_fast)' "
                "entries are that run itself",
            },
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    stem = out.with_suffix("")
    plot(
        payload,
        Path(f"{stem}.png"),
        "methods",
        {
            "the ladder (solid: oracle PRM, dashed: learned PRM)": [
                *LADDER,
                *(m + LEARNED for m in LADDER if m in USES_PRM),
            ],
            "published samplers (dashed: learned PRM)": [
                "euphonium",
                "euphonium" + LEARNED,
                "dance_grpo_eu",
                "dance_grpo",
                "flow_grpo",
                "flow_grpo_fast",
            ],
        },
    )
    plot(
        payload,
        Path(f"{stem}_ablations.png"),
        "ablations",
        {
            "guidance strength (euphonium_fast: rho 0.5)": [
                "rho_0.25",
                "rho_0.5 (euphonium_fast)",
                "rho_1",
                "rho_2",
                "lambda_0.01",
                "no_guidance (td_fast)",
            ],
            "credit, log-prob mean, updates, distillation": [
                "credit_td (euphonium_fast)",
                "credit_state",
                "credit_none",
                "logprob_unguided",
                "updates_2",
                "distill_on",
                "prm_learned",
            ],
            "guidance early / late (window in steps 0-8)": [
                "window_wide_guidance_all",
                "window_wide_guidance_early",
                "window_wide_guidance_late",
            ],
        },
    )
    print(table(payload))
    print()
    print(speedup_table(payload))
    if payload["ablations"]:
        print()
        print(table(payload, "ablations"))
    if payload["not_run"]:
        print("\nnot run:\n  " + "\n  ".join(payload["not_run"]))
    print(f"# wrote {out} and {stem}*.png")
    return payload


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
