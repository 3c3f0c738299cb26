"""Model adapters: diffusers flow transformers (Wan2.1 first) behind one velocity interface."""

from euphonium.models.diffusers import Conditioning, DiffusersFlowModel, select_attention_backend

__all__ = ["Conditioning", "DiffusersFlowModel", "select_attention_backend"]
