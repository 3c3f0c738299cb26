"""ops.group_advantages and ops.dual_reward_advantages on every backend against float64 NumPy."""

import itertools

import numpy as np
import pytest
import torch
from conftest import aot_compile

from euphonium import ops

BACKENDS = ["reference", "torch", "triton"]


def advantages_np(rewards, ids, *, eps=1e-8, unbiased=True, global_std=False, clip=None):
    """Float64 NumPy spec: per group and column, (r - mean) / (std + eps); all-equal groups give 0."""
    r = np.asarray(rewards, dtype=np.float64)
    r2 = r.reshape(r.shape[0], -1)
    ids = np.asarray(ids)
    out = np.zeros_like(r2)
    for g in np.unique(ids):
        rows = ids == g
        for k in range(r2.shape[1]):
            v = r2[rows, k]
            pool = r2[:, k] if global_std else v
            std = pool.std(ddof=1 if unbiased and len(pool) > 1 else 0)
            a = (v - v.mean()) / (std + eps)
            out[rows, k] = 0.0 if v.max() == v.min() else a
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return out.reshape(r.shape)


def _layout(kind, batch):
    """(group kwargs, [B] numpy ids) for contiguous, shuffled or unequal-size groups."""
    if kind == "contiguous":
        return {"group_size": 4}, np.arange(batch) // 4
    if kind == "shuffled":
        ids = (torch.arange(batch) // 4)[torch.randperm(batch)]
        return {"group_ids": ids}, ids.numpy()
    # Unequal sizes (a singleton included), arbitrary non-contiguous ids, some negative.
    sizes = [1, 2, 3, 5, 7, batch - 18]
    ids = torch.repeat_interleave(torch.tensor([7, -3, 0, 12, 2, 5]), torch.tensor(sizes))[torch.randperm(batch)]
    return {"group_ids": ids.to(torch.int32)}, ids.numpy()


OPTIONS = [
    dict(unbiased=u, global_std=g, clip=c) for u, g, c in itertools.product([True, False], [False, True], [None, 0.9])
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "shuffled", "unequal"])
@pytest.mark.parametrize("cols", [None, 5])
def test_matches_numpy(backend, layout, cols, nan_poison):
    batch = 24
    shape = (batch,) if cols is None else (batch, cols)
    rewards = torch.randn(shape) * 3 + 1
    group, ids = _layout(layout, batch)
    for options in OPTIONS:
        with ops.use_backend(backend):
            adv = ops.group_advantages(rewards, **group, **options)
        assert adv.shape == rewards.shape and adv.dtype == torch.float32
        expected = advantages_np(rewards.numpy(), ids, **options)
        # A group whose rewards nearly agree carries its fp32 mean's rounding, an ulp of |mean| / std
        # in advantage units (two rewards 1e-4 apart: 5e-4).
        moments = {k: v for k, v in options.items() if k != "clip"}
        atol = np.maximum(1e-5, 8 * 2.0**-24 * _mean_over_std(rewards.numpy(), ids, **moments))
        err = np.abs(adv.numpy().astype(np.float64) - expected)
        assert (err <= atol + 1e-5 * np.abs(expected)).all(), f"{options}: max error {err.max()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_and_large_groups(backend, nan_poison):
    # Groups larger than one row block of the kernel (64 rows) and a large eps. The offset of 1000
    # costs a one-pass variance (E[r^2] - E[r]^2) ~3e-2 here; the two-pass one stays at fp32
    # rounding of the inputs (ulp(1000) = 6e-5).
    rewards = torch.randn(160, 3) + 1000.0
    with ops.use_backend(backend):
        adv = ops.group_advantages(rewards, group_size=80, eps=0.5)
    np.testing.assert_allclose(
        adv.numpy(), advantages_np(rewards.numpy(), np.arange(160) // 80, eps=0.5), rtol=0, atol=3e-4
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("global_std", [False, True])
def test_equal_rewards_and_singletons_give_zero(backend, unbiased, global_std, nan_poison):
    # The fp32 mean of 7 x 0.1, 7 x 0.7 or 3 x 0.9 is off by an ulp whichever order the sum takes,
    # which must not turn into ulp / eps.
    rewards = torch.randn(20, 3)
    rewards[0:7, 0] = 0.1
    rewards[0:7, 1] = 0.7
    rewards[7:10, :] = 0.9
    ids = torch.tensor([0] * 7 + [1] * 3 + [2] + [3] * 4 + [4] + [5] * 4)
    perm = torch.randperm(20)
    with ops.use_backend(backend):
        adv = ops.group_advantages(rewards[perm], group_ids=ids[perm], unbiased=unbiased, global_std=global_std)
        flat = ops.group_advantages(torch.full((14,), 0.1), group_size=7, global_std=global_std)
    adv = adv[torch.argsort(perm)]
    assert torch.isfinite(adv).all()
    assert (adv[0:7, :2] == 0).all() and (adv[7:10] == 0).all()
    assert (adv[10] == 0).all() and (adv[15] == 0).all()  # groups of one
    assert (adv[0:7, 2] != 0).all() and (adv[11:15] != 0).all() and (adv[16:] != 0).all()
    assert (flat == 0).all()
    expected = advantages_np(rewards.numpy(), ids.numpy(), unbiased=unbiased, global_std=global_std)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_dtypes(backend, dtype, out_dtype, nan_poison):
    rewards = torch.randn(16, 2).to(dtype)
    with ops.use_backend(backend):
        adv = ops.group_advantages(rewards, group_size=8)
    assert adv.dtype == out_dtype
    tol = 1e-12 if backend != "triton" and dtype == torch.float64 else 1e-5
    expected = advantages_np(rewards.double().numpy(), np.arange(16) // 8)
    np.testing.assert_allclose(adv.double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_columns(backend):
    # A rollout without guided steps has a [B, 0] process reward: nothing to normalise.
    with ops.use_backend(backend):
        adv = ops.group_advantages(torch.randn(6, 0), group_ids=torch.tensor([0, 1, 0, 1, 2, 2]))
        contiguous = ops.group_advantages(torch.randn(6, 0), group_size=3)
    assert adv.shape == contiguous.shape == (6, 0) and adv.dtype == contiguous.dtype == torch.float32


def _mean_over_std(rewards, ids, *, eps=1e-8, unbiased=True, global_std=False):
    """``|mean_group| / std`` per element (float64; 0 where the std is 0): the scale of the fp32 mean's rounding."""
    r = np.asarray(rewards, dtype=np.float64).reshape(len(ids), -1)
    out = np.zeros_like(r)
    for g in np.unique(ids):
        rows = ids == g
        for k in range(r.shape[1]):
            pool = r[:, k] if global_std else r[rows, k]
            std = pool.std(ddof=1 if unbiased and len(pool) > 1 else 0) + eps
            out[rows, k] = abs(r[rows, k].mean()) / std if std > 0 else 0.0
    return out.reshape(np.shape(rewards))


def _extreme_rewards(magnitude, batch=24, cols=2):
    """Finite fp32 rewards of one magnitude: sums (and at 3e38 differences) overflow, squares
    underflow (1e-22) or the values are subnormal (1e-40); a column of all-equal groups too."""
    if magnitude == 3e38:
        r = (torch.rand(batch, cols) * 2 - 1) * 3e38  # +-3e38: r - mean overflows as well
    else:
        r = (torch.rand(batch, cols) + 0.5) * magnitude
    r[:, -1] = magnitude  # every group all-equal in the last column
    return r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e20, 3e38, 1e-22, 1e-40])
@pytest.mark.parametrize("layout", ["contiguous", "unequal"])
def test_huge_and_tiny_rewards(backend, magnitude, layout, nan_poison):
    rewards = _extreme_rewards(magnitude)
    group, ids = _layout(layout, rewards.shape[0])
    for options in [dict(eps=0.0), dict(eps=1e-8), dict(eps=0.0, global_std=True, unbiased=False)]:
        with ops.use_backend(backend):
            adv = ops.group_advantages(rewards, **group, **options)
        expected = advantages_np(rewards.numpy(), ids, **options)
        assert np.isfinite(expected).all() and torch.isfinite(adv).all(), options
        # Relative to the largest advantage: 1e-32-sized ones (1e-40 rewards over eps) too. Every element
        # carries the fp32 rounding of its group's mean, a few ulps of |mean| / std in advantage units:
        # large when a group's rewards nearly agree (two of rand()+0.5 0.3% apart: 2e-5).
        scale = np.abs(expected).max()
        atol = np.maximum(1e-6 * scale, 8 * 2.0**-24 * _mean_over_std(rewards.numpy(), ids, **options))
        err = np.abs(adv.numpy().astype(np.float64) - expected)
        bad = np.argwhere(err > atol + 1e-5 * np.abs(expected))
        assert bad.size == 0, f"{options}: {[(tuple(i), adv.numpy()[tuple(i)], expected[tuple(i)]) for i in bad[:4]]}"
        assert (adv[:, -1] == 0).all()


def test_huge_rewards_the_issue_examples():
    # [1e20, 2e20] gave [0, 0] and [3e38, 2e38] NaN on every backend (the squares overflowed).
    for backend in BACKENDS:
        with ops.use_backend(backend):
            a = ops.group_advantages(torch.tensor([1e20, 2e20, 3e38, 2e38]), group_size=2)
        np.testing.assert_allclose(a.numpy(), [-(0.5**0.5), 0.5**0.5, 0.5**0.5, -(0.5**0.5)], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rewards_raise_on_every_backend(backend):
    for bad in (torch.nan, torch.inf, -torch.inf):
        rewards = torch.randn(8, 2)
        rewards[5, 1] = bad
        with (
            ops.use_backend(backend),
            pytest.raises(ValueError, match=r"rewards has non-finite values \(first at sample 5\)"),
        ):
            ops.group_advantages(rewards, group_ids=torch.arange(8) % 3)


def test_plain_rewards_keep_the_bits_of_the_plain_formula():
    # Power-of-two rescaling is exact: where nothing overflows the scaled form is the plain one.
    from euphonium.ops.advantages import group_advantages_contiguous

    rewards = torch.randn(32, 3) * 5 + 2
    r = rewards.reshape(8, 4, 3)
    centred = r - r.mean(1, keepdim=True)
    plain = centred / (centred.square().sum(1, keepdim=True).div(3).sqrt() + 1e-8)
    assert torch.equal(group_advantages_contiguous(rewards, 4), plain.reshape(32, 3))


def test_backends_agree_bitwise_on_layouts(nan_poison):
    # The same groups through contiguous and shuffled layouts give the same advantages per sample.
    rewards = torch.randn(16, 3)
    perm = torch.randperm(16)
    with ops.use_backend("triton"):
        contiguous = ops.group_advantages(rewards, group_size=4)
        shuffled = ops.group_advantages(rewards[perm], group_ids=(torch.arange(16) // 4)[perm])
    torch.testing.assert_close(shuffled, contiguous[perm], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_reward_advantages(backend, nan_poison):
    batch, steps = 12, 4
    ids = torch.randint(0, 3, (batch,))
    outcome = {"adherence": torch.rand(batch), "smooth": torch.randn(batch) * 2}
    process = torch.randn(batch, steps)
    guided = torch.tensor([True, False, True, False])
    process[:, ~guided] = torch.nan  # never computed at unguided steps: ignored
    with ops.use_backend(backend):
        a_o, a_p = ops.dual_reward_advantages(outcome, process, guided=guided, group_ids=ids, clip=2.0)
    assert list(a_o) == ["adherence", "smooth"]
    for name, r in outcome.items():
        np.testing.assert_allclose(
            a_o[name].numpy(), advantages_np(r.numpy(), ids.numpy(), clip=2.0), rtol=1e-5, atol=1e-5
        )
    assert a_p.shape == (batch, steps) and (a_p[:, ~guided] == 0).all()
    np.testing.assert_allclose(
        a_p[:, guided].numpy(), advantages_np(process[:, guided].numpy(), ids.numpy(), clip=2.0), rtol=1e-5, atol=1e-5
    )
    with ops.use_backend(backend):
        only_outcome, none = ops.dual_reward_advantages(outcome, group_ids=ids)
    assert none is None
    np.testing.assert_allclose(
        only_outcome["smooth"].numpy(), advantages_np(outcome["smooth"].numpy(), ids.numpy()), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "unequal"])
def test_dual_reward_advantages_td_form(backend, layout, nan_poison):
    # A_p[:, k] = groupnorm(r[:, k+1] - r[:, k]) at the guided steps, 0 elsewhere, by hand in float64.
    batch, steps = 24, 4
    group, ids = _layout(layout, batch)
    outcome = {"adherence": torch.randn(batch)}
    states = torch.randn(batch, steps + 1) * 2
    guided = torch.tensor([False, True, True, False])
    states[:, 4] = torch.nan  # only step 3 (unguided) uses state 4: ignored
    with ops.use_backend(backend):
        a_o, a_p = ops.dual_reward_advantages(outcome, states, guided=guided, process_form="td", clip=2.5, **group)
        _, a_state = ops.dual_reward_advantages(outcome, states[:, :steps], guided=guided, clip=2.5, **group)
    s = states.double().numpy()
    expected = np.zeros((batch, steps))
    for k in np.flatnonzero(guided.numpy()):
        delta = s[:, k + 1] - s[:, k]
        for g in np.unique(ids):
            rows = ids == g
            d = delta[rows]
            std = d.std(ddof=1) if rows.sum() > 1 else 0.0
            expected[rows, k] = 0.0 if d.max() == d.min() else np.clip((d - d.mean()) / (std + 1e-8), -2.5, 2.5)
    assert a_p.shape == (batch, steps) and a_p.dtype == torch.float32
    np.testing.assert_allclose(a_p.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert (a_p[:, ~guided] == 0).all() and (a_p[:, guided] != 0).any()
    np.testing.assert_allclose(
        a_o["adherence"].numpy(), advantages_np(outcome["adherence"].numpy(), ids, clip=2.5), rtol=1e-5, atol=1e-5
    )
    # The state form is the default and unchanged: the level at each step, not its change.
    np.testing.assert_allclose(
        a_state[:, guided].numpy(), advantages_np(s[:, 1:3], ids, clip=2.5), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(a_state.numpy(), a_p.numpy())


def test_dual_reward_advantages_td_bad_input():
    r = {"a": torch.randn(8)}
    with pytest.raises(ValueError, match="process_form must be 'state' or 'td', got 'delta'"):
        ops.dual_reward_advantages(r, torch.randn(8, 3), group_size=4, process_form="delta")
    with pytest.raises(ValueError, match=r"process_rewards must be \[B, K\+1\] .* got shape \(8,\)"):
        ops.dual_reward_advantages(r, torch.randn(8), group_size=4, process_form="td")
    with pytest.raises(ValueError, match=r"process_rewards must be \[B, K\+1\] .* got shape \(8, 0\)"):
        ops.dual_reward_advantages(r, torch.randn(8, 0), group_size=4, process_form="td")
    # [B, K+1] states: guided has K flags.
    with pytest.raises(ValueError, match=r"guided must have shape \[3\] \(one flag per step\)"):
        ops.dual_reward_advantages(
            r, torch.randn(8, 4), guided=torch.ones(4, dtype=torch.bool), group_size=4, process_form="td"
        )
    with pytest.raises(ValueError, match=r"process_rewards has batch size 6, expected 8"):
        ops.dual_reward_advantages(r, torch.randn(6, 4), group_size=2, process_form="td")
    states = torch.randn(8, 4)
    states[5, 2] = torch.inf  # used by step 1 (after) and step 2 (before)
    with pytest.raises(ValueError, match=r"process_rewards at state 2 has non-finite values \(first at sample 5\)"):
        ops.dual_reward_advantages(r, states, group_size=4, process_form="td")
    guided = torch.tensor([True, False, False])  # states 0 and 1 only
    _, a_p = ops.dual_reward_advantages(r, states, guided=guided, group_size=4, process_form="td")
    assert torch.isfinite(a_p).all() and (a_p[:, 1:] == 0).all()
    huge = torch.randn(8, 2)
    huge[3] = torch.tensor([-3e38, 3e38])
    with pytest.raises(ValueError, match=r"TD difference r\[:, 1\] - r\[:, 0\] overflows \(first at sample 3\)"):
        ops.dual_reward_advantages(r, huge, group_size=4, process_form="td")
    with pytest.raises(TypeError, match="distributed must be a bool"):
        ops.dual_reward_advantages(r, group_size=4, distributed=1)


def test_bad_input():
    r = torch.randn(8)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        ops.group_advantages(r)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        ops.group_advantages(r, group_size=4, group_ids=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="group_size must be a positive divisor of the batch size 8"):
        ops.group_advantages(r, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        ops.group_advantages(r, group_size=0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        ops.group_advantages(r, group_size=4.0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        ops.group_advantages(r, group_size=True)
    with pytest.raises(TypeError, match="group_ids="):
        ops.group_advantages(r, group_size=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group_ids must have shape \[8\]"):
        ops.group_advantages(r, group_ids=torch.zeros(7, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        ops.group_advantages(r, group_ids=torch.zeros(8))
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        ops.group_advantages(r, group_ids=torch.zeros(8, dtype=torch.bool))
    with pytest.raises(TypeError, match="group_ids must be a torch.Tensor"):
        ops.group_advantages(r, group_ids=[0] * 8)
    bad = r.clone()
    bad[5] = torch.nan
    with pytest.raises(ValueError, match="rewards has non-finite values \\(first at sample 5\\)"):
        ops.group_advantages(bad, group_size=4)
    bad2 = torch.randn(8, 3)
    bad2[6, 2] = torch.inf
    with pytest.raises(ValueError, match="first at sample 6"):
        ops.group_advantages(bad2, group_size=4)
    # Finite rewards whose sum overflows are finite: the check must not stop at the sum.
    huge = torch.tensor([3e38, 3e38, 1.0, 2.0, 2e38, 3e38, 0.5, 0.5])
    assert (ops.group_advantages(huge, group_size=2)[[0, 1, 6, 7]] == 0).all()
    bad3 = huge.clone()
    bad3[4] = -torch.inf
    with pytest.raises(ValueError, match="first at sample 4"):
        ops.group_advantages(bad3, group_size=2)
    with pytest.raises(ValueError, match=r"rewards must be \[B\] or \[B, K\]"):
        ops.group_advantages(torch.randn(8, 2, 2), group_size=4)
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor"):
        ops.group_advantages(torch.arange(8), group_size=4)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        ops.group_advantages([1.0] * 8, group_size=4)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ops.group_advantages(r, group_size=4, eps=-1e-8)
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        ops.group_advantages(r, group_size=4, clip=0.0)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        ops.group_advantages(r, group_size=4, unbiased=1)
    with pytest.raises(TypeError, match="global_std must be a bool"):
        ops.group_advantages(r, group_size=4, global_std="yes")


def test_dual_reward_advantages_bad_input():
    r = torch.randn(8)
    with pytest.raises(TypeError, match="outcome_rewards must be a mapping"):
        ops.dual_reward_advantages(r, group_size=4)
    with pytest.raises(ValueError, match="nothing to optimise"):
        ops.dual_reward_advantages({}, group_size=4)
    with pytest.raises(ValueError, match="'process' is reserved"):
        ops.dual_reward_advantages({"process": r}, group_size=4)
    with pytest.raises(ValueError, match=r"outcome_rewards\['a'\] must be \[B\]"):
        ops.dual_reward_advantages({"a": torch.randn(8, 2)}, group_size=4)
    with pytest.raises(ValueError, match=r"outcome_rewards\['b'\] has batch size 6"):
        ops.dual_reward_advantages({"a": r, "b": torch.randn(6)}, group_size=2)
    with pytest.raises(ValueError, match=r"process_rewards must be \[B, K\]"):
        ops.dual_reward_advantages({"a": r}, torch.randn(8), group_size=4)
    with pytest.raises(TypeError, match="guided must be a bool tensor"):
        ops.dual_reward_advantages({"a": r}, torch.randn(8, 3), guided=torch.ones(3), group_size=4)
    with pytest.raises(ValueError, match=r"guided must have shape \[3\]"):
        ops.dual_reward_advantages({"a": r}, torch.randn(8, 3), guided=torch.ones(8, 3, dtype=torch.bool), group_size=4)
    process = torch.randn(8, 3)
    process[2, 1] = torch.nan
    with pytest.raises(ValueError, match=r"process_rewards at step 1 has non-finite values \(first at sample 2\)"):
        ops.dual_reward_advantages({"a": r}, process, group_size=4)
    bad = r.clone()
    bad[6] = torch.inf
    with pytest.raises(ValueError, match=r"outcome_rewards\['b'\] has non-finite values \(first at sample 6\)"):
        ops.dual_reward_advantages({"a": r, "b": bad}, group_size=4)


@pytest.mark.aot
def test_aot_compile():
    rows = aot_compile(["group_advantages_outcome", "group_advantages_process_global_clip"])
    assert len(rows) == 4
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert row["registers"] and row["registers"] <= 64, row
