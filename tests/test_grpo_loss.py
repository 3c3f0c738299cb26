"""ops.grpo_loss and ops.dual_reward_loss: every backend against float64 NumPy, gradcheck, errors."""

import numpy as np
import pytest
import torch
from conftest import aot_compile

from euphonium import ops

BACKENDS = ["reference", "torch", "triton"]


def grpo_np(log_prob, old_log_prob, advantages, *, clip_range, adv_clip, kl=None, kl_coef=0.0, fp32_elements=False):
    """Float64 spec: loss, stats and the analytic d loss / d log_prob and d loss / d kl.

    ``fp32_elements``: each element as the fp32 paths evaluate it (the log ratio in fp32, a ratio,
    ``ratio - 1`` or loss term beyond fp32's range is +-inf), the rest in float64.
    """
    lp, old = np.float64(log_prob), np.float64(old_log_prob)
    a = np.float64(advantages)
    if adv_clip is not None:
        a = np.clip(a, -adv_clip, adv_clip)
    if a.ndim < lp.ndim:
        a = a[:, None] * np.ones_like(lp)
    big = np.float64(np.finfo(np.float32).max)

    def fp32_range(v):
        return np.where(np.abs(v) > big, np.sign(v) * np.inf, v) if fp32_elements else v

    with np.errstate(over="ignore", invalid="ignore"):
        x = np.float64(np.float32(log_prob) - np.float32(old_log_prob)) if fp32_elements else lp - old
        ratio = fp32_range(np.exp(x))
        em1 = fp32_range(np.expm1(x))
        clipped = np.clip(ratio, 1 - clip_range, 1 + clip_range)
        # The exact max of -A r and -A clip(r): the clipped branch where it wins, 0 for A = 0.
        flat = ((a > 0) & (ratio > clipped)) | ((a < 0) & (ratio < clipped)) | ((a == 0) & ~np.isnan(ratio))
        terms = fp32_range(np.where(flat, -a * clipped, -a * ratio))
        policy = terms.mean()
        kl_mean = np.float64(kl).mean() if kl is not None else 0.0
        dlogp = np.where(flat, 0.0, -a * ratio) / lp.size
        akl = np.where(em1 == np.inf, np.inf, em1 - x)
        stats = {
            "clip_frac": np.mean(np.abs(em1) > clip_range) if not np.isnan(x).any() else np.nan,
            "approx_kl": np.mean(akl),
            "ratio_mean": 1 + np.mean(em1),
            "ratio_max_dev": np.max(np.abs(em1)),
            "policy_loss": policy,
            "kl": kl_mean,
        }
    return policy + kl_coef * kl_mean, stats, dlogp, np.full(lp.shape, kl_coef / lp.size)


def _inputs(shape, clip_range, *, adv_per_row=False, with_kl=False, dtype=torch.float32):
    batch = shape[0]
    old = torch.randn(shape) * 3 - 20
    # Log-ratios of about 2 * clip_range: a good share of elements on each side of the clip.
    log_prob = (old + torch.randn(shape) * 2 * clip_range).to(dtype).requires_grad_()
    adv = torch.randn(batch if adv_per_row else shape) * 4  # some beyond adv_clip
    kl = (torch.rand(shape) * 0.1).to(dtype).requires_grad_() if with_kl else None
    return log_prob, old.to(dtype), adv, kl


