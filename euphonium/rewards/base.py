"""One interface for outcome (pixel) rewards: ``reward(videos, prompts) -> [B]``.

``videos`` is a float tensor ``[B, F, C, H, W]`` with values in ``[0, 1]`` (decoded clips) and
``prompts`` a sequence of ``B`` strings. A reward returns one float per sample. Anything with that
call signature works: a plain function, an ``nn.Module`` (VideoAlign, HPS, your own) or one of the
built-in rewards. :class:`RewardSet` evaluates several named rewards, checks every value, and returns
the weighted total together with each reward on its own, because the trainer logs and normalises
them one by one.

A reward that returns the wrong shape, NaN or inf raises ``ValueError`` naming the reward and the
first bad sample; a reward that raises is never turned into a number.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from euphonium._checks import check_float, check_float_tensor

RewardValue = Union[torch.Tensor, np.ndarray, Sequence[float]]
RewardFn = Callable[[torch.Tensor, Sequence[str]], Union[RewardValue, Mapping[str, RewardValue]]]

# Decoders that compute ``(x + 1) / 2`` in low precision overshoot [0, 1] by a few ulps; a value
# further out than this means the caller passed latents or [-1, 1] pixels.
VIDEO_RANGE_TOLERANCE = 1e-3


class RewardOutput(NamedTuple):
    """``total [B]`` float32 = ``sum_k weight_k * parts[k]``; ``parts``: name -> unweighted ``[B]`` float32."""

    total: torch.Tensor
    parts: Dict[str, torch.Tensor]


def check_videos(videos, prompts: Optional[Sequence[str]] = None) -> int:
    """Check ``videos [B, F, C, H, W]`` (float, finite, in [0, 1]) and, if given, ``prompts`` (B strings).

    Returns ``B``.
    """
    check_float_tensor("videos", videos)
    if videos.dim() != 5:
        raise ValueError(f"videos must have shape [B, F, C, H, W], got {tuple(videos.shape)}")
    batch = videos.shape[0]
    if prompts is not None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
        if len(prompts) != batch:
            raise ValueError(f"prompts has {len(prompts)} entries but videos has batch size {batch}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    values = videos.detach()
    finite = torch.isfinite(values).reshape(batch, -1).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"videos has non-finite values (first at sample {int((~finite).nonzero()[0])})")
    lo, hi = float(values.amin()), float(values.amax())
    if lo < -VIDEO_RANGE_TOLERANCE or hi > 1 + VIDEO_RANGE_TOLERANCE:
        raise ValueError(
            f"videos must hold pixel values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "decode latents first and map [-1, 1] pixels with (x + 1) / 2"
        )
    return batch


def check_reward_values(
    name: str, values, batch: int, prompts: Optional[Sequence[str]] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Reward ``name``'s output as a ``[batch]`` float32 tensor on ``device``.

    Accepts a tensor, a NumPy array or a sequence of numbers. Raises ``ValueError`` naming the reward
    and the first offending sample when the shape is not ``[batch]`` (``[batch, 1]`` is accepted) or a
    value is NaN or inf. A differentiable reward keeps its graph (call rewards under ``torch.no_grad()``
    when no gradient is wanted).
    """
    if isinstance(values, Mapping):
        raise TypeError(f"reward {name!r} returned a mapping; put multi-part rewards in a RewardSet")
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(np.asarray(values, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"reward {name!r} must return a tensor, an array or a list of numbers, got {type(values).__name__}"
            ) from err
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"reward {name!r} must return real numbers, got dtype {values.dtype}")
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() != 1 or values.shape[0] != batch:
        raise ValueError(
            f"reward {name!r} must return shape [{batch}] (one value per sample), got shape {tuple(values.shape)}"
        )
    values = values.to(device=device if device is not None else values.device, dtype=torch.float32)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        where = f" (prompt {prompts[i]!r})" if prompts is not None else ""
        raise ValueError(f"reward {name!r} returned {float(values[i])} for sample {i}{where}")
    return values


