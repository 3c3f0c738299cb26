"""Wan2.2 A14B (two experts switched at ``boundary_ratio``) through the trainer, on a tiny random pipeline folder.

The folder is what ``WanPipeline(..., transformer_2=..., boundary_ratio=...).save_pretrained`` writes;
training goes through exactly the command line's ``model.kind=wan`` path.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_models_common import assert_first_ratio_is_one

from euphonium.models.diffusers import DiffusersFlowModel
from euphonium.models.wan22 import WanExperts
from euphonium.train import ConfigError, load_config
from euphonium.train.__main__ import main
from euphonium.train.policy import build_policy, check_lora, check_model_config

PROMPTS = ["a red fox running through snow", "a boat on a lake at sunset", "a cat on a red boat"]
Z_DIM, TEXT_DIM = 4, 16
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
BOUNDARY = 0.875


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _transformer(seed):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
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


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan22")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
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
    WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=_transformer(1),
        transformer_2=_transformer(2),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        boundary_ratio=BOUNDARY,
    ).save_pretrained(root)
    return root


def overrides(root, **extra):
    values = {
        "model.kind": "wan",
        "model.path": str(root),
        "model.lora_rank": 2,
        "model.num_frames": 5,
        "model.height": 16,
        "model.width": 16,
        "model.max_sequence_length": 8,
        "prompts": json.dumps(PROMPTS),
        "rewards": "{jpeg_compressibility: {}}",
        "reward_weights": "{jpeg_compressibility: 1.0}",
        "algorithm": "flow_grpo",
        "prompts_per_step": 2,
        "group_size": 2,
        # shift 3 on 4 steps: timesteps 1000, 900 (high-noise expert), 750, 500 (low-noise expert)
        "sampler.num_steps": 4,
        "sampler.shift": 3.0,
        "sampler.sde_window": "[0, 4]",
        "timestep_fraction": 1.0,
        "micro_batches": 2,
        "max_steps": 2,
        "checkpoint_every": 1,
        "num_eval_samples": 2,
        "eval_every": 0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("expert", ["both", "low"])
def test_two_expert_lora_training(wan22_dir, tmp_path, expert):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *overrides(wan22_dir, **{"model.expert": expert})]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # fp32; the training batches mix noise levels and experts, so only batch-size-dependent rounding is left
    # (the exact check on the rollout's batches is test_first_ratio_is_exactly_one)
    assert rows[0]["ratio_max_dev"] < 1e-6
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float))

    first = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    trained = {"both": ("transformer", "transformer_2"), "low": ("transformer_2",)}[expert]
    assert set(last) == {
        f"{name}.blocks.0.{attn}.{t}.lora_{ab}.default.weight"
        for name in trained
        for attn in ("attn1", "attn2")
        for t in TARGETS
        for ab in "AB"
    }
    # Each trained expert saw its own samples: its B moved from peft's zero init, and moved again.
    assert all(first[k].abs().max() > 0 and not torch.equal(first[k], last[k]) for k in last if ".lora_B." in k)


def test_lora_counts_per_expert_and_zero_is_an_error(wan22_dir):
    from peft import LoraConfig

    config = load_config(None, overrides(wan22_dir, **{"model.expert": "high"}))
    policy = build_policy(config, torch.device("cpu"))
    experts = policy.transformer
    assert isinstance(experts, WanExperts) and experts.trained == ("transformer",)
    experts.add_adapter(LoraConfig(r=2, target_modules=list(TARGETS)))
    assert check_lora(experts, TARGETS) == {"transformer": {t: 2 for t in TARGETS}}  # attn1 + attn2
    assert not any("lora" in n for n, _ in experts.transformer_2.named_parameters())  # the frozen expert

    policy = build_policy(load_config(None, overrides(wan22_dir)), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"model.lora_targets \['to_qkv'\] attached no LoRA adapter to transformer"):
        policy.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_qkv"]))
    with pytest.raises(ConfigError, match="model.lora_targets: Target modules"):
        policy.transformer.add_adapter(LoraConfig(r=2, target_modules=["qkv"]), adapter_name="other")


def test_first_ratio_is_exactly_one(wan22_dir):
    policy = build_policy(load_config(None, overrides(wan22_dir)), torch.device("cpu"))
    traj = assert_first_ratio_is_one(policy, PROMPTS[:2])
    assert (traj.sigmas[:4] * 1000 >= BOUNDARY * 1000).tolist() == [True, True, False, False]  # both experts ran


def test_experts_switch_where_wan_pipeline_switches(wan22_dir):
    """The pipeline's own run records (timestep, expert) per step; WanExperts picks the same expert at each."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan22_dir)
    calls = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_hook(
            lambda m, args, kwargs, out, name=name: calls.append((name, kwargs["timestep"].clone())), with_kwargs=True
        )
    pipe(PROMPTS[0], num_inference_steps=8, num_frames=5, height=16, width=16, guidance_scale=1.0, output_type="latent")
    assert {name for name, _ in calls} == {"transformer", "transformer_2"}

    config = load_config(None, overrides(wan22_dir))
    experts = build_policy(config, torch.device("cpu")).transformer
    for name, timestep in calls:
        assert bool(experts.high_noise(timestep).all()) == (name == "transformer")
    # The boundary itself belongs to the high-noise expert, as in the pipeline (t >= boundary).
    at = torch.tensor([BOUNDARY * 1000, torch.nextafter(torch.tensor(BOUNDARY * 1000), torch.tensor(0.0))])
    assert experts.high_noise(at).tolist() == [True, False]


