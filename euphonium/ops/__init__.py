"""Public, stable ops: fused Triton kernels on CUDA, PyTorch paths on the CPU, eager PyTorch references (the spec)."""

from euphonium.ops._backend import get_backend, use_backend
from euphonium.ops.advantages import group_advantages
from euphonium.ops.distributed import gather_group_advantages
from euphonium.ops.grpo import dual_reward_advantages, dual_reward_loss, grpo_loss
from euphonium.ops.reward_grad import reward_grad
from euphonium.ops.sde import SDEStepOutput, philox_randn, sde_log_prob, sde_step

__all__ = ["get_backend", "use_backend", "SDEStepOutput", "philox_randn", "sde_log_prob", "sde_step"]
__all__ += [
    "group_advantages",
    "gather_group_advantages",
    "grpo_loss",
    "dual_reward_advantages",
    "dual_reward_loss",
    "reward_grad",
]
