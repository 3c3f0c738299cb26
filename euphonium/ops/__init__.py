"""Public, stable ops: fused Triton kernels on CUDA with eager PyTorch references (the spec)."""

from euphonium.ops._backend import get_backend, use_backend
from euphonium.ops.sde import SDEStepOutput, philox_randn, sde_log_prob, sde_step

__all__ = ["get_backend", "use_backend", "SDEStepOutput", "philox_randn", "sde_log_prob", "sde_step"]
