"""Benchmark ``euphonium.ops.group_advantages`` (GRPO's group-relative advantages) against eager and compile.

The work timed normalises rewards ``[B]`` (one outcome reward per sample) or ``[B, K]`` (a process
reward per denoising step) within contiguous groups of ``--group-size`` samples:
``A = (r - mean_group(r)) / (std_group(r) + eps)``. ``eager`` is ``group_advantages_ref`` (given the
group ids), ``compile`` is ``torch.compile`` of it, ``euphonium`` is ``ops.group_advantages``
(validation included; one Triton launch on CUDA).

Minimal bytes: read the rewards, write the float32 advantages. These tensors are small (a rollout
batch), so the times are dominated by launch and framework overhead, not bandwidth.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

import torch  # noqa: E402

from benchmarks.common import DTYPES, Case, SizeSpec, compiled, make_parser, resolve_args, run_bench  # noqa: E402
from euphonium import ops  # noqa: E402
from euphonium.ops.advantages import contiguous_group_ids, group_advantages_ref  # noqa: E402

SIZES = SizeSpec(
    presets={
        "b48": (48,),  # one GPU's rollout batch, one outcome reward per sample
        "b256k16": (256, 16),  # a global batch with a process reward at 16 steps
        "b8192k16": (8192, 16),  # a large global batch (bandwidth-bound end of the range)
    },
    default_cpu=["b48", "b256k16", "b8192k16"],
    default_cuda=["b48", "b256k16", "b8192k16"],
    quick=["b48"],
    dtypes=["fp32"],
)


def cases(shapes, dtypes, device, args):
    """One ``Case`` per (shape, dtype), built lazily."""
    compiled_ref = compiled(group_advantages_ref, args.compile_backend)
    for label, shape in shapes:
        if shape[0] % args.group_size:
            raise SystemExit(f"--group-size {args.group_size} must divide the batch size {shape[0]} of {label}")
        for dtype_name in dtypes:
            yield _case(label, shape, dtype_name, device, args, compiled_ref)


def _case(label, shape, dtype_name, device, args, compiled_ref):
    dtype = DTYPES[dtype_name]
    rewards = torch.rand(shape, device=device).to(dtype)
    ids = contiguous_group_ids(shape[0], args.group_size, device)
    kw = dict(eps=1e-8, unbiased=True, clip=args.clip)
    numel = rewards.numel()
    return Case(
        label=label,
        dtype=dtype_name,
        shape=tuple(shape),
        bytes_moved=numel * rewards.element_size() + numel * 4,
        run={
            "eager": lambda: group_advantages_ref(rewards, ids, **kw),
            "compile": lambda: compiled_ref(rewards, ids, **kw),
            "euphonium": lambda: ops.group_advantages(rewards, group_size=args.group_size, **kw),
        },
        params=dict(group_size=args.group_size, clip=args.clip),
    )


def parse_args(argv=None):
    """The command line (``argv`` or ``sys.argv``) of this benchmark."""
    parser = make_parser(__doc__.splitlines()[0], SIZES)
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt group (default 8)")
    parser.add_argument("--clip", type=float, default=None, help="clamp the advantages to +-clip")
    args = parser.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    device, shapes, dtypes, options = resolve_args(args, SIZES)
    notes = [
        f"contiguous groups of {args.group_size}, unbiased std, eps 1e-8" + (f", clip {args.clip}" if args.clip else "")
    ]
    return run_bench(
        "group_advantages",
        "group-relative advantages",
        cases(shapes, dtypes, device, args),
        args,
        device,
        options,
        notes,
    )


if __name__ == "__main__":
    main()
