"""HunyuanVideo (``model.kind=hunyuan_video``) through the trainer, on a tiny random ``HunyuanVideoPipeline`` folder.

A Llama text encoder (3 layers: the pipeline takes the third hidden state from the top) behind
diffusers' default prompt template, a CLIP text encoder for the pooled embedding, a transformer with
one dual-stream, one single-stream and one token-refiner block and the guidance embedding, and an
``AutoencoderKLHunyuanVideo`` with its 4x temporal and 8x spatial strides.
"""

import pytest
import torch
from test_models_common import (
    assert_first_ratio_is_one,
    assert_trained_two_steps,
    clip_tokenizer,
    train_overrides,
    word_tokenizer,
)

from euphonium.models.hunyuan_video import HunyuanVideoTransformer, default_prompt_template
from euphonium.train import load_config
from euphonium.train.__main__ import main
from euphonium.train.policy import build_policy, check_lora, check_model_config

PROMPTS = ["a red fox in snow", "a boat on a lake", "a cat on a red boat"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def build_hunyuan_video(root):
    """Save a tiny random HunyuanVideoPipeline to ``root`` and return it."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from test_models_common import tiny_clip
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    template = default_prompt_template()["template"].replace("{}", " ")
    llama_words = [*WORDS, *template.replace("<|", " ").replace("|>", " ").split()]
    tok_llama = word_tokenizer(
        llama_words, special=["<pad>", "<unk>", "<s>"], template="<s> $A", model_max_length=256, pad="<pad>"
    )
    tok_clip = clip_tokenizer(WORDS, model_max_length=77)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(tok_llama),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tok_llama.pad_token_id,
        )
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
    )
    HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=tok_llama,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=tiny_clip(tok_clip, 8),
        tokenizer_2=tok_clip,
    ).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory):
    return build_hunyuan_video(tmp_path_factory.mktemp("hunyuan_video"))


def overrides(root, **extra):
    return train_overrides(
        root,
        "hunyuan_video",
        PROMPTS,
        **{"model.num_frames": 5, "model.guidance_scale": 6.0, "model.max_sequence_length": 16, **extra},
    )


def test_lora_training_on_a_hunyuan_video_pipeline_folder(hunyuan_dir, tmp_path):
    out = tmp_path / "run"
    targets = ",".join(TARGETS)
    assert main(["--output-dir", str(out), *overrides(hunyuan_dir, **{"model.lora_targets": f"[{targets}]"})]) == 0
    keys = assert_trained_two_steps(out, TARGETS)
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_q.") for k in keys)


def test_first_ratio_is_exactly_one(hunyuan_dir):
    policy = build_policy(load_config(None, overrides(hunyuan_dir)), torch.device("cpu"))
    assert policy.latent_shape == (4, 2, 2, 2) and isinstance(policy.transformer, HunyuanVideoTransformer)
    cond = policy.encode(PROMPTS[:2])
    assert cond.kwargs["guidance"].tolist() == [6000.0, 6000.0]
    assert cond.prompt_embeds.shape == (2, 16, 16) and cond.kwargs["encoder_attention_mask"].shape == (2, 16)
    assert_first_ratio_is_one(policy, PROMPTS[:2], shift=7.0)


def test_encode_velocity_and_decode_equal_the_pipeline(hunyuan_dir):
    """Prompt embeddings (template, crop, mask, pooled), the transformer inputs the pipeline's own run passes
    (recorded) and the decoded videos equal HunyuanVideoPipeline's."""
    from diffusers import HunyuanVideoPipeline

    policy = build_policy(load_config(None, overrides(hunyuan_dir)), torch.device("cpu"))
    pipe = HunyuanVideoPipeline.from_pretrained(hunyuan_dir)
    prompts = PROMPTS[:2]
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(prompts, max_sequence_length=16)
    cond = policy.encode(prompts)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.kwargs["pooled_projections"], pooled)
    assert torch.equal(cond.kwargs["encoder_attention_mask"], mask.float())
    assert 0 < int(mask.sum()) < mask.numel()  # the template's tail and the prompt, then masked padding

    calls = []
    pipe.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    call = dict(
        prompt=prompts,
        num_inference_steps=2,
        num_frames=5,
        height=16,
        width=16,
        guidance_scale=6.0,
        max_sequence_length=16,
    )
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    videos = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert latents.shape == (2, *policy.latent_shape)
    for kwargs in calls[:2]:
        for key in ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections", "guidance"):
            ours = cond.prompt_embeds if key == "encoder_hidden_states" else cond.kwargs[key]
            assert torch.equal(ours, kwargs[key]), key
    assert torch.equal(policy.decode(latents), videos)


def test_packaged_config_fits_a_hunyuan_video_folder(hunyuan_dir):
    from peft import LoraConfig

    # the packaged euphonium algorithm needs a PRM folder; the folder checks are the same under flow_grpo
    config = load_config("hunyuan_video", [f"model.path={hunyuan_dir}", "algorithm=flow_grpo"])
    assert (config.model.kind, config.model.guidance_scale, config.model.cfg_scale) == ("hunyuan_video", 6.0, 1.0)
    assert check_model_config(config)["latent_shape"] == (4, 9, 40, 64)
    transformer = build_policy(config, torch.device("cpu")).transformer
    transformer.add_adapter(LoraConfig(r=2, target_modules=list(config.model.lora_targets)))
    counts = check_lora(transformer, config.model.lora_targets)["transformer"]
    # the dual-stream block has all eight; the single-stream block to_q/k/v; the token refiner's to_q/k/v/to_out.0
    assert counts == {**{t: 1 for t in TARGETS}, "to_q": 3, "to_k": 3, "to_v": 3, "to_out.0": 2}
