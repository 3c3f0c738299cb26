"""Exact outcome rewards for the toy video world (:mod:`euphonium.toy`) and its oracle PRM.

Every term is a closed-form function of the pixels, differentiable almost everywhere in the video
(the kinks are the ink clamp, ``min`` in the presence factor and ``|.|`` in the direction margin),
so ``grad_video`` of any term exists for an "oracle PRM" ablation. Per clip, with frames ``f`` and
pixels ``p`` (pixel centres at ``(j + 0.5, i + 0.5)``, x right, y down):

- ink ``a[f, p] = clamp((max_c v[f, c, p] - 0.2) / 0.6, 0, 1)`` (the background is black);
  mass ``M_f = sum_p a[f, p]``, centroid ``mu_f = sum_p a p / (M_f + eps)``,
  mean colour ``c_f = sum_p a v[:, p] / (M_f + eps)``, ``eps = 1e-6``.
- target area ``A*`` and reference shape statistics ``kappa_j`` come from the renderer itself
  (static clips of the prompted size at 16 sub-pixel offsets, same ink function), so a rendered clip
  of the prompt is scored against its own statistics. A size-free prompt uses the size whose area is
  nearest (in log) to the clip's mean mass.
- presence ``P_f = min(M_f / A*, A* / M_f)``: 1 for an object of the prompted area, 0 for a blank
  frame, ``A* / M`` for a frame flooded with colour. Every term but ``size`` is scaled by it, so no
  term can be earned without an object of about the prompted area.

Terms (all ``[B]`` float32 in [0, 1]):

- ``color``      ``mean_f P_f * softmax_k(-||c_f - rgb_k||^2 / (2 * 0.2^2))[prompt colour]``
- ``shape``      ``mean_f P_f * softmax_j(-(kappa_f - kappa_j)^2 / (2 * 0.05^2))[prompt shape]`` with the
  fourth-moment statistic ``kappa_f = 2 E[dx^2 dy^2] / (E[dx^4] + E[dy^4])`` of the ink around
  ``mu_f`` (square ~0.54, circle ~0.34, diamond ~0.18; a Gaussian blob is 1/3).
- ``size``       ``mean_f exp(-ln(M_f / A*)^2 / (2 * 0.25^2))`` (small and large areas differ by a factor ~1.96).
- ``direction``  ``mean_f P_f * sigmoid((v.u - |v.u_perp| - SPEED / 2) / (SPEED / 8))`` with ``v`` the
  least-squares centroid velocity (pixels per frame) and ``u`` the prompted direction: ~0.98 for the
  renderer's motion, ~0 when static, sideways, diagonal or backwards.
- ``smoothness`` ``mean_f P_f * exp(-R / (2 * 0.5^2)) * exp(-Var_f ln M_f / (2 * 0.15^2))`` with ``R`` the
  mean squared distance of ``mu_f`` from its least-squares line: one object moving steadily, no
  flicker.
- ``combined``   ``sum_k w_k r_k / sum_k w_k`` with :data:`DEFAULT_WEIGHTS` (the default training reward).

A blank clip scores 0 on every term; a frame flooded with the prompted colour scores at most
``A* / (H W)`` (<= 0.19) on each presence-scaled term and ~0 on size, so ``combined`` stays low.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Mapping, Optional, Sequence

import torch

from euphonium._checks import check_float_tensor
from euphonium.rewards.base import RewardSet
from euphonium.toy import world
from euphonium.toy.model import predict_velocity

INK_LOW = 0.2
INK_HIGH = 0.8
EPS = 1e-6
COLOR_TEMPERATURE = 0.2
SHAPE_TEMPERATURE = 0.05
SIZE_LOG_STD = 0.25
DIRECTION_SCALE = world.SPEED / 8
TRAJECTORY_STD = 0.5
AREA_LOG_STD = 0.15

DEFAULT_WEIGHTS: Dict[str, float] = {"color": 1.0, "shape": 1.0, "size": 1.0, "direction": 1.0, "smoothness": 0.5}
TERMS = ("color", "shape", "size", "direction", "smoothness")

_COLOR_NAMES = list(world.COLORS)
_COLOR_RGB = torch.tensor([world.COLORS[c] for c in _COLOR_NAMES])  # [K, 3]
_DIRECTION_NAMES = list(world.DIRECTIONS)
_DIRECTION_VECS = torch.tensor([world.DIRECTIONS[d] for d in _DIRECTION_NAMES])  # [4, 2]
_SIZE_NAMES = list(world.SIZES)


def _check_videos(videos) -> None:
    check_float_tensor("videos", videos, min_dim=5)
    if videos.dim() != 5 or videos.shape[1:] != (world.NUM_FRAMES, world.CHANNELS, world.HEIGHT, world.WIDTH):
        raise ValueError(
            f"videos must have shape [B, {world.NUM_FRAMES}, {world.CHANNELS}, {world.HEIGHT}, {world.WIDTH}] "
            f"(toy clips in [0, 1]), got {tuple(videos.shape)}"
        )


def _check_prompts(prompts, batch: int) -> list:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
    if len(prompts) != batch:
        raise ValueError(f"prompts has {len(prompts)} entries but videos has batch size {batch}")
    return [world.parse_prompt(p) for p in prompts]


def frame_statistics(videos: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-frame ink statistics of ``videos [B, F, 3, H, W]`` (any float dtype, computed in float32).

    Returns ``mass [B, F]``, ``centroid [B, F, 2]`` (x, y in pixels), ``color [B, F, 3]`` (ink-weighted
    mean RGB) and ``kappa [B, F]`` (fourth-moment shape statistic); formulas in the module docstring.
    """
    v = videos.float()
    ink = ((v.amax(dim=2) - INK_LOW) / (INK_HIGH - INK_LOW)).clamp(0, 1)  # [B, F, H, W]
    mass = ink.sum(dim=(2, 3))
    denom = mass + EPS
    ys = torch.arange(world.HEIGHT, dtype=torch.float32, device=v.device) + 0.5
    xs = torch.arange(world.WIDTH, dtype=torch.float32, device=v.device) + 0.5
    cx = (ink.sum(dim=2) * xs).sum(dim=-1) / denom
    cy = (ink.sum(dim=3) * ys).sum(dim=-1) / denom
    color = torch.einsum("bfhw,bfchw->bfc", ink, v) / denom.unsqueeze(-1)
    dx = xs.view(1, 1, 1, -1) - cx.view(*cx.shape, 1, 1)
    dy = ys.view(1, 1, -1, 1) - cy.view(*cy.shape, 1, 1)
    dx2, dy2 = dx * dx, dy * dy
    m_xy = (ink * dx2 * dy2).sum(dim=(2, 3))
    m_x4 = (ink * dx2 * dx2).sum(dim=(2, 3))
    m_y4 = (ink * dy2 * dy2).sum(dim=(2, 3))
    kappa = 2 * m_xy / (m_x4 + m_y4 + EPS)
    return {"mass": mass, "centroid": torch.stack([cx, cy], dim=-1), "color": color, "kappa": kappa}


