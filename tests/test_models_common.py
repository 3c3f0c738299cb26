"""What every model family's tests share: the first importance ratio of a rollout, recomputed the trainer's way,
and the LoRA count helper (adapters per target, zero an error) on a plain module.

``assert_first_ratio_is_one`` samples a rollout through the policy's transformer with the trainer's
``DiffusersFlowModel`` and recomputes each recorded step's log-prob as the trainer's loss does (the
same velocity call, ``ops.sde_log_prob`` at the trajectory's sigmas) on the rollout's batch: the ratio
``exp(log_prob - old_log_prob)`` must be exactly 1. A family whose training call differs from its
rollout call (timestep scale, latent packing, guidance input, CFG halves) fails it.
"""

import pytest
import torch

from euphonium import ops
from euphonium.models.diffusers import DiffusersFlowModel
from euphonium.sampler import preset, rollout
from euphonium.train import ConfigError
from euphonium.train.policy import check_lora, lora_counts


def assert_first_ratio_is_one(policy, prompts, *, cfg_scale=1.0, num_steps=4, shift=3.0):
    model = DiffusersFlowModel(policy.transformer, cfg_scale=cfg_scale)
    cond = policy.encode(prompts)
    config = preset("flow_grpo", num_steps=num_steps, shift=shift, sde_window=(0, num_steps))
    with torch.no_grad():
        traj = rollout(model, cond, config, shape=(len(prompts), *policy.latent_shape), seed=0, device="cpu")
        batch, k = traj.log_prob.shape
        assert k == num_steps
        for j in range(k):
            cols = torch.full((batch,), j)
            rows = torch.arange(batch)
            steps = traj.sde_steps[cols]
            sigma, sigma_next = traj.sigmas[steps], traj.sigmas[steps + 1]
            v = model(traj.latents[rows, cols], sigma, cond)
            log_prob = ops.sde_log_prob(
                traj.latents[rows, cols],
                v,
                traj.latents[rows, cols + 1],
                sigma,
                sigma_next,
                schedule=traj.schedule,
                noise_level=traj.noise_level,
                sigma_max=traj.sigma_max,
            )
            ratio = torch.exp(log_prob - traj.log_prob[:, j])
            assert torch.equal(ratio, torch.ones_like(ratio)), f"step {j}: ratios {ratio.tolist()}"
    return traj


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(4, 4)
        self.to_k = torch.nn.Linear(4, 4)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Dropout(0.0)])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Attn() for _ in range(3)])
        self.proj_out = torch.nn.Linear(4, 4)


def test_lora_counts_per_target_and_zero_names_the_target():
    from peft import LoraConfig, inject_adapter_in_model

    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_out.0", "to_v"]), _Net())
    assert lora_counts(net, ["to_q", "to_out.0", "to_v", "proj_out"]) == {
        "proj_out": 0,
        "to_out.0": 3,
        "to_q": 3,
        "to_v": 0,
    }
    assert lora_counts(net, ["to_q"], adapter_name="other") == {"to_q": 0}
    assert check_lora(net, ["to_q", "to_out.0"]) == {"transformer": {"to_out.0": 3, "to_q": 3}}
    with pytest.raises(ConfigError, match=r"\['to_v'\] attached no LoRA adapter .* named proj_out, to_k, to_out.0"):
        check_lora(net, ["to_q", "to_v"])


def word_tokenizer(words, *, special, template, model_max_length, pad):
    """A word-level fast tokenizer (the ``tokenizers`` library, no download): ``special`` tokens first,
    then ``words``; ``template`` is the post-processor's single-sequence template (e.g. ``"$A </s>"``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*special, *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [t for t in special if t in template.split()]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token="<unk>", model_max_length=model_max_length
    )


def clip_tokenizer(words, model_max_length=8):
    """CLIP's layout: ``<|startoftext|> words <|endoftext|>``, padded with ``<|endoftext|>``."""
    special = ["<unk>", "<|startoftext|>", "<|endoftext|>"]
    return word_tokenizer(
        words,
        special=special,
        template="<|startoftext|> $A <|endoftext|>",
        model_max_length=model_max_length,
        pad="<|endoftext|>",
    )


def t5_tokenizer(words, model_max_length=512):
    """T5's layout: ``words </s>``, padded with ``<pad>`` (id 0)."""
    return word_tokenizer(
        words, special=["<pad>", "</s>", "<unk>"], template="$A </s>", model_max_length=model_max_length, pad="<pad>"
    )


def tiny_clip(tokenizer, hidden, projection=None):
    """A random CLIP text encoder (``CLIPTextModelWithProjection``, or ``CLIPTextModel`` without ``projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_t5(tokenizer, d_model):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=4,
            d_ff=2 * d_model,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        )
    )


def train_overrides(root, kind, prompts, **extra):
    """The trainer's overrides of a 2-step LoRA run on a tiny pipeline folder (flow_grpo, jpeg reward, fp32)."""
    import json

    values = {
        "model.kind": kind,
        "model.path": str(root),
        "model.lora_rank": 2,
        "model.height": 16,
        "model.width": 16,
        "model.max_sequence_length": 8,
        "prompts": json.dumps(prompts),
        "rewards": "{jpeg_compressibility: {}}",
        "reward_weights": "{jpeg_compressibility: 1.0}",
        "algorithm": "flow_grpo",
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 3,
        "sampler.sde_window": "[0, 3]",
        "timestep_fraction": 1.0,
        "micro_batches": 2,
        "max_steps": 2,
        "checkpoint_every": 1,
        "num_eval_samples": 2,
        "eval_every": 0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def assert_trained_two_steps(out, targets):
    """metrics.jsonl has steps 1 and 2, the first ratio within float32 rounding of 1 (training batches mix
    noise levels, so batch-size-dependent rounding is left; the exact check is assert_first_ratio_is_one),
    and for every target some LoRA B moved at each step (not every one: e.g. the text queries of the last
    joint block of SD3/FLUX only feed outputs the model drops, so their gradient is zero). Returns the last
    checkpoint's keys."""
    import json

    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["ratio_max_dev"] < 1e-6
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float))
    first = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    for target in targets:
        keys = [k for k in last if f".{target}.lora_B." in k]
        assert any(first[k].abs().max() > 0 and not torch.equal(first[k], last[k]) for k in keys), target
    return set(last)
