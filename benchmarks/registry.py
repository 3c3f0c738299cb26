"""The one list of what ``benchmarks/`` runs: every op benchmark, the training-step breakdown and the kernel report.

``run_all.py`` builds its plan from it, ``make_readme_table.py`` takes the README order and titles from
it, the pytest-benchmark suite (``test_bench_ops.py``) parametrizes over its op entries and
``device_run.sh`` asks it which scripts make up each part of a GPU run. A new benchmark is one entry
here (and its script); nothing else lists benchmarks by hand.

Each entry names its results file (``name``: ``benchmarks/results/<device>/<name>.json``), the script
that writes it (``benchmarks/<script>.py``) with its arguments, the README title and what it measures.
This module imports nothing beyond the standard library, so that shell scripts can call it::

    python -m benchmarks.registry --names                # results names, README order
    python -m benchmarks.registry --scripts --part ops   # the scripts of device_run.sh's `ops` part
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence, Tuple

KINDS = ("op", "train", "report")
# device_run.sh's parts, in order of importance (a session has 15 device minutes in all).
PARTS = ("targets", "ops", "train")


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmark run.

    ``kind``: ``op`` (an op benchmark built on ``benchmarks.common``: eager, compile and euphonium
    providers; takes ``--quick``), ``train`` (``train_step.py``) or ``report`` (``kernel_report.py``).
    ``devices``: where ``run_all.py`` runs it by default. ``quick``: part of a ``--quick`` smoke run
    (``quick_args`` replace ``args`` there). ``pytest``: in the pytest-benchmark suite (an op's
    base variant). ``part``: the ``device_run.sh`` part that runs it.
    """

    name: str
    script: str
    title: str
    measures: str
    kind: str = "op"
    args: Tuple[str, ...] = ()
    quick_args: Optional[Tuple[str, ...]] = None
    devices: Tuple[str, ...] = ("cpu", "cuda")
    quick: bool = True
    pytest: bool = False
    part: str = "ops"

    def command(self, quick: bool = False) -> list:
        """``[script.py, *args]`` as ``run_all.py`` runs it (before the common arguments)."""
        args = self.quick_args if quick and self.quick_args is not None else self.args
        return [f"{self.script}.py", *args]


REGISTRY: Tuple[Bench, ...] = (
    Bench(
        "sde_step",
        "sde_step",
        "`sde_step`",
        "one SDE rollout step (x_next, x0_pred, log_prob) on given noise",
        pytest=True,
        part="targets",
    ),
    Bench(
        "sde_step_drawn",
        "sde_step",
        "`sde_step` (noise drawn)",
        "the rollout step drawing its own noise (Philox in the kernel against torch.randn_like)",
        args=("--noise", "drawn"),
        devices=("cuda",),
        quick=False,
        part="targets",
    ),
    Bench(
        "sde_step_guided",
        "sde_step",
        "`sde_step` (guided)",
        "the rollout step with the guidance c * reward_grad in the mean",
        args=("--guided",),
        devices=("cuda",),
        quick=False,
        part="targets",
    ),
    Bench(
        "sde_log_prob",
        "sde_log_prob",
        "`sde_log_prob` fwd+bwd",
        "the training log-prob and its gradient in v, with the bytes saved for backward",
        pytest=True,
        part="targets",
    ),
    Bench(
        "sde_log_prob_kl",
        "sde_log_prob",
        "`sde_log_prob` fwd+bwd, KL",
        "the training log-prob and the KL to a reference velocity, forward and backward",
        args=("--kl",),
        devices=("cuda",),
        quick=False,
        part="targets",
    ),
    Bench(
        "reward_grad",
        "reward_grad",
        "`reward_grad` normalise/clip",
        "the PRM gradient's per-sample normalisation and norm clipping",
        pytest=True,
    ),
    Bench(
        "group_advantages",
        "advantages",
        "`group_advantages`",
        "group-relative advantages of [B] and [B, K] rewards",
        pytest=True,
    ),
    Bench("grpo_loss", "grpo_loss", "`grpo_loss` fwd+bwd", "the clipped GRPO loss, forward and backward", pytest=True),
    Bench(
        "grpo_loss_kl",
        "grpo_loss",
        "`grpo_loss` fwd+bwd, KL",
        "the clipped GRPO loss with a KL term, forward and backward",
        args=("--kl",),
        devices=("cuda",),
        quick=False,
    ),
    Bench(
        "compat_flow_grpo",
        "compat",
        "`compat.flow_grpo` step",
        "euphonium.compat.flow_grpo.sde_step_with_logprob against Flow-GRPO's step as published "
        "(rollout, and training forward + backward)",
        args=("--peer", "flow_grpo"),
        pytest=True,
    ),
    Bench(
        "compat_dance_grpo",
        "compat",
        "`compat.dance_grpo` step",
        "euphonium.compat.dance_grpo.flux_step against DanceGRPO's (and upstream Euphonium's guided) step "
        "as published (rollout, and training forward + backward)",
        args=("--peer", "dance_grpo"),
        pytest=True,
    ),
    Bench(
        "train_step_toy",
        "train_step",
        "training step (toy)",
        "where a training step's time goes on the toy WanTransformer3DModel",
        kind="train",
        args=("--model", "toy"),
        quick_args=("--model", "toy", "--steps", "1", "--num-steps", "4", "--guided-steps", "1"),
        part="train",
    ),
    Bench(
        "train_step_wan",
        "train_step",
        "training step (Wan2.1-1.3B-shaped)",
        "where a training step's time goes on a Wan2.1-1.3B-shaped model",
        kind="train",
        args=("--model", "wan", "--steps", "1"),
        devices=("cuda",),
        quick=False,
        part="train",
    ),
    Bench(
        "kernel_report",
        "kernel_report",
        "kernels compiled ahead of time",
        "registers, spills, shared memory and global access widths of every kernel, from the SASS",
        kind="report",
        part="train",
    ),
)


