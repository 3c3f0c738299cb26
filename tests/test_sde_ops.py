"""ops.sde_step / ops.sde_log_prob on every backend against a float64 implementation of DESIGN.md.

Backends: ``reference`` (the eager spec), ``torch`` (the library's PyTorch path, what CPU tensors
run under ``auto``) and ``triton``: in Triton's interpreter on the CPU (small sizes), compiled on
CUDA (``gpu`` tests), and compiled ahead of time for sm_80/sm_90 (``aot`` tests).
"""

import math

import pytest
import torch
from scipy import stats

from euphonium import ops
from euphonium.ops import sde as sde_ops

SCHEDULES = ["flow_grpo", "dance_grpo", "cps", "ode"]
STOCHASTIC = ["flow_grpo", "dance_grpo", "cps"]
BACKENDS = ["reference", "torch", "triton"]
FUSED = ["torch", "triton"]  # no autograd graph: a custom backward that recomputes the mean
SHAPES = [(3, 5, 7), (2, 4, 3, 5, 7)]
SIGMA_MAX = 0.96
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# The spec, written from DESIGN.md section 2 in whatever dtype the inputs have (float64 for the
# ground truth; bfloat16 for the "eager in the same dtype" side of the bf16 accuracy rule).
# ----------------------------------------------------------------------------------------------


