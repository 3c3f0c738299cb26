"""Benchmark ``euphonium.ops.sde_log_prob`` forward + backward (the training log-prob) against eager and compile.

The work timed is the training step's log-prob of stored transitions ``x -> x_next`` under a new
velocity ``v`` and its gradient: ``log_prob = sde_log_prob(x, v, x_next, sigma, sigma_next)`` then
``d (grad_out . log_prob) / d v`` (``--kl`` also returns the KL to ``v_ref`` and backpropagates a
random upstream gradient through both). ``eager`` is ``sde_log_prob_reference`` differentiated by
autograd through its eager ops, ``compile`` is ``torch.compile`` of it (AOTAutograd compiles the
backward too), ``euphonium`` is ``ops.sde_log_prob`` (a fused forward and a fused backward that
recomputes the mean on CUDA).

Memory: the bytes autograd saves for the backward (``saved_tensors_hooks``), in total and beyond the
op's inputs (``new``: what the op adds to a training step's memory), and the CUDA peak.

Minimal bytes: a fused forward reads ``x``, ``v``, ``x_next``; a recomputing backward reads them again
and writes ``grad_v`` (with ``--kl``, ``v_ref`` is read in both): 7 (9) latent-sized tensors.
"""

from __future__ import annotations

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
from euphonium import ops  # noqa: E402
from euphonium.ops.sde import SCHEDULES, sde_log_prob_reference  # noqa: E402

SIZES = SizeSpec(
    presets=LATENT_PRESETS,
    default_cpu=["image", "wan480p"],
    default_cuda=["image", "wan480p", "wan480p-b4", "wan720p"],
    quick=["small"],
    dtypes=["bf16", "fp32"],
    quick_dtypes=["bf16"],
)
SIGMA, SIGMA_NEXT = 0.8, 0.7


def _forward_backward(fn, x, v, x_next, v_ref, grads, kw):
    """``fn``'s outputs (detached) and the gradient of ``sum(grads * outputs)`` with respect to ``v``."""
    out = fn(x, v, x_next, SIGMA, SIGMA_NEXT, v_ref=v_ref, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    (grad_v,) = torch.autograd.grad(outs, v, grads[: len(outs)])
    return tuple(o.detach() for o in outs) + (grad_v,)


def cases(shapes, dtypes, device, args):
    """One ``Case`` per (shape, dtype), built lazily so only one case's tensors are alive at a time."""
    compiled_ref = compiled(sde_log_prob_reference, args.compile_backend)
    for label, shape in shapes:
        for dtype_name in dtypes:
            yield _case(label, shape, dtype_name, device, args, compiled_ref)


def _case(label, shape, dtype_name, device, args, compiled_ref):
    dtype = DTYPES[dtype_name]
    kw = dict(schedule=args.schedule, noise_level=args.noise_level)
    x = torch.randn(shape, device=device).to(dtype)
    v = torch.randn(shape, device=device).to(dtype).requires_grad_(True)
    # A transition the rollout could have produced: x_next near the step's mean.
    with torch.no_grad():
        x_next = ops.sde_step(x, v.detach() + 0.1 * torch.randn_like(v), SIGMA, SIGMA_NEXT, **kw).x_next
    v_ref = (v.detach() + 0.05 * torch.randn_like(v)) if args.kl else None
    batch = shape[0]
    grads = (torch.randn(batch, device=device), torch.randn(batch, device=device))
    fns = {"eager": sde_log_prob_reference, "compile": compiled_ref, "euphonium": ops.sde_log_prob}
    return Case(
        label=label,
        dtype=dtype_name,
        shape=tuple(shape),
        bytes_moved=latent_bytes(shape, dtype, 9 if args.kl else 7),
        run={name: (lambda fn=fn: _forward_backward(fn, x, v, x_next, v_ref, grads, kw)) for name, fn in fns.items()},
        forward={
            name: (lambda fn=fn: fn(x, v, x_next, SIGMA, SIGMA_NEXT, v_ref=v_ref, **kw)) for name, fn in fns.items()
        },
        inputs=[t for t in (x, v, x_next, v_ref) if t is not None],
        params=dict(
            schedule=args.schedule, noise_level=args.noise_level, kl=args.kl, sigma=SIGMA, sigma_next=SIGMA_NEXT
        ),
    )


def parse_args(argv=None):
    """The command line (``argv`` or ``sys.argv``) of this benchmark."""
    parser = make_parser(__doc__.splitlines()[0], SIZES)
    parser.add_argument("--schedule", choices=[s for s in SCHEDULES if s != "ode"], default="flow_grpo")
    parser.add_argument("--noise-level", type=float, default=0.7, help="a of flow_grpo/cps, eta of dance_grpo")
    parser.add_argument("--kl", action="store_true", help="also the KL to a reference velocity v_ref")
    args = parser.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    device, shapes, dtypes, options = resolve_args(args, SIZES)
    name = "sde_log_prob" + ("_kl" if args.kl else "")
    notes = [
        f"forward + backward, schedule={args.schedule} noise_level={args.noise_level}, sigma {SIGMA} -> {SIGMA_NEXT}"
        + (", with KL to v_ref" if args.kl else "")
    ]
    return run_bench(
        name,
        "training log-prob, forward + backward in v",
        cases(shapes, dtypes, device, args),
        args,
        device,
        options,
        notes,
    )


if __name__ == "__main__":
    main()