class Reward(abc.ABC):
    """Base class of the built-in rewards: checks inputs and output around :meth:`compute`.

    Subclasses set ``name`` and implement ``compute(videos, prompts) -> [B]``.
    """

    name: str = "reward"

    @abc.abstractmethod
    def compute(self, videos: torch.Tensor, prompts: Sequence[str]) -> RewardValue:
        """``[B]`` reward values for ``videos [B, F, C, H, W]`` in [0, 1] and ``B`` prompts."""

    def __call__(
        self, videos: torch.Tensor, prompts: Sequence[str], metadata: Optional[Sequence[Mapping]] = None
    ) -> torch.Tensor:
        """``compute(videos, prompts)``, checked; ``metadata`` (one mapping per prompt) is passed on as
        ``compute(..., metadata=...)`` where ``compute`` takes it."""
        batch = check_videos(videos, prompts)
        if metadata is not None and accepts_metadata(self.compute):
            values = self.compute(videos, prompts, metadata=check_metadata(metadata, batch))
        else:
            values = self.compute(videos, prompts)
        return check_reward_values(self.name, values, batch, prompts, videos.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def accepts_metadata(fn: Callable) -> bool:
    """``fn`` has a parameter named ``metadata`` (rewards without one are called as before)."""
    try:
        return "metadata" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def check_metadata(metadata, batch: int) -> list:
    """``metadata`` as a list of ``batch`` dicts (one per prompt)."""
    if isinstance(metadata, Mapping) or not isinstance(metadata, Sequence) or len(metadata) != batch:
        raise ValueError(f"metadata must be a sequence of {batch} mappings, one per prompt")
    for i, item in enumerate(metadata):
        if not isinstance(item, Mapping):
            raise TypeError(f"metadata[{i}] must be a mapping, got {type(item).__name__}")
    return [dict(item) for item in metadata]


class CallableReward(Reward):
    """Adapter for any callable or ``nn.Module`` ``fn(videos, prompts) -> [B]``.

    ``fn`` may return a tensor (any device, any real dtype), a NumPy array or a list of numbers; the
    result is checked and returned as ``[B]`` float32 on the videos' device. Exceptions from ``fn``
    propagate unchanged.
    """

    def __init__(self, fn: RewardFn, name: Optional[str] = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__

    def compute(self, videos, prompts, metadata=None):
        if metadata is not None and accepts_metadata(self.fn):
            return self.fn(videos, prompts, metadata=metadata)
        return self.fn(videos, prompts)


class RewardSet:
    """Several named rewards, each checked, combined as ``total = sum_k weight_k * r_k``.

    ``rewards`` maps a name to a callable ``fn(videos, prompts)``. The callable returns either ``[B]``
    values (one part, called by its key) or a mapping of part names to ``[B]`` values (one part per
    entry: e.g. the toy task's exact rewards, computed together). Part names must be unique.

    ``weights`` maps every part name to its weight (0 logs a reward without optimising it); ``None``
    weighs every part 1. A weight for an unknown part, or a part without a weight, is an error (raised
    on the first call, when the parts are known) so that a misspelled name never goes unnoticed.

    Calling returns :class:`RewardOutput` ``(total [B], parts {name: [B]})``, float32 on the videos'
    device.

    Prompt metadata: a reward whose call has a ``metadata`` parameter gets ``metadata=`` a list of one
    dict per prompt (the fields of a ``.jsonl`` prompt file besides ``prompt``; ``{}`` where there are
    none); the others are called as ``fn(videos, prompts)``. The metadata is what the call passes, else
    looked up by prompt text in ``prompt_metadata``.
    """

    def __init__(
        self,
        rewards: Mapping[str, RewardFn],
        weights: Optional[Mapping[str, float]] = None,
        prompt_metadata: Optional[Mapping[str, Mapping]] = None,
    ):
        if not isinstance(rewards, Mapping) or not rewards:
            raise ValueError("rewards must be a non-empty mapping of name -> callable(videos, prompts)")
        for key, fn in rewards.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"reward names must be non-empty strings, got {key!r}")
            if not callable(fn):
                raise TypeError(f"reward {key!r} must be callable, got {type(fn).__name__}")
        self.rewards = dict(rewards)
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(f"weights must be a mapping of reward name -> float, got {type(weights).__name__}")
            weights = {k: check_float(f"weights[{k!r}]", w) for k, w in weights.items()}
        self.weights = weights
        self.prompt_metadata = dict(prompt_metadata or {})

    def _check_weights(self, parts: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        if self.weights is None:
            return {name: 1.0 for name in parts}
        unknown = sorted(set(self.weights) - set(parts))
        if unknown:
            raise ValueError(f"weights names unknown rewards {unknown}; the rewards are {sorted(parts)}")
        missing = sorted(set(parts) - set(self.weights))
        if missing:
            raise ValueError(f"rewards {missing} have no weight; give each a weight (0 logs it without optimising it)")
        return self.weights

    def __call__(
        self, videos: torch.Tensor, prompts: Sequence[str], metadata: Optional[Sequence[Mapping]] = None
    ) -> RewardOutput:
        batch = check_videos(videos, prompts)
        if metadata is None:
            metadata = [self.prompt_metadata.get(p, {}) for p in prompts]
        metadata = check_metadata(metadata, batch)
        parts: Dict[str, torch.Tensor] = {}
        for key, fn in self.rewards.items():
            out = fn(videos, prompts, metadata=metadata) if accepts_metadata(fn) else fn(videos, prompts)
            named = out.items() if isinstance(out, Mapping) else [(key, out)]
            for name, values in named:
                if name in parts:
                    raise ValueError(f"two rewards are both named {name!r}; rename one")
                parts[name] = check_reward_values(name, values, batch, prompts, videos.device)
        weights = self._check_weights(parts)
        total = torch.zeros(batch, dtype=torch.float32, device=videos.device)
        for name, values in parts.items():
            total = total + weights[name] * values
        return RewardOutput(total, parts)

    def __repr__(self) -> str:
        return f"RewardSet(rewards={list(self.rewards)}, weights={self.weights})"


# A factory, or "module:attribute" naming one: a reward defined above this layer (the toy world's) is
# registered by name and imported only when it is built, so rewards/ never imports the layers above it.
_REGISTRY: Dict[str, Union[Callable[..., RewardFn], str]] = {}


def register_reward(name: str, factory: Union[Callable[..., RewardFn], str]) -> None:
    """Make ``build_reward(name, **kwargs)`` call ``factory(**kwargs)``; re-registering a name is an error.

    ``factory`` is a callable or a ``"package.module:attribute"`` string, imported at the first build.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if isinstance(factory, str):
        if factory.count(":") != 1 or not all(factory.split(":")):
            raise ValueError(f"factory must be a callable or 'module:attribute', got {factory!r}")
    elif not callable(factory):
        raise TypeError(f"factory must be callable or 'module:attribute', got {type(factory).__name__}")
    if name in _REGISTRY and _REGISTRY[name] is not factory and _REGISTRY[name] != factory:
        raise ValueError(f"a reward named {name!r} is already registered")
    _REGISTRY[name] = factory


def available_rewards() -> list:
    """Names that :func:`build_reward` knows, sorted."""
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs) -> RewardFn:
    """The registered reward ``name`` built with ``kwargs`` (e.g. ``build_reward("clip_score", path=...)``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards are {available_rewards()}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attribute = factory.split(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory(**kwargs)