def entries(kind: Optional[str] = None, part: Optional[str] = None) -> Tuple[Bench, ...]:
    """The registry's entries, in README order, optionally of one ``kind`` and one ``part``."""
    return tuple(b for b in REGISTRY if (kind is None or b.kind == kind) and (part is None or b.part == part))


def ops() -> Tuple[Bench, ...]:
    """The op benchmarks, in README order."""
    return entries("op")


def get(name: str) -> Bench:
    for b in REGISTRY:
        if b.name == name:
            return b
    raise KeyError(f"no benchmark {name!r} in the registry; known: {[b.name for b in REGISTRY]}")


def scripts(benches: Sequence[Bench]) -> list:
    """The script names (without ``.py``) of ``benches``, each once, in order."""
    out = []
    for b in benches:
        if b.script not in out:
            out.append(b.script)
    return out


def plan(device: str, quick: bool, kernel_report: bool = True) -> list:
    """``(bench, [script.py, *args])`` for everything ``run_all.py`` runs on ``device``, in order."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    chosen = [b for b in REGISTRY if b.kind != "report" and device_type in b.devices and (b.quick or not quick)]
    # Each op's base run before the variants (a device run that times out loses the variants first);
    # the op benchmarks, then the training step, then the kernel report.
    order = {"op": 0, "train": 1}
    chosen.sort(key=lambda b: (order[b.kind], b.kind == "op" and not b.quick))
    out = [(b, b.command(quick)) for b in chosen]
    if kernel_report:
        out += [(b, b.command()) for b in entries("report")]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--names", action="store_true", help="results names (the default)")
    what.add_argument("--scripts", action="store_true", help="script names without .py, each once")
    what.add_argument("--table", action="store_true", help="name, script and arguments, part, what it measures")
    parser.add_argument("--part", choices=PARTS, help="only the entries of this device_run.sh part")
    parser.add_argument("--kind", choices=KINDS, help="only the entries of this kind")
    args = parser.parse_args(argv)
    selected = entries(args.kind, args.part)
    if args.scripts:
        print(" ".join(scripts(selected)))
    elif args.table:
        for b in selected:
            print(f"{b.name}\t{' '.join(b.command())}\t{b.part}\t{b.measures}")
    else:
        print(" ".join(b.name for b in selected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
