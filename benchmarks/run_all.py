"""Regenerate every benchmark result file and the README's benchmark section in one command.

Runs, each in its own process (so that one benchmark's memory and compile caches do not colour the
next): the op benchmarks, the training-step breakdown, the kernel report, then
``make_readme_table.py``, which prints the Markdown, writes ``benchmarks/results/benchmarks.md`` and replaces
the README's generated results block.

What runs comes from ``benchmarks/registry.py`` (``python -m benchmarks.registry --table``). On a
CPU: ``sde_step``, ``sde_log_prob``, ``reward_grad``, ``advantages``, ``grpo_loss``, the two ``compat``
benchmarks at their CPU default sizes and ``train_step`` on the toy model (about 10 minutes on a 2-core
machine the first time, when inductor compiles every graph; less once its cache is warm). On CUDA
also the drawn-noise and guided variants of ``sde_step``, the KL variants of ``sde_log_prob`` and
``grpo_loss`` (after every op's base run), and ``train_step`` on the Wan2.1-1.3B-shaped model. Extra
arguments (``--threads 1``, ``--quick``, ``--device cpu``) go to every op benchmark
(``--threads``/``--device`` to ``train_step`` too).

A lent GPU runs one command for at most 10 minutes: run the plan in parts with ``--only``, e.g.
``--only sde_step sde_log_prob``, then ``--only reward_grad advantages grpo_loss compat``, then
``--only train_step kernel_report`` (``make_readme_table.py`` runs at the end of every part);
``benchmarks/device_run.sh`` runs such parts (and ``pytest -m gpu``) and packs the results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `python benchmarks/run_all.py` from anywhere

from benchmarks import registry  # noqa: E402


def plan(device: str, quick: bool):
    """``(ops, train)``: the op benchmarks' and the training step's commands (``registry.plan``)."""
    ops, train = [], []
    for bench, cmd in registry.plan(device, quick, kernel_report=False):
        (ops if bench.kind == "op" else train).append(cmd)
    return ops, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads in every benchmark")
    parser.add_argument("--quick", action="store_true", help="small sizes, short timing (a smoke run)")
    parser.add_argument("--skip-kernel-report", action="store_true", help="leave out the ahead-of-time kernel report")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SCRIPT",
        help="run only these scripts (names without .py: "
        + " ".join(registry.scripts(registry.REGISTRY))
        + "; `python -m benchmarks.registry --table` lists what each runs)",
    )
    args = parser.parse_args(argv)
    common = ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    ops, train = plan(args.device, args.quick)
    commands = [cmd + common + (["--quick"] if args.quick else []) for cmd in ops]
    commands += [cmd + common for cmd in train]
    if not args.skip_kernel_report:
        commands += [b.command() for b in registry.entries("report")]
    if args.only:
        known = {cmd[0][:-3] for cmd in commands}
        unknown = sorted(set(args.only) - known)
        if unknown:
            raise SystemExit(f"--only: unknown scripts {unknown}; choose from {sorted(known)}")
        commands = [cmd for cmd in commands if cmd[0][:-3] in args.only]
    commands.append(
        [
            "make_readme_table.py",
            "--output",
            str(HERE / "results" / "benchmarks.md"),
            "--readme",
            str(HERE.parent / "README.md"),
        ]
    )
    failed = []
    for cmd in commands:
        print(f"\n$ python benchmarks/{' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]]).returncode
        print(f"# {cmd[0]} finished in {time.perf_counter() - start:.0f} s (exit {code})", flush=True)
        if code:
            failed.append(" ".join(cmd))
    if failed:
        print("\nFAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
