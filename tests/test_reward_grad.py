"""ops.reward_grad: exact on an analytic quadratic PRM, no autograd side effects, norm options, errors."""

import numpy as np
import pytest
import torch
from conftest import aot_compile
from torch import nn

from euphonium import ops

BACKENDS = ["reference", "torch", "triton"]


class QuadraticPRM(nn.Module):
    """``r_b = -0.5 * w(sigma_b) * sum((x_b - mu)^2 * a) + bias . e``: ``d r_b / d x_b = -w (x_b - mu) a``."""

    def __init__(self, shape):
        super().__init__()
        self.mu = nn.Parameter(torch.randn(shape))
        self.a = nn.Parameter(torch.rand(shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x, sigma, *, prompt_embedding):
        per_sample = ((x.to(torch.promote_types(x.dtype, torch.float32)) - self.mu) ** 2 * self.a).flatten(1).sum(1)
        return -0.5 * (1 + sigma) * per_sample + prompt_embedding @ self.bias

    def analytic_grad(self, x, sigma):
        with torch.no_grad():
            w = (1 + sigma).reshape(-1, *([1] * (x.dim() - 1)))
            return -w * (x.double() - self.mu.double()) * self.a.double()


def _setup(batch=4, shape=(3, 5, 7)):
    prm = QuadraticPRM(shape)
    x = torch.randn(batch, *shape)
    sigma = torch.rand(batch)
    emb = torch.randn(batch, 3)
    return prm, x, sigma, emb


@pytest.mark.parametrize("mode", ["no_grad", "grad", "x_requires_grad"])
def test_exact_gradient_and_no_side_effects(mode):
    prm, x, sigma, emb = _setup()
    if mode == "x_requires_grad":
        x.requires_grad_()
    context = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with context:
        reward, grad = ops.reward_grad(prm, x, sigma, prompt_embedding=emb)
    expected_reward = prm(x.detach(), sigma, prompt_embedding=emb).detach()
    torch.testing.assert_close(reward, expected_reward)
    assert grad.shape == x.shape and grad.dtype == x.dtype
    torch.testing.assert_close(grad.double(), prm.analytic_grad(x.detach(), sigma), rtol=1e-6, atol=1e-6)
    # No graph, no requires_grad, no gradients accumulated anywhere.
    assert reward.grad_fn is None and grad.grad_fn is None
    assert not reward.requires_grad and not grad.requires_grad
    assert x.requires_grad == (mode == "x_requires_grad") and x.grad is None
    assert all(p.grad is None for p in prm.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_of_x(dtype):
    prm, x, sigma, emb = _setup()
    x = x.to(dtype)
    with torch.no_grad():
        _, grad = ops.reward_grad(prm, x, sigma, prompt_embedding=emb)
    assert grad.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(grad.double(), prm.analytic_grad(x, sigma), rtol=tol, atol=tol)


def scale_np(g, normalize, max_norm):
    g = np.float64(g)
    norm = np.sqrt((g.reshape(len(g), -1) ** 2).sum(1))
    scale = np.ones_like(norm)
    if normalize:
        scale = np.where(norm > 0, 1 / np.where(norm > 0, norm, 1), 0.0)
        norm = norm * scale
    if max_norm is not None:
        scale = scale * np.minimum(1.0, max_norm / np.where(norm > 0, norm, 1))
    return g * scale.reshape(-1, *([1] * (g.ndim - 1)))


@pytest.mark.parametrize("backend,chunks", [("reference", "-"), ("torch", "-"), ("triton", "one"), ("triton", "many")])
@pytest.mark.parametrize("normalize,max_norm", [(True, None), (False, 1.5), (True, 0.5), (True, 2.0)])
def test_normalize_and_max_norm(backend, chunks, normalize, max_norm, nan_poison, monkeypatch):
    # 5 * 7 * 11 = 385 elements per sample: one block with a masked tail, or (small blocks) 4
    # chunks of 7 blocks of 16 per sample, the last chunk ragged.
    from euphonium.kernels import reward_grad as kernels

    if chunks == "many":
        for name, value in (("MIN_BLOCK", 16), ("MAX_BLOCK", 16), ("MAX_CHUNKS", 4)):
            monkeypatch.setattr(kernels, name, value)
    prm, x, sigma, emb = _setup(batch=5, shape=(5, 7, 11))
    with torch.no_grad():
        x[1] = prm.mu  # a zero gradient must stay zero, not NaN
        x[2] = prm.mu + 1e-3  # a small gradient below max_norm
        with ops.use_backend(backend):
            _, grad = ops.reward_grad(prm, x, sigma, prompt_embedding=emb, normalize=normalize, max_norm=max_norm)
    raw = prm.analytic_grad(x, sigma).numpy()
    expected = scale_np(raw, normalize, max_norm)
    np.testing.assert_allclose(grad.double().numpy(), expected, rtol=1e-5, atol=1e-7)
    norms = grad.flatten(1).norm(dim=1)
    assert norms[1] == 0 and torch.isfinite(grad).all()
    target = min(1.0, max_norm) if normalize and max_norm else (1.0 if normalize else None)
    if target is not None:
        torch.testing.assert_close(norms[[0, 2, 3, 4]], torch.full((4,), target), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_bf16(backend, nan_poison):
    prm, x, sigma, emb = _setup(batch=3, shape=(4, 64))
    x = x.bfloat16()
    with ops.use_backend(backend):
        _, grad = ops.reward_grad(prm, x, sigma, prompt_embedding=emb, normalize=True)
    assert grad.dtype == torch.bfloat16
    expected = scale_np(prm.analytic_grad(x, sigma).numpy(), True, None)
    np.testing.assert_allclose(grad.double().numpy(), expected, rtol=2e-2, atol=2e-3)


def check_inplace_equals_new_tensor(dtype, device):
    from euphonium.ops.reward_grad import scale_by_norm

    scales = torch.logspace(-3, 1, 5, device=device).reshape(-1, 1, 1)
    grad = (scales * torch.randn(5, 7, 29, device=device)).to(dtype)
    for normalize, max_norm in [(True, None), (False, 0.5), (True, 0.5)]:
        # Out of place into NaN-poisoned memory: every element is written.
        expected = scale_by_norm(grad, normalize=normalize, max_norm=max_norm)
        assert not torch.isnan(expected).any()
        work = grad.clone()
        out = scale_by_norm(work, normalize=normalize, max_norm=max_norm, inplace=True)
        assert out.data_ptr() == work.data_ptr() and out.shape == grad.shape and out.dtype == dtype
        assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"inplace=True\) needs a contiguous grad"):
        scale_by_norm(grad.transpose(1, 2), normalize=True, inplace=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_new_tensor(backend, dtype, nan_poison, monkeypatch):
    # Small Triton blocks: several chunks per sample, so that a chunk written before another chunk
    # of its sample is read would show.
    from euphonium.kernels import reward_grad as kernels

    for name, value in (("MIN_BLOCK", 16), ("MAX_BLOCK", 16), ("MAX_CHUNKS", 4)):
        monkeypatch.setattr(kernels, name, value)
    with ops.use_backend(backend):
        check_inplace_equals_new_tensor(dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_inplace_equals_new_tensor(backend, dtype, nan_poison):
    with ops.use_backend(backend):
        check_inplace_equals_new_tensor(dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_path_rounds_the_fp32_product_once(dtype):
    from euphonium.ops.reward_grad import _scales, scale_by_norm_torch

    grad = (torch.randn(4, 3, 50) * torch.logspace(-2, 1, 4).reshape(-1, 1, 1)).to(dtype)
    scale = _scales(torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float32), True, 0.7)
    expected = (grad.float() * scale.reshape(-1, 1, 1)).to(dtype)
    assert torch.equal(scale_by_norm_torch(grad, normalize=True, max_norm=0.7), expected)


class _KeptGradient(torch.autograd.Function):
    """A PRM whose backward hands back a tensor it keeps (or a view of one)."""

    kept = None

    @staticmethod
    def forward(ctx, x):
        return x.flatten(1).sum(1)

    @staticmethod
    def backward(ctx, grad_reward):
        return _KeptGradient.kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_autograd_did_not_make_are_not_written_over(backend):
    x = torch.randn(3, 4, 5)
    buffer = torch.rand(3, 4, 5) + 0.5
    with ops.use_backend(backend):
        # d/dx sum(x) is autograd's expanded view of one scalar: normalised into a new tensor.
        reward, grad = ops.reward_grad(lambda x: x.flatten(1).sum(1), x, normalize=True)
        torch.testing.assert_close(grad, torch.full_like(x, 20**-0.5))
        torch.testing.assert_close(reward, x.flatten(1).sum(1))
        # A contiguous view of the PRM's own tensor: a view is never written.
        _KeptGradient.kept = buffer.view(3, 20).view(3, 4, 5)
        _, grad = ops.reward_grad(_KeptGradient.apply, x, normalize=True)
        assert torch.equal(_KeptGradient.kept, buffer) and grad.data_ptr() != buffer.data_ptr()
        # The tensor itself: inplace=False keeps it.
        _KeptGradient.kept = buffer
        expected = buffer.clone()
        _, grad = ops.reward_grad(_KeptGradient.apply, x, normalize=True, inplace=False)
        assert torch.equal(buffer, expected)
        torch.testing.assert_close(grad.flatten(1).norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_path_matches_reference(dtype):
    from euphonium.ops.reward_grad import scale_by_norm_ref, scale_by_norm_torch

    scales = torch.logspace(-4, 1, 6).reshape(-1, 1, 1, 1)
    grad = (scales * torch.randn(6, 3, 5, 13)).to(dtype)
    grad[2] = 0
    for normalize, max_norm in [(True, None), (False, 0.3), (True, 0.5)]:
        out = scale_by_norm_torch(grad, normalize=normalize, max_norm=max_norm)
        ref = scale_by_norm_ref(grad, normalize=normalize, max_norm=max_norm)
        assert out.dtype == dtype and out.shape == grad.shape
        # fp32 norms summed in another order: at most one rounding of the output dtype apart.
        torch.testing.assert_close(out.float(), ref.float(), rtol=torch.finfo(dtype).eps, atol=0)
        assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [1e-22, 1e-40, 1e20, 1e36])
@pytest.mark.parametrize("normalize,max_norm", [(True, None), (False, 0.5), (True, 0.5)])
def test_tiny_and_huge_gradients(backend, magnitude, normalize, max_norm, nan_poison, monkeypatch):
    # Sums of squares in fp32 underflow (a norm of 1e-22 came back wrong) or overflow (1e20 x 385
    # elements, 1e36): the norm is taken in units of max |g|. Small Triton blocks, several chunks
    # per sample of different maxima.
    from euphonium.kernels import reward_grad as kernels
    from euphonium.ops.reward_grad import scale_by_norm

    for name, value in (("MIN_BLOCK", 16), ("MAX_BLOCK", 16), ("MAX_CHUNKS", 4)):
        monkeypatch.setattr(kernels, name, value)
    grad = torch.randn(4, 5, 7, 11) * magnitude
    grad[1] = 0  # an all-zero gradient stays zero
    grad[2] *= torch.logspace(-3, 0, 11)  # chunks of very different scales
    grad[3] = 0
    grad[3, 2, 3, 4] = -magnitude  # one element: its norm is |g|
    # Clipping after normalising is to a unit-scale norm, clipping alone to the gradient's scale.
    clip = max_norm if normalize or max_norm is None else max_norm * magnitude * 10
    with ops.use_backend(backend):
        out = scale_by_norm(grad, normalize=normalize, max_norm=clip)
    expected = scale_np(grad.numpy(), normalize, clip)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    # Subnormal results (clipping 1e-40 gradients) are exact to the subnormal spacing only.
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=3e-45)
    if normalize:
        norms = out.double().flatten(1).norm(dim=1)
        target = 1.0 if clip is None else min(1.0, clip)
        torch.testing.assert_close(norms[[0, 2, 3]], torch.full((3,), target, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_grad_of_a_tiny_linear_prm_has_unit_norm(backend):
    # The example end to end: a PRM whose gradient has norm ~1e-22.
    w = torch.randn(3, 8, 8) * 1e-24
    x = torch.randn(2, 3, 8, 8)
    with ops.use_backend(backend):
        _, grad = ops.reward_grad(lambda x: (x * w).flatten(1).sum(1), x, normalize=True)
    expected = (w.double() / w.double().norm()).expand(2, -1, -1, -1)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-9)


def test_bad_prm_output():
    prm, x, sigma, emb = _setup()
    cases = [
        (lambda x: prm(x, sigma, prompt_embedding=emb)[:, None], r"shape \[4\], got torch.float32 of shape \(4, 1\)"),
        (lambda x: prm(x, sigma, prompt_embedding=emb)[:3], r"shape \[4\]"),
        (lambda x: prm(x, sigma, prompt_embedding=emb).sum(), r"shape \[4\]"),
        (lambda x: (x.flatten(1).sum(1) > 0).long(), "floating-point reward"),
        (lambda x: [1.0] * 4, "prm must return a \\[B\\] tensor of rewards, got list"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.reward_grad(fn, x)

    def nan_at_2(x):
        r = prm(x, sigma, prompt_embedding=emb)
        return torch.where(torch.arange(4) == 2, torch.nan, r)

    with pytest.raises(ValueError, match=r"prm\(x\) has non-finite values \(first at sample 2\)"):
        ops.reward_grad(nan_at_2, x)

    def inf_grad_at_3(x):
        # Finite reward, infinite gradient at sample 3: sqrt'(0) = inf.
        return (x.flatten(1)[:, 0] * (torch.arange(4) != 3)).abs().sqrt() + prm(x, sigma, prompt_embedding=emb)

    x_zero = x.clone()
    x_zero[3, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match=r"grad has non-finite values \(first at sample 3\)"):
        ops.reward_grad(inf_grad_at_3, x_zero)

    def no_grad_prm(x):
        with torch.no_grad():
            return prm(x, sigma, prompt_embedding=emb)

    with pytest.raises(ValueError, match="does not depend on x differentiably"):
        ops.reward_grad(no_grad_prm, x)
    with pytest.raises(ValueError, match="does not depend on x"):
        ops.reward_grad(lambda x: prm.bias.sum() * torch.ones(4), x)


def test_bad_arguments():
    prm, x, sigma, emb = _setup()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="run the rollout under torch.no_grad"):
        ops.reward_grad(prm, x, sigma, prompt_embedding=emb)
    with pytest.raises(TypeError, match="prm must be callable"):
        ops.reward_grad(3.0, x)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.reward_grad(prm, x.long(), sigma, prompt_embedding=emb)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.reward_grad(prm, x.numpy(), sigma, prompt_embedding=emb)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        ops.reward_grad(prm, x, sigma, prompt_embedding=emb, normalize=1)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        ops.reward_grad(prm, x, sigma, prompt_embedding=emb, inplace=None)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
            ops.reward_grad(prm, x, sigma, prompt_embedding=emb, max_norm=bad)


@pytest.mark.aot
def test_aot_compile():
    names = [
        "reward_grad_sum_sq_fp32",
        "reward_grad_sum_sq_bf16",
        "reward_grad_normalize_fp32",
        "reward_grad_normalize_clip_bf16",
    ]
    rows = aot_compile(names)
    assert len(rows) == 8
    for row in rows:
        assert row["spill_bytes"] == 0, row
        # Samples are contiguous and aligned: the gradient is read and written 128 bits wide; only
        # the per-chunk partial sums move as 32-bit scalars.
        loads, stores = row["global_loads_by_bits"], row["global_stores_by_bits"]
        assert loads.get("128", 0) > 0 and set(loads) <= {"128", "32"}, row
        if row["kernel"].startswith("reward_grad_sum_sq"):
            assert set(loads) == {"128"} and set(stores) == {"32"}, row
        else:
            assert set(stores) == {"128"}, row