@functools.lru_cache(maxsize=None)
def reference_statistics() -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{size: {shape: {"area": A*, "kappa": kappa_ref}}}`` from static renders of each shape.

    Each value is the mean over a 4 x 4 grid of sub-pixel centre offsets around the frame centre, with
    the same ink function as the rewards.
    """
    offsets = torch.arange(4, dtype=torch.float64) / 4
    ox, oy = torch.meshgrid(offsets, offsets, indexing="ij")
    n = ox.numel()
    centers = torch.stack([world.WIDTH / 2 + ox.reshape(-1), world.HEIGHT / 2 + oy.reshape(-1)], dim=-1)
    centers = centers.view(n, 1, 2).expand(n, world.NUM_FRAMES, 2)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for size in world.SIZES:
        out[size] = {}
        for shape in world.SHAPES:
            attrs = [{"color": "red", "shape": shape, "size": size}] * n
            stats = frame_statistics(world.render_attributes(attrs, centers))
            out[size][shape] = {"area": float(stats["mass"].mean()), "kappa": float(stats["kappa"].mean())}
    return out


def _targets(attrs: list, mass: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-clip target area ``[B]``, reference kappas ``[B, S]`` and indices of the prompted attributes."""
    ref = reference_statistics()
    mean_log_mass = torch.log(mass.detach().mean(dim=1) + EPS)
    areas, kappas, sizes = [], [], []
    for i, a in enumerate(attrs):
        size = a["size"]
        if size is None:  # size-free prompt: the nearest size in log-area
            size = min(_SIZE_NAMES, key=lambda s: abs(math.log(ref[s][a["shape"]]["area"]) - float(mean_log_mass[i])))
        sizes.append(size)
        areas.append(ref[size][a["shape"]]["area"])
        kappas.append([ref[size][sh]["kappa"] for sh in world.SHAPES])
    device = mass.device
    return {
        "area": torch.tensor(areas, device=device),
        "kappa_ref": torch.tensor(kappas, device=device),
        "color": torch.tensor([_COLOR_NAMES.index(a["color"]) for a in attrs], device=device),
        "shape": torch.tensor([world.SHAPES.index(a["shape"]) for a in attrs], device=device),
        "direction": torch.tensor([_DIRECTION_NAMES.index(a["direction"]) for a in attrs], device=device),
    }


