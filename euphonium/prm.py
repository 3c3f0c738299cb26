"""``python -m euphonium.prm {collect,train,report}``: build a PRM's training data from rollouts, train it,
report its quality.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from euphonium.rewards.prm import (
    LOSSES,
    LatentRewardModel,
    PRMDataset,
    PRMTrainConfig,
    PRMTrainer,
    correlation_by_sigma,
)
from euphonium.toy import load_toy_model, sample_prompts
from euphonium.toy.prm import (
    TOY_SAMPLER,
    collect_toy_rollouts,
    guided_step_effect,
    load_toy_prm,
    relabel_toy_prompts,
    toy_sampler_config,
)


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
        "command": "python -m euphonium.prm " + shlex.join(args.argv),
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
        "command": "python -m euphonium.prm " + shlex.join(args.argv),
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
    """``python -m euphonium.prm {collect,train,report}`` (``--help`` on each)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m euphonium.prm",
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
