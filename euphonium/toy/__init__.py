"""The built-in toy video world, whole: 8-frame 16x16 clips of moving shapes and their prompts.

- :mod:`.world`: the renderer, the prompts, the latent <-> video maps.
- :mod:`.model`: the prompt encoder and the tiny ``WanTransformer3DModel`` with the committed weights.
- :mod:`.rewards`: the exact pixel rewards (registered as ``build_reward("toy")``) and the oracle PRM.
- :mod:`.prm`: the committed toy PRM, its on-policy training data and its guided-step report.
- :mod:`.pretrain`, :mod:`.report`: ``python -m euphonium.toy pretrain`` trains the base model;
  ``... report`` samples and scores it.

Everything runs through the same sampler, ops and trainer as a diffusers model; only the sizes differ.
"""

from euphonium.toy.model import (
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
from euphonium.toy.prm import TOY_PRM_DIR, load_toy_prm
from euphonium.toy.rewards import ToyOraclePRM, toy_reward_set, toy_rewards
from euphonium.toy.world import (
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
    "TOY_PRM_DIR",
    "TOY_TEXT_ENCODER_CONFIG",
    "TOY_TRANSFORMER_CONFIG",
    "VOCABULARY",
    "WIDTH",
    "ToyOraclePRM",
    "ToyTextEncoder",
    "all_prompts",
    "build_toy_model",
    "format_prompt",
    "latents_to_video",
    "load_toy_model",
    "load_toy_prm",
    "parse_prompt",
    "predict_velocity",
    "render",
    "sample_ode",
    "sample_prompts",
    "save_toy_model",
    "toy_reward_set",
    "toy_rewards",
    "video_to_latents",
]
