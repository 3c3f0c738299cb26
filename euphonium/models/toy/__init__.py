"""The built-in toy video world: data, prompt encoder, a tiny Wan transformer, and its pretraining."""

from euphonium.models.toy.world import (
    ATTRIBUTES,
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
    "ATTRIBUTES", "COLORS", "DIRECTIONS", "HEIGHT", "NUM_FRAMES", "SHAPES", "SIZES", "SPEED", "WIDTH",
    "all_prompts", "format_prompt", "latents_to_video", "parse_prompt", "render", "sample_prompts",
    "video_to_latents",
]
