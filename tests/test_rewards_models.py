"""Model-based rewards on tiny random weights built offline in each official checkpoint layout.

Each reward is compared with an independent computation: the official architecture written out here
(open_clip's ViT and text transformer for HPS v2, BLIP's timm-style ViT for ImageReward) or the
transformers model loaded on its own, fed the reward's own preprocessing; the preprocessing is
checked on its own where it has exact properties.
"""

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from euphonium.rewards.aesthetic import AestheticScore
from euphonium.rewards.base import build_reward
from euphonium.rewards.hpsv2 import HPSv2
from euphonium.rewards.image_reward import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, ImageReward
from euphonium.rewards.pickscore import PickScore

WORDS = ["a", "red", "green", "square", "circle", "moving", "left", "right", "photo", "of"]
PROMPTS = ["a red square moving left", "a green circle moving right", "a photo of a square"]


def word_tokenizer(path, specials, template, **names):
    """A word-level fast tokenizer over WORDS, saved with save_pretrained; returns its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(specials) + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    first, last = template
    tok.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", special_tokens=[(first, vocab[first]), (last, vocab[last])]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(path)
    return vocab


def clip_tokenizer(path):
    """CLIP-like: end-of-text is the highest id (open_clip pools at argmax), padding with it as OpenAI's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>"] + WORDS + ["<|startoftext|>", "<|endoftext|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>", model_max_length=16
    ).save_pretrained(path)
    return vocab


def tiny_clip_config(vocab, projection_dim=16):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=vocab["<|endoftext|>"],
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=projection_dim,
    )


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel (logit scale exp = 50) in one folder, its tokenizer and processor in another."""
    from transformers import CLIPImageProcessor, CLIPModel

    model_dir, proc_dir = tmp_path_factory.mktemp("pick_model"), tmp_path_factory.mktemp("pick_processor")
    vocab = clip_tokenizer(proc_dir)
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(vocab))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    model.save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(proc_dir)
    return model_dir, proc_dir


# --- PickScore -------------------------------------------------------------------------------------


def test_pickscore_is_logit_scale_times_mean_cosine(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    model_dir, proc_dir = tiny_clip
    reward = build_reward("pickscore", path=model_dir, processor_path=proc_dir, frame_batch_size=5)
    assert isinstance(reward, PickScore)
    v = torch.rand(3, 4, 3, 20, 28)
    score = reward(v, PROMPTS)
    assert score.shape == (3,) and score.dtype == torch.float32

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokens = AutoTokenizer.from_pretrained(proc_dir)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(**tokens)
        text = F.normalize(text if isinstance(text, torch.Tensor) else text.pooler_output, dim=-1)
        pixels = reward.clip.preprocess(v.flatten(0, 1))
        image = model.get_image_features(pixel_values=pixels)
        image = F.normalize(image if isinstance(image, torch.Tensor) else image.pooler_output, dim=-1)
    expected = 50.0 * (image.view(3, 4, -1) * text[:, None]).sum(-1).mean(1)
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)
    assert float(score.abs().max()) <= 50.0 + 1e-3
    assert pixels.shape == (12, 3, 32, 32)

    v.requires_grad_(True)
    reward(v, PROMPTS).sum().backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0


def test_pickscore_needs_its_processor(tiny_clip, tmp_path):
    model_dir, _ = tiny_clip
    with pytest.raises(ValueError, match=r"path: .*preprocessor_config\.json.* is missing"):
        PickScore(model_dir)
    with pytest.raises(ValueError, match=r"path must be a local folder"):
        PickScore(tmp_path / "nowhere")


# --- LAION aesthetic predictor ---------------------------------------------------------------------


def aesthetic_state(dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    sizes = [(dim, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        state[f"layers.{index}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


@pytest.fixture(scope="module")
def aesthetic_dir(tiny_clip, tmp_path_factory):
    """The official layout: the MLP's .pth next to a clip/ folder (model + processor)."""
    import shutil

    model_dir, proc_dir = tiny_clip
    root = tmp_path_factory.mktemp("aesthetic")
    shutil.copytree(model_dir, root / "clip")
    shutil.copy(proc_dir / "preprocessor_config.json", root / "clip")
    torch.save(aesthetic_state(16), root / "sac+logos+ava1-l14-linearMSE.pth")
    return root


