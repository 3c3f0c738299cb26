"""Process-reward gradient for guided sampling: ``g = d r_p(x, ...) / d x`` inside a no-grad rollout."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from euphonium._checks import check_bool, check_finite, check_float_tensor, check_positive
from euphonium.ops._backend import resolve
from euphonium.ops.advantages import pow2_scale


# No trio of its own (the PRM's autograd); its norm post-processing is ops.reward_grad.scale_by_norm's trio.
def reward_grad(
    prm: Callable[..., torch.Tensor],
    x: torch.Tensor,
    *args,
    normalize: bool = False,
    max_norm: Optional[float] = None,
    inplace: bool = True,
    **kwargs,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reward ``r = prm(x, *args, **kwargs)`` (``[B]``) and its gradient ``g = d r / d x``.

    The gradient of ``sum_b r[b]`` with respect to ``x`` is each sample's own gradient as long as the
    PRM treats samples independently (true for a PRM in eval mode; batch-norm in training mode
    would couple them). The PRM runs under ``torch.enable_grad()`` even inside ``torch.no_grad()``;
    the call leaves no graph behind, does not set ``requires_grad`` on the caller's ``x`` and
    accumulates no ``.grad`` in the PRM's parameters (only ``x`` is differentiated). It is one
    ``torch.autograd.Function`` whose outputs are non-differentiable, so a rollout never carries a
    graph out of it.

    Options, per sample ``b`` (``n_b = ||g_b||_2`` over all non-batch elements, in fp32, computed as
    ``m_b sqrt(sum((g_b / m_b)^2))`` with ``m_b`` the power of two at or below ``max |g_b|``, so that
    neither tiny gradients (``1e-22``, subnormal) underflow nor huge ones overflow):
    ``normalize=True`` gives ``g_b / n_b`` (a zero gradient stays zero); ``max_norm=c`` then
    scales by ``min(1, c / ||g_b||)``. On CUDA these are two Triton launches over (sample, chunk)
    blocks (per-chunk sums of squares, then a fixed-order norm and the scaling), deterministic and
    spread over the whole GPU however few samples there are; on the CPU the PyTorch path. Both
    scale the gradient autograd returned in place (no latent-sized allocation) when it is
    contiguous and not a view; ``inplace=False`` always makes a new tensor, for a PRM whose custom
    backward returns a tensor it keeps (which would otherwise be overwritten).

    Args:
        prm: a callable (e.g. an ``nn.Module``) mapping ``x`` ``[B, ...]`` and the extra arguments
            (noise level, prompt embeddings, ...) to a ``[B]`` floating-point reward.
        x: the latents ``[B, ...]``, any float dtype.

    Returns:
        ``(reward, grad)``: the detached ``[B]`` reward as the PRM returned it, and the detached
        gradient with the shape and dtype of ``x``.

    Raises:
        RuntimeError: called under ``torch.inference_mode`` (use ``torch.no_grad`` for rollouts).
        ValueError: the PRM returns a non-tensor, a tensor not of shape ``[B]``, non-finite rewards or
            a non-finite gradient (naming the sample), or a reward that does not depend on ``x``
            differentiably (e.g. computed under ``torch.no_grad`` inside the PRM).
    """
    if not callable(prm):
        raise TypeError(f"prm must be callable (a process reward model), got {type(prm).__name__}")
    check_float_tensor("x", x)
    check_bool("normalize", normalize)
    check_bool("inplace", inplace)
    max_norm = check_positive("max_norm", max_norm, allow_none=True)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "reward_grad needs autograd, which torch.inference_mode disables beyond enable_grad(); "
            "run the rollout under torch.no_grad() instead"
        )
    reward, grad = _RewardGrad.apply(x, prm, args, kwargs)
    check_finite("grad", grad, what="the process reward model's gradient d reward / d x")
    if normalize or max_norm is not None:
        # A gradient that autograd's ops made is new memory nobody else holds; a view may share its
        # memory with anything (its base is unknown), and an expanded one cannot be written at all.
        owned = inplace and grad.is_contiguous() and grad._base is None
        grad = scale_by_norm(grad, normalize=normalize, max_norm=max_norm, inplace=owned)
    return reward, grad


