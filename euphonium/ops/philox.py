"""Philox noise in PyTorch: the counter-based generator of ``triton.language.random``.

Philox4x32-10 keyed by a 64-bit seed, and its Box-Muller transform, written with torch integer ops
so that the PyTorch paths draw the stream the kernels draw: element ``i`` of the flattened ``[B, ...]``
noise is ``tl.randn(seed, i)`` (one normal per Philox call, from its first two words, as Triton does).

The 32 x 32 -> 64-bit products of the rounds are int64 multiplications: the product of two values
below ``2^32`` is below ``2^64``, so its wrapped two's-complement int64 holds the exact bits, and the
high and low words are ``(p >> 32) & 0xFFFFFFFF`` and ``p & 0xFFFFFFFF``. Words that only feed an
XOR keep garbage above bit 31 until they are masked; the noise is made in chunks that stay in
cache, with in-place ops.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale (the largest with INT32_MAX * scale < 1 in fp32) and the
# Box-Muller constants of its pair_uniform_to_normal, all applied in fp32.
_UNIFORM_SCALE = 4.6566127342e-10
_MIN_UNIFORM = 1.0e-7
_TWO_PI = 6.283185307179586
# Elements per chunk of randn: int64 temporaries of a few hundred KiB (cache-resident).
CHUNK = 1 << 15


def _rounds(seed: int, offset: torch.Tensor, words: int) -> Tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters ``(offset_lo, offset_hi, 0, 0)``; the first ``words`` output words,
    each an int64 tensor whose low 32 bits are the word (the bits above are not cleared)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    # Round 1 with c2 = c3 = 0: umulhi(B, 0) = B * 0 = 0.
    c3 = (offset & _MASK32).mul_(_PHILOX_ROUND_A)
    c2 = (c3 >> 32).bitwise_xor_(k1).bitwise_and_(_MASK32)
    c0 = (offset >> 32).bitwise_xor_(k0)
    c1 = None  # zero
    for r in range(1, _PHILOX_ROUNDS):
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
        p_b = c2 * _PHILOX_ROUND_B  # c0 and c2 are clean: the products are exact
        hi_b = p_b >> 32
        if c1 is not None:
            hi_b.bitwise_xor_(c1)
        last = r == _PHILOX_ROUNDS - 1
        if last and words <= 2:
            return hi_b.bitwise_xor_(k0).bitwise_and_(_MASK32), p_b
        p_a = c0.mul_(_PHILOX_ROUND_A)
        c0 = hi_b.bitwise_xor_(k0).bitwise_and_(_MASK32)
        c2 = (p_a >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, c3 = p_b, p_a
    return c0, c1, c2, c3


def philox4x32(seed: int, offset: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counter ``(offset_lo, offset_hi, 0, 0)`` and key ``(seed_lo, seed_hi)``.

    ``offset``: int64 tensor of non-negative counters; ``seed`` an int in ``[0, 2^64)``. Returns four
    int64 tensors holding uint32 values, bit-exact with Triton's ``tl.randint4x(seed, offset)`` (read
    as unsigned).
    """
    return tuple(w & _MASK32 for w in _rounds(seed, offset.to(torch.int64), 4))


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` of the low 32 bits: as int32, negatives folded by ``~x``, times the scale."""
    x = word.to(torch.int32)  # keeps the low 32 bits
    return x.bitwise_xor_(x >> 31).to(torch.float32).mul_(_UNIFORM_SCALE)


def philox_randn(
    seed: int,
    numel: int,
    device: Union[str, torch.device] = "cpu",
    *,
    offset: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``numel`` standard normal float32 values: element ``i`` is Triton's ``tl.randn(seed, offset + i)``.

    The integer stream (Philox4x32-10 keyed by the 64-bit ``seed``, counter ``(j_lo, j_hi, 0, 0)`` for
    ``j = offset + i``) and the uniform floats are bit-exact; the Box-Muller transform
    ``sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2)`` goes through torch's ``log``/``cos``, which can
    differ from the GPU's in the last bits. ``out``: a contiguous float32 tensor of ``numel``
    elements to fill (returned) instead of a new one.
    """
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=device)
    flat = out.view(-1)
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        counters = torch.arange(offset + start, offset + stop, dtype=torch.int64, device=flat.device)
        w0, w1 = _rounds(seed, counters, 2)
        radius = _uniform(w0).clamp_min_(_MIN_UNIFORM).log_().mul_(-2.0).sqrt_()
        torch.mul(radius, _uniform(w1).mul_(_TWO_PI).cos_(), out=flat[start:stop])
    return out


def draw_seed() -> int:
    """A fresh Philox seed from torch's default CPU generator (``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())


__all__ = ["philox4x32", "philox_randn", "draw_seed", "CHUNK"]
