"""Model adapters: diffusers flow transformers (Wan, SD3.5, FLUX.1, HunyuanVideo) behind one velocity interface."""

from euphonium.models.adapter import FlowTransformer
from euphonium.models.diffusers import Conditioning, DiffusersFlowModel, select_attention_backend
from euphonium.models.flux import FluxTextEncoder, FluxTransformer
from euphonium.models.hunyuan_video import HunyuanVideoTextEncoder, HunyuanVideoTransformer
from euphonium.models.sd3 import SD3TextEncoder, SD3Transformer, sd3_decode
from euphonium.models.wan22 import WanExperts

__all__ = [
    "Conditioning",
    "DiffusersFlowModel",
    "FlowTransformer",
    "FluxTextEncoder",
    "FluxTransformer",
    "HunyuanVideoTextEncoder",
    "HunyuanVideoTransformer",
    "SD3TextEncoder",
    "SD3Transformer",
    "WanExperts",
    "sd3_decode",
    "select_attention_backend",
]
