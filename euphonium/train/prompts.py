"""Prompt data of a run and an on-disk cache of text embeddings.

``prompts:`` in a config is a list of strings or the path of a ``.txt`` file (one prompt per line,
blank lines skipped) or a ``.jsonl`` file (one object per line with a ``prompt`` string; its other
fields are the prompt's metadata, which the rewards that take a ``metadata`` argument receive, see
:class:`euphonium.rewards.RewardSet`). ``eval_prompts:`` is a count (that many prompts drawn from the
training prompts) or such a path (the evaluation set is the file's prompts, in order).

:class:`EmbeddingCache` keeps one safetensors file per prompt under a folder named by the text
encoder's identity, so that a restarted run (or another rank, or another run on the same model) reads
the embeddings instead of computing them; :class:`CachedTextEncoder` puts it in front of a family's
text encoder, which it builds only when a prompt is missing.

This module imports neither torch nor the package's higher layers at import time (the config uses it
before torch loads).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

PROMPT_SUFFIXES = (".txt", ".jsonl")


def read_prompt_file(path, key: str = "prompts") -> Tuple[List[str], List[Dict[str, Any]]]:
    """``(texts, metadata)`` of a ``.txt`` or ``.jsonl`` prompt file (``key`` names the config key in errors).

    Raises ``ValueError`` (one line naming the file and line) for a missing file, another suffix, a
    ``.jsonl`` line that is not an object with a non-empty ``prompt`` string, no prompts at all, or a
    prompt listed twice with different metadata (rewards look metadata up by the prompt's text).
    """
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"{key}: {path} must be a .txt (one prompt per line) or .jsonl file (a 'prompt' field)")
    if not path.is_file():
        raise ValueError(f"{key}: {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{key}: {path}: cannot be read ({err})") from None
    texts: List[str] = []
    metadata: List[Dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            texts.append(line.strip())
            metadata.append({})
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{key}: {path} line {number} is not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{key}: {path} line {number} must be a JSON object with a non-empty 'prompt' string")
        texts.append(row["prompt"])
        metadata.append({k: v for k, v in row.items() if k != "prompt"})
    if not texts:
        raise ValueError(f"{key}: {path} holds no prompts")
    metadata_table(texts, metadata, where=f"{key}: {path}")
    return texts, metadata


def metadata_table(
    texts: Sequence[str], metadata: Sequence[Mapping[str, Any]], where: str = "prompts"
) -> Dict[str, Dict[str, Any]]:
    """``{prompt: metadata}``; a prompt given twice with different metadata is a ``ValueError``."""
    table: Dict[str, Dict[str, Any]] = {}
    for text, meta in zip(texts, metadata):
        if text in table and table[text] != meta:
            raise ValueError(
                f"{where}: prompt {text!r} is listed twice with different metadata ({table[text]} and {dict(meta)})"
            )
        table[text] = dict(meta)
    return table


def check_prompts_value(value: Any) -> None:
    """``prompts`` is None, a list of non-empty strings or a path to a ``.txt``/``.jsonl`` file (read here)."""
    if value is None:
        return
    if isinstance(value, str):
        read_prompt_file(value, "prompts")
        return
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"prompts must be a list of non-empty strings or a .txt/.jsonl path, got {value!r}")


def check_eval_prompts_value(value: Any) -> None:
    """``eval_prompts`` is a count >= 1 or a path to a ``.txt``/``.jsonl`` file (read here)."""
    if isinstance(value, str):
        read_prompt_file(value, "eval_prompts")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"eval_prompts must be a count >= 1 or a .txt/.jsonl path, got {value!r}")


def resolve_prompts(config) -> None:
    """Replace a ``prompts`` path by the file's prompts (every consumer sees a list), keeping the path
    (``config.prompts_source``) and the metadata (:func:`prompt_metadata`) on the config object."""
    if isinstance(config.prompts, str):
        texts, metadata = read_prompt_file(config.prompts, "prompts")
        object.__setattr__(config, "_prompts_source", config.prompts)
        object.__setattr__(config, "_prompts_metadata", metadata)
        config.prompts = texts


def prompt_metadata(config) -> Dict[str, Dict[str, Any]]:
    """``{prompt: metadata}`` of the run's training prompts and of an ``eval_prompts`` file (empty for a list)."""
    texts, metadata = list(config.prompts or []), getattr(config, "_prompts_metadata", None)
    table = metadata_table(texts, metadata) if metadata is not None and len(metadata) == len(texts) else {}
    if isinstance(config.eval_prompts, str):
        eval_texts, eval_meta = read_prompt_file(config.eval_prompts, "eval_prompts")
        for text, meta in metadata_table(eval_texts, eval_meta, where=f"eval_prompts: {config.eval_prompts}").items():
            if not meta and text in table:
                continue  # a .txt file or a row without fields: the training prompt's metadata
            if text in table and table[text] and table[text] != meta:
                raise ValueError(
                    f"eval_prompts: prompt {text!r} has other metadata ({meta}) than in the training prompts "
                    f"({table[text]})"
                )
            table[text] = meta
    return table


def eval_set_size(config) -> int:
    """How many prompts the fixed evaluation set has (a count, or the ``eval_prompts`` file's prompts)."""
    if isinstance(config.eval_prompts, str):
        return len(read_prompt_file(config.eval_prompts, "eval_prompts")[0])
    return int(config.eval_prompts)


def evaluation_set(config, prompts: Sequence[str], generator) -> List[str]:
    """The fixed evaluation prompts: an ``eval_prompts`` file's prompts in order, else ``eval_prompts``
    of ``prompts`` in an order drawn from ``generator`` (repeated when there are fewer prompts)."""
    if isinstance(config.eval_prompts, str):
        return read_prompt_file(config.eval_prompts, "eval_prompts")[0]
    import torch

    order = torch.randperm(len(prompts), generator=generator)
    shuffled = [prompts[i] for i in order.tolist()]
    return (shuffled * -(-config.eval_prompts // len(shuffled)))[: config.eval_prompts]


# --------------------------------------------------------------------------------------------------
# Text embeddings on disk


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Text embeddings on disk: ``root/<encoder digest>/<prompt digest>.safetensors``.

    ``encoder_id`` (a string or a JSON-able mapping, e.g. the model folder, the encoder class, the
    maximum length and the dtype) names the encoder: embeddings of another encoder never mix in. Each
    file holds one prompt's named tensors with the prompt and the encoder id in its header, checked on
    reading; a file that does not read back (torn, foreign) is ignored with a warning and rewritten.
    Files are written under a unique temporary name and renamed into place, so ranks and runs sharing
    the folder (on one file system) never see a partial file and may write the same prompt at once.
    """

    def __init__(self, root, encoder_id):
        self.encoder_id = encoder_id if isinstance(encoder_id, str) else json.dumps(encoder_id, sort_keys=True)
        self.folder = Path(root) / _digest(self.encoder_id)[:24]
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "encoder.json"
        if not info.is_file():
            self._replace(info, (self.encoder_id + "\n").encode())

    def path(self, prompt: str) -> Path:
        return self.folder / f"{_digest(prompt)}.safetensors"

    def _replace(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load(self, prompt: str, device=None) -> Optional[Tuple[Dict[str, Any], Dict[str, str]]]:
        """``(tensors, header)`` of ``prompt`` (``header``: the file's string metadata), or None."""
        from safetensors import safe_open

        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                if header.get("prompt") != prompt or header.get("encoder") != self.encoder_id:
                    raise ValueError("written for another prompt or encoder")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises its own types for a torn or foreign file
            warnings.warn(f"embedding cache {path}: unreadable ({err}); computing it again", stacklevel=2)
            return None
        if device is not None:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors, header

    def save(self, prompt: str, tensors: Mapping[str, Any], **header: str) -> Path:
        """Store ``prompt``'s ``tensors`` (any device; written from the CPU) atomically."""
        from safetensors.torch import save

        data = save(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            metadata={"prompt": prompt, "encoder": self.encoder_id, **header},
        )
        path = self.path(prompt)
        self._replace(path, data)
        return path


class CachedTextEncoder:
    """``prompts -> embeddings`` through an :class:`EmbeddingCache`, as the encoder returns them.

    ``encoder`` is a family's text encoder ``prompts -> Tensor [B, ...]`` or ``-> Conditioning`` whose
    ``kwargs`` are batched tensors, or (``lazy=True``) a function that builds it: then a run whose
    prompts are all on disk never loads the encoder. Embeddings are kept in memory too. With ``cache``
    None it only keeps them in memory.
    """

    def __init__(self, encoder: Callable, cache: Optional[EmbeddingCache], device=None, *, lazy: bool = False):
        self._encoder = None if lazy else encoder
        self._factory = encoder if lazy else None
        self.cache, self.device = cache, device
        self.memory: Dict[str, Tuple[Dict[str, Any], str]] = {}
        self.computed = 0  # prompts this process encoded (not read from disk or memory)

    @property
    def encoder(self) -> Callable:
        if self._encoder is None:
            self._encoder = self._factory()
        return self._encoder

    def _encode(self, prompts: List[str]) -> None:
        import torch

        from euphonium.models.diffusers import Conditioning

        with torch.no_grad():
            out = self.encoder(prompts)
        if isinstance(out, torch.Tensor):
            kind, named = "tensor", {"embeds": out}
        elif isinstance(out, Conditioning):
            if out.negative_prompt_embeds is not None or out.negative_kwargs:
                raise TypeError("CachedTextEncoder caches encoders of prompts, not Conditionings with a negative half")
            kind, named = "conditioning", {"prompt_embeds": out.prompt_embeds}
            for key, value in out.kwargs.items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != len(prompts):
                    raise TypeError(f"CachedTextEncoder: Conditioning.kwargs[{key!r}] is not a batched tensor")
                named[f"kwargs.{key}"] = value
        else:
            raise TypeError(f"CachedTextEncoder: the encoder returned a {type(out).__name__}")
        self.computed += len(prompts)
        for i, prompt in enumerate(prompts):
            row = {k: v[i] for k, v in named.items()}
            self.memory[prompt] = (row, kind)
            if self.cache is not None:
                self.cache.save(prompt, row, kind=kind)

    def __call__(self, prompts: Sequence[str]):
        import torch

        from euphonium.models.diffusers import Conditioning

        prompts = list(prompts)
        missing = []
        for prompt in dict.fromkeys(prompts):
            if prompt in self.memory:
                continue
            found = self.cache.load(prompt, self.device) if self.cache is not None else None
            if found is None or found[1].get("kind") not in ("tensor", "conditioning"):
                missing.append(prompt)
            else:
                self.memory[prompt] = (found[0], found[1]["kind"])
        if missing:
            self._encode(sorted(missing))
        rows = [self.memory[p] for p in prompts]
        kind = rows[0][1]
        stacked = {key: torch.stack([row[key] for row, _ in rows]) for key in rows[0][0]}
        if kind == "tensor":
            return stacked["embeds"]
        kwargs = {key[len("kwargs.") :]: value for key, value in stacked.items() if key.startswith("kwargs.")}
        return Conditioning(stacked["prompt_embeds"], kwargs=kwargs)


def text_encoder_id(**parts: Any) -> Dict[str, Any]:
    """An encoder identity for :class:`EmbeddingCache` (paths made absolute, everything as JSON-able values)."""
    out = {}
    for key, value in parts.items():
        if isinstance(value, Path) or (key.endswith("path") and isinstance(value, str)):
            value = str(Path(value).resolve())
        out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out


def embedding_cache(config, **encoder_id: Any) -> Optional[EmbeddingCache]:
    """The run's :class:`EmbeddingCache` (``config.embedding_cache``), None when it is off."""
    root = getattr(config, "embedding_cache", None)
    return EmbeddingCache(root, text_encoder_id(**encoder_id)) if root else None


def cached_text_encoder(config, make_encoder: Callable[[], Callable], device=None, **encoder_id: Any) -> Callable:
    """A family's text encoder behind the run's :class:`EmbeddingCache`: ``make_encoder()`` when
    ``config.embedding_cache`` is None (unchanged behaviour), else a :class:`CachedTextEncoder` that builds
    it only when some prompt is not on disk yet. ``encoder_id``: what identifies the encoder (model
    folder, class, maximum length, dtype...)."""
    cache = embedding_cache(config, **encoder_id)
    if cache is None:
        return make_encoder()
    return CachedTextEncoder(make_encoder, cache, device, lazy=True)


def state_digest(module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): identifies small encoders' weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update((t.double() if t.is_floating_point() else t.long()).numpy().tobytes())
    return h.hexdigest()
