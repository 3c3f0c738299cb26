"""The run's loggers: jsonl (always), TensorBoard and Weights & Biases (offline, under the output dir):
the resolved config, the metrics, the evaluation clips (MP4, or GIF without an encoder), the reward curve."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from euphonium.rewards.prm import LatentRewardModel
from euphonium.toy import NUM_FRAMES, build_toy_model, save_toy_model
from euphonium.train import ConfigError, load_config
from euphonium.train import logging as run_logging
from euphonium.train.__main__ import main


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    transformer, text_encoder = build_toy_model(seed=5)
    save_toy_model(transformer, text_encoder, root / "toy")
    LatentRewardModel(in_channels=3, text_dim=text_encoder.config.dim).save_pretrained(root / "prm")
    return root


def overrides(assets, **extra):
    values = {
        "model.path": assets / "toy",
        "prm_path": assets / "prm",
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": 2,
        "checkpoint_every": 1,
        "num_eval_samples": 2,
        "eval_every": 1,
        "eval_prompts": 3,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_every_logger_gets_config_metrics_clips_and_curve(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    loggers = "[jsonl, tensorboard, wandb]"
    args = ["--output-dir", str(out), *overrides(tiny_assets, loggers=loggers, **{"wandb.tags": "[test]"})]
    assert main(args) == 0

    # Evaluation clips: one MP4 per evaluation (steps 0, 1, 2), the set's first clips side by side.
    clips = sorted((out / "eval_clips").iterdir())
    assert [p.name for p in clips] == ["step-0.mp4", "step-1.mp4", "step-2.mp4"]
    frames = imageio.mimread(clips[-1])
    assert len(frames) == NUM_FRAMES and frames[0].shape[0] % 16 == 0

    acc = tensorboard_tags(out / "tensorboard")
    tags = acc.Tags()
    assert {"reward_mean", "loss", "eval/reward_mean"} <= set(tags["scalars"])
    assert {"eval/clips", "reward_curve"} <= set(tags["images"])
    assert [e.step for e in acc.Images("eval/clips")] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2]
    text = b"".join(e.tensor_proto.string_val[0] for e in acc.Tensors("config/text_summary"))
    assert b"euphonium_fast" in text and b"from_algorithm" in text

    run_id = (out / "wandb" / "euphonium-run-id").read_text().strip()
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    record = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    for needle in (b"reward_mean", b"eval/reward_mean", b"euphonium_fast", b"resolved_sampler", b"test"):
        assert needle in record, needle
    media = runs[0] / "files" / "media"
    assert len(list((media / "videos" / "eval").glob("clips_*.mp4"))) == 3
    assert len(list((media / "images").glob("reward_curve_*.png"))) == 1

    # A resumed run continues the same wandb run (same id) and logs its new steps.
    assert (
        main(
            [
                "--output-dir",
                str(out),
                "--resume",
                *overrides(tiny_assets, loggers=loggers, max_steps=3, **{"wandb.tags": "[test]"}),
            ]
        )
        == 0
    )
    assert (out / "wandb" / "euphonium-run-id").read_text().strip() == run_id
    assert len(sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert (out / "eval_clips" / "step-3.mp4").is_file()


def test_gif_clips_without_a_video_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(run_logging, "video_encoder_available", lambda: False)
    logger = run_logging.MetricsLogger(tmp_path, loggers=["jsonl", "tensorboard"])
    videos = torch.zeros(2, 3, 3, 4, 5)
    videos[0, :, 0] = 1.0  # red
    videos[1, 1, 2] = 1.0  # blue in the second frame
    path = logger.log_clips(7, videos, ["a", "b"])
    assert path == tmp_path / "eval_clips" / "step-7.gif"
    frames = [f[..., :3] for f in imageio.mimread(path)]
    assert len(frames) == 3 and frames[0].shape == (4, 12, 3)
    assert (frames[0][:, :5] == [255, 0, 0]).all() and (frames[0][:, 7:] == 0).all()
    assert (frames[1][:, 7:] == [0, 0, 255]).all() and (frames[1][:, 5:7] == 255).all()  # the white gap
    logger.close()
    assert "eval/clips" in tensorboard_tags(tmp_path / "tensorboard").Tags()["images"]


def test_jsonl_only_and_logger_errors(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert main(["--output-dir", str(out), *overrides(tiny_assets, loggers="[jsonl]", max_steps=1, eval_every=0)]) == 0
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    for value, message in (("[tensorboard]", "must list jsonl"), ("[jsonl, mlflow]", "must list jsonl")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"loggers={value}"])


def test_frame_grid_rows_are_clips_and_columns_frames():
    videos = torch.rand(2, 3, 3, 4, 5)
    grid = run_logging.frame_grid(videos)
    assert grid.shape == (2 * 4 + 2, 3 * 5 + 2 * 2, 3)
    expected = (videos[1, 2].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(grid[6:10, 14:19], expected)
