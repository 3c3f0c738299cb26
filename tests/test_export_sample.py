"""Using a trained model: ``python -m euphonium.export`` (diffusers' LoRA layout, loaded by
``WanPipeline.load_lora_weights``; a merged ``save_pretrained`` folder for LoRA and full fine-tuning)
and ``python -m euphonium.sample`` (sampling and scoring a checkpoint), on a tiny random Wan2.1
pipeline folder built offline and on the toy world. Also the Wan text encoder behind the embedding cache."""

import json

import pytest
import torch
from safetensors.torch import load_file

from euphonium.export import checkpoint_config, load_run, select_weights
from euphonium.export import main as export_main
from euphonium.rewards import register_reward
from euphonium.rewards.prm import LatentRewardModel
from euphonium.sample import load_trained_policy
from euphonium.sample import main as sample_main
from euphonium.toy import build_toy_model, save_toy_model
from euphonium.train import load_config
from euphonium.train import policy as policy_module
from euphonium.train.__main__ import main as train_main

PROMPTS = ["a red fox running through snow", "a boat on a lake at sunset", "a cat on a red boat"]
Z_DIM, TEXT_DIM = 4, 16


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny random Wan2.1 T2V pipeline folder (``WanPipeline.save_pretrained``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wan")
    tokenizer = _tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
        )
    )  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=torch.randn(Z_DIM).tolist(), latents_std=(torch.rand(Z_DIM) + 0.5).tolist(),
        scale_factor_temporal=2, scale_factor_spatial=4,
    )  # fmt: skip
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=Z_DIM, out_channels=Z_DIM,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )  # fmt: skip
    WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    ).save_pretrained(root / "pipeline")
    return root / "pipeline"


def wan_overrides(pipeline, **extra):
    values = {
        "algorithm": "grpo_fast",
        "model.kind": "wan",
        "model.path": pipeline,
        "model.num_frames": 5,
        "model.height": 16,
        "model.width": 16,
        "model.max_sequence_length": 8,
        "prompts": json.dumps(PROMPTS),
        "rewards": "{jpeg_compressibility: {}}",
        "reward_weights": "{jpeg_compressibility: 1.0}",
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "max_steps": 1,
        "eval_every": 0,
        "num_eval_samples": 1,
        "lr": 5e-2,  # a visible change in one step (LoRA's B starts at 0)
        "lr_warmup_steps": 0,
        "ema_decay": 0.5,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, Z_DIM, 3, 4, 4, generator=g)
    text = torch.randn(2, 8, TEXT_DIM, generator=g)
    with torch.no_grad():
        return transformer(x, torch.tensor([700.0, 300.0]), text, return_dict=False)[0]


def trained_transformer(run):
    _, loaded = load_run(run)
    config = checkpoint_config(loaded)
    return load_trained_policy(config, select_weights(loaded, "ema"), torch.device("cpu")).transformer, loaded


def test_lora_export_loads_into_the_wan_pipeline_and_merges(wan_dir, tmp_path, capsys):
    from diffusers import WanPipeline

    run = tmp_path / "run"
    # alpha != rank: the export must carry the scale alpha / rank (here 2).
    assert (
        train_main(["--output-dir", str(run), *wan_overrides(wan_dir, **{"model.lora_rank": 2, "model.lora_alpha": 4})])
        == 0
    )
    trained, loaded = trained_transformer(run)
    expected = transformer_output(trained)

    lora = tmp_path / "lora"
    assert export_main([str(run), "--out", str(lora)]) == 0
    saved = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.blocks.0.attn") and ".default." not in k for k in saved)
    assert len(saved) == 2 * 4 * 2  # attn1/attn2 x 4 targets x A/B
    pipe = WanPipeline.from_pretrained(wan_dir)
    base = transformer_output(pipe.transformer)
    pipe.load_lora_weights(str(lora))
    got = transformer_output(pipe.transformer)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (base - expected).abs().max() > 1e-3  # the adapter does change the output

    merged = tmp_path / "merged"
    assert export_main([str(run), "--out", str(merged), "--merge"]) == 0
    fused = WanPipeline.from_pretrained(merged)
    torch.testing.assert_close(transformer_output(fused.transformer), expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in fused.transformer.named_parameters())
    original = WanPipeline.from_pretrained(wan_dir)
    for a, b in zip(fused.vae.state_dict().values(), original.vae.state_dict().values()):
        assert torch.equal(a, b)

    # The EMA is the default; --weights trained exports the last update's weights (another model).
    last = tmp_path / "last"
    assert export_main([str(run), "--out", str(last), "--weights", "trained"]) == 0
    assert any(
        not torch.equal(v, saved[k]) for k, v in load_file(str(last / "pytorch_lora_weights.safetensors")).items()
    )
    assert export_main([str(run), "--out", str(lora)]) == 2  # not an empty folder
    assert "not an empty folder" in capsys.readouterr().err


