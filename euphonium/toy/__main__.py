"""``python -m euphonium.toy pretrain|report``: train the toy base model, or report on it."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from euphonium.toy.model import ASSET_DIR


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    from euphonium.toy.pretrain import PretrainConfig

    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(prog="python -m euphonium.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="flow-matching pretraining on the renderer's clips")
    p.add_argument(
        "--output",
        type=Path,
        default=ASSET_DIR,
        help=f"where to save transformer/, text_encoder/ and pretrain.json (default {ASSET_DIR})",
    )
    p.add_argument("--steps", type=_positive_int, default=defaults.steps)
    p.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="0: save the raw weights")
    p.add_argument("--logit-mean", type=float, default=defaults.logit_mean)
    p.add_argument("--logit-std", type=float, default=defaults.logit_std)
    p.add_argument("--shift", type=float, default=defaults.shift, help="timestep shift of the training sigmas")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=_positive_int, default=defaults.threads)
    p.add_argument(
        "--eval-every", type=int, default=defaults.eval_every, help="sample and score every N steps (0: never)"
    )
    p.add_argument(
        "--transformer-config",
        type=json.loads,
        default={},
        help="JSON overrides of TOY_TRANSFORMER_CONFIG, e.g. '{\"num_layers\": 1}'",
    )
    p.add_argument(
        "--text-encoder-config",
        type=json.loads,
        default={},
        help="JSON overrides of TOY_TEXT_ENCODER_CONFIG, e.g. '{\"dim\": 16}'",
    )

    p.add_argument(
        "--caption-accuracy",
        type=json.loads,
        default={},
        help="JSON {attribute: probability that the caption names the rendered value}, e.g. "
        "'{\"color\": 0.4}' (default: exact captions)",
    )
    p.add_argument(
        "--caption-coupling",
        action="store_true",
        help="pick each noisy attribute's rendered value from the clip's own noise (see euphonium.toy.pretrain)",
    )
    p.add_argument("--init", type=str, default=None, help="continue from this model folder (default: fresh weights)")

    r = sub.add_parser("report", help="sample the model, print reward statistics, write pictures and JSON")
    r.add_argument("--model", type=Path, default=None, help="model directory (default: the committed weights)")
    r.add_argument("--out", type=Path, default=Path("docs/toy"))
    r.add_argument("--repeats", type=_positive_int, default=4, help="clips per prompt (96 prompts)")
    r.add_argument("--steps", type=_positive_int, default=20, help="Euler ODE steps")
    r.add_argument("--shift", type=float, default=3.0, help="timestep shift of the sampling sigmas")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=_positive_int, default=2)
    r.add_argument(
        "--no-groups", action="store_true", help="skip the group statistics (groups of 4, the main job's sampler)"
    )

    args = parser.parse_args(argv)
    if args.command == "pretrain":
        from euphonium.toy.pretrain import pretrain

        config = PretrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            ema_decay=args.ema_decay,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            shift=args.shift,
            seed=args.seed,
            threads=args.threads,
            eval_every=args.eval_every,
            transformer_config=args.transformer_config,
            text_encoder_config=args.text_encoder_config,
            caption_accuracy=args.caption_accuracy,
            caption_coupling=args.caption_coupling,
            init=args.init,
        )
        command = "python -m euphonium.toy " + shlex.join(sys.argv[1:] if argv is None else list(argv))
        record = pretrain(config, output=args.output, command=command)
        print(
            f"saved to {args.output}: loss {record['first_loss']:.4f} -> {record['final_loss']:.4f} "
            f"in {record['wall_seconds']:.0f} s"
        )
    else:
        from euphonium.toy.report import format_report, run_report

        report = run_report(
            args.model, args.out, args.repeats, args.steps, args.shift, args.seed, args.threads, not args.no_groups
        )
        print(format_report(report))
        print(f"wrote {args.out / 'report.json'}, {args.out / 'samples.png'}, {args.out / 'samples.gif'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
