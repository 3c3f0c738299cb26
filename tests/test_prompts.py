"""Prompt data (lists, .txt and .jsonl files with metadata for the rewards) and the on-disk embedding cache."""

import json

import pytest
import torch

from euphonium.models.diffusers import Conditioning
from euphonium.rewards import CallableReward, Reward, RewardSet, register_reward
from euphonium.rewards.prm import LatentRewardModel
from euphonium.toy import build_toy_model, save_toy_model
from euphonium.train import ConfigError, Trainer, load_config
from euphonium.train.prompts import (
    CachedTextEncoder,
    EmbeddingCache,
    evaluation_set,
    prompt_metadata,
    read_prompt_file,
)

TOY = ["a red square moving left", "a blue circle moving up", "a green diamond moving right"]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    transformer, text_encoder = build_toy_model(seed=3)
    save_toy_model(transformer, text_encoder, root / "toy")
    LatentRewardModel(in_channels=3, text_dim=text_encoder.config.dim).save_pretrained(root / "prm")
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_txt_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text(f"{TOY[0]}\n\n  {TOY[1]}  \n")
    assert read_prompt_file(txt) == ([TOY[0], TOY[1]], [{}, {}])
    rows = [{"prompt": TOY[0], "tag": "a", "score": 1}, {"prompt": TOY[1]}, {"prompt": TOY[0], "tag": "a", "score": 1}]
    texts, meta = read_prompt_file(write_jsonl(tmp_path / "p.jsonl", rows))
    assert texts == [TOY[0], TOY[1], TOY[0]] and meta == [{"tag": "a", "score": 1}, {}, {"tag": "a", "score": 1}]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.csv", "a\n", "must be a .txt"),
        ("p.txt", "\n \n", "holds no prompts"),
        ("p.jsonl", '{"prompt": "a"}\nnot json\n', "line 2 is not valid JSON"),
        ("p.jsonl", '{"text": "a"}\n', "line 1 must be a JSON object with a non-empty 'prompt'"),
        ("p.jsonl", '["a"]\n', "line 1 must be a JSON object"),
        ("p.jsonl", '{"prompt": "a", "k": 1}\n{"prompt": "a", "k": 2}\n', "listed twice with different metadata"),
    ],
)
def test_bad_prompt_files_are_config_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"prompts={path}"])
    with pytest.raises(ConfigError, match="eval_prompts: .*" + message):
        load_config(None, [f"eval_prompts={path}"])


def test_config_reads_the_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": TOY[0], "k": 1}, {"prompt": TOY[1], "k": 2}])
    evals = tmp_path / "eval.txt"
    evals.write_text(f"{TOY[2]}\n{TOY[0]}\n")
    config = load_config(None, [f"prompts={train}", f"eval_prompts={evals}"])
    assert config.prompts == TOY[:2] and config.eval_prompts == str(evals)
    # A .txt evaluation file has no metadata: its prompts keep the training prompts' (or none).
    assert prompt_metadata(config) == {TOY[0]: {"k": 1}, TOY[1]: {"k": 2}, TOY[2]: {}}
    # The file's prompts are the evaluation set, in order; a count draws from the training prompts.
    assert evaluation_set(config, config.prompts, torch.Generator().manual_seed(0)) == [TOY[2], TOY[0]]
    counted = load_config(None, ["prompts=[a red square moving left]", "eval_prompts=3"])
    assert evaluation_set(counted, counted.prompts, torch.Generator()) == [TOY[0]] * 3
    # The eval file may not give a training prompt other metadata.
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"prompt": TOY[0], "k": 5}])
    with pytest.raises(ConfigError, match="other metadata"):
        load_config(None, [f"prompts={train}", f"eval_prompts={clash}"])
    for bad, message in (("eval_prompts=0", "eval_prompts must be a count >= 1"), ("prompts=[1]", "list of non-empty")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


def test_reward_set_passes_metadata_only_to_rewards_that_take_it():
    seen = {}

    def plain(videos, prompts):
        return torch.ones(len(prompts))

    def with_meta(videos, prompts, metadata):
        seen["fn"] = metadata
        return torch.tensor([float(m.get("k", 0)) for m in metadata])

    class Builtin(Reward):
        name = "builtin"

        def compute(self, videos, prompts, metadata=None):
            seen["builtin"] = metadata
            return torch.zeros(len(prompts))

    rewards = RewardSet(
        {"plain": plain, "meta": with_meta, "builtin": Builtin(), "wrapped": CallableReward(with_meta, "wrapped")},
        prompt_metadata={"a": {"k": 3}},
    )
    videos = torch.rand(2, 1, 3, 4, 4)
    out = rewards(videos, ["a", "b"])
    assert out.parts["meta"].tolist() == [3.0, 0.0] and out.parts["wrapped"].tolist() == [3.0, 0.0]
    assert seen["builtin"] == [{"k": 3}, {}]
    assert rewards(videos, ["a", "b"], metadata=[{"k": 1}, {"k": 2}]).parts["meta"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="sequence of 2 mappings"):
        rewards(videos, ["a", "b"], metadata=[{}])
    # Rewards without a metadata parameter are called exactly as before.
    assert RewardSet({"plain": plain})(videos, ["a", "b"]).parts["plain"].tolist() == [1.0, 1.0]


SEEN = []


def _metadata_reward(**kwargs):
    def reward(videos, prompts, metadata):
        SEEN.append([(p, m) for p, m in zip(prompts, metadata)])
        return torch.tensor([float(m.get("k", -1)) for m in metadata])

    return reward


register_reward("test_prompt_metadata", _metadata_reward)


def test_the_trainer_hands_file_metadata_to_rewards(tiny_assets, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": TOY[0], "k": 1}, {"prompt": TOY[1], "k": 2}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": TOY[2], "k": 7}])
    overrides = {
        "model.path": tiny_assets / "toy",
        "prm_path": tiny_assets / "prm",
        "prompts": train,
        "eval_prompts": evals,
        "rewards": "{test_prompt_metadata: {}}",
        "reward_weights": "{test_prompt_metadata: 1}",
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": 1,
    }
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(config, tmp_path / "run")
    SEEN.clear()
    trainer.train_step()
    expected = {TOY[0]: {"k": 1}, TOY[1]: {"k": 2}}
    assert SEEN and all(expected[p] == m for p, m in SEEN[-1])
    SEEN.clear()
    assert trainer.evaluate()["reward_mean"] == 7.0  # the one eval prompt, its own metadata
    assert SEEN == [[(TOY[2], {"k": 7})]]


