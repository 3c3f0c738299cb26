"""The computed activation memory (euphonium.models.memory) against a hand count, and how it scales."""

import pytest

from euphonium.models.memory import activation_memory, latent_frames

WAN = dict(num_attention_heads=2, attention_head_dim=8, ffn_dim=32, num_layers=3, patch_size=(1, 2, 2), qk_norm="rms")
FLUX = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=3)


def test_wan_by_hand():
    # 9 frames -> 3 latent frames; 32x32 pixels -> 4x4 latents -> 2x2 patches: N = 12 tokens, d = 16, f = 32.
    got = activation_memory("WanTransformer3DModel", WAN, num_frames=9, height=32, width=32, text_tokens=5)
    assert (got.tokens, got.text_tokens) == (12, 5)
    # per video token: attention with q/k norms 10d + cross-attention 5d + FFN 4d + 2f = 19 * 16 + 64 = 368;
    # per text token 3d = 48; bf16: 2 bytes a value.
    block = (12 * 368 + 5 * 48) * 2
    assert got.blocks == (block,) * 3
    assert got.without_checkpointing == 3 * block == 27936
    assert got.with_checkpointing == 3 * 12 * 16 * 2 + block == 10464


def test_flux_by_hand():
    # 32x32 pixels -> 4x4 latents -> 2x2 packed tokens, + 3 text tokens; d = 16, f = 64.
    got = activation_memory("FluxTransformer2DModel", FLUX, num_frames=1, height=32, width=32, text_tokens=3)
    joint, single = 7 * (10 * 16 + 4 * 16 + 2 * 64) * 2, 7 * (11 * 16 + 3 * 64) * 2
    assert got.blocks == (joint,) * 2 + (single,) * 3
    assert got.with_checkpointing == 5 * 7 * 16 * 2 + max(joint, single)


@pytest.mark.parametrize(
    "class_name, config",
    [
        ("WanTransformer3DModel", WAN),
        ("HunyuanVideoTransformer3DModel", dict(FLUX, patch_size=2, patch_size_t=1, mlp_ratio=4.0)),
    ],
)
def test_video_memory_grows_with_frames_and_checkpointing_saves(class_name, config):
    results = [
        activation_memory(class_name, config, num_frames=f, height=64, width=96, text_tokens=8) for f in (1, 5, 33, 81)
    ]
    assert [r.tokens for r in results] == [latent_frames(f, 4) * 4 * 6 for f in (1, 5, 33, 81)]
    for small, large in zip(results, results[1:]):
        assert small.without_checkpointing < large.without_checkpointing
        assert small.with_checkpointing < large.with_checkpointing
    assert all(r.with_checkpointing < r.without_checkpointing for r in results)
    # Affine in the video tokens: twice the tokens, less than twice the memory (the text tokens' share is fixed).
    a, b = (activation_memory(class_name, config, num_frames=5, height=64, width=w, text_tokens=8) for w in (48, 96))
    assert b.tokens == 2 * a.tokens
    assert a.without_checkpointing < b.without_checkpointing < 2 * a.without_checkpointing


def test_sd3_dual_attention_layers_add_an_attention():
    config = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, patch_size=2, qk_norm="rms_norm")
    plain = activation_memory("SD3Transformer2DModel", config, num_frames=1, height=32, width=32, text_tokens=3)
    dual = activation_memory(
        "SD3Transformer2DModel", dict(config, dual_attention_layers=(0,)), num_frames=1, height=32, width=32,
        text_tokens=3,
    )  # fmt: skip
    assert dual.blocks[0] - plain.blocks[0] == 4 * 10 * 16 * 2 and dual.blocks[1] == plain.blocks[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=8), "num_frames must be 1 \\+ a multiple of 4"),
        (dict(height=20), "height must be a positive multiple of 16"),
        (dict(class_name="UNet2DConditionModel"), "class_name must be one of"),
    ],
)
def test_bad_sizes_and_classes_are_errors(kwargs, match):
    args = {"class_name": "WanTransformer3DModel", "num_frames": 9, "height": 32, "width": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        activation_memory(args.pop("class_name"), WAN, text_tokens=5, **args)
