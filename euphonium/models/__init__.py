"""Model adapters: diffusers flow transformers (Wan2.1, Wan2.2's two experts) behind one velocity interface."""

from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import Conditioning, DiffusersFlowModel, select_attention_backend
from euphonium.models.wan22 import WanExperts

__all__ = ["Conditioning", "DiffusersFlowModel", "FlowTransformer", "WanExperts", "select_attention_backend"]