def scale_by_norm(
    grad: torch.Tensor, *, normalize: bool = False, max_norm: Optional[float] = None, inplace: bool = False
) -> torch.Tensor:
    """:func:`reward_grad`'s per-sample normalisation / norm clipping of ``grad`` on the backend that
    ``grad``'s device resolves to (the Triton kernels, the PyTorch path or the reference).

    ``inplace=True`` writes the result into ``grad`` (which must be contiguous) and returns it.
    """
    _check_inplace(grad, inplace)
    backend = resolve(grad.device, torch_path=True, kernels="reward_grad")
    if backend == "reference":
        out = scale_by_norm_ref(grad, normalize=normalize, max_norm=max_norm)
        return grad.copy_(out) if inplace else out
    if backend == "torch":
        return scale_by_norm_torch(grad, normalize=normalize, max_norm=max_norm, inplace=inplace)
    from euphonium.kernels.reward_grad import scale_by_norm as scale_by_norm_triton

    return scale_by_norm_triton(grad, normalize=normalize, max_norm=max_norm, inplace=inplace)


class _RewardGrad(torch.autograd.Function):
    """Forward computes the PRM and its input gradient in a private graph; nothing flows back."""

    @staticmethod
    def forward(ctx, x, prm, args, kwargs):
        batch = x.shape[0]
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            reward = prm(x_leaf, *args, **kwargs)
            if not isinstance(reward, torch.Tensor):
                raise ValueError(f"prm must return a [B] tensor of rewards, got {type(reward).__name__}")
            if reward.shape != (batch,) or not reward.is_floating_point():
                raise ValueError(
                    f"prm must return a floating-point reward of shape [{batch}], got "
                    f"{reward.dtype} of shape {tuple(reward.shape)}"
                )
            check_finite("prm(x)", reward, what="the process reward model returned non-finite rewards")
            if not reward.requires_grad:
                raise ValueError(
                    "prm(x) does not depend on x differentiably (no autograd graph: does the PRM "
                    "run under torch.no_grad/inference_mode or detach its input?)"
                )
            (grad,) = torch.autograd.grad(reward.sum(), [x_leaf], allow_unused=True)
        if grad is None:
            raise ValueError("prm(x) does not depend on x: its gradient with respect to x does not exist")
        reward = reward.detach()
        ctx.mark_non_differentiable(reward, grad)
        return reward, grad

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("reward_grad's outputs are constants; nothing can be differentiated through them")


# Same formula: ops.reward_grad.scale_by_norm_torch (PyTorch path), kernels.reward_grad.scale_by_norm (Triton).
def scale_by_norm_ref(grad: torch.Tensor, *, normalize: bool = False, max_norm: Optional[float] = None) -> torch.Tensor:
    """Eager reference of the per-sample normalisation and norm clipping of :func:`reward_grad`.

    Norms in power-of-two units of each sample's ``max |g|`` (exact rescalings):
    ``u = g / m``, ``||g|| = m ||u||``, the result ``u * k`` with ``k`` the scale in those units."""
    g = grad.to(torch.promote_types(grad.dtype, torch.float32))
    flat = g.reshape(g.shape[0], -1)
    unit, inv = pow2_scale(flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0]))
    u = flat * inv[:, None]
    k = _scales(u.norm(dim=1), normalize, max_norm, unit=unit)
    return (u * k[:, None]).reshape(g.shape).to(grad.dtype)


def _check_inplace(grad: torch.Tensor, inplace: bool) -> None:
    if inplace and not grad.is_contiguous():
        raise ValueError(
            f"scale_by_norm(inplace=True) needs a contiguous grad, got strides {grad.stride()} "
            f"for shape {tuple(grad.shape)}"
        )


