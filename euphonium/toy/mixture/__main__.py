"""``python -m euphonium.toy.mixture {pretrain, rates, grpo}``: the mixture world's base model and checks.

- ``pretrain --output DIR``: flow-matching pretraining (:func:`pretrain_mixture_model`; the defaults made
  the committed ``euphonium/assets/mixture/model``).
- ``rates [--model DIR]``: the model's rates of the prompted mode and component against the data's.
- ``grpo [--model DIR] [--steps N] [--oracle]``: the minimal GRPO loop (:mod:`.grpo`), evaluation curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

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


if __name__ == "__main__":
    raise SystemExit(main())
