"""Does process-reward guidance speed up alignment? A toy-scale convergence study of five methods.

``python benchmarks/convergence.py`` trains the committed toy video model (``euphonium.train``'s
defaults: ``configs/toy.yaml``) with ``algorithm=euphonium``, ``flow_grpo``, ``dance_grpo``,
``euphonium_fast`` and ``flow_grpo_fast`` for the same number of steps on the same prompt draws (a
run's prompts depend only on its seed), the same group size and rollouts per step, with 3 seeds each.
Each method samples with its own sampler preset (``euphonium.sampler.preset``: Flow-GRPO's ``a = 0.7`` SDE
over 20 steps with the last one deterministic; DanceGRPO's ``eta = 0.3`` over 16 steps with shared
group noise; Euphonium's ``eta = 0.25``, shift 5, PRM guidance on steps 12-15 with ``c = 0.01 delta``
and log-probs under the unguided mean; Flow-GRPO-Fast's ``cps`` ``a = 0.8`` on a random 3-step window
in the first half of 10 steps; ``euphonium_fast``, the toy default: that window with Euphonium's
shared group noise and guidance on the window's steps). The first three train half of their SDE steps
per sample (``timestep_fraction = 0.5``), the fast ones all 3 window steps; optimiser, learning rate
and rewards are the trainer's toy defaults for all (the papers' learning rates are for
billion-parameter models).

Besides the training reward (new prompts every step), each run scores the trainer's fixed evaluation
set (``Trainer.evaluate``: the same prompts and initial noise every time, ODE sampling with the
method's steps and shift, EMA weights) before training and every ``--eval-every`` steps.

``--ablations`` runs variants of the published Euphonium preset instead: guidance off (PRM scores kept,
``guidance_lambda = 0``), a guidance scale large enough to move the toy rollouts (``lambda = 1000``:
see the PRM report), and at that scale process advantages off, log-probs under the guided mean, and
the exact toy reward of the base model's one-step estimate as an oracle PRM
(:class:`euphonium.toy.rewards.ToyOraclePRM`) in place of the learned one.

The threshold is fixed before any run: the median over the reference method's seeds (DanceGRPO;
for the ablations the Euphonium default) of its final smoothed reward, smoothing being the trailing
mean over ``--window`` steps. A run reaches it at the first step whose smoothed reward is at or above
it; a run that never does is "not reached" and counts as the step budget in the speedups (the JSON
says so). Speedup = the other method's median steps to threshold / Euphonium's; the wall-clock
speedup multiplies each by its median seconds per step, so guidance's PRM backward passes count.

Outputs: ``benchmarks/results/convergence.json`` (or ``ablations.json``) and a PNG of the mean curves
(training reward and evaluation) with min-max bands over seeds. Runs go to ``--workers`` processes
with ``--threads`` torch threads each; on 2 CPU cores (2 x 1) the five methods took 53 minutes at
``--steps 150`` and the ablations 37 minutes at ``--steps 100``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, describe_device  # noqa: E402

# The published samplers train half of each rollout's SDE steps; the fast ones all 3 of their window.
HALF_SDE_STEPS = ["timestep_fraction=0.5"]
# name -> (trainer overrides, whether the learned PRM is replaced by the oracle)
METHODS: Dict[str, tuple] = {
    "euphonium": (["algorithm=euphonium", *HALF_SDE_STEPS], False),
    "flow_grpo": (["algorithm=flow_grpo", *HALF_SDE_STEPS], False),
    "dance_grpo": (["algorithm=dance_grpo", *HALF_SDE_STEPS], False),
    "euphonium_fast": (["algorithm=euphonium_fast", "timestep_fraction=1.0"], False),
    "flow_grpo_fast": (["algorithm=flow_grpo_fast", "timestep_fraction=1.0"], False),
}
_EU = METHODS["euphonium"][0]
ABLATIONS: Dict[str, tuple] = {
    "default (lambda 0.01)": ([*_EU], False),
    "guidance off (lambda 0)": ([*_EU, "sampler.guidance_lambda=0"], False),
    "lambda 1000": ([*_EU, "sampler.guidance_lambda=1000"], False),
    "lambda 1000, process adv off": ([*_EU, "sampler.guidance_lambda=1000", "process_weight=0"], False),
    "lambda 1000, guided-mean log-prob": ([*_EU, "sampler.guidance_lambda=1000", "sampler.logprob_mean=guided"], False),
    "lambda 1000, oracle PRM": ([*_EU, "sampler.guidance_lambda=1000"], True),
}
REFERENCE = {"methods": "dance_grpo", "ablations": "default (lambda 0.01)"}
SUBJECT = {"methods": "euphonium", "ablations": "default (lambda 0.01)"}


def train_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """One run (in a worker process): the trainer's steps without checkpoints; the per-step metrics."""
    torch.set_num_threads(job["threads"])
    from euphonium.train.config import load_config
    from euphonium.train.trainer import Trainer

    config = load_config(None, [*job["overrides"], f"seed={job['seed']}", f"max_steps={job['steps']}", "device=cpu"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out)
        if job["oracle"]:
            from euphonium.toy import load_toy_model
            from euphonium.toy.rewards import ToyOraclePRM

            weights = {k: v for k, v in config.rewards["toy"]["weights"].items() if v > 0}
            trainer.policy.prm = ToyOraclePRM(*load_toy_model(), prompts=trainer.policy.prompts, weights=weights)
        rewards, seconds = [], []
        evals = [trainer.evaluate()["reward_mean"]]
        for step in range(1, config.max_steps + 1):
            metrics = trainer.train_step()
            rewards.append(metrics["reward_mean"])
            seconds.append(metrics["seconds"])
            if step % job["eval_every"] == 0:
                evals.append(trainer.evaluate()["reward_mean"])
        trainer.logger.close()
    return {
        "name": job["name"],
        "seed": job["seed"],
        "rewards": rewards,
        "seconds": seconds,
        "evals": evals,
        "sampler": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(trainer.sampler).items()},
        "config": config.to_dict(),
    }


