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
