"""Public, stable ops: fused Triton kernels on CUDA with eager PyTorch references (the spec)."""

from euphonium.ops._backend import get_backend, use_backend

__all__ = ["get_backend", "use_backend"]