CASES = [
    dict(shape=(37,), adv_per_row=False, with_kl=False, clip_range=1e-4, adv_clip=5.0),
    dict(shape=(9, 7), adv_per_row=True, with_kl=True, clip_range=1e-4, adv_clip=1.5, kl_coef=0.3),
    dict(shape=(9, 7), adv_per_row=False, with_kl=True, clip_range=0.2, adv_clip=None, kl_coef=0.04),
    dict(shape=(300, 5), adv_per_row=True, with_kl=False, clip_range=0.05, adv_clip=5.0),  # several programs
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['shape']}-row{c['adv_per_row']}-kl{c['with_kl']}")
def test_matches_numpy(backend, case, nan_poison):
    log_prob, old, adv, kl = _inputs(
        case["shape"], case["clip_range"], adv_per_row=case["adv_per_row"], with_kl=case["with_kl"]
    )
    opts = dict(clip_range=case["clip_range"], adv_clip=case["adv_clip"], kl_coef=case.get("kl_coef", 0.0))
    with ops.use_backend(backend):
        loss, stats = ops.grpo_loss(log_prob, old, adv, kl=kl, **opts)
    grad_out = torch.rand(()) + 0.5
    (loss * grad_out).backward()
    loss_np, stats_np, dlogp_np, dkl_np = grpo_np(
        log_prob.detach().numpy(), old.numpy(), adv.numpy(), kl=None if kl is None else kl.detach().numpy(), **opts
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    np.testing.assert_allclose(loss.item(), loss_np, rtol=1e-5, atol=1e-6)
    assert set(stats) == set(stats_np) and all(isinstance(v, float) for v in stats.values())
    assert 0 < stats_np["clip_frac"] < 1
    for name, value in stats_np.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(log_prob.grad.numpy(), grad_out.item() * dlogp_np, rtol=1e-5, atol=1e-9)
    if kl is not None:
        np.testing.assert_allclose(kl.grad.numpy(), grad_out.item() * dkl_np, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "torch"])  # the kernels compute in fp32 only
