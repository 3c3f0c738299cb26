"""ops.sde_step / ops.sde_log_prob at extreme values: every backend agrees, or every backend refuses.

A step whose per-sample fp32 coefficients would underflow (tiny sigma, a noise std below 2^-40, a
subnormal sigma) or overflow (huge noise_level, sigma_max that is 1 in fp32) is refused at
validation with the same one-line ValueError on every backend. Inside that range, latents and
velocities up to 2^80 give finite, agreeing steps on every backend, and a training log-prob whose
residuals overflow fp32 is non-finite for the same samples on every backend (finite and equal up
to rounding elsewhere).
"""

import math

import pytest
import torch

from euphonium import ops

BACKENDS = ["reference", "torch", "triton"]
SIGMA_MAX = 0.96


def _step(backend, x, v, sigma, sigma_next, **kw):
    with ops.use_backend(backend):
        return ops.sde_step(x, v, sigma, sigma_next, **kw)


def _log_prob(backend, x, v, x_next, sigma, sigma_next, **kw):
    with ops.use_backend(backend):
        return ops.sde_log_prob(x, v, x_next, sigma, sigma_next, **kw)


# (name, sigma, sigma_next, keyword arguments, message): floats, and [B] tensors with one bad sample.
OUT_OF_RANGE = [
    ("flow_grpo sigma 1e-23", 1e-23, 0.0, dict(schedule="flow_grpo", noise_level=0.7), r"std must be >= 2\^-40"),
    ("cps sigma_next 1e-23", 0.5, 1e-23, dict(schedule="cps", noise_level=0.5), r"std must be >= 2\^-40"),
    (
        "dance_grpo delta 2^-71",
        2.0**-70,
        2.0**-71,
        dict(schedule="dance_grpo", noise_level=1e-3),
        r"std must be >= 2\^-40",
    ),
    (
        "flow_grpo tiny noise_level and delta",
        0.5,
        0.5 - 2.0**-25,
        dict(schedule="flow_grpo", noise_level=1e-9),
        r"std must be >= 2\^-40",
    ),
    ("subnormal sigma", 1e-40, 0.0, dict(schedule="dance_grpo", noise_level=0.5), r"sigma must satisfy 2\^-100"),
    ("sigma 2^-101 ode", 2.0**-101, 0.0, dict(schedule="ode"), r"sigma must satisfy 2\^-100"),
    ("huge eta", 0.5, 0.4, dict(schedule="dance_grpo", noise_level=1e20), r"noise_level must be in \(0, 2\^20\]"),
    ("huge a", 0.5, 0.4, dict(schedule="flow_grpo", noise_level=1e30), r"noise_level must be in \(0, 2\^20\]"),
    (
        "sigma_max 1 in fp32",
        1.0,
        0.5,
        dict(schedule="flow_grpo", noise_level=0.7, sigma_max=1 - 1e-9),
        "sigma_max must be in .* below 1 in fp32",
    ),
    (
        "coefficients 2^44",
        1.0,
        0.9,
        dict(schedule="flow_grpo", noise_level=2.0**10, sigma_max=1 - 2.0**-24),
        r"coefficients up to .* must be <= 2\^40",
    ),
    (
        "coefficients near sigma 1",
        1 - 2.0**-24,
        0.5,
        dict(schedule="flow_grpo", noise_level=2.0**12),
        r"coefficients up to .* must be <= 2\^40",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, sigma, sigma_next, kw, match", OUT_OF_RANGE, ids=[c[0] for c in OUT_OF_RANGE])
def test_steps_outside_fp32_range_are_refused(backend, name, sigma, sigma_next, kw, match):
    x, v = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    kw = dict(kw)
    kw.setdefault("sigma_max", SIGMA_MAX)
    # The same sample in the middle of a batch of good ones, as [B] tensors (float64: not rounded first).
    good = (0.8, 0.6) if kw["schedule"] != "flow_grpo" or kw["noise_level"] <= 2.0**10 else (0.3, 0.29)
    sigma_t = torch.tensor([good[0], sigma, good[0]], dtype=torch.float64)
    sigma_next_t = torch.tensor([good[1], sigma_next, good[1]], dtype=torch.float64)
    stochastic = kw["schedule"] != "ode"
    for s, sn in ((sigma, sigma_next), (sigma_t, sigma_next_t)):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            xd, vd = x.to(dtype), v.to(dtype)
            with pytest.raises(ValueError, match=match) as info:
                _step(backend, xd, vd, s, sn, seed=1, **kw)
            message = str(info.value)
            assert "\n" not in message
            if "sample" in message:
                assert "(sample 1)" in message if isinstance(s, torch.Tensor) else "(sample 0)" in message
            if stochastic:
                with pytest.raises(ValueError, match=match):
                    _log_prob(backend, xd, vd, xd, s, sn, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_is_the_same_on_every_backend(backend):
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    with ops.use_backend("reference"):
        with pytest.raises(ValueError) as expected:
            ops.sde_step(x, v, 1e-23, 0.0, noise_level=0.7, seed=1)
    with pytest.raises(ValueError) as got:
        _step(backend, x, v, 1e-23, 0.0, noise_level=0.7, seed=1)
    assert str(got.value) == str(expected.value)


# Steps just inside the range: the smallest std, the smallest sigma, the largest coefficients.
EDGE = [
    ("cps std 1.5 * 2^-40", 0.5, 1.5 * 2.0**-40 / math.sin(0.5 * math.pi / 2), dict(schedule="cps", noise_level=0.5)),
    ("flow_grpo tiny sigma", 2.0 * 2.0**-40 / 0.7, 0.0, dict(schedule="flow_grpo", noise_level=0.7)),
    ("dance_grpo tiny delta", 0.5, 0.5 - 2.0**-24, dict(schedule="dance_grpo", noise_level=2.0**-26)),
    ("ode sigma 2^-100", 2.0**-100, 0.0, dict(schedule="ode", noise_level=0.7)),
    ("flow_grpo coefficients ~2^38", 0.3, 0.2, dict(schedule="flow_grpo", noise_level=2.0**20)),
    ("dance_grpo eta 2^19", 0.9, 0.8999, dict(schedule="dance_grpo", noise_level=2.0**19)),
]


@pytest.mark.parametrize("name, sigma, sigma_next, kw", EDGE, ids=[c[0] for c in EDGE])
def test_steps_at_the_edge_of_the_range_agree(name, sigma, sigma_next, kw):
    x, v, eps = torch.randn(2, 3, 40), torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    out = {}
    for backend in BACKENDS:
        out[backend] = _step(backend, x, v, sigma, sigma_next, sigma_max=SIGMA_MAX, noise=eps, **kw)
        o = out[backend]
        assert torch.isfinite(o.x_next).all() and torch.isfinite(o.x0_pred).all(), (backend, name)
        if kw["schedule"] == "ode":
            continue
        assert torch.isfinite(o.log_prob).all(), (backend, name)
        lp = _log_prob(backend, x, v, o.x_next, sigma, sigma_next, sigma_max=SIGMA_MAX, **kw)
        assert torch.equal(lp, o.log_prob), (backend, name)
    scale = out["reference"].x_next.abs().max().item()
    for backend in ("torch", "triton"):
        torch.testing.assert_close(out[backend].x_next, out["reference"].x_next, atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(out[backend].x0_pred, out["reference"].x0_pred, atol=1e-5, rtol=1e-5)


def _assert_agree(got, want, what):
    """Non-finite at the same samples; the finite ones equal up to fp32 rounding of big numbers."""
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), what
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-4, msg=what)


@pytest.mark.parametrize("schedule", ["flow_grpo", "dance_grpo", "cps", "ode"])
def test_huge_latents_and_velocities_agree(schedule):
    # Rollout: inputs up to 2^80 in magnitude, with ordinary coefficients and with coefficients near
    # the 2^40 limit: no intermediate overflows on any backend, so every backend returns finite,
    # agreeing steps (and the training log-prob has the step's bits). Nearer fp32's largest value the
    # backends' orders of operations overflow at different elements (sde_step's docstring).
    torch.manual_seed(0)
    base_x, base_v, eps = torch.randn(3, 4, 64), torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    steps = [
        (torch.tensor([1.0, 0.7, 0.3]), torch.tensor([SIGMA_MAX, 0.5, 0.0]), 0.6),
        (torch.tensor([0.3, 0.25, 0.3]), torch.tensor([0.2, 0.0, 0.29]), 2.0**20 if schedule != "cps" else 1.0),
    ]
    for sigma, sigma_next, noise_level in steps:
        kw = dict(schedule=schedule, noise_level=noise_level, sigma_max=SIGMA_MAX)
        for x_scale, v_scale in ((1, 2.0**80), (2.0**80, 1), (2.0**80, 2.0**80), (2.0**60, 2.0**70)):
            x, v, g = base_x * x_scale, base_v * v_scale, base_v.flip(0) * v_scale
            out = {}
            for b in BACKENDS:
                guidance = dict(reward_grad=g, guidance_scale=0.5)
                out[b] = _step(b, x, v, sigma, sigma_next, noise=eps, logprob_mean="guided", **guidance, **kw)
                what = (schedule, noise_level, x_scale, v_scale, b)
                assert torch.isfinite(out[b].x_next).all() and torch.isfinite(out[b].x0_pred).all(), what
                if schedule != "ode":
                    # Rounding-dominated at these magnitudes (not compared between backends), but finite.
                    assert torch.isfinite(out[b].log_prob).all(), what
                    lp = _log_prob(b, x, v, out[b].x_next, sigma, sigma_next, **guidance, **kw)
                    assert torch.equal(lp, out[b].log_prob), what
            for b in ("torch", "triton"):
                for field in ("x_next", "x0_pred"):
                    got, want = getattr(out[b], field), getattr(out["reference"], field)
                    scale = want.abs().amax(dim=tuple(range(1, want.dim())), keepdim=True)
                    assert ((got - want).abs() <= 1e-5 * scale).all(), (field, schedule, x_scale, v_scale, b)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("schedule", ["flow_grpo", "dance_grpo", "cps"])
def test_huge_residuals_in_training_overflow_alike(schedule):
    # Training: a velocity far from the rollout's, or a stored x_next far off at one element. The
    # squared residuals are averaged before the division by 2 std^2 on every backend, so one element
    # does not overflow the log-prob where the average does not.
    torch.manual_seed(1)
    x, v = torch.randn(2, 3, 50), torch.randn(2, 3, 50)
    sigma, sigma_next = torch.tensor([0.5, 0.9]), torch.tensor([0.49, 0.6])
    kw = dict(schedule=schedule, noise_level=0.05 if schedule != "cps" else 0.01, sigma_max=SIGMA_MAX)
    x_next = _step("torch", x, v, sigma, sigma_next, seed=3, **kw).x_next
    cases = [(v * s, x_next) for s in (1e15, 1e18, 1e20, 1e36)]
    for offset in (1e15, 1e17, 1e19, 1e30):
        off = x_next.clone()
        off[0, 1, 7] += offset
        cases.append((v, off))
    saw_finite_huge = False
    for v_train, xn in cases:
        got = {b: _log_prob(b, x, v_train, xn, sigma, sigma_next, v_ref=v, **kw) for b in BACKENDS}
        lp_ref, kl_ref = got["reference"]
        saw_finite_huge |= bool((torch.isfinite(lp_ref) & (lp_ref.abs() > 1e35)).any())
        for b in ("torch", "triton"):
            _assert_agree(got[b][0], lp_ref, (schedule, b, "log_prob"))
            _assert_agree(got[b][1], kl_ref, (schedule, b, "kl"))
    assert saw_finite_huge  # some case sits between the per-element and the averaged overflow
