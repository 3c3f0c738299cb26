"""The toy video world: prompts, a deterministic clip renderer, and the latent <-> video maps.

A clip is ``NUM_FRAMES`` frames of ``HEIGHT x WIDTH`` RGB pixels: one shape of one colour on a black
background, moving in a straight line at ``SPEED`` pixels per frame. Prompts follow one grammar::

    "a [small|large] <color> <shape> moving <direction>"

with the size word optional (a prompt without it leaves the size free). The vocabulary:

- colours (RGB in [0, 1]): red (1, 0, 0), green (0, 1, 0), blue (0, 0, 1), yellow (1, 1, 0);
- shapes: square (side ``s``), circle (diameter ``s``), diamond (a square turned 45 degrees with
  diagonal ``1.25 s``, which gives it the circle's area);
- sizes: small ``s = 5`` px, large ``s = 7`` px;
- directions: left, right, up, down (image coordinates: x to the right, y downwards).

Pixels are rendered with ``SUPERSAMPLE x SUPERSAMPLE`` samples each (antialiased edges): a pixel's
value is ``coverage * colour``. The start position is drawn uniformly (sub-pixel) among the positions
that keep the whole shape inside the frame for the whole clip.

Latents are pixels: there is no autoencoder. Latents have Wan's layout ``[B, C, F, H, W]`` in
``[-1, 1]``; videos have the reward layout ``[B, F, C, H, W]`` in ``[0, 1]``.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Union

import torch

from euphonium._checks import check_float_tensor

NUM_FRAMES = 8
HEIGHT = 16
WIDTH = 16
CHANNELS = 3
SPEED = 0.75  # pixels per frame: sub-pixel phases vary over a clip
SUPERSAMPLE = 8

COLORS: Dict[str, tuple] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SHAPES = ("square", "circle", "diamond")
SIZES: Dict[str, float] = {"small": 5.0, "large": 7.0}
DIRECTIONS: Dict[str, tuple] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
DIAMOND_DIAGONAL = 1.25  # diagonal / size: equal area to the circle of the same size

ATTRIBUTES = ("color", "shape", "size", "direction")

Generator = Union[torch.Generator, int, None]


def half_extent(shape: str, size: float) -> float:
    """Distance from a shape's centre to its furthest point along x (or y), in pixels."""
    if shape == "diamond":
        return DIAMOND_DIAGONAL * size / 2
    return size / 2