def test_aesthetic_is_the_mlp_on_unit_clip_embeddings(aesthetic_dir):
    from transformers import CLIPModel

    reward = build_reward("aesthetic", path=aesthetic_dir)
    assert isinstance(reward, AestheticScore)
    v = torch.rand(2, 3, 3, 40, 32)
    score = reward(v, ["x", "y"])

    model = CLIPModel.from_pretrained(aesthetic_dir / "clip").eval()
    state = aesthetic_state(16)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=reward.clip.preprocess(v.flatten(0, 1)))
        x = F.normalize(image if isinstance(image, torch.Tensor) else image.pooler_output, dim=-1)
        for index in (0, 2, 4, 6, 7):  # linear layers only: the released MLP has no activations
            x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(score, x.view(2, 3).mean(1), rtol=1e-4, atol=1e-4)


def test_aesthetic_weights_formats_and_layout_errors(aesthetic_dir, tmp_path):
    from safetensors.torch import save_file

    save_file(aesthetic_state(16), tmp_path / "head.safetensors")
    v = torch.rand(1, 2, 3, 32, 32)
    a = AestheticScore(tmp_path, clip_path=aesthetic_dir / "clip", weights="head.safetensors")(v, ["x"])
    b = AestheticScore(aesthetic_dir)(v, ["x"])
    torch.testing.assert_close(a, b)

    broken = aesthetic_state(16)
    del broken["layers.7.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth.*missing keys.*layers\.7\.weight"):
        AestheticScore(tmp_path, clip_path=aesthetic_dir / "clip", weights="broken.pth")
    torch.save(aesthetic_state(8), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"narrow\.pth.*wrong shape"):
        AestheticScore(tmp_path, clip_path=aesthetic_dir / "clip", weights="narrow.pth")
    with pytest.raises(ValueError, match=r"weights: weights file .*sac\+logos.* does not exist"):
        AestheticScore(tmp_path)
    torch.save({"layers": nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")
    with pytest.raises(ValueError, match=r"cannot load weights from .*pickled_module\.pth"):
        AestheticScore(tmp_path, clip_path=aesthetic_dir / "clip", weights="pickled_module.pth")


# --- HPS v2: open_clip's architecture, written out ---------------------------------------------------


class OpenClipBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (pre-LN, nn.MultiheadAttention with a fused in_proj, GELU MLP)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(4 * width, width))]
            )
        )

    def forward(self, x, mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenClipBlock(width, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class OpenClipVisual(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, embed_dim):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OpenClipTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipCLIP(nn.Module):
    """open_clip's ``CLIP`` (ViT image tower, built-in text transformer), same parameter names."""

    def __init__(self, cfg):
        super().__init__()
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        self.visual = OpenClipVisual(
            v["image_size"], v["patch_size"], v["width"], v["layers"], v["width"] // v["head_width"], cfg["embed_dim"]
        )
        self.transformer = OpenClipTransformer(t["width"], t["layers"], t["heads"])
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.randn(t["context_length"], t["width"]) * 0.01)
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.randn(t["width"], cfg["embed_dim"]) * t["width"] ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.context_length = t["context_length"]

    def encode_text(self, ids):
        n = self.context_length
        mask = torch.full((n, n), float("-inf")).triu(1)
        x = self.transformer(self.token_embedding(ids) + self.positional_embedding, mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


HPS_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 13, "width": 24, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hps")
    vocab = clip_tokenizer(path)
    assert len(vocab) == HPS_CFG["text_cfg"]["vocab_size"]
    torch.manual_seed(0)
    model = OpenClipCLIP(HPS_CFG)
    with torch.no_grad():  # non-trivial LayerNorms, biases and patch weights
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path / "HPS_v2.1_compressed.pt")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": HPS_CFG, "preprocess_cfg": {}}))
    return path, model


def test_hpsv2_matches_open_clip_forward(hps_dir):
    from transformers import AutoTokenizer

    path, ref = hps_dir
    reward = build_reward("hpsv2", path=path, frame_batch_size=4)
    assert isinstance(reward, HPSv2)
    v = torch.rand(3, 3, 3, 24, 40)
    score = reward(v, PROMPTS)

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = torch.zeros(3, HPS_CFG["text_cfg"]["context_length"], dtype=torch.long)  # open_clip pads with 0
    for i, p in enumerate(PROMPTS):
        t = tokenizer(p)["input_ids"]
        ids[i, : len(t)] = torch.tensor(t)
    with torch.no_grad():
        text = F.normalize(ref.encode_text(ids), dim=-1)
        image = F.normalize(ref.visual(reward.preprocess(v.flatten(0, 1))), dim=-1).view(3, 3, -1)
    expected = (image * text[:, None]).sum(-1).mean(1)  # hpsv2.score: image_features @ text_features.T, no scale
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward.model.logit_scale.detach(), ref.logit_scale.detach())