def smooth(curve: Sequence[float], window: int) -> List[float]:
    """Trailing mean over ``window`` steps (fewer at the start)."""
    return [statistics.fmean(curve[max(0, i + 1 - window) : i + 1]) for i in range(len(curve))]


def steps_to(curve: Sequence[float], threshold: float, window: int) -> Optional[int]:
    """The first step (1-based) whose smoothed reward is >= ``threshold``, None if never; the first
    ``window - 1`` steps don't count (their mean is over fewer steps)."""
    for i, value in enumerate(smooth(curve, window)):
        if i + 1 >= window and value >= threshold:
            return i + 1
    return None


def summarise(
    runs: List[Dict[str, Any]], names: Sequence[str], kind: str, steps: int, window: int, eval_every: int = 25
) -> Dict[str, Any]:
    by_name = {n: sorted((r for r in runs if r["name"] == n), key=lambda r: r["seed"]) for n in names}
    reference, table = REFERENCE[kind], (METHODS if kind == "methods" else ABLATIONS)
    threshold = statistics.median(statistics.fmean(r["rewards"][-window:]) for r in by_name[reference])
    eval_steps = [0, *range(eval_every, steps + 1, eval_every)]
    methods = {}
    for name, rs in by_name.items():
        reached = [steps_to(r["rewards"], threshold, window) for r in rs]
        methods[name] = {
            "overrides": table[name][0],
            "oracle_prm": table[name][1],
            "sampler": rs[0]["sampler"],
            "config": {k: v for k, v in rs[0]["config"].items() if k != "seed"},
            "seeds": [r["seed"] for r in rs],
            "steps_to_threshold": reached,
            "final_reward": [statistics.fmean(r["rewards"][-window:]) for r in rs],
            "initial_reward": [statistics.fmean(r["rewards"][:window]) for r in rs],
            "seconds_per_step": [statistics.median(r["seconds"][1:]) for r in rs],
            "curves": [r["rewards"] for r in rs],
        }
        if all("evals" in r for r in rs):
            second_half = [i for i, s in enumerate(eval_steps) if s >= steps / 2]
            methods[name].update(
                {
                    "eval_initial": [r["evals"][0] for r in rs],
                    "eval_second_half": [statistics.fmean(r["evals"][i] for i in second_half) for r in rs],
                    "eval_curves": [r["evals"] for r in rs],
                }
            )
    subject = methods[SUBJECT[kind]]

    def median_steps(entry):
        return statistics.median(s if s is not None else steps for s in entry["steps_to_threshold"])

    def speedups(other: str) -> Dict[str, Any]:
        base = methods[other]
        mine, theirs = median_steps(subject), median_steps(base)
        wall_mine = mine * statistics.median(subject["seconds_per_step"])
        wall_theirs = theirs * statistics.median(base["seconds_per_step"])
        return {
            "steps": theirs / mine,
            "wall_clock": wall_theirs / wall_mine,
            "baseline_never_reached": all(s is None for s in base["steps_to_threshold"]),
            "subject_never_reached": all(s is None for s in subject["steps_to_threshold"]),
        }

    payload: Dict[str, Any] = {
        "threshold": threshold,
        "threshold_rule": f"median over {reference}'s seeds of its final smoothed reward (trailing mean of the "
        f"last {window} steps); fixed before the runs",
        "smoothing_window": window,
        "steps": steps,
        "methods": methods,
        "not_reached_counts_as": steps,
        "eval_steps": eval_steps,
        "eval_rule": "reward_mean of the trainer's fixed evaluation set (eval_prompts prompts, the method's "
        "steps and shift as a deterministic ODE, the same initial noise every time) before training "
        f"and every {eval_every} steps; eval_second_half = the mean of the evaluations at steps >= "
        f"{steps / 2:g}",
    }
    others = [n for n in names if n != SUBJECT[kind]]
    detail = {other: speedups(other) for other in others}
    if kind == "methods":
        for other in ("flow_grpo", "dance_grpo"):
            payload[f"speedup_vs_{other}"] = detail[other]["steps"]
            payload[f"wall_clock_speedup_vs_{other}"] = detail[other]["wall_clock"]
    payload["speedup_detail"] = detail
    return payload


