"""euphonium.train on a real diffusers Wan2.1 pipeline folder: a tiny random one, built offline.

The folder is what ``WanPipeline.save_pretrained`` writes (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/), with a random ``WanTransformer3DModel``, ``AutoencoderKLWan``
(non-default strides, read from its config), ``UMT5EncoderModel`` and a word-level tokenizer made
with the ``tokenizers`` library. Training goes through exactly the ``model.kind=wan`` path of the
command line (LoRA through peft).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from euphonium.rewards.prm import LatentRewardModel
from euphonium.train import ConfigError, load_config
from euphonium.train.__main__ import main
from euphonium.train.policy import build_wan_policy, check_wan_config

REQUIRED = (
    "step",
    "reward_mean",
    "reward/jpeg_compressibility",
    "loss",
    "clip_frac",
    "approx_kl",
    "ratio_max_dev",
    "grad_norm",
    "lr",
    "world_size",
    "seconds",
)
PROMPTS = ["a red fox running through snow", "a boat on a lake at sunset", "a cat on a red boat"]
Z_DIM, TEXT_DIM = 4, 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # UMT5 appends </s> to every prompt; the pipeline's attention mask then covers it.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny random Wan2.1 T2V pipeline folder (``WanPipeline.save_pretrained``) and a matching PRM folder."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan")
    tokenizer = _tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        )
    )
    # Strides 2 (time) and 4 (space) instead of Wan's 4 and 8: the trainer must read them from the config.
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=torch.randn(Z_DIM).tolist(),
        latents_std=(torch.rand(Z_DIM) + 0.5).tolist(),
        scale_factor_temporal=2,
        scale_factor_spatial=4,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )
    WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    ).save_pretrained(root / "pipeline")
    LatentRewardModel(
        in_channels=Z_DIM,
        text_dim=TEXT_DIM,
        channels=(8,),
        blocks=(1,),
        patch_size=(1, 2, 2),
        cond_dim=16,
        sigma_freq_dim=16,
        norm_groups=4,
    ).save_pretrained(root / "prm")
    return root


def wan_overrides(wan_dir, **extra):
    values = {
        "model.kind": "wan",
        "model.path": str(wan_dir / "pipeline"),
        "model.lora_rank": 2,
        "model.num_frames": 5,
        "model.height": 16,
        "model.width": 16,
        "model.max_sequence_length": 8,
        "prompts": json.dumps(PROMPTS),
        "prm_path": str(wan_dir / "prm"),
        "rewards": "{jpeg_compressibility: {}}",
        "reward_weights": "{jpeg_compressibility: 1.0}",
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": 2,
        "checkpoint_every": 1,
        "num_eval_samples": 2,
        "eval_prompts": 3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        # The shipped wan config's precision and memory settings.
        ("euphonium", {"model.dtype": "bfloat16", "model.gradient_checkpointing": "true"}),
        ("dance_grpo", {}),
    ],
)
def test_lora_training_on_a_wan_pipeline_folder(wan_dir, tmp_path, algorithm, extra):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *wan_overrides(wan_dir, algorithm=algorithm, **extra)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert set(REQUIRED) <= set(row)
        assert row["world_size"] == 1 and row["reward/jpeg_compressibility"] < 0
        assert row["reward_mean"] == pytest.approx(row["reward/jpeg_compressibility"])
        assert row["ratio_max_dev"] < 1e-3  # rollouts and training see the same bf16 velocities
        assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN
    assert ("process_reward_mean" in rows[0]) == (algorithm == "euphonium")
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 2] and all(r["reward_mean"] < 0 for r in evals)

    first = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    # Only the adapter: A and B of each targeted projection of self- and cross-attention, in fp32.
    expected = {
        f"blocks.0.{attn}.{target}.lora_{ab}.default.weight"
        for attn in ("attn1", "attn2")
        for target in LORA_TARGETS
        for ab in "AB"
    }
    assert set(last) == expected
    assert all(t.dtype == torch.float32 for t in last.values())
    # peft's gaussian init sets B = 0: one step moved it, and the second step moved it again.
    assert all(first[k].abs().max() > 0 for k in first if ".lora_B." in k)
    assert all(not torch.equal(first[k], last[k]) for k in last if ".lora_B." in k)
    for name in ("reward_curve.png", "samples.gif", "samples.png"):
        assert (out / name).is_file()


def test_wan_policy_encodes_and_decodes_as_wan_pipeline(wan_dir):
    """Prompt embeddings and decoded videos equal what diffusers' WanPipeline computes from the same folder."""
    from diffusers import WanPipeline

    config = load_config(None, wan_overrides(wan_dir))
    policy = build_wan_policy(config, torch.device("cpu"))
    assert policy.latent_shape == (Z_DIM, 3, 4, 4)
    pipe = WanPipeline.from_pretrained(wan_dir / "pipeline")
    prompts = PROMPTS[:2]
    expected, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=8)
    torch.testing.assert_close(policy.encode(prompts).prompt_embeds, expected)

    call = dict(
        prompt=prompts,
        num_inference_steps=2,
        num_frames=5,
        height=16,
        width=16,
        guidance_scale=1.0,
        max_sequence_length=8,
    )
    seed = int(torch.randint(0, 2**31, ()))
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
    videos = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(seed)).frames
    assert latents.shape == (2, *policy.latent_shape)
    torch.testing.assert_close(policy.decode(latents), videos, atol=1e-6, rtol=0)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    return err