def test_hpsv2_letterboxes_to_a_black_square(hps_dir):
    reward = HPSv2(hps_dir[0])
    frame = torch.rand(1, 3, 16, 32)  # longer side already 32: padded only, 8 black rows above and below
    out = reward.preprocess(frame)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    black = (-mean / std).view(3)
    assert out.shape == (1, 3, 32, 32)
    torch.testing.assert_close(out[0, :, :8], black.view(3, 1, 1).expand(3, 8, 32))
    torch.testing.assert_close(out[0, :, 24:], black.view(3, 1, 1).expand(3, 8, 32))
    torch.testing.assert_close(out[0, :, 8:24], (frame[0] - mean) / std)
    tall = reward.preprocess(torch.rand(1, 3, 64, 16))  # shrunk to 32x8, 12 black columns each side
    torch.testing.assert_close(tall[0, :, :, :12], black.view(3, 1, 1).expand(3, 32, 12))


def test_hpsv2_layout_errors(hps_dir, tmp_path):
    path, ref = hps_dir
    with pytest.raises(ValueError, match=r"holds none of \['HPS_v2\.1_compressed\.pt'"):
        HPSv2(tmp_path)
    clip_tokenizer(tmp_path)
    state = ref.state_dict()
    del state["visual.proj"]
    torch.save({"state_dict": state}, tmp_path / "HPS_v2_compressed.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": HPS_CFG}))
    with pytest.raises(ValueError, match=r"HPS_v2_compressed\.pt.*not an open_clip ViT state dict.*visual\.proj"):
        HPSv2(tmp_path)
    (tmp_path / "open_clip_config.json").unlink()  # the default ViT-H-14 does not fit the tiny weights
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match=r"does not match the architecture ViT-H-14"):
        HPSv2(tmp_path)


# --- ImageReward: BLIP's ViT written out, its med BERT as transformers' BlipTextModel ------------------


class TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class BlipViT(nn.Module):
    """BLIP's VisionTransformer (models/vit.py): patch_embed.proj, cls_token, pos_embed, blocks, norm."""

    def __init__(self, image_size=32, patch=16, dim=64, depth=2):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(TimmBlock(dim, dim // 64) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


MED = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 16,
    "encoder_width": 768,
    "add_cross_attention": True,
}


@pytest.fixture(scope="module")
def image_reward_dir(tmp_path_factory):
    from transformers import BlipTextConfig, BlipTextModel

    path = tmp_path_factory.mktemp("image_reward")
    vocab = word_tokenizer(
        path,
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        ("[CLS]", "[SEP]"),
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=512,
    )
    assert len(vocab) + 2 == MED["vocab_size"]  # + BLIP's [DEC] and [ENC]
    (path / "med_config.json").write_text(json.dumps(MED))
    torch.manual_seed(0)
    vit = BlipViT()
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=16,
            hidden_size=32,
            encoder_hidden_size=64,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
        ),
        add_pooling_layer=False,
    ).eval()
    with torch.no_grad():  # LayerNorms and biases away from their ones/zeros, so that a swapped key shows
        for p in list(vit.parameters()) + list(text.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # med's persistent buffer
    state["blip.vision_proj.weight"] = torch.randn(256, 64)  # BLIP_Pretrain's unused projections
    state["blip.text_proj.weight"] = torch.randn(256, 32)
    state.update({f"mlp.{k}": v for k, v in aesthetic_state(32, seed=3).items()})
    torch.save(state, path / "ImageReward.pt")
    return path, vit, text


def test_image_reward_matches_blip_forward(image_reward_dir):
    from transformers import AutoTokenizer

    path, vit, text = image_reward_dir
    reward = build_reward("image_reward", path=path, frame_batch_size=4)
    assert isinstance(reward, ImageReward)
    v = torch.rand(3, 3, 3, 36, 30)
    score = reward(v, PROMPTS)

    tokens = AutoTokenizer.from_pretrained(path)(PROMPTS, padding="max_length", max_length=35, return_tensors="pt")
    mlp = aesthetic_state(32, seed=3)
    with torch.no_grad():
        image = vit(reward.preprocess(v.flatten(0, 1)))
        out = text(
            input_ids=tokens["input_ids"].repeat_interleave(3, 0),
            attention_mask=tokens["attention_mask"].repeat_interleave(3, 0),
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state[:, 0]
        for index in (0, 2, 4, 6, 7):
            out = out @ mlp[f"layers.{index}.weight"].T + mlp[f"layers.{index}.bias"]
    expected = ((out[:, 0] - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).view(3, 3).mean(1)
    torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [14, 15]


def test_image_reward_layout_errors(image_reward_dir, tmp_path):
    path, vit, text = image_reward_dir
    with pytest.raises(ValueError, match=r"med_config\.json.* is missing"):
        ImageReward(tmp_path)
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    torch.save({"mlp.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"ImageReward\.pt.*not an ImageReward state dict"):
        ImageReward(tmp_path, tokenizer_path=path)
    state = torch.load(path / "ImageReward.pt", weights_only=True)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"missing keys.*crossattention\.self\.key\.weight"):
        ImageReward(tmp_path, tokenizer_path=path)


# --- VideoAlign: Qwen2-VL with the reward head, checkpoint in the official PEFT layout ---------------

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|image_pad|>",
    "<|VQ_reward|>",
    "<|MQ_reward|>",
    "<|TA_reward|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LORA_R, LORA_ALPHA = 4, 8
INFERENCE = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.25, "MQ_std": 0.5, "TA_mean": 1.0, "TA_std": 4.0}


def qwen_config(vocab_size):
    from transformers import Qwen2VLConfig

    ids = {t: QWEN_SPECIALS.index(t) + 1 for t in QWEN_SPECIALS}  # + 1: [UNK] is id 0
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=2
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def official_key(key):
    if key.startswith("model.visual."):
        key = key[len("model.") :]
    elif key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model.") :]
    return "base_model.model." + key


@pytest.fixture(scope="module")
def videoalign_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration

    root, base = tmp_path_factory.mktemp("videoreward"), tmp_path_factory.mktemp("qwen2_vl_base")
    vocab = {t: i for i, t in enumerate(["[UNK]"] + QWEN_SPECIALS + WORDS + ["Visual", "Quality", "END", "video"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIALS
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "tokenizer")
    qwen_config(vocab_size=len(vocab) - 3).save_pretrained(base)  # the base vocabulary lacks the reward tokens

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(qwen_config(len(vocab))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    head = torch.randn(1, 32)
    state = {}
    scale = LORA_ALPHA / LORA_R
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = official_key(key)
        linear = "language_model" in key and key.endswith("proj.weight")
        if linear:  # a LoRA layer: W = base + alpha / r * B @ A
            a = torch.randn(LORA_R, value.shape[1]) * 0.1
            b = torch.randn(value.shape[0], LORA_R) * 0.1
            prefix = name[: -len(".weight")]
            state[f"{prefix}.base_layer.weight"] = value - scale * b @ a
            state[f"{prefix}.lora_A.default.weight"] = a
            state[f"{prefix}.lora_B.default.weight"] = b
        elif "language_model" in key and key.endswith("proj.bias"):
            state[name[: -len(".bias")] + ".base_layer.bias"] = value
        else:
            state[name] = value
    state["base_model.model.lm_head.weight"] = model.state_dict()["lm_head.weight"]
    state["base_model.model.rm_head.weight"] = head
    (root / "checkpoint-12").mkdir()
    torch.save(state, root / "checkpoint-12" / "model.pth")
    (root / "checkpoint-3").mkdir()  # an older step: must not be the one loaded
    torch.save({**state, "base_model.model.rm_head.weight": torch.zeros(1, 32)}, root / "checkpoint-3" / "model.pth")
    config = {
        "data_config": {
            "max_frame_pixels": 9000,
            "num_frames": None,
            "fps": 2.0,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "model_config": {
            "model_name_or_path": str(base),
            "output_dim": 1,
            "use_special_tokens": True,
            "reward_token": "special",
        },
        "peft_lora_config": {"lora_enable": True, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "use_rslora": False},
        "inference_config": INFERENCE,
    }
    (root / "model_config.json").write_text(json.dumps(config))
    return root, base, model, head, tokenizer


def videoalign_reference(model, head, tokenizer, clip, prompt, video_fps=16.0):
    """The official pipeline written out: uniform frames, smart-resized, normalised, processor patch layout."""
    from euphonium.rewards.videoalign import DETAILED_PROMPT_WITH_SPECIAL_TOKEN

    n = max(4, round(clip.shape[0] / video_fps * 2.0 / 2) * 2)
    idx = torch.linspace(0, clip.shape[0] - 1, min(n, clip.shape[0])).round().long()
    h, w = clip.shape[-2:]
    beta = math.sqrt(128 * 8 * 8 / (h * w))
    size = (math.ceil(h * beta / 8) * 8, math.ceil(w * beta / 8) * 8)  # min_pixels = 128 * (patch * merge)^2
    frames = F.interpolate(clip[idx], size=size, mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    frames = ((frames - mean) / std)[None]  # transformers' Qwen2VLVideoProcessor.patchify, batch of one
    gt, gh, gw = frames.shape[1] // 2, size[0] // 4, size[1] // 4
    patches = frames.view(1, gt, 2, 3, gh // 2, 2, 4, gw // 2, 2, 4).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixels = patches.reshape(gt * gh * gw, 3 * 2 * 4 * 4)
    text = DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=prompt)
    chat = f"<|im_start|>user\n<|vision_start|>{'<|video_pad|>' * (gt * gh * gw // 4)}<|vision_end|>{text}"
    chat += "<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(chat, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model.model(
            input_ids=ids,
            pixel_values_videos=pixels,
            video_grid_thw=torch.tensor([[gt, gh, gw]]),
            mm_token_type_ids=(ids == tokenizer.convert_tokens_to_ids("<|video_pad|>")).long() * 2,
        ).last_hidden_state[0]
    out = {}
    for name, token in zip(("VQ", "MQ", "TA"), ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")):
        raw = hidden[ids[0] == tokenizer.convert_tokens_to_ids(token)] @ head.T
        out[name] = float((raw - INFERENCE[f"{name}_mean"]) / INFERENCE[f"{name}_std"])
    return out


def test_videoalign_heads_match_the_official_pipeline(videoalign_dir):
    from euphonium.rewards import RewardSet
    from euphonium.rewards.videoalign import VideoAlign

    root, base, model, head, tokenizer = videoalign_dir
    reward = build_reward("videoalign", path=root, batch_size=2)
    assert isinstance(reward, VideoAlign)
    v = torch.rand(2, 6, 3, 24, 32)
    p = ["a red square moving left", "a photo of a green circle moving right"]  # different lengths: padding
    parts = reward(v, p)
    assert set(parts) == {"videoalign_vq", "videoalign_mq", "videoalign_ta"}
    for b in range(2):
        ref = videoalign_reference(model, head, tokenizer, v[b], p[b])
        for name in ("VQ", "MQ", "TA"):
            assert parts[f"videoalign_{name.lower()}"][b].item() == pytest.approx(ref[name], rel=1e-4, abs=1e-4)

    one_by_one = VideoAlign(root, heads="overall", batch_size=1)(v, p)
    torch.testing.assert_close(one_by_one, sum(parts.values()), rtol=1e-4, atol=1e-4)
    raw = VideoAlign(root, heads=["vq"], normalize=False)(v, p)["videoalign_vq"]
    torch.testing.assert_close(raw, parts["videoalign_vq"] * INFERENCE["VQ_std"] + INFERENCE["VQ_mean"])
    out = RewardSet({"videoalign": reward}, weights={"videoalign_vq": 1.0, "videoalign_mq": 0.5, "videoalign_ta": 0})(
        v, p
    )
    torch.testing.assert_close(out.total, parts["videoalign_vq"] + 0.5 * parts["videoalign_mq"])


def test_videoalign_frame_sampling_and_layout_errors(videoalign_dir, tmp_path):
    from euphonium.rewards.videoalign import VideoAlign, sample_frames, smart_resize

    root, base, *_ = videoalign_dir
    # 81 frames at 16 fps sampled at 2 fps: 10.1 -> 10 frames (even), evenly spaced, ends included.
    assert sample_frames(81, 16.0, 2.0, None) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert sample_frames(81, 16.0, 2.0, 5) == [0, 27, 53, 80]  # num_frames=5 rounds (half to even) to 4
    assert sample_frames(6, 16.0, 2.0, None) == [0, 2, 3, 5]  # at least 4
    assert sample_frames(3, 16.0, 2.0, None) == [0, 2]  # max_frames floors 3 frames to an even 2
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 448 * 448) == (336, 588)
    with pytest.raises(ValueError, match="heads must name some of"):
        VideoAlign(root, heads=["quality"])
    with pytest.raises(ValueError, match=r"model_config\.json.* is missing"):
        VideoAlign(tmp_path)
    (tmp_path / "model_config.json").write_text((root / "model_config.json").read_text())
    with pytest.raises(ValueError, match=r"path: no tokenizer"):
        VideoAlign(tmp_path)
    import shutil

    shutil.copytree(root / "tokenizer", tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"no checkpoint-\*/model\.pth"):
        VideoAlign(tmp_path)
    state = torch.load(root / "checkpoint-12" / "model.pth", weights_only=True)
    del state["base_model.model.rm_head.weight"]
    (tmp_path / "checkpoint-1").mkdir()
    torch.save(state, tmp_path / "checkpoint-1" / "model.pth")
    with pytest.raises(ValueError, match=r"model\.pth.*no rm_head\.weight"):
        VideoAlign(tmp_path)
    with pytest.raises(ValueError, match=r"base_path must be a local folder"):
        VideoAlign(root, base_path=tmp_path / "nowhere")


def test_package_import_registers_every_model_reward_without_transformers():
    import subprocess
    import sys

    code = (
        "import sys; from euphonium.rewards import available_rewards; "
        "print(sorted(available_rewards())); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    names = set(eval(out[0]))
    assert {"pickscore", "hpsv2", "image_reward", "aesthetic", "videoalign", "vlm_judge"} <= names
    assert out[1] == "False"  # transformers loads when a model reward is built, not on import
