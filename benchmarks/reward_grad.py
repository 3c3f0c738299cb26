"""Benchmark the post-processing of ``euphonium.ops.reward_grad`` (per-sample normalise / clip the PRM gradient).

The work timed is what ``ops.reward_grad(prm, x, normalize=..., max_norm=...)`` does to the PRM's
gradient ``g [B, ...]`` after autograd produced it: ``n_b = ||g_b||_2`` in fp32, then
``g_b / n_b`` (``--normalize``, default on) and a ``min(1, max_norm / ||g_b||)`` clip
(``--max-norm``, default 1). The PRM's own forward/backward is the model's cost and is timed in
``train_step.py``. ``eager`` is ``scale_by_norm_ref``, ``compile`` is ``torch.compile`` of it,
``euphonium`` is what ``reward_grad`` dispatches to on this device (the Triton kernel
``euphonium.kernels.reward_grad.scale_by_norm`` on CUDA, ``scale_by_norm_torch`` on the CPU), in
place as ``reward_grad`` runs it on autograd's fresh gradient: it works on its own copy of the
input, which after the first call (the one checked against eager) holds unit-norm samples, the
same work.

Minimal bytes: read ``g`` once and write the result (the kernel reads each sample twice; a sample of a
Wan latent fits in an H100's L2 only in part).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DTYPES,
    LATENT_PRESETS,
    Case,
    SizeSpec,
    compiled,
    latent_bytes,
    make_parser,
    resolve_args,
    run_bench,
)
from euphonium.ops.reward_grad import scale_by_norm, scale_by_norm_ref  # noqa: E402

SIZES = SizeSpec(
    presets=LATENT_PRESETS,
    default_cpu=["image", "wan480p"],
    default_cuda=["image", "wan480p", "wan480p-b4", "wan720p"],
    quick=["small"],
    dtypes=["bf16", "fp32"],
    quick_dtypes=["bf16"],
)


def cases(shapes, dtypes, device, args):
    """One ``Case`` per (shape, dtype), built lazily."""
    compiled_ref = compiled(scale_by_norm_ref, args.compile_backend)
    for label, shape in shapes:
        for dtype_name in dtypes:
            yield _case(label, shape, dtype_name, device, args, compiled_ref)


def _case(label, shape, dtype_name, device, args, compiled_ref):
    dtype = DTYPES[dtype_name]
    # PRM gradients on latents are small; per-sample scales differ so that the clip bites on some.
    scales = torch.logspace(-3, 1, shape[0], device=device).reshape(-1, *([1] * (len(shape) - 1)))
    grad = (scales * torch.randn(shape, device=device) / (torch.tensor(shape[1:]).prod().sqrt())).to(dtype)
    kw = dict(normalize=args.normalize, max_norm=args.max_norm)
    work = grad.clone()
    return Case(
        label=label,
        dtype=dtype_name,
        shape=tuple(shape),
        bytes_moved=latent_bytes(shape, dtype, 2),
        run={
            "eager": lambda: scale_by_norm_ref(grad, **kw),
            "compile": lambda: compiled_ref(grad, **kw),
            "euphonium": lambda: scale_by_norm(work, inplace=True, **kw),
        },
        params=dict(kw),
    )


def parse_args(argv=None):
    """The command line (``argv`` or ``sys.argv``) of this benchmark."""
    parser = make_parser(__doc__.splitlines()[0], SIZES)
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="divide each sample by its L2 norm (default on)",
    )
    parser.add_argument("--max-norm", type=float, default=1.0, help="clip each sample's norm (default 1; 0 disables)")
    args = parser.parse_args(argv)
    if args.max_norm is not None and args.max_norm <= 0:
        args.max_norm = None
    if not args.normalize and args.max_norm is None:
        raise SystemExit("nothing to time: give --normalize and/or --max-norm > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, shapes, dtypes, options = resolve_args(args, SIZES)
    notes = [f"normalize={args.normalize} max_norm={args.max_norm}"]
    return run_bench(
        "reward_grad",
        "PRM-gradient per-sample normalise/clip",
        cases(shapes, dtypes, device, args),
        args,
        device,
        options,
        notes,
    )


if __name__ == "__main__":
    main()
