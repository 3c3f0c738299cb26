"""Benchmark ``euphonium.compat`` (the peers' step functions on the fused ops) against the peers' own steps.

``--peer flow_grpo``: ``euphonium.compat.flow_grpo.sde_step_with_logprob`` against Flow-GRPO's
``sde_step_with_logprob`` as published (``sde_type`` ``sde`` and ``cps``); ``--peer dance_grpo``:
``euphonium.compat.dance_grpo.flux_step`` against DanceGRPO's ``flux_step`` and upstream Euphonium's
guided one (a normalised PRM gradient, log-prob under the guided mean, upstream's defaults). ``eager``
is the peer's function written out here as published (whole-tensor ``.float()`` upcasts, one op at a
time), ``compile`` is ``torch.compile`` of it, ``euphonium`` the compat function.

Each variant runs in the two modes a trainer calls it in: ``rollout`` (no ``prev_sample``: the noise
drawn from the same generator by every provider, so outputs are compared) and ``train`` (a stored
``prev_sample``; forward and the backward of the log-prob into ``model_output``, with the bytes saved
for backward). dtype: ``model_output``'s (and for Flow-GRPO the sample's: ``fp32`` is what Flow-GRPO's
trainer passes after its ``.float()`` calls, ``bf16`` the inputs without them); DanceGRPO's latents
are fp32, as its trainers pass them.

Beyond time and memory each case records (``params``, printed as notes):

- ``first_ratio_max_dev``: ``max |exp(lp_train - lp_rollout) - 1|`` when the rollout runs on the whole
  batch with 1 thread and training recomputes each sample's log-prob alone with 2 threads (torch then
  splits a sample's reduction between the threads), per provider (eager and euphonium); 0 means the
  first importance ratio is exactly 1 (the guided step, whose gradient is normalised over the whole
  batch, is retrained on the whole batch);
- ``fp32_input_copies``: how many latent-sized fp32 copies of bf16 inputs one call makes (the ops' CPU
  path converts blocks of at most 2^18 elements, which at the ``small`` size is the whole tensor).

Minimal bytes: rollout reads ``sample`` and ``model_output`` and writes the latent-sized outputs the
peer returns (Flow-GRPO: ``prev_sample`` and ``prev_sample_mean``, fp32; DanceGRPO: ``prev_sample`` and
``pred_original_sample``); training reads ``sample``, ``model_output`` and ``prev_sample`` in the forward
and again in a recomputing backward, and writes those outputs and the gradient.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

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
from euphonium.compat import dance_grpo, flow_grpo  # noqa: E402

SIZES = SizeSpec(
    presets=LATENT_PRESETS,
    default_cpu=["image", "wan480p"],
    default_cuda=["image", "wan480p", "wan480p-b4"],
    quick=["small"],
    dtypes=["bf16", "fp32"],
    quick_dtypes=["bf16"],
)
FLOW_STEP = 3  # of a 10-step shift-3 schedule (sigma ~0.86)
DANCE_INDEX = 4  # of a 16-step shift-3 schedule
VARIANTS = {"flow_grpo": ("sde", "cps"), "dance_grpo": ("dance", "guided")}


# ------------------------------------------------------------------------------------------------
# The peers' steps as published (the eager baselines)
# ------------------------------------------------------------------------------------------------


def flow_grpo_eager(scheduler, model_output, timestep, sample, noise_level, prev_sample, generator, sde_type):
    """Flow-GRPO's ``sde_step_with_logprob``."""
    from diffusers.utils.torch_utils import randn_tensor

    model_output, sample = model_output.float(), sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    index = [scheduler.index_for_timestep(t) for t in timestep]
    view = (-1,) + (1,) * (sample.dim() - 1)
    sigma = scheduler.sigmas[index].view(view)
    sigma_prev = scheduler.sigmas[[i + 1 for i in index]].view(view)
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        if prev_sample is None:
            eps = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=model_output.dtype)
            prev_sample = mean + std_dev_t * torch.sqrt(-1 * dt) * eps
        std = std_dev_t * torch.sqrt(-1 * dt)
        log_prob = (
            -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
            - torch.log(std)
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        )
    else:
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        x0 = sample - sigma * model_output
        x1 = sample + model_output * (1 - sigma)
        mean = x0 * (1 - sigma_prev) + x1 * torch.sqrt(sigma_prev**2 - std_dev_t**2)
        if prev_sample is None:
            eps = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=model_output.dtype)
            prev_sample = mean + std_dev_t * eps
        log_prob = -((prev_sample.detach() - mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, mean, std_dev_t


def dance_grpo_eager(model_output, latents, eta, sigmas, index, prev_sample, reward_gradient=None, scale=0.1):
    """DanceGRPO's ``flux_step`` (``grpo=True``, ``sde_solver=True``); with a gradient, upstream
    Euphonium's (normalised gradient, log-prob under the guided mean: upstream's defaults)."""
    sigma = sigmas[index]
    dsigma = sigmas[index + 1] - sigma
    mean = latents + dsigma * model_output
    x0 = latents - sigma * model_output
    std_dev_t = eta * math.sqrt(sigma - sigmas[index + 1])
    score = -(latents - x0 * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score) * dsigma
    if reward_gradient is not None:
        norm = reward_gradient.norm()
        if norm > 0:
            mean = mean + scale * (reward_gradient / (norm + 1e-8)).to(mean.dtype)
    if prev_sample is None:
        prev_sample = mean + torch.randn_like(mean) * std_dev_t
    log_prob = (
        -((prev_sample.detach().to(torch.float32) - mean.to(torch.float32)) ** 2) / (2 * std_dev_t**2)
        - math.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return prev_sample, x0, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _flow_compat(scheduler, model_output, timestep, sample, noise_level, prev_sample, generator, sde_type):
    return flow_grpo.sde_step_with_logprob(
        scheduler, model_output, timestep, sample, noise_level, prev_sample, generator, sde_type
    )


def _dance_compat(model_output, latents, eta, sigmas, index, prev_sample, reward_gradient=None, scale=0.1):
    return dance_grpo.flux_step(
        model_output,
        latents,
        eta,
        sigmas,
        index,
        prev_sample,
        True,
        True,
        reward_gradient=reward_gradient,
        reward_gradient_scale=scale,
    )


# ------------------------------------------------------------------------------------------------
# Measurements beyond time
# ------------------------------------------------------------------------------------------------


class _InputUpcasts(TorchDispatchMode):
    """Counts conversions that make a latent-sized fp32 tensor from a tensor of another dtype."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            if out.dtype == torch.float32 and out.numel() == self.numel and src.dtype != torch.float32:
                self.count += 1
        return out


def fp32_input_copies(fn, numel) -> int:
    with torch.no_grad(), _InputUpcasts(numel) as log:
        fn()
    return log.count


def first_ratio_max_dev(rollout, train, batch, per_sample=True) -> float:
    """``max |exp(lp_train - lp_rollout) - 1|``: ``rollout()`` on the batch with 1 thread returns
    ``(prev_sample, log_prob)``, ``train(rows, prev_rows)`` each sample's log-prob alone with 2 threads
    (``per_sample=False``: the whole batch at once, with 2 threads)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            prev, lp = rollout()
        torch.set_num_threads(2)
        with torch.no_grad():
            if per_sample:
                lp_train = torch.cat([train(slice(b, b + 1), prev[b : b + 1]) for b in range(batch)])
            else:
                lp_train = train(slice(None), prev)
    finally:
        torch.set_num_threads(threads)
    return float((torch.exp(lp_train.double() - lp.double()) - 1).abs().max())


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def cases(shapes, dtypes, device, args):
    """One ``Case`` per (variant, mode, shape, dtype), built lazily."""
    if args.peer == "flow_grpo":
        fns = {"eager": flow_grpo_eager, "compile": compiled(flow_grpo_eager, args.compile_backend)}
        fns["euphonium"] = _flow_compat
    else:
        # Inductor's own RNG would draw other noise than eager's torch.randn_like: use aten's.
        import torch._inductor.config

        torch._inductor.config.fallback_random = True
        fns = {"eager": dance_grpo_eager, "compile": compiled(dance_grpo_eager, args.compile_backend)}
        fns["euphonium"] = _dance_compat
    for label, shape in shapes:
        for dtype_name in dtypes:
            for variant in VARIANTS[args.peer]:
                for mode in ("rollout", "train"):
                    yield _case(label, shape, dtype_name, device, args, variant, mode, fns)


def _flow_setup(shape, dtype, device):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10, device=device)
    timestep = scheduler.timesteps[FLOW_STEP].unsqueeze(0)
    x = torch.randn(shape, device=device).to(dtype)
    v = torch.randn(shape, device=device).to(dtype)
    return scheduler, timestep, x, v


def _generator(device):
    return torch.Generator(device=device).manual_seed(1234)


def _case(label, shape, dtype_name, device, args, variant, mode, fns):
    dtype = DTYPES[dtype_name]
    batch = shape[0]
    numel = math.prod(shape)
    if args.peer == "flow_grpo":
        scheduler, timestep, x, v_in = _flow_setup(shape, dtype, device)

        def call(fn, v, prev, rows=slice(None)):
            gen = _generator(device) if prev is None else None
            return fn(scheduler, v, timestep, x[rows], 0.7, prev, gen, variant)

        def log_prob_of(out):
            return out[1]

    else:
        sigmas = torch.linspace(1, 0, 17)
        sigmas = 3.0 * sigmas / (1 + 2.0 * sigmas)
        x = torch.randn(shape, device=device)  # fp32 latents, as the peers pass them
        v_in = torch.randn(shape, device=device).to(dtype)
        g = torch.randn(shape, device=device).to(dtype) if variant == "guided" else None

        def call(fn, v, prev, rows=slice(None)):
            if prev is None:
                torch.manual_seed(1234)  # the global generator, as the peers draw
            return fn(v, x[rows], 0.25, sigmas, DANCE_INDEX, prev, None if g is None else g[rows], 0.1)

        def log_prob_of(out):
            return out[2]

    with torch.no_grad():
        stored = call(fns["eager"], v_in, None)[0].detach()  # a rollout's prev_sample
    grad_out = torch.randn(batch, device=device)
    params = dict(peer=args.peer, variant=variant, mode=mode)
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    fp32_output = latent_bytes(shape, torch.float32, 1)
    if mode == "rollout":
        run = {name: (lambda fn=fn: _no_grad(call, fn, v_in)) for name, fn in fns.items()}
        forward = None
        bytes_moved = size(x) + size(v_in) + 2 * fp32_output
        params["fp32_input_copies"] = {
            name: fp32_input_copies(lambda fn=fns[name]: call(fn, v_in, None), numel) for name in ("eager", "euphonium")
        }
        # The guided step normalises by the whole batch's gradient norm (upstream): its training batch
        # must be the rollout's, so only the thread count changes there.
        split = variant != "guided"
        params["first_ratio_max_dev"] = {
            name: first_ratio_max_dev(
                lambda fn=fns[name]: (lambda out: (out[0], log_prob_of(out)))(call(fn, v_in, None)),
                lambda rows, prev, fn=fns[name]: log_prob_of(call(fn, v_in[rows], prev, rows)),
                batch if split else 1,
                per_sample=split,
            )
            for name in ("eager", "euphonium")
        }
    else:
        v = v_in.clone().requires_grad_(True)

        def forward_backward(fn):
            lp = log_prob_of(call(fn, v, stored))
            (grad_v,) = torch.autograd.grad(lp, v, grad_out)
            return lp.detach(), grad_v

        run = {name: (lambda fn=fn: forward_backward(fn)) for name, fn in fns.items()}
        forward = {name: (lambda fn=fn: log_prob_of(call(fn, v, stored))) for name, fn in fns.items()}
        # Forward and a recomputing backward read x, v and prev_sample; the latent-sized output the
        # peer returns (mean or pred_original_sample, fp32) and grad_v are written.
        bytes_moved = 2 * (size(x) + size(v_in) + size(stored)) + fp32_output + size(v_in)
        params["fp32_input_copies"] = {
            name: fp32_input_copies(lambda fn=fns[name]: call(fn, v_in, stored), numel)
            for name in ("eager", "euphonium")
        }
    return Case(
        label=f"{variant} {mode} {label}",
        dtype=dtype_name,
        shape=tuple(shape),
        bytes_moved=bytes_moved,
        run=run,
        forward=forward,
        inputs=[x, v_in, stored] + ([v] if mode == "train" else []),
        params=params,
    )


def _no_grad(call, fn, v):
    with torch.no_grad():
        return call(fn, v, None)


def parse_args(argv=None):
    """The command line (``argv`` or ``sys.argv``) of this benchmark."""
    parser = make_parser(__doc__.splitlines()[0], SIZES)
    parser.add_argument("--peer", choices=sorted(VARIANTS), default="flow_grpo", help="whose step (default flow_grpo)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, shapes, dtypes, options = resolve_args(args, SIZES)
    name = f"compat_{args.peer}"
    what = {
        "flow_grpo": "Flow-GRPO's sde_step_with_logprob (sde and cps, step 3 of 10, shift 3, a = 0.7)",
        "dance_grpo": "DanceGRPO's flux_step (eta 0.25, step 4 of 16, shift 3) and upstream Euphonium's guided one "
        "(normalised bf16 PRM gradient, scale 0.1, guided-mean log-prob)",
    }[args.peer]
    payload = run_bench(
        name,
        f"euphonium.compat against {what}: rollout, and training forward + backward",
        cases(shapes, dtypes, device, args),
        args,
        device,
        options,
        [f"{what}; rollout noise from the same generator for every provider"],
    )
    for case in payload["cases"]:
        p = case["params"]
        extra = f"fp32 copies of inputs {p['fp32_input_copies']}"
        if "first_ratio_max_dev" in p:
            extra += f", first ratio max |r - 1| {p['first_ratio_max_dev']}"
        print(f"# {case['case']} {case['dtype']}: {extra}")
    return payload


if __name__ == "__main__":
    main()
