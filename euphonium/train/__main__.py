"""``python -m euphonium.train [--config FILE.yaml|NAME] [--max-steps N] [--output-dir DIR] [--resume] [key=value ...]``

With no arguments: the toy video world with the Euphonium algorithm on whatever device is there.
"""

from __future__ import annotations

import argparse
import sys

from euphonium.train.config import ConfigError, available_configs, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m euphonium.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        help=f"a YAML file or a packaged config by name ({', '.join(available_configs())}); default: the toy world",
    )
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("--output-dir", default="runs/toy", help="where metrics, checkpoints and samples go")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=1e-4 model.path=/data/wan"
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"max_steps={args.max_steps}"] if args.max_steps is not None else [])
    try:
        config = load_config(args.config, overrides)
        from euphonium.train.trainer import Trainer

        trainer = Trainer(config, args.output_dir, resume=args.resume)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = trainer.train()
    if trainer.is_main:
        print(f"done: {out}/metrics.jsonl, {out}/reward_curve.png, {out}/samples.gif")
    return 0


if __name__ == "__main__":
    sys.exit(main())