def plot(payload: Dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    window = payload["smoothing_window"]
    has_eval = all("eval_curves" in e for e in payload["methods"].values())
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(14 if has_eval else 8, 4.8), squeeze=False)
    ax = axes[0, 0]
    for name, entry in payload["methods"].items():
        curves = np.array([smooth(c, window) for c in entry["curves"]])
        x = np.arange(1, curves.shape[1] + 1)
        (line,) = ax.plot(x, curves.mean(0), label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
        if has_eval:
            evals = np.array(entry["eval_curves"])
            axes[0, 1].plot(payload["eval_steps"], evals.mean(0), "o-", color=line.get_color(), label=name)
            axes[0, 1].fill_between(
                payload["eval_steps"], evals.min(0), evals.max(0), color=line.get_color(), alpha=0.12
            )
    ax.axhline(payload["threshold"], color="k", ls="--", lw=0.8, label=f"threshold {payload['threshold']:.3f}")
    ax.set_ylabel(f"training reward (trailing {window}-step mean)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if has_eval:
        axes[0, 1].set_ylabel("fixed evaluation set reward")
        axes[0, 1].set_title(
            "the trainer's fixed evaluation set (ODE, same noise each time); mean and min-max over seeds", fontsize=9
        )
        axes[0, 1].legend(fontsize=7, loc="lower right")
    for ax in axes[0]:
        ax.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(payload: Dict[str, Any]) -> None:
    print(f"threshold {payload['threshold']:.4f} ({payload['threshold_rule']})")
    print(
        f"{'method':<36}{'steps to threshold':>24}{'initial':>9}{'final':>9}{'s/step':>8}"
        f"{'eval@0':>9}{'eval 2nd half':>15}"
    )
    for name, e in payload["methods"].items():
        reached = ", ".join("-" if s is None else str(s) for s in e["steps_to_threshold"])
        evals = (
            f"{statistics.fmean(e['eval_initial']):>9.4f}{statistics.fmean(e['eval_second_half']):>15.4f}"
            if "eval_initial" in e
            else ""
        )
        print(
            f"{name:<36}{reached:>24}{statistics.fmean(e['initial_reward']):>9.4f}"
            f"{statistics.fmean(e['final_reward']):>9.4f}{statistics.median(e['seconds_per_step']):>8.2f}{evals}"
        )
    for other, d in payload["speedup_detail"].items():
        never = " (it never reached the threshold: its step budget used)" if d["baseline_never_reached"] else ""
        print(f"speedup vs {other}: {d['steps']:.2f}x in steps, {d['wall_clock']:.2f}x in wall-clock{never}")


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", action="store_true", help="run the Euphonium ablations instead of the methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the trainer's)")
    parser.add_argument("--window", type=int, default=10, help="smoothing window in steps (default 10)")
    parser.add_argument("--eval-every", type=int, default=25, help="fixed-set evaluation every N steps (default 25)")
    parser.add_argument("--only", nargs="+", default=None, help="a subset of the methods / variants")
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    from euphonium.train.config import TrainConfig

    kind = "ablations" if args.ablations else "methods"
    table = ABLATIONS if args.ablations else METHODS
    names = args.only or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {list(table)}")
    for needed in (REFERENCE[kind], SUBJECT[kind]):
        if needed not in names:
            parser.error(f"--only must include {needed!r} (the threshold and the speedups are relative to it)")
    steps = args.steps or TrainConfig().max_steps
    if steps < args.window:
        parser.error(f"--steps ({steps}) must be at least --window ({args.window})")
    if not 1 <= args.eval_every <= steps / 2:
        parser.error(f"--eval-every ({args.eval_every}) must be between 1 and half the steps ({steps / 2:g})")
    jobs = [
        {
            "name": n,
            "seed": s,
            "overrides": table[n][0],
            "oracle": table[n][1],
            "steps": steps,
            "threads": args.threads,
            "eval_every": args.eval_every,
        }
        for s in args.seeds
        for n in names
    ]

    from tqdm.auto import tqdm

    start = time.perf_counter()
    runs = []
    context = multiprocessing.get_context("spawn")
    bar = tqdm(total=len(jobs), desc=f"convergence ({kind})")
    with context.Pool(args.workers, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(train_one, jobs):
            runs.append(result)
            final = statistics.fmean(result["rewards"][-args.window :])
            bar.update(1)
            bar.set_postfix(last=f"{result['name']} seed {result['seed']}: {final:.3f}")
    bar.close()
    payload = summarise(runs, names, kind, steps, args.window, args.eval_every)
    info = describe_device(torch.device("cpu"))
    payload.update(
        {
            "device": info,
            "workers": args.workers,
            "threads_per_run": args.threads,
            "total_seconds": time.perf_counter() - start,
            "command": " ".join(["convergence.py", *(argv if argv is not None else sys.argv[1:])]),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "trainer_defaults": "configs/toy.yaml (euphonium.train.config.TrainConfig)",
        }
    )
    print_table(payload)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "ablations" if args.ablations else "convergence"
        (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
        config = payload["methods"][names[0]]["config"]
        plot(
            payload,
            args.out / f"{stem}.png",
            f"toy world, {len(args.seeds)} seeds x {steps} steps, "
            f"{config['prompts_per_step']} prompts x group {config['group_size']} per step ({kind})",
        )
        print(f"# wrote {args.out / stem}.json and .png ({payload['total_seconds'] / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    main()