def _bcast(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def spec_step(x, v, sigma, sigma_next, *, schedule, a, sigma_max=SIGMA_MAX, g=None, c=None, eps=None):
    """DESIGN.md: mean, std, mean_g = mean + c g, x_next = mean_g + std eps, x0_pred = x - sigma v."""
    sigma, sigma_next = _bcast(sigma, x), _bcast(sigma_next, x)
    x0_pred = x - sigma * v
    if schedule == "cps":
        std = sigma_next * math.sin(a * math.pi / 2)
        x1 = x + (1 - sigma) * v
        mean = x0_pred * (1 - sigma_next) + x1 * torch.sqrt((sigma_next**2 - std**2).clamp_min(0))
    else:
        delta = sigma - sigma_next
        if schedule == "flow_grpo":
            sigma_tilde = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
            s = a * torch.sqrt(sigma / (1 - sigma_tilde))
        elif schedule == "dance_grpo":
            s = torch.full_like(sigma, a)
        else:
            s = torch.zeros_like(sigma)
        mean = x - delta * v - (s**2 * delta / (2 * sigma)) * (x + (1 - sigma) * v)
        std = s * torch.sqrt(delta)
    mean_g = mean if g is None else mean + _bcast(c, x) * g
    x_next = mean_g if eps is None else mean_g + std * eps
    return {"mean": mean, "mean_g": mean_g, "std": std, "x_next": x_next, "x0_pred": x0_pred}


def spec_log_prob(x_next, m, std):
    """Gaussian log-density averaged over the non-batch elements; 0 for a deterministic sample."""
    std_b = std.expand_as(m)
    safe = torch.where(std_b > 0, std_b, torch.ones_like(std_b))
    per_element = -((x_next - m) ** 2) / (2 * safe**2) - torch.log(safe) - HALF_LOG_2PI
    lp = per_element.flatten(1).mean(1)
    return torch.where(std_b.flatten(1)[:, 0] > 0, lp, torch.zeros_like(lp))


def spec_k(sigma, sigma_next, schedule, a, sigma_max=SIGMA_MAX):
    """d mean / d v per sample (DESIGN.md: k = -delta (1 + s^2 (1 - sigma) / (2 sigma)); cps: its own)."""
    one = torch.ones(sigma.shape[0], 1, dtype=sigma.dtype)
    zero = torch.zeros_like(one)
    return (spec_step(zero, one, sigma, sigma_next, schedule=schedule, a=a, sigma_max=sigma_max)["mean"]).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------


def draw_sigmas(batch, per_sample, schedule, device):
    """fp32-exact sigmas in (0, 1] with sigma_next in [0, sigma): floats or [B] tensors.

    Per-sample draws include sigma == 1 (flow_grpo's clamp) and sigma_next == 0 (the last step).
    """
    sigma = 0.3 + 0.65 * torch.rand(batch)
    sigma_next = sigma * (0.1 + 0.8 * torch.rand(batch))
    if per_sample:
        sigma[0] = 1.0
        sigma_next[0] = SIGMA_MAX
        sigma_next[-1] = 0.0
        return sigma.to(device), sigma_next.to(device)
    return float(sigma[0]), float(sigma_next[0])


def as64(value, batch):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double()
    return torch.full((batch,), float(value), dtype=torch.float64)


def make_case(shape, dtype, schedule, per_sample, guided, device):
    batch = shape[0]
    sigma, sigma_next = draw_sigmas(batch, per_sample, schedule, device)
    case = {
        "x": torch.randn(shape, device=device).to(dtype),
        "v": torch.randn(shape, device=device).to(dtype),
        "eps": torch.randn(shape, device=device).to(dtype),
        "sigma": sigma,
        "sigma_next": sigma_next,
        "a": float(torch.empty(()).uniform_(0.3, 0.9)),
        "g": None,
        "c": 0.0,
    }
    if guided:
        case["g"] = torch.randn(shape, device=device).to(dtype)
        case["c"] = (
            (0.05 + 0.1 * torch.rand(batch)).to(device) if per_sample else float(torch.empty(()).uniform_(0.05, 0.15))
        )
    return case


def run_step(case, schedule, backend, *, logprob_mean="unguided", noise=True, seed=None):
    with ops.use_backend(backend):
        return ops.sde_step(
            case["x"],
            case["v"],
            case["sigma"],
            case["sigma_next"],
            schedule=schedule,
            noise_level=case["a"],
            sigma_max=SIGMA_MAX,
            reward_grad=case["g"],
            guidance_scale=case["c"],
            noise=case["eps"] if noise else None,
            seed=seed,
            logprob_mean=logprob_mean,
        )


def log_prob_for(case, x_next, schedule, backend, *, guided, v=None, v_ref=None):
    """``ops.sde_log_prob`` of a stored transition; ``guided``: around the case's ``mean + c g``."""
    with ops.use_backend(backend):
        return ops.sde_log_prob(
            case["x"],
            case["v"] if v is None else v,
            x_next,
            case["sigma"],
            case["sigma_next"],
            schedule=schedule,
            noise_level=case["a"],
            sigma_max=SIGMA_MAX,
            v_ref=v_ref,
            reward_grad=case["g"] if guided else None,
            guidance_scale=case["c"] if guided else 0.0,
        )


def spec_for(case, schedule, dtype=torch.float64):
    batch = case["x"].shape[0]
    cast = lambda t: None if t is None else t.detach().cpu().to(dtype)  # noqa: E731
    return spec_step(
        cast(case["x"]),
        cast(case["v"]),
        as64(case["sigma"], batch).to(dtype),
        as64(case["sigma_next"], batch).to(dtype),
        schedule=schedule,
        a=case["a"],
        g=cast(case["g"]),
        c=as64(case["c"], batch).to(dtype),
        eps=cast(case["eps"]),
    )


def max_err(a, b):
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Correctness against the float64 spec.
# ----------------------------------------------------------------------------------------------


def check_step_against_spec(shape, dtype, schedule, backend, device):
    variants = [(False, False, "unguided"), (True, True, "unguided")]
    if schedule != "ode":
        variants.append((True, True, "guided"))
    for per_sample, guided, logprob_mean in variants:
        case = make_case(shape, dtype, schedule, per_sample, guided, device)
        out = run_step(case, schedule, backend, logprob_mean=logprob_mean)
        ref = spec_for(case, schedule)
        assert out.x_next.dtype == dtype and out.x0_pred.dtype == dtype and out.x_next.shape == shape
        m = ref["mean_g"] if logprob_mean == "guided" else ref["mean"]
        if schedule == "ode":
            assert out.log_prob is None
        else:
            assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (shape[0],)
        # The log-prob is that of the returned (rounded) x_next.
        lp_ref = None if schedule == "ode" else spec_log_prob(out.x_next.cpu().double(), m, ref["std"])
        if dtype == torch.float32:
            torch.testing.assert_close(out.x_next.cpu().double(), ref["x_next"], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(out.x0_pred.cpu().double(), ref["x0_pred"], atol=2e-5, rtol=2e-5)
            if lp_ref is not None:
                torch.testing.assert_close(out.log_prob.cpu().double(), lp_ref, atol=2e-4, rtol=2e-5)
            continue
        # bf16/fp16 rule: at least as accurate as the eager computation in the same dtype.
        eager = spec_for(case, schedule, dtype=dtype)
        assert max_err(out.x_next, ref["x_next"]) <= 2 * max_err(eager["x_next"], ref["x_next"]) + 1e-3
        assert max_err(out.x0_pred, ref["x0_pred"]) <= 2 * max_err(eager["x0_pred"], ref["x0_pred"]) + 1e-3
        if lp_ref is not None:
            m_eager = eager["mean_g"] if logprob_mean == "guided" else eager["mean"]
            lp_eager = spec_log_prob(out.x_next.cpu().to(dtype), m_eager, eager["std"])
            assert max_err(out.log_prob, lp_ref) <= 2 * max_err(lp_eager, lp_ref) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_spec(backend, schedule, shape, dtype):
    check_step_against_spec(shape, dtype, schedule, backend, "cpu")


def check_log_prob_against_spec(shape, dtype, schedule, backend, device):
    # guided: the density around mean + c g (float and [B] scales); the KL does not see the shift.
    for per_sample, guided in ((False, False), (True, False), (False, True), (True, True)):
        case = make_case(shape, dtype, schedule, per_sample, guided, device)
        ref = spec_for(case, schedule)
        x_next = ref["x_next"].to(device=device, dtype=dtype)  # a stored transition
        v_ref = (case["v"].float() + 0.3 * torch.randn(shape, device=device)).to(dtype)
        lp, kl = log_prob_for(case, x_next, schedule, backend, guided=guided, v_ref=v_ref)
        lp_only = log_prob_for(case, x_next, schedule, backend, guided=guided)
        assert torch.equal(lp, lp_only)
        if guided:
            _, kl_unguided = log_prob_for(case, x_next, schedule, backend, guided=False, v_ref=v_ref)
            assert torch.equal(kl, kl_unguided)
        assert lp.dtype == kl.dtype == torch.float32 and lp.shape == kl.shape == (shape[0],)
        m_key = "mean_g" if guided else "mean"
        lp_ref = spec_log_prob(x_next.cpu().double(), ref[m_key], ref["std"])
        ref_v = spec_for({**case, "v": v_ref}, schedule)
        std = ref["std"].flatten(1)[:, 0]
        kl_ref = ((ref["mean"] - ref_v["mean"]) ** 2).flatten(1).mean(1) / (2 * torch.where(std > 0, std, 1) ** 2)
        kl_ref = torch.where(std > 0, kl_ref, 0)
        if dtype == torch.float32:
            torch.testing.assert_close(lp.cpu().double(), lp_ref, atol=2e-4, rtol=2e-5)
            torch.testing.assert_close(kl.cpu().double(), kl_ref, atol=2e-4, rtol=2e-5)
        else:
            eager = spec_for(case, schedule, dtype=dtype)
            eager_v = spec_for({**case, "v": v_ref}, schedule, dtype=dtype)
            lp_eager = spec_log_prob(x_next.cpu(), eager[m_key], eager["std"])
            eager_std = eager["std"].flatten(1)[:, 0]
            kl_eager = ((eager["mean"] - eager_v["mean"]) ** 2).flatten(1).mean(1) / (
                2 * torch.where(eager_std > 0, eager_std, 1) ** 2
            )
            kl_eager = torch.where(eager_std > 0, kl_eager, 0)
            assert max_err(lp, lp_ref) <= 2 * max_err(lp_eager, lp_ref) + 1e-3
            assert max_err(kl, kl_ref) <= 2 * max_err(kl_eager, kl_ref) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("schedule", STOCHASTIC)
@pytest.mark.parametrize("backend", BACKENDS)
def test_log_prob_matches_spec(backend, schedule, dtype):
    check_log_prob_against_spec((3, 5, 7), dtype, schedule, backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_and_mixed_dtypes(backend):
    shape = (2, 3, 11)
    for x_dtype, v_dtype in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)):
        case = make_case(shape, x_dtype, "flow_grpo", True, True, "cpu")
        case["v"] = case["v"].to(v_dtype)
        case["eps"] = case["eps"].float()
        out = run_step(case, "flow_grpo", backend)
        ref = spec_for(case, "flow_grpo")
        assert out.x_next.dtype == x_dtype and torch.isfinite(out.log_prob).all()
        eager = spec_for(case, "flow_grpo", dtype=x_dtype)
        assert max_err(out.x_next, ref["x_next"]) <= 2 * max_err(eager["x_next"], ref["x_next"]) + 1e-3
        with ops.use_backend(backend):
            lp = ops.sde_log_prob(
                case["x"],
                case["v"],
                out.x_next,
                case["sigma"],
                case["sigma_next"],
                noise_level=case["a"],
                sigma_max=SIGMA_MAX,
            )
        assert torch.equal(lp, out.log_prob)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_awkward_layouts(backend, monkeypatch):
    # Non-contiguous inputs, several blocks per sample with a ragged last block, the 64-bit index
    # variant (forced through its threshold), many partials per sample (small blocks: the finalize
    # loops over several chunks) and a [B] tensor sigma of another float dtype.
    from euphonium.kernels import sde as kernels

    x = torch.randn(2, 37, 3, 41).transpose(1, 3)
    v = torch.randn(2, 41, 3, 37)
    sigma = torch.tensor([0.9, 0.7], dtype=torch.float64)
    out_ref = ops.sde_step(x, v, sigma, 0.5, noise=torch.randn(x.shape), schedule="dance_grpo", noise_level=0.3)
    with ops.use_backend(backend):
        out = ops.sde_step(x, v, sigma, 0.5, noise=None, seed=3, schedule="dance_grpo", noise_level=0.3)
        lp = ops.sde_log_prob(x, v, out.x_next, sigma, 0.5, schedule="dance_grpo", noise_level=0.3)
        assert torch.equal(lp, out.log_prob)
        if backend == "triton":
            with monkeypatch.context() as m:
                m.setattr(kernels, "INDEX32_LIMIT", 16)
                out64 = ops.sde_step(x, v, sigma, 0.5, noise=None, seed=3, schedule="dance_grpo", noise_level=0.3)
            assert torch.equal(out64.x_next, out.x_next) and torch.equal(out64.log_prob, out.log_prob)
            with monkeypatch.context() as m:
                m.setattr(kernels, "MAX_BLOCK", 128)  # 36 blocks per sample: finalized in 5 chunks of 8
                m.setattr(kernels, "REDUCE_BLOCK", 8)
                small = ops.sde_step(x, v, sigma, 0.5, noise=None, seed=3, schedule="dance_grpo", noise_level=0.3)
                lp_small = ops.sde_log_prob(x, v, out.x_next, sigma, 0.5, schedule="dance_grpo", noise_level=0.3)
            assert torch.equal(small.x_next, out.x_next) and torch.equal(lp_small, small.log_prob)
            torch.testing.assert_close(lp_small, out.log_prob, atol=1e-5, rtol=1e-6)
        if backend == "torch":
            from euphonium.ops import _sde_torch

            # Per-block Philox noise is the whole tensor's stream.
            eps = ops.philox_randn(3, x.numel()).reshape(x.shape)
            given = ops.sde_step(x, v, sigma, 0.5, noise=eps, schedule="dance_grpo", noise_level=0.3)
            assert torch.equal(given.x_next, out.x_next) and torch.equal(given.log_prob, out.log_prob)
            # 4551 elements per sample: slices of one sample with a ragged last slice, then blocks of two
            # samples; row sums in pieces of 64 with a ragged tail.
            for block in (1000, 10000):
                with monkeypatch.context() as m:
                    m.setattr(_sde_torch, "BLOCK_ELEMENTS", block)
                    m.setattr(_sde_torch, "SUM_WIDTH", 64)
                    small = ops.sde_step(x, v, sigma, 0.5, noise=None, seed=3, schedule="dance_grpo", noise_level=0.3)
                    lp_small = ops.sde_log_prob(x, v, small.x_next, sigma, 0.5, schedule="dance_grpo", noise_level=0.3)
                assert torch.equal(small.x_next, out.x_next) and torch.equal(small.x0_pred, out.x0_pred)
                assert torch.equal(lp_small, small.log_prob)
                torch.testing.assert_close(lp_small, out.log_prob, atol=1e-6, rtol=1e-7)
    torch.testing.assert_close(out.x0_pred, out_ref.x0_pred, atol=1e-5, rtol=1e-5)
    ref = spec_step(
        x.double(), v.double(), sigma, torch.full((2,), 0.5, dtype=torch.float64), schedule="dance_grpo", a=0.3
    )
    eps = (out.x_next.double() - ref["mean"]) / ref["std"]
    assert eps.abs().max() < 7 and abs(eps.std().item() - 1) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_tensors_and_strided_per_sample_arguments(backend):
    # Kernels read sigma, sigma_next and guidance_scale at ptr + b: 0-d tensors (broadcast to the
    # batch) and strided [B] views (a column of a [B, T] schedule) must give the values they hold.
    # Also a batch of one and one element per sample.
    for shape in ((4, 3, 5), (1, 6), (3, 1)):
        batch = shape[0]
        x, v, g, eps = (torch.randn(shape) for _ in range(4))
        table = torch.rand(batch, 3) * 0.5 + 0.4  # sigma in column 1, guidance scale in column 2
        args = [
            (torch.tensor(0.7), torch.tensor(0.45), torch.tensor(0.2)),
            (table[:, 1], table[:, 1] * table[:, 0], table[:, 2]),
        ]
        for sigma, sigma_next, c in args:
            with ops.use_backend(backend):
                out = ops.sde_step(
                    x,
                    v,
                    sigma,
                    sigma_next,
                    schedule="flow_grpo",
                    noise_level=0.7,
                    reward_grad=g,
                    guidance_scale=c,
                    noise=eps,
                )
                lp = ops.sde_log_prob(x, v, out.x_next, sigma, sigma_next, schedule="flow_grpo", noise_level=0.7)
            ref = spec_step(
                x.double(),
                v.double(),
                as64(sigma.expand(batch), batch),
                as64(sigma_next.expand(batch), batch),
                schedule="flow_grpo",
                a=0.7,
                g=g.double(),
                c=as64(c.expand(batch), batch),
                eps=eps.double(),
            )
            torch.testing.assert_close(out.x_next.double(), ref["x_next"], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(
                lp.double(), spec_log_prob(out.x_next.double(), ref["mean"], ref["std"]), atol=2e-4, rtol=2e-5
            )


# ----------------------------------------------------------------------------------------------
# The published steps (guidance off), written from the papers' equations.
# ----------------------------------------------------------------------------------------------


def flow_grpo_paper_step(x, v, t, t_next, a, eps, t_max):
    """Flow-GRPO (Liu et al. 2025), the SDE sampler: with sigma_t = a sqrt(t / (1 - t)),
    x_{t+dt} = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt + sigma_t sqrt(-dt) eps, dt = t_next - t < 0
    (t ~ sigma; the code clamps the denominator at t = 1 with the second sigma of the schedule)."""
    dt = t_next - t
    sigma_t = a * math.sqrt(t / (1 - (t_max if t == 1 else t)))
    mean = x + (v + sigma_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = sigma_t * math.sqrt(-dt)
    x_next = mean + std * eps
    log_prob = (
        (-((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).flatten(1).mean(1)
    )
    return x_next, log_prob


def dance_grpo_paper_step(z, u, t, t_next, eta, eps):
    """DanceGRPO (Xue et al. 2025), rectified-flow SDE dz = (u - eta^2 / 2 * score) dt + eta dw with the
    score of z_t = (1 - t) x0 + t noise given x0_hat = z - t u: score = -(z - (1 - t) x0_hat) / t^2."""
    dt = t_next - t
    x0_hat = z - t * u
    score = -(z - (1 - t) * x0_hat) / t**2
    mean = z + (u - 0.5 * eta**2 * score) * dt
    std = eta * math.sqrt(-dt)
    z_next = mean + std * eps
    log_prob = (-((z_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    return z_next, x0_hat, log_prob


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproduces_flow_grpo_step(backend):
    x, v, eps = torch.randn(3, 4, 6, 5), torch.randn(3, 4, 6, 5), torch.randn(3, 4, 6, 5)
    for t, t_next in ((1.0, SIGMA_MAX), (0.7, 0.6), (0.2, 0.0)):
        x_next, lp = flow_grpo_paper_step(x, v, t, t_next, 0.7, eps, SIGMA_MAX)
        with ops.use_backend(backend):
            out = ops.sde_step(x, v, t, t_next, schedule="flow_grpo", noise_level=0.7, sigma_max=SIGMA_MAX, noise=eps)
        torch.testing.assert_close(out.x_next, x_next, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.log_prob, lp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproduces_dance_grpo_step(backend):
    z, u, eps = torch.randn(2, 3, 7, 9), torch.randn(2, 3, 7, 9), torch.randn(2, 3, 7, 9)
    for t, t_next in ((1.0, 0.95), (0.6, 0.5), (0.1, 0.0)):
        z_next, x0_hat, lp = dance_grpo_paper_step(z, u, t, t_next, 0.3, eps)
        with ops.use_backend(backend):
            out = ops.sde_step(z, u, t, t_next, schedule="dance_grpo", noise_level=0.3, noise=eps)
        torch.testing.assert_close(out.x_next, z_next, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.x0_pred, x0_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.log_prob, lp, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Rollout log-prob == training log-prob, bit for bit.
# ----------------------------------------------------------------------------------------------


def check_same_bits(backend, device):
    """The training log-prob of a rollout's step is its log-prob, bit for bit, under either mean:
    ``logprob_mean="guided"`` with the step's ``reward_grad``/``guidance_scale`` passed to
    ``sde_log_prob``; float and [B] scales, given and in-kernel noise, awkward shapes and dtypes."""
    cases = [
        ((3, 5, 7), torch.float32, "flow_grpo", True),
        ((3, 5, 7), torch.float32, "flow_grpo", False),
        ((2, 4, 3, 5, 7), torch.bfloat16, "cps", True),
        ((2, 3000), torch.bfloat16, "dance_grpo", True),
        ((2, 3000), torch.float32, "cps", False),
        ((3, 1), torch.bfloat16, "dance_grpo", False),
        ((1, 2, 37, 41), torch.float32, "dance_grpo", True),
    ]
    for shape, dtype, schedule, per_sample in cases:
        case = make_case(shape, dtype, schedule, per_sample, True, device)
        for noise in (True, False):
            for logprob_mean in ("unguided", "guided"):
                guided = logprob_mean == "guided"
                out = run_step(
                    case, schedule, backend, noise=noise, seed=None if noise else 11, logprob_mean=logprob_mean
                )
                lp = log_prob_for(case, out.x_next, schedule, backend, guided=guided)
                where = (shape, dtype, schedule, per_sample, noise, logprob_mean)
                assert torch.equal(lp, out.log_prob), where
                assert torch.exp(lp - out.log_prob).eq(1).all()
                # The other mean gives another density (so the check above can fail).
                other = log_prob_for(case, out.x_next, schedule, backend, guided=not guided)
                assert not torch.equal(other, out.log_prob), where


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_and_log_prob_same_bits(backend):
    check_same_bits(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_log_prob_same_bits_on_awkward_layouts(backend, monkeypatch):
    # Non-contiguous x and reward_grad (of different layouts), a float64 [B] scale, Philox noise; on
    # the fused paths also several blocks per sample, the 64-bit index variant and small blocks.
    from euphonium.kernels import sde as kernels
    from euphonium.ops import _sde_torch

    x = torch.randn(2, 37, 3, 41).transpose(1, 3)
    v = torch.randn(2, 41, 3, 37)
    g = torch.randn(2, 3, 37, 41).permute(0, 3, 1, 2)
    c = torch.tensor([0.15, 0.04], dtype=torch.float64)
    sigma = torch.tensor([0.9, 0.7])
    kw = dict(schedule="flow_grpo", noise_level=0.7, sigma_max=SIGMA_MAX)

    def step_and_log_prob():
        out = ops.sde_step(x, v, sigma, 0.5, reward_grad=g, guidance_scale=c, seed=9, logprob_mean="guided", **kw)
        return out, ops.sde_log_prob(x, v, out.x_next, sigma, 0.5, reward_grad=g, guidance_scale=c, **kw)

    patches = {
        "reference": [{}],
        "torch": [{}, {(_sde_torch, "BLOCK_ELEMENTS"): 1000, (_sde_torch, "SUM_WIDTH"): 64}],
        "triton": [{}, {(kernels, "INDEX32_LIMIT"): 16}, {(kernels, "MAX_BLOCK"): 128, (kernels, "REDUCE_BLOCK"): 8}],
    }[backend]
    with ops.use_backend(backend):
        for patch in patches:
            with monkeypatch.context() as m:
                for (module, name), value in patch.items():
                    m.setattr(module, name, value)
                out, lp = step_and_log_prob()
            assert torch.equal(lp, out.log_prob), patch
            unguided = ops.sde_log_prob(x, v, out.x_next, sigma, 0.5, **kw)
            assert not torch.equal(unguided, lp)
    ref = spec_step(
        x.double(),
        v.double(),
        sigma.double(),
        torch.full((2,), 0.5, dtype=torch.float64),
        schedule="flow_grpo",
        a=0.7,
        g=g.double(),
        c=c.float().double(),
    )
    torch.testing.assert_close(
        lp.double(), spec_log_prob(out.x_next.double(), ref["mean_g"], ref["std"]), atol=2e-4, rtol=2e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_log_prob_of_a_mixed_batch(backend, dtype):
    # A training batch gathers samples from different steps of different rollouts: guided steps
    # (each with its own scale) and unguided ones, given a zero scale and any finite reward_grad.
    # Each sample's log-prob is the bits its own step recorded.
    shape = (3, 4, 50)
    x, v, g = (torch.randn(shape).to(dtype) for _ in range(3))
    sigma = torch.tensor([0.9, 0.6, 0.8])
    sigma_next = torch.tensor([0.8, 0.3, 0.75])
    scales = [0.2, 0.0, 0.07]  # sample 1 was not guided
    kw = dict(schedule="flow_grpo", noise_level=0.7, sigma_max=SIGMA_MAX, logprob_mean="guided")
    recorded, x_next = [], []
    with ops.use_backend(backend):
        for i, c in enumerate(scales):
            guidance = dict(reward_grad=g[i : i + 1], guidance_scale=c) if c else {}
            out = ops.sde_step(
                x[i : i + 1], v[i : i + 1], float(sigma[i]), float(sigma_next[i]), seed=i, **guidance, **kw
            )
            recorded.append(out.log_prob)
            x_next.append(out.x_next)
        kw.pop("logprob_mean")
        lp = ops.sde_log_prob(
            x, v, torch.cat(x_next), sigma, sigma_next, reward_grad=g, guidance_scale=torch.tensor(scales), **kw
        )
    assert torch.equal(lp, torch.cat(recorded))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_guidance_shifts_the_mean_by_rho_std(backend, dtype):
    # The rho guidance form: with a unit-norm g per sample (as ops.reward_grad(normalize=True)
    # returns) and guidance_scale = rho * std, the guided step moves each sample by exactly rho * std
    # in L2 norm (same noise: x_next(guided) - x_next(unguided) = c g); a zero g moves it by 0.
    shape = (4, 3, 5, 7)
    batch = shape[0]
    x, v = (0.1 * torch.randn(shape)).to(dtype), (0.1 * torch.randn(shape)).to(dtype)
    eps = torch.randn(shape).to(dtype)
    g64 = torch.randn(shape, dtype=torch.float64)
    g64[2] = 0.0  # a sample without a reward gradient
    norms = g64.flatten(1).norm(dim=1)
    g64 = g64 / torch.where(norms > 0, norms, 1).reshape(-1, 1, 1, 1)
    g = g64.to(dtype)
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.3])
    sigma_next = torch.tensor([SIGMA_MAX, 0.7, 0.45, 0.1])
    rho = 2.0
    bits = {torch.float32: 23, torch.bfloat16: 7}[dtype]

    def ulp(t, mantissa_bits):  # spacing of the floats around |t| (of the normal range)
        _, exponent = torch.frexp(t.double().abs().clamp_min(2.0**-100))
        return torch.pow(2.0, (exponent - 1 - mantissa_bits).double())

    for schedule in STOCHASTIC:
        std = spec_step(
            torch.zeros(batch, 1, dtype=torch.float64),
            torch.zeros(batch, 1, dtype=torch.float64),
            sigma.double(),
            sigma_next.double(),
            schedule=schedule,
            a=0.6,
        )["std"].reshape(-1)
        c = (rho * std).float()
        kw = dict(schedule=schedule, noise_level=0.6, sigma_max=SIGMA_MAX, noise=eps)
        with ops.use_backend(backend):
            guided = ops.sde_step(x, v, sigma, sigma_next, reward_grad=g, guidance_scale=c, **kw)
            plain = ops.sde_step(x, v, sigma, sigma_next, **kw)
            zero = ops.sde_step(x, v, sigma, sigma_next, reward_grad=torch.zeros_like(g), guidance_scale=c, **kw)
        diff = guided.x_next.double() - plain.x_next.double()
        shift = diff.flatten(1).norm(dim=1)
        expected = rho * std * (norms > 0)
        # |shift - c| <= || error of the difference || + c || g - g64 ||: each x_next rounded once to its
        # dtype, a few fp32 roundings of the step's terms (magnitudes of x, v, eps, x_next) before that.
        terms = x.double().abs() + v.double().abs() + eps.double().abs() + guided.x_next.double().abs()
        per_element = (ulp(guided.x_next, bits) + ulp(plain.x_next, bits)) / 2 + 8 * ulp(terms, 23)
        tol = per_element.flatten(1).norm(dim=1) + c.double() * (g.double() - g64).flatten(1).norm(dim=1)
        assert ((shift - expected).abs() <= tol).all(), (schedule, shift, expected, tol)
        assert (tol[norms > 0] < 0.1 * expected[norms > 0]).all(), tol  # the check has teeth
        assert shift[2] == 0 and torch.equal(zero.x_next, plain.x_next)


# ----------------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("schedule", STOCHASTIC)
@pytest.mark.parametrize("backend", ["reference", "torch"])  # the kernels compute in fp32 only
def test_gradcheck(backend, schedule, guided):
    shape = (3, 2, 5)
    case = make_case(shape, torch.float64, schedule, True, guided, "cpu")
    ref = spec_for(case, schedule)
    x_next = ref["x_next"] + 0.1 * torch.randn(shape, dtype=torch.float64)  # not exactly the guided mean's noise
    v_ref = torch.randn(shape, dtype=torch.float64)
    v = case["v"].clone().requires_grad_(True)

    def fn(v_):
        return log_prob_for(case, x_next, schedule, backend, guided=guided, v=v_, v_ref=v_ref)

    assert fn(v)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # The documented closed form: d log_prob / d v = k (x_next - m) / (std^2 N), m = mean or mean + c g.
    lp, kl = fn(v)
    (grad,) = torch.autograd.grad(lp.sum(), v)
    k = spec_k(as64(case["sigma"], 3), as64(case["sigma_next"], 3), schedule, case["a"])
    std = ref["std"].flatten(1)[:, 0]
    n = x_next[0].numel()
    m = ref["mean_g"] if guided else ref["mean"]
    closed = torch.where(std > 0, k / (std.clamp_min(1e-30) ** 2 * n), 0).reshape(-1, 1, 1) * (x_next - m)
    torch.testing.assert_close(grad, closed, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(lp, spec_log_prob(x_next, m, ref["std"]), atol=1e-10, rtol=1e-10)
    # The KL term is the same with or without guidance (the shift cancels in mean_theta - mean_ref).
    _, kl_unguided = log_prob_for(case, x_next, schedule, backend, guided=False, v=v.detach(), v_ref=v_ref)
    assert torch.equal(kl.detach(), kl_unguided)


def check_backward_matches_reference(shape, dtype, schedule, device, backend="triton", guided=False):
    case = make_case(shape, dtype, schedule, True, guided, device)
    x_next = spec_for(case, schedule)["x_next"].to(device=device, dtype=dtype)
    v_ref = (case["v"].float() + 0.2 * torch.randn(shape, device=device)).to(dtype)
    g_lp, g_kl = torch.randn(shape[0], device=device), torch.randn(shape[0], device=device)
    grads = {}
    for name in ("reference", backend):
        v = case["v"].clone().requires_grad_(True)
        lp, kl = log_prob_for(case, x_next, schedule, name, guided=guided, v=v, v_ref=v_ref)
        (grads[name],) = torch.autograd.grad((lp * g_lp).sum() + (kl * g_kl).sum(), v)
        lp_only = log_prob_for(case, x_next, schedule, name, guided=guided, v=v)
        (grads[name + "_lp"],) = torch.autograd.grad(lp_only.sum(), v)
        assert grads[name].dtype == dtype
    scale = grads["reference"].float().abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grads[backend].float(), grads["reference"].float(), atol=tol * scale, rtol=tol)
    scale = grads["reference_lp"].float().abs().max().item()
    torch.testing.assert_close(
        grads[backend + "_lp"].float(), grads["reference_lp"].float(), atol=tol * scale, rtol=tol
    )


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("schedule", STOCHASTIC)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_backward_matches_reference(backend, schedule, guided):
    check_backward_matches_reference((3, 5, 7), torch.float32, schedule, "cpu", backend, guided=guided)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_backward_bf16(backend, guided):
    check_backward_matches_reference((2, 3, 20), torch.bfloat16, "flow_grpo", "cpu", backend, guided=guided)


def test_torch_path_saves_only_inputs_and_sums_independently_of_threads(monkeypatch):
    # The autograd graph keeps x, v, x_next (and the [B] sigmas it made), nothing latent-sized of its
    # own; the log-prob's bits do not depend on torch's thread count (rollout and training may
    # differ), with several blocks per sample and rows summed in pieces with a tail.
    from euphonium.ops import _sde_torch

    monkeypatch.setattr(_sde_torch, "BLOCK_ELEMENTS", 40_000)
    monkeypatch.setattr(_sde_torch, "SUM_WIDTH", 96)
    # x_next far from the mean: the residual term dominates the log-prob, so a sum's last bit shows.
    x, x_next = torch.randn(8, 4, 25_000), 30 * torch.randn(8, 4, 25_000)
    v = torch.randn(8, 4, 25_000, requires_grad=True)
    saved = []
    with (
        ops.use_backend("torch"),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        lp = ops.sde_log_prob(x, v, x_next, 0.9, 0.6, schedule="dance_grpo", noise_level=0.4)
    inputs = {t.untyped_storage().data_ptr() for t in (x, v, x_next)}
    assert sum(t.numel() for t in saved if t.untyped_storage().data_ptr() not in inputs) <= 2 * x.shape[0]
    threads = torch.get_num_threads()
    try:
        bits = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with ops.use_backend("torch"):
                bits.append(ops.sde_log_prob(x, v.detach(), x_next, 0.9, 0.6, schedule="dance_grpo", noise_level=0.4))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bits[0], lp) and torch.equal(bits[1], lp) and torch.equal(bits[2], lp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_sample_has_zero_log_prob_and_gradient(backend):
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4, requires_grad=True)
    sigma, sigma_next = torch.tensor([0.5, 0.4]), torch.tensor([0.0, 0.2])
    with ops.use_backend(backend):
        out = ops.sde_step(x, v.detach(), sigma, sigma_next, schedule="cps", noise_level=0.5, seed=1)
        lp = ops.sde_log_prob(x, v, out.x_next, sigma, sigma_next, schedule="cps", noise_level=0.5)
        (grad,) = torch.autograd.grad(lp.sum(), v)
    assert out.log_prob[0] == 0 and lp[0] == 0 and (grad[0] == 0).all() and (grad[1] != 0).any()
    torch.testing.assert_close(out.x_next[0], (x[0] - 0.5 * v[0].detach()) * 1.0, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# torch.compile traces through the ops (torch.library custom ops while compiling).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, v, v_ref = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 5)

    g, c = torch.randn(2, 3, 5), torch.tensor([0.2, 0.05])

    def loss(x, v, x_next, v_ref):
        lp, kl = ops.sde_log_prob(x, v, x_next, 0.8, 0.6, v_ref=v_ref)
        lp_guided = ops.sde_log_prob(x, v, x_next, 0.8, 0.6, reward_grad=g, guidance_scale=c)
        return (lp * torch.arange(1.0, 3.0)).sum() + 0.1 * kl.sum() + 0.3 * lp_guided.sum()

    with ops.use_backend(backend):
        step = torch.compile(lambda x, v: ops.sde_step(x, v, 0.8, 0.6, seed=4), backend="aot_eager", fullgraph=True)
        compiled, eager = step(x, v), ops.sde_step(x, v, 0.8, 0.6, seed=4)
        assert torch.equal(compiled.x_next, eager.x_next) and torch.equal(compiled.log_prob, eager.log_prob)
        grads = []
        for fn in (torch.compile(loss, backend="aot_eager", fullgraph=True), loss):
            v_ = v.clone().requires_grad_(True)
            fn(x, v_, eager.x_next, v_ref).backward()
            grads.append(v_.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_custom_ops_pass_opcheck(backend):
    x, v, x_next, v_ref = (torch.randn(2, 3, 5) for _ in range(4))
    sigma, sigma_next = torch.tensor([0.9, 0.8]), torch.tensor([0.5, 0.0])
    torch.library.opcheck(
        sde_ops._sde_step_op, (x, v, sigma, sigma_next, v_ref, sigma, None, 7, "cps", 0.6, None, False, backend)
    )
    v.requires_grad_(True)
    for g, c in ((None, None), (v_ref, torch.tensor([0.3, 0.0]))):
        torch.library.opcheck(
            sde_ops._sde_log_prob_op, (x, v, x_next, v_ref, g, c, sigma, sigma_next, "flow_grpo", 0.7, None, backend)
        )


# ----------------------------------------------------------------------------------------------
# Every output element written (NaN-poisoned allocations).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
def test_fused_paths_write_every_output_element(backend, monkeypatch):
    from euphonium.kernels import sde as kernels
    from euphonium.ops import _sde_torch

    poisoned = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    monkeypatch.setattr(kernels if backend == "triton" else _sde_torch, "_alloc", poisoned)
    if backend == "torch":
        monkeypatch.setattr(_sde_torch, "BLOCK_ELEMENTS", 1000)  # slices of the second case's samples
    for shape, dtype in (((3, 5, 7), torch.float32), ((2, 3, 37, 41), torch.bfloat16)):
        for schedule in SCHEDULES:
            case = make_case(shape, dtype, schedule, True, True, "cpu")
            for logprob_mean in ("unguided", "guided"):
                out = run_step(case, schedule, backend, noise=False, seed=5, logprob_mean=logprob_mean)
                assert torch.isfinite(out.x_next).all() and torch.isfinite(out.x0_pred).all()
                if schedule == "ode":
                    break
                assert torch.isfinite(out.log_prob).all()
                v = case["v"].clone().requires_grad_(True)
                v_ref = torch.randn(shape).to(dtype)
                guided = logprob_mean == "guided"
                with ops.use_backend(backend):
                    lp, kl = log_prob_for(case, out.x_next, schedule, backend, guided=guided, v=v, v_ref=v_ref)
                    (grad,) = torch.autograd.grad(lp.sum() + kl.sum(), v)
                    lp_only = log_prob_for(case, out.x_next, schedule, backend, guided=guided, v=v)
                    (grad_lp,) = torch.autograd.grad(lp_only.sum(), v)
                assert torch.isfinite(lp).all() and torch.isfinite(kl).all() and torch.isfinite(grad).all()
                assert torch.isfinite(grad_lp).all() and torch.equal(lp_only, out.log_prob)


# ----------------------------------------------------------------------------------------------
# Noise: Philox stream, statistics, seeds.
# ----------------------------------------------------------------------------------------------


def test_philox_integer_stream_is_tritons():
    import triton
    import triton.language as tl

    @triton.jit
    def randint_kernel(out_ptr, seed, base, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, o.to(tl.int64) + base)
        tl.store(out_ptr + o * 4 + 0, r0.to(tl.int64) & 0xFFFFFFFF, mask=o < n)
        tl.store(out_ptr + o * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF, mask=o < n)
        tl.store(out_ptr + o * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF, mask=o < n)
        tl.store(out_ptr + o * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF, mask=o < n)

    n = 300
    seeds = (0, int(torch.randint(1, 2**31 - 1, ()).item()), 2**40 + int(torch.randint(0, 2**20, ()).item()), 2**64 - 1)
    # Counters from 0, and across 2^32 (the high counter word goes from 0 to 1).
    for seed, base in zip(seeds, (0, 2**32 - 150, 0, 2**33 - 100)):
        out = torch.empty(n, 4, dtype=torch.int64)
        randint_kernel[(3,)](out, seed, base, n, BLOCK=128)
        ours = torch.stack(sde_ops.philox4x32(seed, base + torch.arange(n)), dim=1)
        assert torch.equal(out, ours), (seed, base)


def test_philox_randn_offsets_and_chunks(monkeypatch):
    from euphonium.ops import philox

    seed = int(torch.randint(0, 2**63 - 1, ()).item())
    full = ops.philox_randn(seed, 5000)
    monkeypatch.setattr(philox, "CHUNK", 777)  # several chunks, a ragged last one
    assert torch.equal(ops.philox_randn(seed, 5000), full)
    assert torch.equal(ops.philox_randn(seed, 1234, offset=3000), full[3000:4234])
    # The normals from the integer stream, as Triton's uint_to_uniform_float and Box-Muller do them.
    w0, w1, _, _ = philox.philox4x32(seed, torch.arange(5000))
    uniform = [
        torch.where(w >= 2**31, 2**32 - 1 - w, w).to(torch.float32) * torch.tensor(4.6566127342e-10) for w in (w0, w1)
    ]
    expected = torch.sqrt(-2.0 * torch.log(uniform[0].clamp_min(1e-7))) * torch.cos(6.283185307179586 * uniform[1])
    assert torch.equal(full, expected)


def test_philox_normals_match_tl_randn():
    shape = (2, 3, 50)
    x, v = torch.randn(shape), torch.randn(shape)
    for seed in (int(torch.randint(0, 2**31 - 1, ()).item()), int(torch.randint(2**31, 2**63 - 1, ()).item())):
        outs = {}
        for backend in BACKENDS:
            with ops.use_backend(backend):
                outs[backend] = ops.sde_step(x, v, 0.8, 0.6, schedule="dance_grpo", noise_level=0.5, seed=seed)
        # Same integer stream; log/cos may differ in the last bits between numpy/GPU and torch.
        torch.testing.assert_close(outs["triton"].x_next, outs["reference"].x_next, atol=5e-6, rtol=5e-6)
        torch.testing.assert_close(outs["torch"].x_next, outs["reference"].x_next, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics_and_seeds(backend):
    n = 8192 if backend == "triton" else 200_000
    x, v = torch.randn(2, n // 2), torch.randn(2, n // 2)
    sigma, sigma_next = 0.8, 0.5
    with ops.use_backend(backend):
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        a = ops.sde_step(x, v, sigma, sigma_next, schedule="dance_grpo", noise_level=0.5, seed=seed)
        b = ops.sde_step(x, v, sigma, sigma_next, schedule="dance_grpo", noise_level=0.5, seed=seed)
        c = ops.sde_step(x, v, sigma, sigma_next, schedule="dance_grpo", noise_level=0.5, seed=seed + 1)
        state = torch.get_rng_state()
        d = ops.sde_step(x, v, sigma, sigma_next, schedule="dance_grpo", noise_level=0.5)
        torch.set_rng_state(state)
        e = ops.sde_step(x, v, sigma, sigma_next, schedule="dance_grpo", noise_level=0.5)
        f = ops.sde_step(x, v, sigma, sigma_next, schedule="dance_grpo", noise_level=0.5)
    assert torch.equal(a.x_next, b.x_next) and torch.equal(a.log_prob, b.log_prob)
    assert torch.equal(d.x_next, e.x_next)
    assert not torch.equal(a.x_next, c.x_next) and not torch.equal(e.x_next, f.x_next)
    ref = spec_step(
        x.double(),
        v.double(),
        torch.full((2,), sigma, dtype=torch.float64),
        torch.full((2,), sigma_next, dtype=torch.float64),
        schedule="dance_grpo",
        a=0.5,
    )
    for out in (a, c, f):
        eps = ((out.x_next.double() - ref["mean"]) / ref["std"]).flatten()
        assert abs(eps.mean().item()) < 5 / math.sqrt(n)
        assert abs(eps.std().item() - 1) < 5 * math.sqrt(0.5 / n) + 1e-4
        assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-5
    # Independent streams for different seeds and across samples of one call.
    eps_a = (a.x_next.double() - ref["mean"]) / ref["std"]
    eps_c = (c.x_next.double() - ref["mean"]) / ref["std"]
    assert abs(torch.corrcoef(torch.stack([eps_a.flatten(), eps_c.flatten()]))[0, 1].item()) < 5 / math.sqrt(n)
    assert abs(torch.corrcoef(eps_a)[0, 1].item()) < 5 / math.sqrt(n // 2)


# ----------------------------------------------------------------------------------------------
# Bad input: errors name the argument.
# ----------------------------------------------------------------------------------------------


def _bad_calls():
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    step = ops.sde_step
    lp = ops.sde_log_prob
    return [
        ("x int", lambda: step(x.long(), v, 0.5, 0.4), TypeError, "x must be a floating-point"),
        ("x no batch", lambda: step(x[0, 0], v[0, 0], 0.5, 0.4), ValueError, "x must have"),
        ("x list", lambda: step(x.tolist(), v, 0.5, 0.4), TypeError, "x must be a torch.Tensor"),
        ("empty batch", lambda: step(x[:0], v[:0], 0.5, 0.4), ValueError, "x has an empty batch"),
        ("v shape", lambda: step(x, v[:, :2], 0.5, 0.4), ValueError, "v must have the shape of x"),
        ("v int", lambda: step(x, v.int(), 0.5, 0.4), TypeError, "v must be a floating-point"),
        ("v device", lambda: step(x, v.to("meta"), 0.5, 0.4), ValueError, "v is on meta"),
        (
            "reward_grad shape",
            lambda: step(x, v, 0.5, 0.4, reward_grad=v[:1], guidance_scale=0.1),
            ValueError,
            "reward_grad must have the shape",
        ),
        ("noise shape", lambda: step(x, v, 0.5, 0.4, noise=v[..., :3]), ValueError, "noise must have the shape"),
        ("x_next shape", lambda: lp(x, v, x[:1], 0.5, 0.4), ValueError, "x_next must have the shape"),
        ("v_ref shape", lambda: lp(x, v, x, 0.5, 0.4, v_ref=v[:, :1]), ValueError, "v_ref must have the shape"),
        (
            "v_ref grad",
            lambda: lp(x, v, x, 0.5, 0.4, v_ref=v.clone().requires_grad_()),
            ValueError,
            "v_ref requires grad",
        ),
        (
            "sigma length",
            lambda: step(x, v, torch.tensor([0.5, 0.6, 0.7]), 0.4),
            ValueError,
            r"sigma must be a float or a tensor of shape \[2\]",
        ),
        (
            "sigma_next length",
            lambda: lp(x, v, x, 0.5, torch.tensor([0.1])),
            ValueError,
            "sigma_next must be a float or a tensor of shape",
        ),
        (
            "sigma int tensor",
            lambda: step(x, v, torch.tensor([1, 1]), 0.4),
            TypeError,
            "sigma must be a floating-point",
        ),
        ("sigma > 1", lambda: step(x, v, 1.5, 0.4), ValueError, r"sigma must satisfy 2\^-100 <= sigma <= 1"),
        ("sigma nan", lambda: step(x, v, torch.tensor([0.5, float("nan")]), 0.4), ValueError, "sigma must satisfy"),
        (
            "sigma_next >= sigma",
            lambda: step(x, v, 0.5, 0.5),
            ValueError,
            "sigma_next must satisfy 0 <= sigma_next < sigma",
        ),
        (
            "sigma_next < 0",
            lambda: lp(x, v, x, torch.tensor([0.5, 0.5]), torch.tensor([0.1, -0.1])),
            ValueError,
            "sigma_next must satisfy",
        ),
        ("sigma_max missing", lambda: step(x, v, torch.tensor([1.0, 0.5]), 0.4), ValueError, "sigma_max is required"),
        ("sigma_max range", lambda: step(x, v, 1.0, 0.4, sigma_max=1.0), ValueError, "sigma_max must be in"),
        ("schedule", lambda: step(x, v, 0.5, 0.4, schedule="ddim"), ValueError, "schedule must be one of"),
        ("logprob_mean", lambda: step(x, v, 0.5, 0.4, logprob_mean="mean"), ValueError, "logprob_mean must be one of"),
        (
            "noise_level",
            lambda: step(x, v, 0.5, 0.4, noise_level=0.0),
            ValueError,
            "noise_level must be a finite number > 0",
        ),
        (
            "cps noise_level",
            lambda: step(x, v, 0.5, 0.4, schedule="cps", noise_level=1.5),
            ValueError,
            r"noise_level must be in \(0, 1\]",
        ),
        ("guidance without grad", lambda: step(x, v, 0.5, 0.4, guidance_scale=0.1), ValueError, "reward_grad is None"),
        (
            "guidance str",
            lambda: step(x, v, 0.5, 0.4, guidance_scale="0.1"),
            TypeError,
            "guidance_scale must be a float or a \\[B\\] tensor, got str",
        ),
        (
            "guidance nan",
            lambda: step(x, v, 0.5, 0.4, reward_grad=v, guidance_scale=float("nan")),
            ValueError,
            "guidance_scale must be a finite",
        ),
        (
            "guidance length",
            lambda: step(x, v, 0.5, 0.4, reward_grad=v, guidance_scale=torch.ones(3)),
            ValueError,
            "guidance_scale must be a float or a tensor of shape",
        ),
        ("seed and noise", lambda: step(x, v, 0.5, 0.4, noise=v, seed=1), ValueError, "either noise or seed"),
        ("seed negative", lambda: step(x, v, 0.5, 0.4, seed=-1), ValueError, "seed must be in"),
        ("seed float", lambda: step(x, v, 0.5, 0.4, seed=1.5), TypeError, "seed must be an int"),
        ("ode log-prob", lambda: lp(x, v, x, 0.5, 0.4, schedule="ode"), ValueError, "schedule='ode'"),
        (
            "log-prob reward_grad shape",
            lambda: lp(x, v, x, 0.5, 0.4, reward_grad=v[:, :1], guidance_scale=0.1),
            ValueError,
            "reward_grad must have the shape",
        ),
        (
            "log-prob reward_grad grad",
            lambda: lp(x, v, x, 0.5, 0.4, reward_grad=v.clone().requires_grad_(), guidance_scale=0.1),
            ValueError,
            "reward_grad requires grad",
        ),
        (
            "log-prob guidance_scale grad",
            lambda: lp(x, v, x, 0.5, 0.4, reward_grad=v, guidance_scale=torch.ones(2, requires_grad=True)),
            ValueError,
            "guidance_scale requires grad",
        ),
        (
            "log-prob guidance without grad",
            lambda: lp(x, v, x, 0.5, 0.4, guidance_scale=torch.ones(2)),
            ValueError,
            "reward_grad is None",
        ),
        (
            "log-prob guidance length",
            lambda: lp(x, v, x, 0.5, 0.4, reward_grad=v, guidance_scale=torch.ones(3)),
            ValueError,
            "guidance_scale must be a float or a tensor of shape",
        ),
        (
            "log-prob guidance inf",
            lambda: lp(x, v, x, 0.5, 0.4, reward_grad=v, guidance_scale=float("inf")),
            ValueError,
            "guidance_scale must be a finite",
        ),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend):
    with ops.use_backend(backend):
        for _name, call, exc, match in _bad_calls():
            with pytest.raises(exc, match=match):
                call()


@pytest.mark.parametrize("backend", FUSED)
def test_fused_step_refuses_inputs_that_require_grad(backend):
    # The fused step has no backward: a graph through it would silently lose the gradient.
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4, requires_grad=True)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="v requires grad"):
            ops.sde_step(x, v, 0.5, 0.4, seed=1)
        with torch.no_grad():
            assert ops.sde_step(x, v, 0.5, 0.4, seed=1).x_next.grad_fn is None
    with ops.use_backend("reference"):
        assert ops.sde_step(x, v, 0.5, 0.4, seed=1).x_next.requires_grad  # the spec is differentiable


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 / sm_90.
# ----------------------------------------------------------------------------------------------


@pytest.mark.aot
def test_aot_compiles_every_variant_without_spills():
    from conftest import aot_compile

    from euphonium.kernels import sde as kernels

    names = [spec.name for spec in kernels.AOT_SPECS]
    # The guided-mean variants: the step that records the guided log-prob, and the training
    # log-prob forward and backward around mean + c g.
    for tag in ("fp32", "bf16"):
        for base in ("sde_step", "sde_step_noise", "sde_step_guided_lp", "sde_log_prob_fwd", "sde_log_prob_bwd"):
            assert f"{base}_{tag}" in names
        for base in ("sde_log_prob_fwd_guided", "sde_log_prob_bwd_guided"):
            assert f"{base}_{tag}" in names
    rows = aot_compile(names, archs=(80, 90))
    assert {(r["kernel"], r["arch"]) for r in rows} == {(n, a) for n in names for a in ("sm_80", "sm_90")}
    for row in rows:
        assert row["spill_bytes"] == 0, row
    # The aligned variants move their latents with 128-bit accesses only: each thread owns
    # BLOCK / (32 * num_warps) consecutive elements, i.e. this many 16-byte vectors per tensor.
    per_thread = kernels.MAX_BLOCK // (32 * kernels.NUM_WARPS)
    streams = {
        "sde_step": (3, 2),
        "sde_step_noise": (4, 2),
        "sde_step_guided_lp": (3, 2),
        "sde_log_prob_fwd": (4, 0),
        "sde_log_prob_bwd": (4, 1),
        "sde_log_prob_fwd_guided": (5, 0),  # + reward_grad
        "sde_log_prob_bwd_guided": (5, 1),
    }
    for row in rows:
        if row["arch"] != "sm_90" or row["kernel"] == "sde_finalize":
            continue
        base, tag = row["kernel"].rsplit("_", 1)
        vectors = per_thread * {"fp32": 4, "bf16": 2}[tag] // 16
        loads, stores = streams[base]
        assert row["global_loads_by_bits"].get("128", 0) == loads * vectors, row
        assert not set(row["global_loads_by_bits"]) - {"128", "32"}, row
        assert row["global_stores_by_bits"].get("128", 0) == stores * vectors, row


# ----------------------------------------------------------------------------------------------
# On a CUDA device: the compiled kernels (auto backend) against the same checks.
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gpu_step_matches_spec(schedule, dtype):
    for shape in SHAPES + [(4, 16, 9, 30, 52)]:
        check_step_against_spec(shape, dtype, schedule, "auto", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("schedule", STOCHASTIC)
def test_gpu_log_prob_and_backward(schedule, dtype):
    check_log_prob_against_spec((4, 16, 9, 30, 52), dtype, schedule, "auto", "cuda")
    check_backward_matches_reference((4, 16, 9, 30, 52), dtype, schedule, "cuda")
    check_backward_matches_reference((4, 16, 9, 30, 52), dtype, schedule, "cuda", guided=True)


@pytest.mark.gpu
def test_gpu_same_bits_and_noise():
    check_same_bits("auto", "cuda")
    check_same_bits("torch", "cuda")
    x, v = torch.randn(4, 1 << 18, device="cuda"), torch.randn(4, 1 << 18, device="cuda")
    out = ops.sde_step(x, v, 0.8, 0.5, schedule="dance_grpo", noise_level=0.5, seed=123)
    with ops.use_backend("reference"):
        ref = ops.sde_step(x, v, 0.8, 0.5, schedule="dance_grpo", noise_level=0.5, seed=123)
    torch.testing.assert_close(out.x_next, ref.x_next, atol=1e-5, rtol=1e-5)
    full = lambda value: torch.full((4,), value, dtype=torch.float64)  # noqa: E731
    mean = spec_step(x.double().cpu(), v.double().cpu(), full(0.8), full(0.5), schedule="dance_grpo", a=0.5)["mean"]
    eps = (out.x_next.double().cpu() - mean) / (0.5 * math.sqrt(0.8 - 0.5))
    assert stats.kstest(eps.flatten().numpy(), "norm").pvalue > 1e-5