def test_gradcheck(backend):
    shape = (5, 4)
    old = torch.randn(shape, dtype=torch.float64)
    log_prob = (old + torch.randn(shape, dtype=torch.float64) * 0.4).requires_grad_()
    adv = torch.randn(5, dtype=torch.float64) * 3
    kl = torch.rand(shape, dtype=torch.float64, requires_grad=True)

    def f(lp, k):
        with ops.use_backend(backend):
            return ops.grpo_loss(lp, old, adv, clip_range=0.2, adv_clip=2.0, kl=k, kl_coef=0.1)[0]

    assert torch.autograd.gradcheck(f, (log_prob, kl))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fused_backwards_match_reference(dtype, tol, nan_poison):
    shape = (6, 11)
    log_prob, old, adv, kl = _inputs(shape, 0.1, adv_per_row=True, with_kl=True, dtype=dtype)
    grad_out = torch.rand(()) + 0.5
    grads = {}
    for backend in BACKENDS:
        lp, k = log_prob.detach().clone().requires_grad_(), kl.detach().clone().requires_grad_()
        # Non-contiguous inputs: the op makes them contiguous itself.
        lp_t = lp.t().contiguous().t()
        with ops.use_backend(backend):
            loss, _ = ops.grpo_loss(lp_t, old, adv, clip_range=0.1, kl=k, kl_coef=0.5)
        (loss * grad_out).backward()
        assert lp.grad.dtype == dtype
        grads[backend] = (loss.detach(), lp.grad, k.grad)
    for backend in ("torch", "triton"):
        for ref, fused in zip(grads["reference"], grads[backend]):
            torch.testing.assert_close(fused.float(), ref.float(), rtol=tol, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rounding_ties_at_the_clip_bound(backend):
    """One ulp outside the clip range, the reference's fp32 products ``-A r`` and ``-A clip(r)`` can
    round to the same value, and ``torch.maximum``'s backward then splits the gradient in half. The
    fused paths decide the branch from ``r`` and ``clip(r)`` as the exact max does: all or nothing."""
    n, clip_range = 20000, 1e-4
    bound = torch.where(torch.rand(n) < 0.5, 1 - clip_range, 1 + clip_range)
    old = torch.randn(n)
    # log-ratios within a few ulps of the bounds (old + log_ratio rounds, so take lp - old as drawn).
    log_prob = (old + torch.log(bound) + 2e-7 * torch.randn(n)).requires_grad_()
    adv = torch.randn(n) * 2
    grads = {}
    for name in ("reference", backend):
        with ops.use_backend(name):
            loss, _ = ops.grpo_loss(log_prob, old, adv, clip_range=clip_range, adv_clip=None)
        (grads[name],) = torch.autograd.grad(loss, [log_prob])
    ratio = torch.exp(log_prob.detach() - old)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    full = -adv * ratio / n
    tie = (-adv * ratio == -adv * clipped) & (ratio != clipped)
    assert tie.sum() > 10
    torch.testing.assert_close(grads["reference"][tie], full[tie] / 2)
    fused = grads[backend]
    # Triton's exp may differ from PyTorch's by an ulp and move an element across the bound, so
    # every element must get the whole gradient or none, never half.
    is_zero, is_full = fused == 0, torch.isclose(fused, full, rtol=1e-5, atol=0)
    assert (is_zero | is_full).all()
    if backend == "torch":
        assert torch.equal(is_zero, adv * (ratio - clipped) > 0)


def _run(backend, log_prob, old, adv, kl=None, **opts):
    lp = log_prob.detach().clone().requires_grad_()
    k = kl.detach().clone().requires_grad_() if kl is not None else None
    with ops.use_backend(backend):
        loss, stats = ops.grpo_loss(lp, old, adv, kl=k, **opts)
    loss.backward()
    return loss.item(), stats, lp.grad.double().numpy(), None if k is None else k.grad.double().numpy()


def _check_against_spec(log_prob, old, adv, kl=None, **opts):
    """Every backend against the fp32-element float64 spec, and the backends against each other."""
    loss_np, stats_np, dlogp_np, dkl_np = grpo_np(
        log_prob.numpy(),
        old.numpy(),
        adv.numpy(),
        kl=None if kl is None else kl.numpy(),
        fp32_elements=True,
        **opts,
    )
    results = {b: _run(b, log_prob, old, adv, kl, **opts) for b in BACKENDS}
    # A mean of fp32 terms that cancel is exact to about N ulps of the terms, not of the result.
    a = adv.double().numpy()
    a = np.clip(a, -opts["adv_clip"], opts["adv_clip"]) if opts.get("adv_clip") is not None else a
    cancel = 1e-6 * float(np.mean(np.abs(np.where(np.isfinite(a), a, 0.0))))
    for backend, (loss, stats, dlogp, dkl) in results.items():
        msg = f"{backend}"
        # Subnormal results (1e-40 advantages) are exact to the subnormal spacing (1.4e-45) only.
        np.testing.assert_allclose(loss, loss_np, rtol=1e-5, atol=max(1e-43, cancel), err_msg=msg)
        for name, value in stats_np.items():
            atol = max(1e-43, cancel) if name == "policy_loss" else 1e-43
            np.testing.assert_allclose(stats[name], value, rtol=1e-4, atol=atol, err_msg=f"{msg} {name}")
        scale = np.nanmax(np.abs(np.where(np.isinf(dlogp_np), 0, dlogp_np)))
        np.testing.assert_allclose(dlogp, dlogp_np, rtol=1e-5, atol=max(1e-7 * scale, 1e-44), err_msg=f"{msg} grad")
        assert np.array_equal(np.isnan(dlogp), np.isnan(dlogp_np)), msg
        if kl is not None:
            np.testing.assert_allclose(dkl, dkl_np, rtol=1e-5, err_msg=f"{msg} kl grad")
    return results


@pytest.mark.parametrize("where", ["log_prob", "old_log_prob", "advantages", "row_advantage", "kl"])
@pytest.mark.parametrize("adv_clip", [5.0, None])
def test_nan_propagates_on_every_backend(where, adv_clip, nan_poison):
    # NaN in is NaN out: the Triton kernel used to clamp a NaN advantage to -adv_clip (loss 2.0) and
    # drop a NaN log-prob from the max (ratio_max_dev 0). A = 0 at the poisoned element too.
    shape = (6, 5)
    log_prob, old, adv, kl = _inputs(shape, 0.05, adv_per_row=where == "row_advantage", with_kl=True)
    log_prob, kl = log_prob.detach(), kl.detach()
    tensors = {"log_prob": log_prob, "old_log_prob": old, "advantages": adv, "row_advantage": adv, "kl": kl}
    if where != "row_advantage":
        adv[2, 3] = 0.0 if where in ("log_prob", "old_log_prob") else adv[2, 3]
        tensors[where][2, 3] = torch.nan
    else:
        adv[2] = torch.nan
    opts = dict(clip_range=0.05, adv_clip=adv_clip, kl_coef=0.1)
    results = _check_against_spec(log_prob, old, adv, kl, **opts)
    for backend, (loss, stats, dlogp, _) in results.items():
        assert np.isnan(loss), backend
        ratio_stats = ("clip_frac", "approx_kl", "ratio_mean", "ratio_max_dev")
        nan_stats = {
            "log_prob": (*ratio_stats, "policy_loss"),
            "old_log_prob": (*ratio_stats, "policy_loss"),
            "advantages": ("policy_loss",),
            "row_advantage": ("policy_loss",),
            "kl": ("kl",),
        }[where]
        assert {k for k, v in stats.items() if np.isnan(v)} == set(nan_stats), backend
        bad = np.zeros(shape, dtype=bool)
        if where == "row_advantage":
            bad[2] = True
        elif where != "kl":
            bad[2, 3] = True
        assert np.array_equal(np.isnan(dlogp), bad), backend


def test_ratio_overflow_is_the_exact_max_on_every_backend(nan_poison):
    # Log ratios of 100 (exp overflows fp32), +inf (3e38 - -3e38 in fp32) and -1e20 (ratio 0), each
    # with A > 0 (the clipped term, flat), A < 0 (+inf) and A = 0 (0, not 0 * inf).
    old = torch.randn(3, 4) - 5
    log_prob = old.clone()
    log_prob[:, 0] = old[:, 0] + 100
    log_prob[:, 1], old[:, 1] = 3e38, -3e38
    log_prob[:, 2], old[:, 2] = -1e20, 0.0
    adv = torch.tensor([[1.5, 2.0, 0.7, 0.3], [0.0, 0.0, 0.0, -0.4], [-1.0, -3.0, -2.0, 1.0]])
    opts = dict(clip_range=0.2, adv_clip=2.0)
    results = _check_against_spec(log_prob, old, adv, **opts)
    for backend, (loss, stats, dlogp, _) in results.items():
        assert loss == np.inf, backend  # A < 0 with an infinite ratio
        assert stats["approx_kl"] == stats["ratio_mean"] == stats["ratio_max_dev"] == np.inf
        assert (dlogp[0, :3] == 0).all() and (dlogp[1, :3] == 0).all(), backend
        assert (dlogp[2, :2] == np.inf).all() and dlogp[2, 2] == 0, backend
    # Only the rows without A < 0 on an overflowed ratio: a finite loss, the clipped terms.
    results = _check_against_spec(log_prob[:2], old[:2], adv[:2], **opts)
    for backend, (loss, stats, _, _) in results.items():
        assert np.isfinite(loss) and np.isfinite(stats["policy_loss"]), backend


@pytest.mark.parametrize("magnitude", [1e20, 3e38, 1e-22, 1e-40])
def test_huge_and_tiny_values_match_float64(magnitude, nan_poison):
    shape = (7, 9)
    old = torch.randn(shape) * 3 - 20
    log_prob = old + torch.randn(shape) * 0.1
    adv = (torch.rand(shape) * 2 - 1) * magnitude  # huge advantages: the mean of +-3e38 terms
    # Huge or tiny log-probs and log ratios in the first rows.
    log_prob[0], old[0] = -magnitude, 0.0
    log_prob[1] = old[1] = (torch.rand(9) * 2 - 1) * magnitude
    log_prob[2] = old[2] + magnitude * torch.sign(torch.randn(9)) if magnitude < 1 else log_prob[2]
    for adv_clip in (None, 3.0):
        _check_against_spec(log_prob, old, adv, clip_range=0.05, adv_clip=adv_clip)


def test_only_log_prob_and_kl_get_gradients():
    log_prob, old, adv, _ = _inputs((8,), 1e-4)
    old.requires_grad_()
    adv.requires_grad_()
    for backend in BACKENDS:
        with ops.use_backend(backend):
            loss, _ = ops.grpo_loss(log_prob, old, adv)
        loss.backward()
        assert old.grad is None and adv.grad is None and log_prob.grad is not None


def _named(batch):
    return {"adherence": torch.randn(batch) * 2, "smooth": torch.randn(batch)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["separate", "sum"])
def test_dual_reward_loss(backend, combine, nan_poison):
    batch, steps = 6, 4
    log_prob, old, _, kl = _inputs((batch, steps), 0.05, with_kl=True)
    outcome = _named(batch)
    process = torch.randn(batch, steps) * 3
    guided = torch.tensor([True, True, False, True])
    weights = {"adherence": 1.0, "smooth": 0.3}
    opts = dict(clip_range=0.05, adv_clip=2.0)
    with ops.use_backend(backend):
        loss, stats = ops.dual_reward_loss(
            log_prob,
            old,
            outcome,
            process,
            outcome_weights=weights,
            process_weight=0.7,
            guided=guided,
            combine=combine,
            kl=kl,
            kl_coef=0.2,
            **opts,
        )
    loss.backward()
    lp, kk = log_prob.detach().numpy(), kl.detach().numpy()
    masked = np.where(guided.numpy()[None], process.numpy(), 0.0)
    terms = [(outcome["adherence"].numpy(), 1.0), (outcome["smooth"].numpy(), 0.3), (masked, 0.7)]
    if combine == "separate":
        parts = [grpo_np(lp, old.numpy(), a, **opts) for a, _ in terms]
        policy = sum(w * p[0] for (_, w), p in zip(terms, parts))
        dlogp = sum(w * p[2] for (_, w), p in zip(terms, parts))
        for (_a, _), name, p in zip(terms, ["adherence", "smooth", "process"], parts):
            np.testing.assert_allclose(stats[f"policy_loss/{name}"], p[0], rtol=1e-4, atol=1e-6)
    else:
        total = sum(w * (a[:, None] if a.ndim == 1 else a) for a, w in terms)
        _, _, dlogp, _ = grpo_np(lp, old.numpy(), total, **opts)
        policy = grpo_np(lp, old.numpy(), total, **opts)[0]
    expected_loss = policy + 0.2 * kk.mean()
    np.testing.assert_allclose(loss.item(), expected_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["policy_loss"], policy, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["kl"], kk.mean(), rtol=1e-5)
    # "separate" sums fp32 gradients of up to ~0.1 per term, which can cancel to ~1e-5: the sum is
    # good to a few fp32 ulps of the terms (~1e-8), not to rtol of the small result.
    np.testing.assert_allclose(log_prob.grad.numpy(), dlogp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kl.grad.numpy(), np.full(kk.shape, 0.2 / kk.size), rtol=1e-5)
    _, ref_stats, _, _ = grpo_np(lp, old.numpy(), terms[0][0], **opts)
    np.testing.assert_allclose(stats["clip_frac"], ref_stats["clip_frac"], rtol=1e-6)


def test_dual_reward_loss_outcome_only_equals_grpo_loss():
    log_prob, old, _, _ = _inputs((8,), 1e-4)
    outcome = {"adherence": torch.randn(8)}
    loss, stats = ops.dual_reward_loss(log_prob, old, outcome)
    ref_loss, ref_stats = ops.grpo_loss(log_prob, old, outcome["adherence"])
    torch.testing.assert_close(loss, ref_loss)
    assert stats["policy_loss/adherence"] == pytest.approx(ref_stats["policy_loss"])


def test_bad_input():
    log_prob, old, adv, _ = _inputs((4, 3), 1e-4)
    with pytest.raises(ValueError, match=r"old_log_prob must have the shape of log_prob \(4, 3\)"):
        ops.grpo_loss(log_prob, old[:, :2], adv)
    with pytest.raises(ValueError, match=r"advantages must have the shape of log_prob \(4, 3\) or \[4\]"):
        ops.grpo_loss(log_prob, old, torch.randn(3))
    with pytest.raises(ValueError, match="kl must have the shape of log_prob"):
        ops.grpo_loss(log_prob, old, adv, kl=torch.rand(4))
    with pytest.raises(ValueError, match=r"log_prob must be \[B\] or \[B, K\]"):
        ops.grpo_loss(log_prob[..., None], old[..., None], adv[..., None])
    with pytest.raises(ValueError, match=r"log_prob must be \[B\] or \[B, K\] with K >= 1, got shape \(4, 0\)"):
        ops.grpo_loss(log_prob[:, :0], old[:, :0], adv[:, 0])
    with pytest.raises(TypeError, match="advantages must be a floating-point tensor"):
        ops.grpo_loss(log_prob, old, torch.ones(4, 3, dtype=torch.long))
    for bad in (0.0, -1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_range must be a finite number > 0"):
            ops.grpo_loss(log_prob, old, adv, clip_range=bad)
    with pytest.raises(TypeError, match="clip_range must be a number"):
        ops.grpo_loss(log_prob, old, adv, clip_range=torch.tensor(0.1))
    with pytest.raises(ValueError, match="adv_clip must be a finite number > 0"):
        ops.grpo_loss(log_prob, old, adv, adv_clip=0)
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0"):
        ops.grpo_loss(log_prob, old, adv, kl_coef=-0.1)


def test_dual_reward_loss_bad_input():
    log_prob, old, _, _ = _inputs((4, 3), 1e-4)
    outcome = {"a": torch.randn(4)}
    with pytest.raises(ValueError, match="combine must be 'separate' or 'sum'"):
        ops.dual_reward_loss(log_prob, old, outcome, combine="mean")
    with pytest.raises(ValueError, match=r"outcome_weights must give a weight for exactly the outcome names \['a'\]"):
        ops.dual_reward_loss(log_prob, old, outcome, outcome_weights={"b": 1.0})
    with pytest.raises(ValueError, match=r"outcome_weights\['a'\] must be a finite number >= 0"):
        ops.dual_reward_loss(log_prob, old, outcome, outcome_weights={"a": -1.0})
    with pytest.raises(ValueError, match=r"outcome_advantages\['a'\] must be \[B\] = \[4\]"):
        ops.dual_reward_loss(log_prob, old, {"a": torch.randn(4, 3)})
    with pytest.raises(ValueError, match=r"process_advantages must be \[B, K\] with the shape of log_prob"):
        ops.dual_reward_loss(log_prob, old, outcome, torch.randn(4, 2))
    with pytest.raises(ValueError, match="guided is given but process_advantages is None"):
        ops.dual_reward_loss(log_prob, old, outcome, guided=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"guided must have shape \[3\]"):
        ops.dual_reward_loss(log_prob, old, outcome, torch.randn(4, 3), guided=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="nothing to optimise"):
        ops.dual_reward_loss(log_prob, old, {})
    with pytest.raises(ValueError, match="process_weight must be a finite number >= 0"):
        ops.dual_reward_loss(log_prob, old, outcome, torch.randn(4, 3), process_weight=float("nan"))


@pytest.mark.gpu
def test_no_sync_before_the_stats_are_read():
    # grpo_loss reads its stats with one .tolist(); everything before it must stay on the device.
    from euphonium.ops.grpo import grpo_loss_tensors

    log_prob, old, adv, kl = (t.detach().cuda() for t in _inputs((64, 8), 1e-4, with_kl=True))
    log_prob.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = grpo_loss_tensors(log_prob, old, adv, kl=kl, kl_coef=0.1)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.shape == (6,) and stats.is_cuda and log_prob.grad.is_cuda


@pytest.mark.aot
def test_aot_compile():
    rows = aot_compile(
        ["grpo_loss_fwd_per_row_adv", "grpo_loss_fwd_kl", "grpo_loss_bwd_per_row_adv", "grpo_loss_bwd_kl"]
    )
    assert len(rows) == 8
    for row in rows:
        assert row["spill_bytes"] == 0, row
        # The log-prob streams are contiguous and aligned: 128-bit loads.
        assert row["global_loads_by_bits"].get("128", 0) > 0, row
