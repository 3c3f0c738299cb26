"""``python -m euphonium.train [--config FILE.yaml|NAME] [--max-steps N] [--output-dir DIR] [--resume] [key=value ...]``

With no arguments: the toy video world with the Euphonium algorithm on whatever device is there.
"""

from __future__ import annotations

import argparse
import sys

from euphonium.checkpointing import CheckpointError, WriteError
from euphonium.train.checkpoint import RunAborted, check_output_dir
from euphonium.train.config import ConfigError, available_configs, check_device, load_config


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
        # The config and the folder are checked before torch and the trainer load (a fraction of a second).
        config = load_config(args.config, overrides)
        check_output_dir(args.output_dir, args.resume, announce=False)
        check_device(config)
        from euphonium.train.trainer import Trainer

        trainer = Trainer(config, args.output_dir, resume=args.resume)
        out = trainer.train()
    except (ConfigError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (WriteError, RunAborted) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if trainer.is_main:
        print(f"done: {out}/metrics.jsonl, {out}/reward_curve.png, {out}/samples.gif")
    return 0


if __name__ == "__main__":
    sys.exit(main())