def _velocity(centroid: torch.Tensor) -> tuple:
    """Least-squares velocity ``[B, 2]`` of ``centroid [B, F, 2]`` and the residual ``R [B]``."""
    frames = centroid.shape[1]
    t = torch.arange(frames, dtype=centroid.dtype, device=centroid.device)
    t = (t - t.mean()).view(1, -1, 1)
    mean = centroid.mean(dim=1, keepdim=True)
    vel = (t * (centroid - mean)).sum(dim=1) / (t * t).sum()
    fit = mean + t * vel.unsqueeze(1)
    residual = ((centroid - fit) ** 2).sum(dim=-1).mean(dim=1)
    return vel, residual


def _gather(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``probs [B, F, K]`` at ``index [B]`` -> ``[B, F]``."""
    return probs.gather(-1, index.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(-1)


def toy_rewards(
    videos: torch.Tensor, prompts: Sequence[str], weights: Optional[Mapping[str, float]] = None
) -> Dict[str, torch.Tensor]:
    """All toy reward terms for ``videos [B, F, 3, H, W]`` in [0, 1] and ``B`` toy prompts.

    Returns ``{"color", "shape", "size", "direction", "smoothness", "combined"}``, each ``[B]`` float32
    on the videos' device and differentiable in ``videos`` (formulas in the module docstring).
    ``combined = sum_k w_k r_k / sum_k w_k`` with ``weights`` (default :data:`DEFAULT_WEIGHTS`; keys must
    be a subset of the terms, missing ones weigh 0).
    """
    _check_videos(videos)
    attrs = _check_prompts(prompts, videos.shape[0])
    weights = _check_weights(weights)
    stats = frame_statistics(videos)
    tgt = _targets(attrs, stats["mass"])
    area = tgt["area"].view(-1, 1)
    mass = stats["mass"] + EPS
    presence = torch.minimum(mass / area, area / mass)  # [B, F]

    color_logits = -((stats["color"].unsqueeze(-2) - _COLOR_RGB.to(videos.device)) ** 2).sum(-1)
    color_probs = torch.softmax(color_logits / (2 * COLOR_TEMPERATURE**2), dim=-1)
    shape_logits = -((stats["kappa"].unsqueeze(-1) - tgt["kappa_ref"].unsqueeze(1)) ** 2)
    shape_probs = torch.softmax(shape_logits / (2 * SHAPE_TEMPERATURE**2), dim=-1)

    vel, residual = _velocity(stats["centroid"])
    u = _DIRECTION_VECS.to(videos.device)[tgt["direction"]]
    along = (vel * u).sum(-1)
    across = (vel * torch.stack([-u[:, 1], u[:, 0]], dim=-1)).sum(-1).abs()
    log_mass = torch.log(mass)
    log_ratio = log_mass - torch.log(area)
    mean_presence = presence.mean(dim=1)

    terms = {
        "color": (presence * _gather(color_probs, tgt["color"])).mean(dim=1),
        "shape": (presence * _gather(shape_probs, tgt["shape"])).mean(dim=1),
        "size": torch.exp(-(log_ratio**2) / (2 * SIZE_LOG_STD**2)).mean(dim=1),
        "direction": mean_presence * torch.sigmoid((along - across - world.SPEED / 2) / DIRECTION_SCALE),
        "smoothness": mean_presence
        * torch.exp(-residual / (2 * TRAJECTORY_STD**2))
        * torch.exp(-log_mass.var(dim=1, unbiased=False) / (2 * AREA_LOG_STD**2)),
    }
    total = sum(weights.values())
    terms["combined"] = sum(w * terms[k] for k, w in weights.items()) / total
    return {k: t.float() for k, t in terms.items()}


def _check_weights(weights: Optional[Mapping[str, float]]) -> Dict[str, float]:
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping of term -> float, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"weights names unknown terms {unknown}; the terms are {list(TERMS)}")
    out = {}
    for k, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{k!r}] must be a finite number >= 0, got {w!r}")
        out[k] = float(w)
    if sum(out.values()) <= 0:
        raise ValueError(f"weights must have a positive sum, got {dict(weights)}")
    return out


def classify(videos: torch.Tensor) -> Dict[str, list]:
    """Hard attribute read-out of each clip: ``{"color", "shape", "size", "direction", "present"}``.

    ``color``: nearest palette colour to the mass-weighted mean colour; ``shape``: nearest reference
    ``kappa`` (of the read-out size) to the mean ``kappa``; ``size``: nearest reference area in log to
    the mean mass (for the read-out shape); ``direction``: the direction ``u`` maximising ``v.u``, or
    ``None`` when ``max v.u < SPEED / 2``; ``present``: mean mass at least half the smallest
    reference area. Lists of ``B`` strings (or ``None``) and bools.
    """
    _check_videos(videos)
    with torch.no_grad():
        stats = frame_statistics(videos)
        ref = reference_statistics()
        mass = stats["mass"]
        weight = mass / (mass.sum(dim=1, keepdim=True) + EPS)
        mean_color = (stats["color"] * weight.unsqueeze(-1)).sum(dim=1)
        mean_kappa = (stats["kappa"] * weight).sum(dim=1)
        log_mass = torch.log(mass.mean(dim=1) + EPS)
        vel, _ = _velocity(stats["centroid"])
        along = vel @ _DIRECTION_VECS.to(vel.device).T
        colors = torch.cdist(mean_color, _COLOR_RGB.to(mean_color.device)).argmin(dim=1).tolist()
        smallest = min(r["area"] for per in ref.values() for r in per.values())
    out: Dict[str, list] = {"color": [], "shape": [], "size": [], "direction": [], "present": []}
    for i in range(videos.shape[0]):
        lm, k = float(log_mass[i]), float(mean_kappa[i])
        # Joint nearest (size, shape) by log-area and kappa, each scaled by its reward width.
        size, shape = min(
            ((s, sh) for s in _SIZE_NAMES for sh in world.SHAPES),
            key=lambda ss: (
                ((lm - math.log(ref[ss[0]][ss[1]]["area"])) / SIZE_LOG_STD) ** 2
                + ((k - ref[ss[0]][ss[1]]["kappa"]) / SHAPE_TEMPERATURE) ** 2
            ),
        )
        best = int(along[i].argmax())
        out["color"].append(_COLOR_NAMES[colors[i]])
        out["shape"].append(shape)
        out["size"].append(size)
        out["direction"].append(_DIRECTION_NAMES[best] if float(along[i, best]) >= world.SPEED / 2 else None)
        out["present"].append(float(mass[i].mean()) >= 0.5 * smallest)
    return out


def attribute_accuracy(videos: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Whether each clip shows each prompted attribute: ``{"color", "shape", "size", "direction", "all"}``.

    Each is a ``[B]`` float32 of 0/1 from :func:`classify`; an absent object counts as wrong on every
    attribute; a size-free prompt counts any size as right; ``all`` is 1 when every attribute is.
    """
    _check_videos(videos)
    attrs = _check_prompts(prompts, videos.shape[0])
    pred = classify(videos)
    out = {}
    for key in world.ATTRIBUTES:
        out[key] = torch.tensor(
            [float(pred["present"][i] and (a[key] is None or pred[key][i] == a[key])) for i, a in enumerate(attrs)]
        )
    out["all"] = torch.stack([out[k] for k in world.ATTRIBUTES]).prod(dim=0)
    return out


class ToyOraclePRM(torch.nn.Module):
    """An exact process reward for the toy world, the "oracle PRM" of the convergence ablations.

    ``prm(x_sigma, sigma, prompt_embeds) = toy_rewards(video(x_sigma - sigma * v_base(x_sigma)), prompts)``
    ``["combined"]``: the exact reward of the frozen base model's one-step clean estimate, so its
    gradient is the reward's own (through the base transformer) instead of a learned approximation.
    The prompts are recovered from ``prompt_embeds`` by matching them against ``text_encoder``'s
    embeddings of ``prompts`` (default: every toy prompt); an embedding of no known prompt is an error.

    Args:
        transformer: the frozen base velocity model (a toy ``WanTransformer3DModel``; not trained here).
        text_encoder: the toy prompt encoder whose ``encode`` made the embeddings the PRM will see.
        prompts: the prompts it may be asked about.
        weights: the ``combined`` weights (:func:`toy_rewards`), e.g. the trainer's reward weights.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        text_encoder: torch.nn.Module,
        prompts: Optional[Sequence[str]] = None,
        weights: Optional[Mapping[str, float]] = None,
    ):
        super().__init__()
        self.transformer = transformer.requires_grad_(False).eval()
        self.prompts = list(prompts) if prompts is not None else world.all_prompts()
        _check_prompts(self.prompts, len(self.prompts))
        self.weights = _check_weights(weights)
        with torch.no_grad():
            keys = text_encoder.encode(self.prompts).flatten(1).float()
        self.register_buffer("keys", keys, persistent=False)

    def prompts_of(self, prompt_embeds: torch.Tensor) -> list:
        """The prompt whose embedding each row of ``prompt_embeds [B, L, D]`` is (exact up to float rounding)."""
        check_float_tensor("prompt_embeds", prompt_embeds, min_dim=2)
        flat = prompt_embeds.detach().flatten(1).float()
        if flat.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"prompt_embeds must flatten to {self.keys.shape[1]} values per sample (the "
                f"text encoder's [L, D]), got shape {tuple(prompt_embeds.shape)}"
            )
        dist = torch.cdist(flat, self.keys.to(flat.device))
        best, index = dist.min(dim=1)
        scale = self.keys.norm(dim=1).max()
        bad = (best > 1e-3 * scale).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"prompt_embeds[{int(bad[0])}] is the embedding of none of the oracle's {len(self.prompts)} prompts"
            )
        return [self.prompts[i] for i in index.tolist()]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:

        prompts = self.prompts_of(prompt_embeds)
        v = predict_velocity(self.transformer, x, sigma, prompt_embeds.to(x.dtype))
        x0 = x - sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * v
        return toy_rewards(world.latents_to_video(x0), prompts, self.weights)["combined"]


def toy_reward_fn(weights: Optional[Mapping[str, float]] = None):
    """``build_reward("toy", weights=...)``: :func:`toy_rewards` as a reward function of ``(videos, prompts)``."""

    def toy(videos, prompts):
        return toy_rewards(videos, prompts, weights=weights)

    return toy


def toy_reward_set(weights: Optional[Mapping[str, float]] = None) -> RewardSet:
    """The toy world's exact rewards as a :class:`~euphonium.rewards.RewardSet`.

    ``total`` is the toy ``combined`` reward, ``sum_k w_k r_k / sum_k w_k`` with ``weights`` over
    ``color``, ``shape``, ``size``, ``direction``, ``smoothness`` (default: the toy defaults); every
    term is also returned in ``parts`` (weight 0 in the set, so it is logged, not counted twice).
    """
    return RewardSet({"toy": toy_reward_fn(weights)}, weights={"combined": 1.0, **{t: 0.0 for t in TERMS}})
