"""Benchmark ``euphonium.ops.grpo_loss`` forward + backward (the clipped GRPO surrogate) against eager and compile.

The work timed is the loss and its statistics over ``[B, K]`` log-probs (``B`` samples, ``K``
trained steps) with one advantage per sample, then ``d loss / d log_prob``. ``eager`` is
``grpo_loss_ref``, ``compile`` is ``torch.compile`` of it, ``euphonium`` is
``euphonium.ops.grpo.grpo_loss_tensors`` (``ops.grpo_loss`` without the host sync that turns the statistics into
Python floats, so that no provider syncs; fused forward and backward on CUDA). ``--kl`` adds a
per-element KL penalty (differentiable too).

Minimal bytes: the forward reads ``log_prob``, ``old_log_prob`` (and ``kl``), the backward reads them
again and writes ``d log_prob`` (and ``d kl``); the ``[B]`` advantages are read twice. These are
small tensors: launch and framework overhead dominate except at the largest size.

Checked against eager: the loss, the statistics and the gradients, except the gradient of elements
whose ratio is within two fp32 ulps of a clip bound (about 1 in 500 at these ratios). There the
branch, and so the gradient (all or nothing), turns on the last bit of ``exp``, which differs
between PyTorch's and Triton's; and eager's fp32 products ``-A r`` and ``-A clip(r)`` can round
to the same value, where ``torch.maximum``'s backward gives half the gradient
(``tests/test_grpo_loss.py::test_rounding_ties_at_the_clip_bound``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

import torch  # noqa: E402

from benchmarks.common import DTYPES, Case, SizeSpec, compiled, make_parser, resolve_args, run_bench  # noqa: E402
from euphonium.ops.grpo import grpo_loss_ref, grpo_loss_tensors  # noqa: E402

SIZES = SizeSpec(
    presets={
        "b48k16": (48, 16),  # one GPU's batch, 16 trained steps
        "b1024k16": (1024, 16),  # a global batch
        "b65536k16": (65536, 16),  # far beyond real batches: the bandwidth-bound limit
    },
    default_cpu=["b48k16", "b1024k16", "b65536k16"],
    default_cuda=["b48k16", "b1024k16", "b65536k16"],
    quick=["b48k16"],
    dtypes=["fp32"],
)


def _forward_backward(fn, log_prob, old_log_prob, advantages, kl, kw):
    loss, stats = fn(log_prob, old_log_prob, advantages, kl=kl, **kw)
    wrt = [log_prob] if kl is None else [log_prob, kl]
    grads = torch.autograd.grad(loss, wrt)
    return (loss.detach(), stats, *grads)


def _near_clip_bounds(log_prob, old_log_prob, clip_range):
    """Elements whose fp32 ratio is within two ulps of ``1 - clip_range`` or ``1 + clip_range``."""
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    band = 2 * torch.finfo(torch.float32).eps
    return ((ratio - (1 - clip_range)).abs() <= band) | ((ratio - (1 + clip_range)).abs() <= band)


def cases(shapes, dtypes, device, args):
    """One ``Case`` per (shape, dtype), built lazily."""
    compiled_ref = compiled(grpo_loss_ref, args.compile_backend)
    for label, shape in shapes:
        if len(shape) != 2:
            raise SystemExit(f"grpo_loss sizes are [B, K], got {label}")
        for dtype_name in dtypes:
            yield _case(label, shape, dtype_name, device, args, compiled_ref)


def _case(label, shape, dtype_name, device, args, compiled_ref):
    dtype = DTYPES[dtype_name]
    # Log-probs are per-element means: ratios within ~1e-4 of 1, some beyond the clip range.
    old_log_prob = torch.randn(shape, device=device).to(dtype)
    log_prob = (old_log_prob.float() + 2e-4 * torch.randn(shape, device=device)).to(dtype).requires_grad_(True)
    advantages = torch.randn(shape[0], device=device).to(dtype)
    kl = (0.01 * torch.rand(shape, device=device)).to(dtype).requires_grad_(True) if args.kl else None
    kw = dict(clip_range=1e-4, adv_clip=5.0, kl_coef=0.01 if args.kl else 0.0)
    fns = {"eager": grpo_loss_ref, "compile": compiled_ref, "euphonium": grpo_loss_tensors}
    near = _near_clip_bounds(log_prob.detach(), old_log_prob, kw["clip_range"])
    numel, size = log_prob.numel(), log_prob.element_size()
    per_elem = 2 + args.kl  # log_prob, old_log_prob (, kl)
    return Case(
        label=label,
        dtype=dtype_name,
        shape=tuple(shape),
        bytes_moved=size * (numel * (2 * per_elem + 1 + args.kl) + 2 * shape[0]),
        run={
            name: (lambda fn=fn: _forward_backward(fn, log_prob, old_log_prob, advantages, kl, kw))
            for name, fn in fns.items()
        },
        checked=lambda out: (*out[:2], out[2].masked_fill(near, 0.0), *out[3:]),
        forward={name: (lambda fn=fn: fn(log_prob, old_log_prob, advantages, kl=kl, **kw)) for name, fn in fns.items()},
        inputs=[t for t in (log_prob, old_log_prob, advantages, kl) if t is not None],
        params=dict(kw, kl=args.kl),
    )


def parse_args(argv=None):
    """The command line (``argv`` or ``sys.argv``) of this benchmark."""
    parser = make_parser(__doc__.splitlines()[0], SIZES)
    parser.add_argument("--kl", action="store_true", help="add a per-element KL penalty (kl_coef 0.01)")
    args = parser.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    device, shapes, dtypes, options = resolve_args(args, SIZES)
    notes = [
        "forward + backward, clip_range 1e-4, adv_clip 5, advantages per sample" + (", with KL" if args.kl else "")
    ]
    return run_bench(
        "grpo_loss" + ("_kl" if args.kl else ""),
        "clipped GRPO loss, forward + backward",
        cases(shapes, dtypes, device, args),
        args,
        device,
        options,
        notes,
    )


if __name__ == "__main__":
    main()