def test_mixed_batch_equals_each_expert_on_its_samples(wan22_dir):
    """A batch of samples on both sides of the boundary: each sample's velocity is its expert's (same sub-batch)."""
    config = load_config(None, overrides(wan22_dir))
    policy = build_policy(config, torch.device("cpu"))
    model = DiffusersFlowModel(policy.transformer)
    cond = policy.encode(PROMPTS[:2] * 2)
    x = torch.randn(4, *policy.latent_shape)
    sigma = torch.tensor([0.95, 0.5, 0.875, 0.2])
    v = model(x, sigma, cond)
    for name, rows in (("transformer", [0, 2]), ("transformer_2", [1, 3])):
        alone = DiffusersFlowModel(getattr(policy.transformer, name))(x[rows], sigma[rows], cond.select(rows))
        assert torch.equal(v[rows], alone)
    with torch.enable_grad():  # the frozen expert alone still gives a graph (zero gradient) when one trains
        experts = build_policy(load_config(None, overrides(wan22_dir, **{"model.expert": "low"})), "cpu").transformer
        out = DiffusersFlowModel(experts)(x[:1], sigma[:1], cond.select([0]))
        assert out.requires_grad
        out.sum().backward()
        assert all(p.grad is not None and not p.grad.any() for p in experts.transformer_2.parameters())


def test_wan22_config_errors(wan22_dir, tmp_path):
    import shutil

    assert check_model_config(load_config(None, overrides(wan22_dir)))["boundary_ratio"] == BOUNDARY
    broken = tmp_path / "broken"
    shutil.copytree(wan22_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(ConfigError, match="needs boundary_ratio in"):
        check_model_config(load_config(None, overrides(broken)))
    shutil.rmtree(broken / "transformer_2")
    with pytest.raises(ConfigError, match="transformer_2/config.json is missing"):
        check_model_config(load_config(None, overrides(broken)))
    (broken / "model_index.json").write_text(json.dumps({**index, "transformer_2": [None, None]}))
    with pytest.raises(ConfigError, match="model.expert=high needs a two-expert"):
        check_model_config(load_config(None, overrides(broken, **{"model.expert": "high"})))


def test_packaged_config_fits_a_two_expert_folder(wan22_dir):
    from peft import LoraConfig

    assert load_config("wan2_2_t2v_a14b", [f"model.path={wan22_dir}"]).algorithm == "euphonium"
    # the packaged euphonium algorithm needs a PRM folder; the folder checks are the same under flow_grpo
    overrides = [f"model.path={wan22_dir}", "model.max_sequence_length=8", "algorithm=flow_grpo"]
    config = load_config("wan2_2_t2v_a14b", overrides)
    assert (config.model.kind, config.model.expert, config.model.dtype) == ("wan", "both", "bfloat16")
    checked = check_model_config(config)
    assert checked["boundary_ratio"] == BOUNDARY and checked["latent_shape"] == (Z_DIM, 17, 120, 208)
    experts = build_policy(config, torch.device("cpu")).transformer
    experts.add_adapter(LoraConfig(r=2, target_modules=list(config.model.lora_targets)))
    assert check_lora(experts, config.model.lora_targets) == {
        name: {t: 2 for t in config.model.lora_targets} for name in ("transformer", "transformer_2")
    }
