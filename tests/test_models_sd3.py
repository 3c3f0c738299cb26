"""SD3.5 (``model.kind=sd3``) through the trainer, on a tiny random ``StableDiffusion3Pipeline`` folder built offline.

Three text encoders (two CLIPs with projections, T5), an MMDiT-X transformer with a dual-attention
block and RMS q/k norms as SD3.5 Medium, an ``AutoencoderKL`` with SD3's shift and scale; CFG on.
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

from euphonium.train import load_config
from euphonium.train.__main__ import main
from euphonium.train.policy import build_policy, check_lora, check_model_config

PROMPTS = ["a red fox in snow", "a boat on a lake", "a cat on a red boat"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_sd3(tmp_path_factory.mktemp("sd3"))


def build_sd3(root):
    """Save a tiny random StableDiffusion3Pipeline to ``root`` and return it."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    tok_l, tok_g, tok_t5 = clip_tokenizer(WORDS), clip_tokenizer(WORDS), t5_tokenizer(WORDS)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=16,
        pooled_projection_dim=20,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        shift_factor=0.0609,
        scaling_factor=1.5305,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=tiny_clip(tok_l, 8, 8),
        tokenizer=tok_l,
        text_encoder_2=tiny_clip(tok_g, 12, 12),
        tokenizer_2=tok_g,
        text_encoder_3=tiny_t5(tok_t5, 24),
        tokenizer_3=tok_t5,
    ).save_pretrained(root)
    return root


def overrides(root, **extra):
    return train_overrides(root, "sd3", PROMPTS, **{"model.cfg_scale": 2.0, **extra})


def test_lora_training_on_an_sd3_pipeline_folder(sd3_dir, tmp_path):
    out = tmp_path / "run"
    targets = ",".join(TARGETS)
    assert main(["--output-dir", str(out), *overrides(sd3_dir, **{"model.lora_targets": f"[{targets}]"})]) == 0
    keys = assert_trained_two_steps(out, TARGETS)
    assert all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert any(".attn2.to_q." in k for k in keys)  # the dual-attention block's second attention


def test_first_ratio_is_exactly_one_with_cfg(sd3_dir):
    policy = build_policy(load_config(None, overrides(sd3_dir)), torch.device("cpu"))
    assert policy.latent_shape == (4, 1, 8, 8)
    cond = policy.encode(PROMPTS[:2])
    assert cond.negative_kwargs["pooled_projections"].shape == (2, 20)
    assert_first_ratio_is_one(policy, PROMPTS[:2], cfg_scale=2.0)


def test_encode_and_decode_equal_the_pipeline(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    policy = build_policy(load_config(None, overrides(sd3_dir)), torch.device("cpu"))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    prompts = PROMPTS[:2]
    with torch.no_grad():  # as the pipeline's __call__ runs it (grad mode picks another CPU attention kernel)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=8
        )
        # the empty prompt is encoded once and cached: compare with the pipeline's encoding of one
        empty, _, empty_pooled, _ = pipe.encode_prompt(
            [""], None, None, do_classifier_free_guidance=False, max_sequence_length=8
        )
    cond = policy.encode(prompts)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.kwargs["pooled_projections"], pooled)
    assert torch.equal(cond.negative_prompt_embeds, empty.expand(2, -1, -1))
    assert torch.equal(cond.negative_kwargs["pooled_projections"], empty_pooled.expand(2, -1))

    call = dict(prompt=prompts, num_inference_steps=2, height=16, width=16, guidance_scale=1.0, max_sequence_length=8)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (2, 4, 8, 8)
    assert torch.equal(policy.decode(latents[:, :, None]), images[:, None])


def test_packaged_config_fits_an_sd3_folder(sd3_dir):
    from peft import LoraConfig

    config = load_config("sd3_5_medium", [f"model.path={sd3_dir}"])
    assert (config.model.kind, config.model.cfg_scale) == ("sd3", 4.5)
    assert check_model_config(config)["latent_shape"] == (4, 1, 256, 256)
    transformer = build_policy(config, torch.device("cpu")).transformer
    transformer.add_adapter(LoraConfig(r=2, target_modules=list(config.model.lora_targets)))
    counts = check_lora(transformer, config.model.lora_targets)["transformer"]
    # 2 blocks; the last one only updates the image stream (no to_add_out); the dual-attention block has attn2
    assert counts == {**{t: 2 for t in TARGETS}, "to_add_out": 1, "to_q": 3, "to_k": 3, "to_v": 3, "to_out.0": 3}
