"""Wan2.2 A14B with one expert trained: updates train only the steps that expert handles (the frozen expert's
carry no gradient), a sampler whose windows could hold none of them is refused before any weights load, and
DDP trains both experts although a micro-batch may reach only one (find_unused_parameters)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_models_wan22 import (
    BOUNDARY,
    _transformer,
    overrides,
    wan22_dir,  # noqa: F401  (a fixture)
)

from euphonium.models.wan22 import WanExperts
from euphonium.sampler import preset
from euphonium.train import ConfigError, load_config
from euphonium.train.__main__ import main
from euphonium.train.experts import check_trained_steps, trained_steps


@pytest.mark.parametrize("expert, steps", [("both", [0, 1, 2]), ("high", [0, 1]), ("low", [2])])
def test_trained_steps_are_the_trained_experts(expert, steps):
    # shift 3, 4 steps: timesteps 1000, 900 (high-noise expert), 750, 500 (low; the last step is never trained).
    experts = WanExperts(_transformer(1), _transformer(2), BOUNDARY, expert=expert)
    sigmas = torch.tensor([1.0, 0.9, 0.75, 0.5])
    traj = SimpleNamespace(trainable=torch.tensor([True, True, True, False]), sigma=sigmas)
    assert trained_steps(experts, traj).tolist() == steps
    # A model without experts trains every trainable step.
    assert trained_steps(_transformer(1), traj).tolist() == [0, 1, 2]
    traj.trainable = torch.zeros(4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="no trainable SDE step"):
        trained_steps(experts, traj)


def test_one_expert_trains_only_on_its_noise_levels(request, tmp_path, monkeypatch):
    seen = []
    forward = WanExperts.forward

    def spy(self, hidden_states, timestep, *args, **kwargs):
        if torch.is_grad_enabled():
            seen.extend(timestep.tolist())
        return forward(self, hidden_states, timestep, *args, **kwargs)

    monkeypatch.setattr(WanExperts, "forward", spy)
    out = tmp_path / "run"
    assert (
        main(["--output-dir", str(out), *overrides(request.getfixturevalue("wan22_dir"), **{"model.expert": "low"})])
        == 0
    )
    # Every training forward is at a low-noise step (750 here): none goes to the frozen high-noise expert.
    assert seen and all(t < BOUNDARY * 1000 for t in seen)
    first = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert {k.split(".")[0] for k in last} == {"transformer_2"}
    assert all(first[k].abs().max() > 0 and not torch.equal(first[k], last[k]) for k in last if ".lora_B." in k)


def test_a_sampler_without_steps_for_the_trained_expert_is_refused(request, tmp_path, capsys):
    def check(expert, **sampler):
        config = load_config(None, overrides(request.getfixturevalue("wan22_dir"), **{"model.expert": expert}))
        base = {"num_steps": 4, "shift": 3.0, "sde_window": None}
        check_trained_steps(config, preset("flow_grpo", **{**base, **sampler}), BOUNDARY)

    check("high", sde_window=(0, 2))
    check("low", sde_window=(1, 3))
    check("both", sde_window=(3, 4))
    with pytest.raises(ConfigError, match=r"model.expert=low .* steps \[2\] .* SDE window \(0, 2\) holds none"):
        check("low", sde_window=(0, 2))
    # A random 1-step window could fall on step 2 or 3; the hint names a range that keeps it on steps 0-1.
    with pytest.raises(ConfigError, match=r"window \(2, 3\) holds none .*sde_window_range=\[0, 2\]"):
        check("high", sde_window_size=1)
    check("high", sde_window_size=1, sde_window_range=(0, 2))

    # Through the command line: a one-line error before any weights load.
    argv = [
        "--output-dir",
        str(tmp_path / "run"),
        *overrides(request.getfixturevalue("wan22_dir"), **{"model.expert": "high"}),
    ]
    assert main([*argv, "sampler.sde_window=[2, 4]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.expert=high") and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ddp_trains_both_experts(request, tmp_path):
    """2 gloo ranks, one sample per micro-batch: a micro-batch reaches one expert, the other's LoRA is unused."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    argv = overrides(request.getfixturevalue("wan22_dir"), **{"model.expert": "both", "checkpoint_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "euphonium.train", "--output-dir", str(out), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["world_size"] == 2
    last = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert {k.split(".")[0] for k in last} == {"transformer", "transformer_2"}
    assert all(last[k].abs().max() > 0 for k in last if ".lora_B." in k)
