"""Model adapters: diffusers flow transformers (Wan2.1 first) and the built-in toy video world."""

from euphonium.models.diffusers import Conditioning, DiffusersFlowModel, select_attention_backend
from euphonium.models.toy import ToyTextEncoder, latents_to_video, load_toy_model, video_to_latents

__all__ = [
    "Conditioning",
    "DiffusersFlowModel",
    "select_attention_backend",
    "ToyTextEncoder",
    "latents_to_video",
    "load_toy_model",
    "video_to_latents",
]
