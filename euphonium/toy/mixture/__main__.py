"""``python -m euphonium.toy.mixture {pretrain, rates, grpo}``: the mixture world's base model and checks.

- ``pretrain --output DIR``: flow-matching pretraining (:func:`pretrain_mixture_model`; the defaults made
  the committed ``euphonium/assets/mixture/model``).
- ``rates [--model DIR]``: the model's rates of the prompted mode and component against the data's.
- ``grpo [--model DIR] [--steps N] [--oracle]``: the minimal GRPO loop (:mod:`.grpo`), evaluation curve.
- ``prm --output DIR``: the learned PRM (the library's ``PRMTrainer`` on base-model rollouts; the
  defaults made the committed ``euphonium/assets/mixture/prm``) and its comparison with the oracle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from euphonium.toy.mixture.grpo import MixtureGRPOConfig, mixture_grpo
from euphonium.toy.mixture.model import (
    MixturePretrainConfig,
    load_mixture_model,
    measure_base_rates,
    mixture_sampler_config,
    pretrain_mixture_model,
)
from euphonium.toy.mixture.world import MixtureOraclePRM

_TYPES = {"int": int, "float": float, "str": str}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m euphonium.toy.mixture", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the MLP flow model")
    p.add_argument("--output", required=True)
    for field in dataclasses.fields(MixturePretrainConfig):
        if field.type in _TYPES:
            p.add_argument(f"--{field.name.replace('_', '-')}", type=_TYPES[field.type], default=None)
    r = sub.add_parser("rates", help="base rates of a model against the data's")
    r.add_argument("--model", default=None, help="model folder (default: the committed one)")
    r.add_argument("--algorithm", default="euphonium_fast", help="sampler preset whose steps and shift to use")
    r.add_argument("--samples-per-prompt", type=int, default=256)
    r.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("grpo", help="minimal GRPO loop (library sampler and ops), evaluation curve")
    g.add_argument("--model", default=None)
    g.add_argument("--oracle", action="store_true", help="guide the rollouts with the exact oracle PRM")
    g.add_argument("--threads", type=int, default=None)
    for field in dataclasses.fields(MixtureGRPOConfig):
        if field.type in _TYPES:
            g.add_argument(f"--{field.name.replace('_', '-')}", type=_TYPES[field.type], default=None)
    q = sub.add_parser("prm", help="train the learned PRM on base-model rollouts, compare it with the oracle")
    q.add_argument("--output", required=True)
    q.add_argument("--model", default=None)
    q.add_argument("--samples", type=int, default=8192)
    q.add_argument("--held-out", type=int, default=1024)
    q.add_argument("--steps", type=int, default=2000)
    q.add_argument("--batch-size", type=int, default=256)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    if args.command == "pretrain":
        given = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(MixturePretrainConfig) if hasattr(args, f.name)
        }
        config = MixturePretrainConfig(**{k: v for k, v in given.items() if v is not None})
        out = pretrain_mixture_model(config, output=args.output, progress=True)
        record = out["record"]
        print(
            f"final loss {record['final_loss']:.4f}, {record['wall_seconds']:.1f} s wall, "
            f"{record['cpu_seconds']:.1f} s CPU"
        )
        rates = measure_base_rates(out["model"])
        print(json.dumps(rates, indent=1))
    elif args.command == "rates":
        model = load_mixture_model(args.model)
        rates = measure_base_rates(
            model,
            config=mixture_sampler_config(args.algorithm),
            samples_per_prompt=args.samples_per_prompt,
            seed=args.seed,
        )
        print(json.dumps(rates, indent=1))
    elif args.command == "prm":
        train_learned_prm(args)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(MixtureGRPOConfig)}
        config = MixtureGRPOConfig(**{k: v for k, v in given.items() if v is not None})
        start = time.perf_counter()
        out = mixture_grpo(
            load_mixture_model(args.model), config, prm=MixtureOraclePRM() if args.oracle else None, progress=True
        )
        print(json.dumps({"config": dataclasses.asdict(config), "evals": out["evals"]}, indent=1))
        print(f"{time.perf_counter() - start:.1f} s")
    return 0


def train_learned_prm(args) -> None:
    from euphonium.rewards.prm import PRMTrainConfig
    from euphonium.toy.mixture.prm import collect_mixture_rollouts, compare_with_oracle, train_mixture_prm

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    model = load_mixture_model(args.model)
    start = time.perf_counter()
    train = collect_mixture_rollouts(model, args.samples, seed=args.seed)
    held_out = collect_mixture_rollouts(model, args.held_out, seed=args.seed + 1)
    collected = time.perf_counter() - start
    config = PRMTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=max(1, args.steps // 4),
        checkpoint_every=0,
        seed=args.seed,
    )
    out = train_mixture_prm(train, held_out=held_out, config=config, output_dir=output, seed=args.seed)
    trained = time.perf_counter() - start - collected
    out["prm"].save_pretrained(output)
    comparison = compare_with_oracle(out["prm"], held_out, seed=args.seed + 2)
    record = {
        "command": "python -m euphonium.toy.mixture prm "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "command" and v is not None),
        "rollouts": {"train": len(train), "held_out": len(held_out), "mean_reward": float(train.rewards.mean())},
        "collect_seconds": collected,
        "train_seconds": trained,
        "torch_threads": torch.get_num_threads(),
        "vs_oracle_on_held_out": comparison,
        "history": out["history"],
    }
    (output / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("collect_seconds", "train_seconds", "vs_oracle_on_held_out")}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
