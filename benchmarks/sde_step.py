"""Benchmark ``euphonium.ops.sde_step`` (one rollout step) against eager PyTorch and torch.compile.

The work timed is one SDE step ``sigma -> sigma_next`` of latents ``x`` with velocity ``v``:
``x_next``, ``x0_pred`` and the per-sample ``log_prob`` (DESIGN.md section 2). ``eager`` is
``sde_step_reference`` (the spec, upcasting whole tensors to fp32 as Flow-GRPO/DanceGRPO do),
``compile`` is ``torch.compile`` of it, ``euphonium`` is ``ops.sde_step`` (one fused kernel on CUDA).

Noise: ``--noise given`` (default) passes the same ``eps`` tensor to every provider (identical
work and outputs, checked against eager); ``--noise drawn`` times what a rollout does: ``eager`` and
``compile`` draw ``torch.randn_like(x)`` inside the step, ``euphonium`` draws Philox noise in the
kernel from a seed (streams differ, so only ``x0_pred`` is checked). ``--guided`` adds the
Euphonium guidance ``c * reward_grad`` to the mean.

Minimal bytes: read ``x``, ``v`` (and ``eps`` when given, ``reward_grad`` when guided), write
``x_next`` and ``x0_pred`` (the [B] log-probs are negligible).

CPU default: image and Wan 480p latents, bf16 and fp32, about 2 s of timing per case; the first run
also pays inductor's C++ compile of each graph (about a minute per graph on a busy 2-core machine,
cached in the inductor cache afterwards). ``--quick`` runs one small case.
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
from euphonium.ops.sde import SCHEDULES, sde_step_reference  # noqa: E402

SIZES = SizeSpec(
    presets=LATENT_PRESETS,
    default_cpu=["image", "wan480p"],
    default_cuda=["image", "wan480p", "wan480p-b4", "wan720p"],
    quick=["small"],
    dtypes=["bf16", "fp32"],
    quick_dtypes=["bf16"],
)
# A mid-trajectory step of a 10-step Flow-GRPO rollout (every sample at the same step, as in a rollout).
SIGMA, SIGMA_NEXT = 0.8, 0.7
GUIDANCE = 0.01 * (SIGMA - SIGMA_NEXT)  # lambda * delta, the upstream default lambda = 0.01


def _step_with_drawn_noise(x, v, sigma, sigma_next, **kwargs):
    """A peer trainer's step: draw ``eps`` with torch, then the reference step."""
    return sde_step_reference(x, v, sigma, sigma_next, torch.randn_like(x), **kwargs)


def cases(shapes, dtypes, device, args):
    """One ``Case`` per (shape, dtype), built lazily so only one case's tensors are alive at a time."""
    fns = (compiled(sde_step_reference, args.compile_backend), compiled(_step_with_drawn_noise, args.compile_backend))
    for label, shape in shapes:
        for dtype_name in dtypes:
            yield _case(label, shape, dtype_name, device, args, *fns)


def _case(label, shape, dtype_name, device, args, compiled_ref, compiled_drawn):
    dtype = DTYPES[dtype_name]
    x = torch.randn(shape, device=device).to(dtype)
    v = torch.randn(shape, device=device).to(dtype)
    g = (0.1 * torch.randn(shape, device=device)).to(dtype) if args.guided else None
    c = GUIDANCE if args.guided else 0.0
    kw = dict(schedule=args.schedule, noise_level=args.noise_level, reward_grad=g, guidance_scale=c)
    if args.noise == "given":
        eps = torch.randn(shape, device=device).to(dtype)
        run = {
            "eager": lambda: sde_step_reference(x, v, SIGMA, SIGMA_NEXT, eps, **kw),
            "compile": lambda: compiled_ref(x, v, SIGMA, SIGMA_NEXT, eps, **kw),
            "euphonium": lambda: ops.sde_step(x, v, SIGMA, SIGMA_NEXT, noise=eps, **kw),
        }
        checked = None
    else:
        run = {
            "eager": lambda: _step_with_drawn_noise(x, v, SIGMA, SIGMA_NEXT, **kw),
            "compile": lambda: compiled_drawn(x, v, SIGMA, SIGMA_NEXT, **kw),
            "euphonium": lambda: ops.sde_step(x, v, SIGMA, SIGMA_NEXT, seed=1234, **kw),
        }
        checked = lambda out: out.x0_pred  # noqa: E731 (the noise streams differ by design)
    reads = 2 + (args.noise == "given") + args.guided
    return Case(
        label=label,
        dtype=dtype_name,
        shape=tuple(shape),
        bytes_moved=latent_bytes(shape, dtype, reads + 2),
        run=run,
        checked=checked,
        params=dict(
            schedule=args.schedule,
            noise_level=args.noise_level,
            noise=args.noise,
            guided=args.guided,
            sigma=SIGMA,
            sigma_next=SIGMA_NEXT,
        ),
    )


def parse_args(argv=None):
    """The command line (``argv`` or ``sys.argv``) of this benchmark."""
    parser = make_parser(__doc__.splitlines()[0], SIZES)
    parser.add_argument("--schedule", choices=[s for s in SCHEDULES if s != "ode"], default="flow_grpo")
    parser.add_argument("--noise-level", type=float, default=0.7, help="a of flow_grpo/cps, eta of dance_grpo")
    parser.add_argument(
        "--noise",
        choices=["given", "drawn"],
        default="given",
        help="given: the same eps tensor for all; drawn: each provider draws its own (rollout)",
    )
    parser.add_argument("--guided", action="store_true", help="add the guidance c * reward_grad to the mean")
    parser.add_argument("--name", default=None, help="results file name (default sde_step[_drawn][_guided])")
    args = parser.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    device, shapes, dtypes, options = resolve_args(args, SIZES)
    name = args.name or "sde_step" + ("_drawn" if args.noise == "drawn" else "") + ("_guided" if args.guided else "")
    notes = [
        f"schedule={args.schedule} noise_level={args.noise_level} sigma {SIGMA} -> {SIGMA_NEXT}, noise {args.noise}"
        + (f", guided (c = {GUIDANCE:g})" if args.guided else "")
    ]
    return run_bench(
        name,
        "one SDE rollout step (x_next, x0_pred, log_prob)",
        cases(shapes, dtypes, device, args),
        args,
        device,
        options,
        notes,
    )


if __name__ == "__main__":
    main()
