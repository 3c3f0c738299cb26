"""FLUX.1-dev (``model.kind=flux``) through the trainer, on a tiny random ``FluxPipeline`` folder built offline.

CLIP (pooled) and T5 text encoders, a transformer with one double- and one single-stream block and
the guidance embedding (FLUX.1-dev), an ``AutoencoderKL`` with FLUX's shift and scale.
"""

import pytest
import torch
from test_models_common import (
    assert_first_ratio_is_one,
    assert_trained_two_steps,
    clip_tokenizer,
    t5_tokenizer,
    tiny_clip,
    tiny_t5,
    train_overrides,
)

from euphonium.models.flux import FluxTransformer, latent_image_ids, pack_latents, unpack_latents
from euphonium.train import load_config
from euphonium.train.__main__ import main
from euphonium.train.policy import build_policy, check_lora, check_model_config

PROMPTS = ["a red fox in snow", "a boat on a lake", "a cat on a red boat"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def build_flux(root):
    """Save a tiny random FluxPipeline to ``root`` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tok_clip, tok_t5 = clip_tokenizer(WORDS), t5_tokenizer(WORDS)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=8,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=tiny_clip(tok_clip, 8),
        tokenizer=tok_clip,
        text_encoder_2=tiny_t5(tok_t5, 24),
        tokenizer_2=tok_t5,
        transformer=transformer,
    ).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_flux(tmp_path_factory.mktemp("flux"))


def overrides(root, **extra):
    return train_overrides(root, "flux", PROMPTS, **{"model.guidance_scale": 3.5, **extra})


def test_lora_training_on_a_flux_pipeline_folder(flux_dir, tmp_path):
    out = tmp_path / "run"
    targets = ",".join(TARGETS)
    argv = overrides(flux_dir, **{"model.lora_targets": f"[{targets}]", "algorithm": "dance_grpo"})
    assert main(["--output-dir", str(out), *argv]) == 0
    keys = assert_trained_two_steps(out, TARGETS)
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_q.") for k in keys)


def test_first_ratio_is_exactly_one(flux_dir):
    policy = build_policy(load_config(None, overrides(flux_dir)), torch.device("cpu"))
    assert policy.latent_shape == (4, 1, 8, 8) and isinstance(policy.transformer, FluxTransformer)
    assert policy.encode(PROMPTS[:2]).kwargs["guidance"].tolist() == [3.5, 3.5]
    assert_first_ratio_is_one(policy, PROMPTS[:2])
    # true CFG on top of the embedded guidance (FluxPipeline's true_cfg_scale) goes the same way
    policy = build_policy(load_config(None, overrides(flux_dir, **{"model.cfg_scale": 2.0})), torch.device("cpu"))
    assert_first_ratio_is_one(policy, PROMPTS[:2], cfg_scale=2.0)


def test_packing_and_ids_equal_the_pipeline(flux_dir):
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = FluxPipeline._pack_latents(x, 2, 4, 6, 8)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    # the pipeline's unpack takes the pixel size: latent 6 x 8 is 12 x 16 pixels for its VAE stride of 2
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12, 16, 2), x)
    assert torch.equal(
        latent_image_ids(3, 4, "cpu", torch.float32),
        FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32),
    )


def test_encode_velocity_and_decode_equal_the_pipeline(flux_dir):
    """Prompt embeddings, the transformer call on packed latents (recorded in the pipeline's own run) and the
    decoded images equal FluxPipeline's."""
    from diffusers import FluxPipeline

    policy = build_policy(load_config(None, overrides(flux_dir)), torch.device("cpu"))
    pipe = FluxPipeline.from_pretrained(flux_dir)
    prompts = PROMPTS[:2]
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=8)
    cond = policy.encode(prompts)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.kwargs["pooled_projections"], pooled)

    calls = []
    pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((kwargs["hidden_states"], kwargs["timestep"], out[0])),
        with_kwargs=True,
    )
    call = dict(prompt=prompts, num_inference_steps=2, height=16, width=16, guidance_scale=3.5, max_sequence_length=8)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (2, 16, 16)  # packed
    with torch.no_grad():
        for packed, timestep, v in calls[:2]:
            x = unpack_latents(packed, 8, 8)[:, :, None]
            ours = policy.transformer(x, timestep * 1000, cond.prompt_embeds, **cond.kwargs)[0]
            assert torch.equal(pack_latents(ours[:, :, 0]), v)
    unpacked = FluxPipeline._unpack_latents(latents, 16, 16, pipe.vae_scale_factor)
    assert torch.equal(policy.decode(unpacked[:, :, None]), images[:, None])


def test_packaged_config_fits_a_flux_folder(flux_dir):
    from peft import LoraConfig

    config = load_config("flux_1_dev", [f"model.path={flux_dir}"])
    assert (config.model.kind, config.model.guidance_scale, config.model.cfg_scale) == ("flux", 3.5, 1.0)
    assert check_model_config(config)["latent_shape"] == (4, 1, 360, 360)
    transformer = build_policy(config, torch.device("cpu")).transformer
    transformer.add_adapter(LoraConfig(r=2, target_modules=list(config.model.lora_targets)))
    counts = check_lora(transformer, config.model.lora_targets)["transformer"]
    # one double-stream block (all eight), one single-stream block (to_q/k/v, proj_out), the final proj_out
    assert counts == {**{t: 1 for t in TARGETS}, "to_q": 2, "to_k": 2, "to_v": 2, "proj_out": 2}
