"""``python -m euphonium.prm {collect,train,report}``: build a PRM's training data from rollouts, train it,
report its quality.

Any configured model (``--config NAME [key=value ...]``, the trainer's configs and overrides)::

    python -m euphonium.prm collect --config wan2_1_t2v_1_3b --num-samples 4096 --out data/prm model.path=...
    python -m euphonium.prm train --config wan2_1_t2v_1_3b --kind backbone --data data/prm --output-dir prm ...
    python -m euphonium.prm report --config wan2_1_t2v_1_3b --prm prm --data data/prm_held_out --out docs/prm ...

``collect`` writes resumable shards (:mod:`euphonium.prm_collect`; under ``torchrun`` each rank its
own); ``train --kind conv`` trains a :class:`LatentRewardModel`, ``--kind backbone`` a
:class:`~euphonium.rewards.prm.BackbonePRM` on the config's transformer (Wan2.1, Wan2.2 A14B, SD3.5, FLUX.1,
HunyuanVideo: the shards keep the policy's whole conditioning for it). Without ``--config`` the toy world
(``collect --out FILE.safetensors``, ``train --data FILE``: the committed toy PRM's recipe).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from euphonium.prm_collect import (
    STORE_DTYPES,
    build_reward_set,
    calibration_by_sigma,
    collect_shards,
    collection_config,
    guided_step_win_rate,
    load_shards,
)
from euphonium.rewards.prm import (
    LOSSES,
    BackbonePRM,
    LatentRewardModel,
    PRMDataset,
    PRMTrainConfig,
    PRMTrainer,
    correlation_by_sigma,
)
from euphonium.rewards.prm.backbone import KINDS, backbone_base, load_base, load_prm, prm_kind, same_folder
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


def _load_data(paths, tokens: bool = False) -> list:
    """Saved PRMDataset files and/or collection folders (their shards)."""
    return [load_shards(p, tokens=tokens) if Path(p).is_dir() else PRMDataset.load(p) for p in paths or []]


def _config(args):
    from euphonium.train.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def _device(config) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _training_data(args) -> PRMDataset:
    datasets = _load_data(args.data, tokens=args.kind == "backbone")
    if args.rollouts:
        datasets.append(collect_toy_rollouts(args.rollouts, seed=args.seed, base_model=args.base_model))
    if not datasets:
        raise SystemExit("error: give --data FILE (a saved PRMDataset) and/or --rollouts N (toy base-model rollouts)")
    data = PRMDataset.concat(datasets)
    if args.save_data:
        data.save(args.save_data)
    return data


def _cmd_collect(args) -> None:
    if args.config:
        result = collect_shards(
            _config(args),
            args.out,
            args.num_samples,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            seed=args.seed,
            store_dtype=args.store_dtype,
            overrides=args.overrides,
            config_name=args.config,
        )
        print(
            f"rank {result['rank']}/{result['world']}: wrote shards {result['written']}, "
            f"{len(result['skipped'])} already complete, of {result['shards']} in {args.out}"
        )
        return
    if args.overrides:
        raise SystemExit("error: key=value overrides need --config")
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
    if args.kind == "backbone":
        model = _backbone_model(args)
    elif args.init:
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
        lr=args.lr if args.lr is not None else (1e-4 if args.kind == "backbone" else PRMTrainConfig().lr),
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
        "kind": args.kind,
        "parameters": sum(p.numel() for p in trainer.params),
        "reward_mean": float(model.reward_mean),
        "reward_std": float(model.reward_std),
        "final": history[-1] if history else {},
    }
    (Path(args.output_dir) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


# The diffusers families (their transformers are the backbone PRM's BACKBONE_CLASSES).
BACKBONE_KINDS = ("wan", "sd3", "flux", "hunyuan_video")


def _backbone_model(args) -> BackbonePRM:
    """A fresh (or ``--init``) backbone PRM on the config's transformer, on the config's device and dtype."""
    if not args.config:
        raise SystemExit("error: --kind backbone needs --config (the model family whose transformer it reuses)")
    from euphonium.models.diffusers import DTYPES

    config = _config(args)
    if config.model.kind not in BACKBONE_KINDS:
        raise SystemExit(
            f"error: --kind backbone supports model.kind={', '.join(BACKBONE_KINDS)}, got {config.model.kind}"
        )
    device, dtype = _device(config), DTYPES[config.model.dtype]
    if args.init:
        model = load_prm(args.init, device, dtype=dtype)
        if not isinstance(model, BackbonePRM):
            raise SystemExit(f"error: --init {args.init} is not a backbone PRM")
        return model.train()
    base = backbone_base(config.model.path)  # Wan2.2 A14B: the pipeline folder, its two experts
    transformer = load_base(base, dtype, device)  # SD3, FLUX, HunyuanVideo: in the adapter the policy calls
    if config.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    model = BackbonePRM(
        transformer,
        base_path=base,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(config.model.lora_targets),
        head_dim=args.head_dim,
        aux_rewards=tuple(a for a in args.aux_rewards.split(",") if a),
    )
    return model.to(device)


def _markdown_config_report(report: Dict) -> str:
    lines = [
        "# PRM quality report",
        "",
        f"PRM: `{report['prm']}` ({report['kind']}); held-out data: {report['held_out']}; "
        f"machine: {report['machine']}.",
        "",
        "## The PRM as E[r | x_sigma], per noise level (held out)",
        "",
        "| sigma | n | Spearman | calibration error | bias | RMSE |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["calibration"]:
        lines.append(
            f"| [{row['sigma_lo']:g}, {row['sigma_hi']:g}] | {row['n']} | {row['spearman']:.3f} | "
            f"{row['calibration_error']:.4f} | {row['bias']:+.4f} | {row['rmse']:.4f} |"
        )
    lines += [
        "",
        "## One guided step vs the same rollout unguided, per rho (same seed)",
        "",
        f"Sampler: `{report['sampler']}`; guidance_form=rho at step {report['guided_step']}; "
        f"{report['guided_prompts']} rollouts.",
        "",
        "| rho | win rate | loss rate | ties | mean reward change (± s.e.) |",
        "|---|---|---|---|---|",
    ]
    for row in report["win_rate"]:
        lines.append(
            f"| {row['rho']:g} | {row['win_rate']:.3f} | {row['loss_rate']:.3f} | {row['tie_rate']:.3f} | "
            f"{row['mean_delta']:+.3e} ± {row['stderr_delta']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def _config_report(args) -> None:
    import platform

    from euphonium.models.diffusers import DTYPES
    from euphonium.train.policy import build_policy

    start = time.perf_counter()
    if not args.prm or not args.data:
        raise SystemExit("error: report --config needs --prm (the PRM folder) and --data (held-out shards or files)")
    config = _config(args)
    device = _device(config)
    policy = build_policy(collection_config(config), device)
    policy.transformer.requires_grad_(False)
    shared = None
    if prm_kind(args.prm) == "backbone":
        base = json.loads((Path(args.prm) / "prm_kind.json").read_text())["base_path"]
        if same_folder(base, backbone_base(config.model.path)):
            shared = policy.transformer  # one copy: the report's rollouts and the PRM use the same base
    prm = load_prm(args.prm, device, transformer=shared, dtype=DTYPES[config.model.dtype])
    if isinstance(prm, BackbonePRM):
        prm.eval_batch_size = args.batch_size
    data = PRMDataset.concat(_load_data(args.data, tokens=isinstance(prm, BackbonePRM)))
    calibration = calibration_by_sigma(prm, data, bins=args.bins, seed=args.seed, batch_size=args.batch_size)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [policy.prompts[i] for i in torch.randint(len(policy.prompts), (args.guided_prompts,), generator=gen)]
    rows = guided_step_win_rate(
        config,
        policy,
        prm,
        build_reward_set(config, device),
        prompts,
        _floats(args.rhos),
        seed=args.seed + 1,
        batch_size=args.batch_size,
        step=args.guided_step,
    )
    report = {
        "command": "python -m euphonium.prm " + shlex.join(args.argv),
        "prm": str(args.prm),
        "kind": prm_kind(args.prm),
        "held_out": ", ".join(args.data) + f" ({len(data)} rollouts)",
        "machine": f"{platform.machine()} {device.type}, {torch.get_num_threads()} torch threads",
        "sampler": f"preset({config.algorithm}) + {config.sampler}",
        "guided_step": rows[0]["step"] if rows else None,
        "guided_prompts": args.guided_prompts,
        "calibration": calibration,
        "win_rate": rows,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown_config_report(report))
    print(_markdown_config_report(report))


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

    if args.config:
        return _config_report(args)
    if args.overrides:
        raise SystemExit("error: key=value overrides need --config")
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
        description="Collect data for, train and evaluate latent process reward models (any configured model).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="save on-policy toy rollouts labelled with the exact toy rewards")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", default=None, help="toy base model folder (default: the committed one)")
    p.add_argument("--out", required=True, help="toy: output .safetensors file; --config: the shard folder")
    p.add_argument("--shard-size", type=int, default=64, help="--config: rollouts per shard (the unit of resume)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="--config: rollouts per sampler call (default: the config's batch)"
    )
    p.add_argument("--store-dtype", choices=sorted(STORE_DTYPES), default="float32", help="--config: dtype of x0")
    p.set_defaults(fn=_cmd_collect)
    collect = p

    p = sub.add_parser("train", help="train a LatentRewardModel on saved data and/or fresh toy rollouts")
    p.add_argument(
        "--output-dir", required=True, help="the trained PRM (save_pretrained), metrics.jsonl, training.json"
    )
    p.add_argument("--data", nargs="*", help="collection folders (collect --config) and/or saved PRMDataset files")
    p.add_argument("--kind", choices=KINDS, default="conv", help="conv: LatentRewardModel; backbone: BackbonePRM")
    p.add_argument("--lora-rank", type=int, default=0, help="backbone: the PRM's LoRA rank (0: frozen backbone)")
    p.add_argument("--lora-alpha", type=int, default=None, help="backbone: LoRA alpha (default: the rank)")
    p.add_argument("--head-dim", type=int, default=256, help="backbone: the reward head's hidden width")
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
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 (conv), 1e-4 (backbone)")
    for name in ("weight_decay", "sigma_min", "sigma_max", "aux_weight"):
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
    p.add_argument("--rhos", default="0.25,0.5,1,2", help="--config: guidance rho values of the win-rate table")
    p.add_argument("--guided-step", type=int, default=None, help="--config: the guided step (default: first of preset)")
    p.add_argument("--bins", type=int, default=10, help="--config: calibration bins per sigma bucket")
    p.add_argument("--batch-size", type=int, default=8, help="--config: PRM and rollout batch size")
    p.set_defaults(fn=_cmd_report)
    report = p

    argv = list(sys.argv[1:] if argv is None else argv)
    for p in (collect, train, report):
        p.add_argument("--config", default=None, help="a trainer config (YAML file or packaged name): any model family")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with --config)")
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