def parse_prompt(prompt: str) -> Dict[str, Optional[str]]:
    """Attributes of a toy prompt: ``{"color", "shape", "size", "direction"}``.

    ``size`` is ``None`` when the prompt has no size word. Case and surrounding/repeated whitespace
    are ignored. Raises ``ValueError`` naming the prompt for anything outside the grammar
    ``"a [small|large] <color> <shape> moving <direction>"``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    words = prompt.lower().split()
    grammar = "'a [small|large] <color> <shape> moving <direction>'"
    if len(words) == 6:
        article, size, color, shape, verb, direction = words
        if size not in SIZES:
            raise ValueError(f"prompt {prompt!r}: unknown size {size!r}; sizes are {list(SIZES)}")
    elif len(words) == 5:
        article, color, shape, verb, direction = words
        size = None
    else:
        raise ValueError(f"prompt {prompt!r} does not follow the toy grammar {grammar}")
    if article != "a" or verb != "moving":
        raise ValueError(f"prompt {prompt!r} does not follow the toy grammar {grammar}")
    if color not in COLORS:
        raise ValueError(f"prompt {prompt!r}: unknown colour {color!r}; colours are {list(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"prompt {prompt!r}: unknown shape {shape!r}; shapes are {list(SHAPES)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"prompt {prompt!r}: unknown direction {direction!r}; directions are {list(DIRECTIONS)}")
    return {"color": color, "shape": shape, "size": size, "direction": direction}


def format_prompt(color: str, shape: str, direction: str, size: Optional[str] = None) -> str:
    """The canonical prompt for the attributes (``size=None`` leaves the size word out)."""
    words = ["a"] + ([size] if size is not None else []) + [color, shape, "moving", direction]
    prompt = " ".join(words)
    parse_prompt(prompt)  # validates every attribute
    return prompt


def all_prompts() -> List[str]:
    """Every fully specified prompt (with a size word), in a fixed order: 4 x 3 x 2 x 4 = 96."""
    return [format_prompt(c, sh, d, sz) for sz, c, sh, d in itertools.product(SIZES, COLORS, SHAPES, DIRECTIONS)]


def _make_generator(generator: Generator) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    return torch.Generator().manual_seed(generator)


def sample_prompts(n: int, generator: Generator = None) -> List[str]:
    """``n`` prompts drawn uniformly with replacement from :func:`all_prompts`.

    ``generator`` is a ``torch.Generator``, an int seed, or ``None`` (torch's global RNG).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    prompts = all_prompts()
    idx = torch.randint(len(prompts), (n,), generator=_make_generator(generator))
    return [prompts[i] for i in idx.tolist()]


def noisy_captions(
    prompts: Sequence[str],
    accuracy: Dict[str, float],
    generator: Generator = None,
    uniforms: Optional[torch.Tensor] = None,
) -> List[str]:
    """Captions of clips rendered from ``prompts`` that name each attribute right only part of the time.

    For every prompt and every attribute ``k`` in ``accuracy`` (a subset of :data:`ATTRIBUTES`), with
    ``u`` a uniform number in [0, 1): the caption keeps the prompt's value when ``u < accuracy[k]`` and
    otherwise names the other value number ``floor((u - p) / (1 - p) * (K - 1))`` (of the ``K - 1``
    other values, in vocabulary order), so each other value with probability ``(1 - p) / (K - 1)``.
    Attributes not in ``accuracy``, and a prompt without a size word, keep their value. The confusion
    is symmetric and values are uniform, so ``P(rendered = v | caption says v) = accuracy[k]`` whichever
    of the two is drawn first: the function maps rendered prompts to captions and captions to rendered
    prompts alike.

    ``uniforms``: ``[B, 4]`` values in [0, 1), one per attribute of :data:`ATTRIBUTES` (e.g. functions of
    the flow-matching noise, :func:`euphonium.toy.pretrain.noise_uniforms`); ``None`` draws them from
    ``generator`` (``torch.Generator``, int seed or ``None``), ``[B, 4]`` whatever ``accuracy`` holds.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise TypeError("prompts must be a non-empty sequence of prompt strings")
    if not isinstance(accuracy, dict):
        raise TypeError(f"accuracy must be a dict of attribute -> probability, got {type(accuracy).__name__}")
    for key, p in accuracy.items():
        if key not in ATTRIBUTES:
            raise ValueError(f"accuracy names unknown attribute {key!r}; attributes are {list(ATTRIBUTES)}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"accuracy[{key!r}] must be a probability in [0, 1], got {p!r}")
    if uniforms is None:
        uniforms = torch.rand(len(prompts), len(ATTRIBUTES), generator=_make_generator(generator), dtype=torch.float64)
    if uniforms.shape != (len(prompts), len(ATTRIBUTES)) or bool(((uniforms < 0) | (uniforms >= 1)).any()):
        raise ValueError(f"uniforms must be [{len(prompts)}, {len(ATTRIBUTES)}] values in [0, 1)")
    values = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "direction": list(DIRECTIONS)}
    u = uniforms.double().tolist()
    captions = []
    for i, prompt in enumerate(prompts):
        attrs = parse_prompt(prompt)
        for j, key in enumerate(ATTRIBUTES):
            p = accuracy.get(key, 1.0)
            if attrs[key] is None or u[i][j] < p:
                continue
            others = [v for v in values[key] if v != attrs[key]]
            attrs[key] = others[min(len(others) - 1, int((u[i][j] - p) / (1 - p) * len(others)))]
        captions.append(format_prompt(attrs["color"], attrs["shape"], attrs["direction"], attrs["size"]))
    return captions


def _coverage(shape: str, size: float, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Pixel coverage ``[N, H, W]`` in [0, 1] of ``shape`` centred at ``(cx, cy)`` (``[N]`` float64)."""
    s = SUPERSAMPLE
    sub_x = (torch.arange(WIDTH * s, dtype=torch.float64) + 0.5) / s
    sub_y = (torch.arange(HEIGHT * s, dtype=torch.float64) + 0.5) / s
    dx = (sub_x.view(1, 1, -1) - cx.view(-1, 1, 1)).abs()
    dy = (sub_y.view(1, -1, 1) - cy.view(-1, 1, 1)).abs()
    r = size / 2
    if shape == "square":
        inside = (dx <= r) & (dy <= r)
    elif shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "diamond":
        inside = dx + dy <= DIAMOND_DIAGONAL * r
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    n = cx.shape[0]
    return inside.to(torch.float32).view(n, HEIGHT, s, WIDTH, s).mean(dim=(2, 4))


def render_attributes(attrs: Sequence[Dict[str, str]], centers: torch.Tensor) -> torch.Tensor:
    """Clips for fully specified attributes and explicit shape centres per frame.

    ``attrs``: B dicts with ``color``, ``shape``, ``size`` (not None); ``centers``: ``[B, F, 2]``
    float (x, y) in pixels (pixel ``j`` spans ``[j, j + 1)``). Returns ``[B, F, 3, H, W]`` float32 in
    [0, 1]: ``coverage * colour`` on black.
    """
    if centers.dim() != 3 or centers.shape[0] != len(attrs) or centers.shape[2] != 2:
        raise ValueError(f"centers must have shape [{len(attrs)}, F, 2], got {tuple(centers.shape)}")
    batch, frames = centers.shape[:2]
    centers = centers.to(torch.float64)
    video = torch.zeros(batch, frames, CHANNELS, HEIGHT, WIDTH)
    groups: Dict[tuple, List[int]] = {}
    for i, a in enumerate(attrs):
        if a["size"] is None:
            raise ValueError(f"attrs[{i}] has no size; render() draws one for size-free prompts")
        groups.setdefault((a["shape"], a["size"]), []).append(i)
    for (shape, size), idx in groups.items():
        c = centers[idx].reshape(-1, 2)
        cov = _coverage(shape, SIZES[size], c[:, 0], c[:, 1]).view(len(idx), frames, 1, HEIGHT, WIDTH)
        rgb = torch.tensor([COLORS[attrs[i]["color"]] for i in idx]).view(len(idx), 1, CHANNELS, 1, 1)
        video[idx] = cov * rgb
    return video


def render(prompts: Sequence[str], generator: Generator = None) -> torch.Tensor:
    """Render one clip per prompt: ``[B, F, 3, H, W]`` float32 in [0, 1].

    Random per clip: the size when the prompt has none (uniform), and the start position (uniform
    over the positions that keep the shape inside the frame for all frames). The centre moves by
    ``SPEED * direction`` per frame. Deterministic given ``generator`` (a ``torch.Generator`` or int
    seed); ``None`` uses torch's global RNG.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise TypeError("prompts must be a non-empty sequence of prompt strings")
    gen = _make_generator(generator)
    attrs = [dict(parse_prompt(p)) for p in prompts]
    batch = len(attrs)
    size_draw = torch.randint(len(SIZES), (batch,), generator=gen)
    u = torch.rand(batch, 2, generator=gen, dtype=torch.float64)
    travel = SPEED * (NUM_FRAMES - 1)
    starts = torch.empty(batch, 2, dtype=torch.float64)
    steps = torch.empty(batch, 2, dtype=torch.float64)
    for i, a in enumerate(attrs):
        if a["size"] is None:
            a["size"] = list(SIZES)[int(size_draw[i])]
        r = half_extent(a["shape"], SIZES[a["size"]])
        d = torch.tensor(DIRECTIONS[a["direction"]], dtype=torch.float64)
        for axis, extent in ((0, WIDTH), (1, HEIGHT)):
            span = extent - 2 * r - travel * abs(float(d[axis]))
            lo = r + (travel if d[axis] < 0 else 0.0)
            starts[i, axis] = lo + u[i, axis] * span
        steps[i] = SPEED * d
    t = torch.arange(NUM_FRAMES, dtype=torch.float64).view(1, -1, 1)
    centers = starts.view(batch, 1, 2) + t * steps.view(batch, 1, 2)
    return render_attributes(attrs, centers)


def latents_to_video(x: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, C, F, H, W]`` in [-1, 1] -> video ``[B, F, C, H, W]`` in [0, 1].

    ``video = clamp((x + 1) / 2, 0, 1)`` permuted; computed in float32 (the output is float32).
    """
    check_float_tensor("x", x, min_dim=5)
    if x.dim() != 5:
        raise ValueError(f"x must have shape [B, C, F, H, W], got {tuple(x.shape)}")
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()


def video_to_latents(video: torch.Tensor) -> torch.Tensor:
    """Video ``[B, F, C, H, W]`` in [0, 1] -> latents ``[B, C, F, H, W]`` in [-1, 1]: ``x = 2 v - 1``.

    The output keeps ``video``'s dtype.
    """
    check_float_tensor("video", video, min_dim=5)
    if video.dim() != 5:
        raise ValueError(f"video must have shape [B, F, C, H, W], got {tuple(video.shape)}")
    return (2 * video - 1).permute(0, 2, 1, 3, 4).contiguous()