def test_full_fine_tuning_exports_merged_only(wan_dir, tmp_path, capsys):
    from diffusers import WanPipeline

    run = tmp_path / "run"
    assert train_main(["--output-dir", str(run), *wan_overrides(wan_dir, lr=1e-3)]) == 0
    assert export_main([str(run / "checkpoints" / "step-1"), "--out", str(tmp_path / "x")]) == 2
    assert "--merge" in capsys.readouterr().err
    trained, loaded = trained_transformer(run)
    merged = tmp_path / "merged"
    assert export_main([str(run), "--out", str(merged), "--merge"]) == 0
    pipe = WanPipeline.from_pretrained(merged)
    params = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in loaded["ema"].items())
    assert torch.equal(transformer_output(pipe.transformer), transformer_output(trained))
    assert not torch.equal(
        transformer_output(pipe.transformer), transformer_output(WanPipeline.from_pretrained(wan_dir).transformer)
    )


def test_wan_embedding_cache_skips_the_text_encoder(wan_dir, tmp_path, monkeypatch):
    config = load_config(None, wan_overrides(wan_dir, embedding_cache=tmp_path / "cache"))
    plain = policy_module.build_wan_policy(load_config(None, wan_overrides(wan_dir)), torch.device("cpu"))
    cached = policy_module.build_wan_policy(config, torch.device("cpu")).encode(PROMPTS).prompt_embeds
    assert torch.equal(cached, plain.encode(PROMPTS).prompt_embeds)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded although every prompt is on disk")

    monkeypatch.setattr(policy_module, "WanTextEncoder", refuse)
    again = policy_module.build_wan_policy(config, torch.device("cpu")).encode(PROMPTS[::-1]).prompt_embeds
    assert torch.equal(again, cached.flip(0))
    # Another max_sequence_length is another encoder: it must encode (and here, loads the encoder).
    other = load_config(
        None, wan_overrides(wan_dir, embedding_cache=tmp_path / "cache", **{"model.max_sequence_length": 6})
    )
    with pytest.raises(AssertionError, match="text encoder was loaded"):
        policy_module.build_wan_policy(other, torch.device("cpu")).encode(PROMPTS[:1])


SEEN = []


def _length_reward(**kwargs):
    def reward(videos, prompts, metadata):
        SEEN.extend(metadata)
        return torch.tensor([float(m.get("weight", 0.0)) for m in metadata])

    return reward


register_reward("test_sample_metadata", _length_reward)


@pytest.fixture(scope="module")
def toy_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    transformer, text_encoder = build_toy_model(seed=6)
    save_toy_model(transformer, text_encoder, root / "toy")
    LatentRewardModel(in_channels=3, text_dim=text_encoder.config.dim).save_pretrained(root / "prm")
    return root


def test_sample_scores_the_evaluation_set_as_the_run_did(toy_assets, tmp_path, capsys):
    run = tmp_path / "run"
    values = {
        "model.path": toy_assets / "toy",
        "prm_path": toy_assets / "prm",
        "model.lora_rank": 2,
        "lr": 1e-2,
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": 2,
        "checkpoint_every": 1,
        "eval_every": 2,
        "eval_prompts": 5,
        "num_eval_samples": 1,
    }
    assert train_main(["--output-dir", str(run), *[f"{k}={v}" for k, v in values.items()]]) == 0
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["reward_mean"] != evals[-1]["reward_mean"]

    out = tmp_path / "samples"
    assert sample_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["clips"] == 5 and summary["weights"] == "ema"
    for key in ("reward_mean", "reward/color", "reward/shape"):
        assert summary[key] == pytest.approx(evals[-1][key], abs=1e-6)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5)) and all((out / r["file"]).is_file() for r in rows)

    # Own prompts with metadata, another reward: the metadata reaches it.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "a red square moving left", "weight": 0.25}) + "\n"
        + json.dumps({"prompt": "a blue circle moving up", "weight": 0.75}) + "\n"
    )  # fmt: skip
    mine = tmp_path / "mine"
    args = ["--checkpoint", str(run / "checkpoints" / "step-1"), "--out", str(mine), "--prompts", str(prompts)]
    SEEN.clear()
    assert sample_main([*args, "--rewards", "{test_sample_metadata: {}}", "--weights", "trained"]) == 0
    summary = json.loads((mine / "summary.json").read_text())
    assert summary["reward_mean"] == pytest.approx(0.5) and summary["step"] == 1 and summary["weights"] == "trained"
    assert SEEN == [{"weight": 0.25}, {"weight": 0.75}]
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