def test_embedding_cache_survives_a_restart_and_ignores_bad_files(tiny_assets, tmp_path):
    overrides = [f"model.path={tiny_assets / 'toy'}", f"embedding_cache={tmp_path / 'cache'}", "algorithm=grpo_fast"]
    config = load_config(None, overrides)
    first = Trainer(config, tmp_path / "a").policy
    embeds = first.encode(TOY).prompt_embeds
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 3
    plain = load_config(None, overrides[:1] + ["algorithm=grpo_fast"])
    assert torch.equal(embeds, Trainer(plain, tmp_path / "b").policy.encode(TOY).prompt_embeds)

    # A restart reads every prompt from disk; a torn file is computed again, with a warning.
    files[0].write_bytes(files[0].read_bytes()[:20])
    again = Trainer(config, tmp_path / "c").policy
    with pytest.warns(UserWarning, match="unreadable"):
        assert torch.equal(again.encode(TOY).prompt_embeds, embeds)

    # Other weights are another encoder: another folder, other embeddings.
    other = tmp_path / "other"
    save_toy_model(*build_toy_model(seed=4), other)
    changed = load_config(None, [f"model.path={other}", *overrides[1:]])
    assert not torch.equal(Trainer(changed, tmp_path / "d").policy.encode(TOY).prompt_embeds, embeds)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_cached_encoder_is_lazy_and_keeps_conditioning_kwargs(tmp_path):
    calls = []

    def make():
        calls.append("built")

        def encode(prompts):
            n = len(prompts)
            x = torch.stack([torch.full((2, 3), float(len(p))) for p in prompts])
            return Conditioning(
                x, kwargs={"pooled_projections": x[:, 0] * 2, "mask": torch.ones(n, 2, dtype=torch.bool)}
            )

        return encode

    cache = EmbeddingCache(tmp_path, {"encoder": "fake", "max_length": 2})
    out = CachedTextEncoder(make, cache, lazy=True)(["ab", "abc", "ab"])
    assert calls == ["built"] and out.prompt_embeds[:, 0, 0].tolist() == [2.0, 3.0, 2.0]
    restarted = CachedTextEncoder(make, cache, lazy=True)
    again = restarted(["abc", "ab"])
    assert calls == ["built"] and restarted.computed == 0  # everything read from disk, the encoder never built
    assert torch.equal(again.kwargs["pooled_projections"], out.kwargs["pooled_projections"][[1, 0]])
    assert again.kwargs["mask"].dtype == torch.bool
    assert CachedTextEncoder(make, EmbeddingCache(tmp_path, {"encoder": "fake", "max_length": 3}), lazy=True)(["ab"])
    assert calls == ["built", "built"]  # another encoder id does not read the first one's files