def _scales(
    norm: torch.Tensor, normalize: bool, max_norm: Optional[float], *, unit: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-sample factors from per-sample norms, in units of ``unit`` (per sample; 1 when None):
    ``norm`` is ``||g|| / unit`` and the result ``k`` scales ``g / unit``, so ``k = unit`` leaves ``g``
    as it is. ``1 / norm`` (0 for a zero gradient) and/or the clip ``min(1, max_norm / ||g||)``."""
    if unit is None:
        unit = torch.ones_like(norm)
    scale = unit
    if normalize:
        scale = torch.where(norm > 0, 1 / norm, torch.zeros_like(norm))
        if max_norm is not None:
            scale = scale * (max_norm / (norm * scale)).clamp(max=1.0)
    elif max_norm is not None:
        # min(1, c / ||g||) in units: min(unit, c / (||g|| / unit)); a zero gradient keeps ``unit``.
        scale = torch.minimum(unit, max_norm / norm)
    return scale


# Same formula: ops.reward_grad.scale_by_norm_ref (spec), kernels.reward_grad.scale_by_norm (Triton).
def scale_by_norm_torch(
    grad: torch.Tensor, *, normalize: bool = False, max_norm: Optional[float] = None, inplace: bool = False
) -> torch.Tensor:
    """The PyTorch path of the post-processing (backend ``torch``; CPU tensors under ``auto``).

    The reference's arithmetic (fp32 norms and products, one rounding to ``grad``'s dtype) without
    its whole-tensor fp32 copy of a bf16/fp16 gradient: the norms are reduced from the input with an
    fp32 accumulator and the products computed in fp32 by the multiply itself. On the CPU each
    sample is multiplied by its 0-d fp32 scale, which PyTorch's CPU kernels apply in fp32 before
    rounding once (a ``[B, 1]`` fp32 operand sends a bf16 tensor through TensorIterator's casting
    path there, about three times slower; on CUDA that path is the fast one, and a 0-d CUDA scale
    would be rounded to bf16 first).
    ``inplace``: write into ``grad`` (contiguous) instead of a new tensor. Samples whose plain norm
    is below 2^-40 or above 2^60 (where fp32 squares may underflow or their sum overflow) take the
    reference's scaled form.
    """
    from euphonium.ops._sde_torch import compute_dtype

    _check_inplace(grad, inplace)
    dtype = compute_dtype(grad)
    flat = grad.reshape(grad.shape[0], -1)
    out = flat if inplace else torch.empty_like(flat)
    norm = torch.linalg.vector_norm(flat, dim=1, dtype=dtype)
    # Squares that may have underflowed (a norm below 2^-40, zero included) or a sum that may have
    # overflowed: the reference's form in units of max |g| instead (a scaled fp32 copy), with the
    # product taken in two exact-scale steps. Elsewhere the plain norm is the same to rounding.
    tiny, huge = (2.0**-40, 2.0**60) if dtype == torch.float32 else (2.0**-400, 2.0**400)
    if not bool(((norm >= tiny) & (norm <= huge)).all()):
        unit, inv = pow2_scale(flat.abs().amax(1).to(dtype) if flat.shape[1] else norm)
        u = flat * inv.to(dtype)[:, None]
        k = _scales(torch.linalg.vector_norm(u, dim=1), normalize, max_norm, unit=unit)
        out.copy_(u.mul_(k[:, None]))
        return out.view(grad.shape)
    scale = _scales(norm, normalize, max_norm)
    if grad.dtype == dtype or grad.device.type != "cpu":
        torch.mul(flat, scale[:, None], out=out)
    else:
        for b in range(flat.shape[0]):
            torch.mul(flat[b], scale[b], out=out[b])
    return out.view(grad.shape)
