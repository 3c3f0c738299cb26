"""The built-in toy video world: data, prompt encoder, a tiny Wan transformer, and its pretraining.

``python -m euphonium.models.toy pretrain`` trains the base model; ``... report`` samples and scores it.
The exact pixel rewards live in :mod:`euphonium.rewards.toy`.
"""

from euphonium.models.toy.model import (
    ASSET_DIR,
    TOY_TEXT_ENCODER_CONFIG,
    TOY_TRANSFORMER_CONFIG,
    VOCABULARY,
    ToyTextEncoder,
    build_toy_model,
    load_toy_model,
    predict_velocity,
    sample_ode,
    save_toy_model,
)
from euphonium.models.toy.world import (
    ATTRIBUTES,
    CHANNELS,
    COLORS,
    DIRECTIONS,
    HEIGHT,
    NUM_FRAMES,
    SHAPES,
    SIZES,
    SPEED,
    WIDTH,
    all_prompts,
    format_prompt,
    latents_to_video,
    parse_prompt,
    render,
    sample_prompts,
    video_to_latents,
)

__all__ = [
    "ASSET_DIR",
    "ATTRIBUTES",
    "CHANNELS",
    "COLORS",
    "DIRECTIONS",
    "HEIGHT",
    "NUM_FRAMES",
    "SHAPES",
    "SIZES",
    "SPEED",
    "TOY_TEXT_ENCODER_CONFIG",
    "TOY_TRANSFORMER_CONFIG",
    "VOCABULARY",
    "WIDTH",
    "ToyTextEncoder",
    "all_prompts",
    "build_toy_model",
    "format_prompt",
    "latents_to_video",
    "load_toy_model",
    "parse_prompt",
    "predict_velocity",
    "render",
    "sample_ode",
    "sample_prompts",
    "save_toy_model",
    "video_to_latents",
]