def test_bad_wan_inputs_are_one_line_errors_before_heavy_work(wan_dir, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "run")]
    # A CLIP reward whose folder does not exist: built before the model check, it would fail first.
    clip = ["rewards={clip_score: {path: /nonexistent/clip}}", "reward_weights={clip_score: 1.0}"]
    assert "model.path is required" in _error(capsys, [*out, "model.kind=wan"])
    assert "no such directory" in _error(
        capsys, [*out, *wan_overrides(wan_dir, **{"model.path": tmp_path / "nope"}), *clip]
    )

    not_a_model = tmp_path / "not_a_model"
    (not_a_model / "transformer").mkdir(parents=True)
    (not_a_model / "weights.bin").write_bytes(torch.randn(16).numpy().tobytes())
    err = _error(capsys, [*out, *wan_overrides(wan_dir, **{"model.path": not_a_model}), *clip])
    assert (
        "not a diffusers Wan pipeline folder" in err and "transformer/config.json" in err and "vae/config.json" in err
    )
    err = _error(capsys, [*out, *wan_overrides(wan_dir, **{"model.path": wan_dir / "pipeline" / "transformer"}), *clip])
    assert "give the pipeline folder above it" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"prompts": "null"}, "prompts must list the training prompts"),
        ({"model.num_frames": 6}, r"model.num_frames must be 1 \+ a multiple of 2"),
        ({"model.height": 12}, "model.height must be a positive multiple of 8"),
        ({"prm_path": "null"}, "needs prm_path"),
        (
            {"prm_path": "{pipeline}/transformer"},
            "prm_path .* holds a WanTransformer3DModel, expected a LatentRewardModel",
        ),
        ({"prm_path": "{other_prm}"}, "prm_path .* has text_dim=32 but the model needs 16"),
    ],
)
def test_wan_config_errors_name_the_key(wan_dir, tmp_path, override, message):
    other_prm = tmp_path / "other_prm"
    LatentRewardModel(
        in_channels=Z_DIM, text_dim=32, channels=(8,), blocks=(1,), cond_dim=16, sigma_freq_dim=16, norm_groups=4
    ).save_pretrained(other_prm)
    values = {
        k: v.format(pipeline=wan_dir / "pipeline", other_prm=other_prm) if isinstance(v, str) else v
        for k, v in override.items()
    }
    with pytest.raises(ConfigError, match=message):
        check_wan_config(load_config(None, wan_overrides(wan_dir, **values)))
