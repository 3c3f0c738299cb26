"""The toy world's base model: a tiny ``diffusers.WanTransformer3DModel`` and a toy prompt encoder.

Flow-matching convention (DESIGN.md section 2): ``x_sigma = (1 - sigma) x0 + sigma eps``, the network
predicts the velocity ``v = eps - x0`` and is called with Wan's timestep ``t = 1000 sigma``. Latents
are pixels (``[B, 3, F, H, W]`` in [-1, 1], see :mod:`euphonium.toy.world`).

Both modules are diffusers ``ModelMixin``/``ConfigMixin`` models, so ``save_pretrained`` /
``from_pretrained`` give the usual ``config.json`` + ``diffusion_pytorch_model.safetensors`` pair;
the committed weights live in ``euphonium/assets/toy/{transformer,text_encoder}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from euphonium.models.diffusers import Conditioning, DiffusersFlowModel
from euphonium.sampler import ode_steps, shifted_sigmas
from euphonium.toy import world

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"

VOCABULARY: Tuple[str, ...] = ("<pad>", "a", "moving", *world.SIZES, *world.COLORS, *world.SHAPES, *world.DIRECTIONS)
MAX_PROMPT_TOKENS = 6

# The committed architecture. Patch (2, 4, 4) gives 4 x 4 x 4 = 64 tokens per clip, so a width of 128
# and 3 layers still run a forward pass on 16 clips in ~20 ms on two CPU cores; patch (1, 4, 4) at width
# 64 is as fast but learned incoherent, blocky clips in the same pretraining budget, and patch (1, 2, 2)
# is ~8x slower.
TOY_TRANSFORMER_CONFIG: Dict[str, object] = {
    "patch_size": (2, 4, 4),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": world.CHANNELS,
    "out_channels": world.CHANNELS,
    "text_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 3,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}
TOY_TEXT_ENCODER_CONFIG: Dict[str, object] = {"dim": 32, "max_length": MAX_PROMPT_TOKENS}


class ToyTextEncoder(ModelMixin, ConfigMixin):
    """Learned token embeddings over the toy vocabulary: prompts -> ``encoder_hidden_states``.

    ``h[b, l] = LayerNorm(E[token_bl] + P[l]) * (token_bl != pad)`` for ``l < max_length``: pad slots
    are exactly zero, as Wan zero-pads its T5 states. Deterministic (no dropout). Prompts must follow
    the toy grammar (:func:`euphonium.toy.world.parse_prompt`).
    """

    @register_to_config
    def __init__(self, dim: int = 32, max_length: int = MAX_PROMPT_TOKENS):
        super().__init__()
        if max_length < MAX_PROMPT_TOKENS:
            raise ValueError(
                f"max_length must be at least {MAX_PROMPT_TOKENS} (the longest toy prompt), got {max_length}"
            )
        self.token_embedding = nn.Embedding(len(VOCABULARY), dim, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding, std=0.1)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_length]`` int64 (right-padded with 0) on the module's device."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise TypeError("prompts must be a non-empty sequence of prompt strings")
        ids = torch.zeros(len(prompts), self.config.max_length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            world.parse_prompt(prompt)
            words = prompt.lower().split()
            ids[i, : len(words)] = torch.tensor([VOCABULARY.index(w) for w in words])
        return ids.to(self.token_embedding.weight.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, L]`` -> hidden states ``[B, L, dim]`` in the module's dtype."""
        h = self.norm(self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]])
        return h * (input_ids != 0).unsqueeze(-1).to(h.dtype)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``encoder_hidden_states [B, max_length, dim]`` for ``B`` toy prompts."""
        return self(self.tokenize(prompts))

    def encode_pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """Pooled prompt embedding ``[B, dim]``: the mean of the hidden states over non-pad tokens."""
        ids = self.tokenize(prompts)
        h = self(ids)
        return h.sum(dim=1) / (ids != 0).sum(dim=1, keepdim=True).to(h.dtype)


def build_toy_model(
    transformer_config: Optional[dict] = None, text_encoder_config: Optional[dict] = None, seed: int = 0
) -> Tuple[WanTransformer3DModel, ToyTextEncoder]:
    """Freshly initialised ``(transformer, text_encoder)`` (float32, CPU), deterministic from ``seed``.

    ``transformer_config`` / ``text_encoder_config`` override entries of :data:`TOY_TRANSFORMER_CONFIG`
    / :data:`TOY_TEXT_ENCODER_CONFIG`; the transformer's ``text_dim`` follows the encoder's ``dim``.
    """
    t_cfg = {**TOY_TRANSFORMER_CONFIG, **(transformer_config or {})}
    e_cfg = {**TOY_TEXT_ENCODER_CONFIG, **(text_encoder_config or {})}
    unknown = set(t_cfg) - set(TOY_TRANSFORMER_CONFIG)
    if unknown:
        raise ValueError(f"transformer_config has unknown keys {sorted(unknown)}")
    unknown = set(e_cfg) - set(TOY_TEXT_ENCODER_CONFIG)
    if unknown:
        raise ValueError(f"text_encoder_config has unknown keys {sorted(unknown)}")
    t_cfg["text_dim"] = e_cfg["dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**t_cfg)
        text_encoder = ToyTextEncoder(**e_cfg)
    return transformer, text_encoder


def load_toy_model(
    path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32
) -> Tuple[WanTransformer3DModel, ToyTextEncoder]:
    """The pretrained toy ``(transformer, text_encoder)`` in eval mode on ``device`` in ``dtype``.

    ``path`` is a directory with ``transformer/`` and ``text_encoder/`` subfolders
    (``save_pretrained`` layout); ``None`` loads the weights committed in ``euphonium/assets/toy``.
    """
    root = Path(path) if path is not None else ASSET_DIR
    for sub in ("transformer", "text_encoder"):
        if not (root / sub / "config.json").is_file():
            raise FileNotFoundError(f"no toy model at {root}: {root / sub / 'config.json'} is missing")
    transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=dtype)
    text_encoder = ToyTextEncoder.from_pretrained(root / "text_encoder", torch_dtype=dtype)
    return transformer.to(device).eval(), text_encoder.to(device).eval()


def save_toy_model(transformer: WanTransformer3DModel, text_encoder: ToyTextEncoder, path: Union[str, Path]) -> Path:
    """Write both modules under ``path`` (``transformer/``, ``text_encoder/``; safetensors + config.json)."""
    root = Path(path)
    transformer.save_pretrained(root / "transformer")
    text_encoder.save_pretrained(root / "text_encoder")
    return root


def predict_velocity(
    transformer: WanTransformer3DModel,
    x: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    encoder_hidden_states: torch.Tensor,
) -> torch.Tensor:
    """``v_theta(x, sigma)`` for latents ``x [B, 3, F, H, W]``; ``sigma`` a float or ``[B]`` tensor in [0, 1].

    Calls the transformer with ``timestep = 1000 * sigma`` (Wan's convention) and returns ``[B, 3, F, H, W]``
    in the transformer's dtype.
    """
    batch = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a float or a [{batch}] tensor, got shape {tuple(sigma.shape)}")
    return transformer(x, timestep=sigma * 1000, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


@torch.no_grad()
def sample_ode(
    transformer: WanTransformer3DModel,
    text_encoder: ToyTextEncoder,
    prompts: Sequence[str],
    steps: int = 20,
    shift: float = 3.0,
    generator: world.Generator = None,
) -> torch.Tensor:
    """Deterministic Euler ODE sampling: ``x <- x + (sigma_next - sigma) v_theta(x, sigma)`` from
    ``x_1 ~ N(0, I)`` over :func:`euphonium.sampler.shifted_sigmas` ``(steps, shift)`` (the base model was
    trained with the same shift, 3). Returns latents ``[B, 3, F, H, W]`` float32.

    ``generator`` (``torch.Generator`` or int seed) draws the initial noise on the CPU.
    """
    param = next(transformer.parameters())
    gen = world._make_generator(generator)
    x = torch.randn(len(prompts), world.CHANNELS, world.NUM_FRAMES, world.HEIGHT, world.WIDTH, generator=gen)
    x = x.to(param.device)
    cond = Conditioning(prompt_embeds=text_encoder.encode(prompts).to(param.dtype))
    return ode_steps(DiffusersFlowModel(transformer), cond, x, shifted_sigmas(steps, shift).tolist())


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
