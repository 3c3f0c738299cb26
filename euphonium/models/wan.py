"""Wan2.1 pieces the pipeline computes outside its transformer: the UMT5 prompt embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch


class WanTextEncoder:
    """UMT5 prompt embeddings as ``WanPipeline`` computes them (zero past each prompt's tokens), cached."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.model = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.length = max_sequence_length
        self.cache: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: List[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            tokens = self.tokenizer(
                new,
                padding="max_length",
                max_length=self.length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            mask = tokens.attention_mask.to(self.device)
            hidden = self.model(tokens.input_ids.to(self.device), mask).last_hidden_state
            hidden = hidden * mask[..., None].to(hidden.dtype)
            for prompt, h in zip(new, hidden):
                self.cache[prompt] = h
        return torch.stack([self.cache[p] for p in prompts])
