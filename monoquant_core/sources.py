"""Checkpoint inputs for checkpoint mode: one file, a sharded folder, or a pickled state_dict.

* a single ``.safetensors`` file;
* a folder of safetensors shards with one ``*.safetensors.index.json`` (HF layout) whose
  ``weight_map`` is checked against the shards' headers, or without an index (every
  ``*.safetensors`` file is a shard); other files (``config.json``, tokenizer files, hidden
  files such as ``.gitattributes``, sub-folders) are copied to the output; weights in other
  formats (``*.bin``, ``*.pt``, ...), ``.git`` and ``.cache`` (a repository's history, a
  download cache describing the *input* files), anything that is not a file or folder (a
  FIFO) and temporary leftovers of Mono Quant writes are not;
* a ``.pt`` / ``.pth`` / ``.bin`` state_dict, loaded with ``weights_only=True`` (memory-mapped when
  the file allows). A pickled full model is refused unless ``trust_pickle`` is given, because
  unpickling runs arbitrary code. Tensors must sit at the top level (a tensor nested in a dict
  or list is refused, naming it, never dropped) and be dense.

Shards are read through the serializers' streaming readers, one tensor at a time.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .artifacts import Artifact, ArtifactReader
from .atomic import is_temp_name
from .errors import FormatError, MonoQuantError, UsageError
from .files import check_regular_file, serializer_for_read
from .registry import Registries

__all__ = ["CheckpointSource", "Shard", "hf_config", "open_source", "read_artifact"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
#: hidden entries of an input folder that are not copied: a git repository (its LFS store can
#: be as large as the weights, and the output is not that repository) and a download cache
#: (``huggingface_hub``'s ``.cache/huggingface`` describes the input files; next to the output
#: it would make a later download take the quantized files for stale originals)
_NOT_COPIED_HIDDEN = (".git", ".cache")


@dataclass
class Shard:
    """One input file and the name its output gets."""

    path: str
    out_name: str
    reader: ArtifactReader | None = None


@dataclass
class CheckpointSource:
    """What checkpoint mode reads: shards, an optional index, and files to copy."""

    path: str
    kind: str  # "file", "folder" or "pickle"
    shards: list[Shard]
    index_name: str | None = None
    index: dict[str, Any] | None = None
    copy: list[str] = field(default_factory=list)  # relative paths (files or folders)
    not_copied: list[str] = field(default_factory=list)
    #: a Hugging Face transformers folder (its copied config.json is a model config): the
    #: output's writers are told so (:attr:`~monoquant_core.ArtifactWriter.for_transformers`)
    transformers: bool = False

    def close(self) -> None:
        for s in self.shards:
            if s.reader is not None:
                s.reader.close()


def _reader_for(registries: Registries, path: str) -> ArtifactReader:
    fix = "give a .safetensors file, a folder of shards, or a .pt state_dict"
    return serializer_for_read(registries.serializers, path, fix).open_reader(path)


def open_source(registries: Registries, path: str, trust_pickle: bool = False) -> CheckpointSource:
    """Inspect ``path`` and open every shard's reader (headers validated, nothing loaded)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"{path!r} does not exist", "check the path")
    if os.path.isdir(path):
        src = _folder(path)
    else:
        check_regular_file(path)  # a FIFO would block the reader forever
        if path.endswith(PICKLE_SUFFIXES):
            reader = PickleReader(path, trust_pickle)
            out = os.path.splitext(os.path.basename(path))[0] + ".safetensors"
            src = CheckpointSource(path, "pickle", [Shard(path, out, reader)])
        else:
            src = CheckpointSource(path, "file", [Shard(path, os.path.basename(path))])
    try:
        for shard in src.shards:
            if shard.reader is None:
                shard.reader = _reader_for(registries, shard.path)
        _check_unique(src)
        if src.index is not None:
            _check_index(src)
    except BaseException:
        src.close()
        raise
    return src


def read_artifact(registries: Registries, path: str) -> Artifact:
    """A saved file, or a folder of shards (with or without its index), as one
    :class:`Artifact`: what :func:`monoquant_core.load` rebuilds a model from.

    Raises:
        FormatError: a tensor name in two shards, or an index naming a missing shard.
        UsageError: no such path, or a folder without safetensors shards.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return serializer_for_read(registries.serializers, path).read(path)
    merged = Artifact()
    where: dict[str, str] = {}
    for shard in _folder(path).shards:
        art = serializer_for_read(registries.serializers, shard.path).read(shard.path)
        for kind in ("tensors", "qtensors"):
            for name, t in getattr(art, kind).items():
                if name in where:
                    raise FormatError(
                        f"{path!r}: tensor {name!r} is in both {where[name]} and {shard.out_name}",
                        "the folder mixes two checkpoints; keep one set of shards",
                    )
                where[name] = shard.out_name
                getattr(merged, kind)[name] = t
        for plugin, info in art.producers.items():
            merged.producers.setdefault(plugin, info)
        merged.config = merged.config or art.config
        merged.format_version = max(merged.format_version, art.format_version)
    return merged


def _folder(path: str) -> CheckpointSource:
    names = sorted(os.listdir(path))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise UsageError(
            f"{path!r} holds several index files ({', '.join(indexes)})",
            "keep one *.safetensors.index.json per checkpoint folder",
        )
    index_name = indexes[0] if indexes else None
    index = None
    if index_name:
        index = _read_index(os.path.join(path, index_name))
        shard_names = sorted(set(index["weight_map"].values()))
        for s in shard_names:
            if not os.path.isfile(os.path.join(path, s)):
                raise FormatError(
                    f"{index_name} names shard {s!r}, which is not in {path!r}",
                    "restore the missing shard or fix the index",
                )
    else:
        shard_names = [
            n for n in names if n.endswith(".safetensors") and os.path.isfile(os.path.join(path, n))
        ]
    if not shard_names:
        raise _no_shards(path, names)
    src = CheckpointSource(
        path, "folder", [Shard(os.path.join(path, s), s) for s in shard_names], index_name, index
    )
    for n in names:
        if n in shard_names or n == index_name or is_temp_name(n):
            continue
        full = os.path.join(path, n)
        if (
            n.endswith(_OTHER_WEIGHTS)
            or n.endswith(".safetensors")
            or n in _NOT_COPIED_HIDDEN
            or not (os.path.isfile(full) or os.path.isdir(full))
        ):
            src.not_copied.append(n)
        else:
            src.copy.append(n)
    config = os.path.join(path, "config.json")
    src.transformers = "config.json" in src.copy and hf_config(config) is not None
    return src


def hf_config(path: str) -> dict[str, Any] | None:
    """The JSON object of a Hugging Face ``config.json`` (one with ``model_type`` or
    ``architectures``), or None for anything else (unreadable, not JSON, another config)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or not ("model_type" in cfg or "architectures" in cfg):
        return None
    return cfg


def _no_shards(path: str, names: list[str]) -> UsageError:
    """The error for a folder without safetensors: name the weights it holds instead."""
    pickles = [
        n for n in names if n.endswith(PICKLE_SUFFIXES) and os.path.isfile(os.path.join(path, n))
    ]
    if len(pickles) == 1:
        file = os.path.join(path, pickles[0])
        return UsageError(
            f"folder {path!r} holds no .safetensors files, only the PyTorch state_dict "
            f"{pickles[0]}",
            f"pass that file itself (monoquant quantize {file} -o OUT.safetensors); its other "
            "files (config.json, tokenizer) are not copied then",
        )
    if pickles:
        shown = ", ".join(pickles[:3]) + (
            f" and {len(pickles) - 3} more" if len(pickles) > 3 else ""
        )
        return UsageError(
            f"folder {path!r} holds no .safetensors files, only the PyTorch files {shown}",
            "pass one state_dict file itself, or convert the checkpoint to safetensors first "
            "(e.g. transformers: model.save_pretrained(dir, safe_serialization=True))",
        )
    return UsageError(
        f"folder {path!r} contains no .safetensors files",
        "give a folder of safetensors shards, or one file",
    )


def _read_index(path: str) -> dict[str, Any]:
    base = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(
            f"{base} is not valid JSON ({e})", "fix or regenerate the index"
        ) from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise FormatError(
            f"{base} has no valid 'weight_map' (tensor name -> shard file)",
            "fix or regenerate the index",
        )
    if not wm:
        raise FormatError(f"{base} has an empty 'weight_map'", "fix or regenerate the index")
    if not isinstance(index.get("metadata") or {}, dict):
        raise FormatError(
            f"{base}: 'metadata' must be a JSON object", "fix or regenerate the index"
        )
    for v in set(wm.values()):
        if os.path.basename(v) != v or v in ("", ".", ".."):
            raise FormatError(
                f"{base} names shard {v!r}, which is not a file name",
                "shards must sit next to the index",
            )
    return index


def _check_unique(src: CheckpointSource) -> None:
    seen: dict[str, str] = {}
    for s in src.shards:
        for name in s.reader.stored_names():
            if name in seen:
                raise FormatError(
                    f"tensor {name!r} is stored in two shards: {seen[name]} and {s.out_name}",
                    "remove the duplicate or fix the index",
                )
            seen[name] = s.out_name


def _check_index(src: CheckpointSource) -> None:
    by_shard = {s.out_name: s.reader.stored_names() for s in src.shards}
    for name, shard in src.index["weight_map"].items():
        if name not in by_shard.get(shard, set()):
            raise FormatError(
                f"{src.index_name} maps {name!r} to {shard!r}, which has no such tensor",
                "fix or regenerate the index",
            )


class PickleReader(ArtifactReader):
    """A ``torch.save``-d state_dict as a reader (``weights_only=True`` unless trusted)."""

    def __init__(self, path: str, trust_pickle: bool = False):
        self.path = path
        state = _load_pickle(path, trust_pickle)
        base = os.path.basename(path)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        for k, v in tensors.items():
            if v.layout != torch.strided or getattr(v, "is_nested", False):
                kind = "a nested tensor" if v.layout == torch.strided else f"a {v.layout} tensor"
                raise UsageError(
                    f"{base}: tensor {k!r} is {kind}; only dense tensors can be stored",
                    f"save it dense (state_dict[{k!r}] = t.to_dense()) or remove it",
                )
        super().__init__(path=path, artifact=Artifact(tensors=tensors))


def _nested_tensors(value: Any, where: str, out: list[str], depth: int = 0) -> None:
    """Append to ``out`` the paths of the tensors inside ``value`` (dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        out.append(where)
    elif depth < 32 and isinstance(value, dict):
        for k, v in value.items():
            _nested_tensors(v, f"{where}.{k}" if where else str(k), out, depth + 1)
    elif depth < 32 and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _nested_tensors(v, f"{where}[{i}]", out, depth + 1)


def _refuse_nested(base: str, state: dict[str, Any]) -> None:
    """A tensor inside a dict or list of the state_dict is never dropped silently."""
    for key, value in state.items():
        if isinstance(value, (dict, list, tuple)):
            found: list[str] = []
            _nested_tensors(value, key, found)
            if found:
                more = f" ({len(found)} nested tensors)" if len(found) > 1 else ""
                raise UsageError(
                    f"{base}: tensor {found[0]!r} sits inside {key!r}{more}; only a flat "
                    "name -> tensor state_dict is read",
                    f"save the flat state_dict alone (e.g. torch.save(checkpoint[{key!r}], "
                    "path) or torch.save(model.state_dict(), path))",
                )


def _load_pickle(path: str, trust: bool) -> dict[str, Any]:
    base = os.path.basename(path)
    try:
        obj = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).strip()
        if "Weights only load failed" not in msg:
            first = msg.splitlines()[0][:160] if msg else repr(e)
            raise FormatError(
                f"{base} is not a readable PyTorch file ({first})",
                "give a file written by torch.save, or a .safetensors file",
            ) from None
        if not trust:
            raise UsageError(
                f"{base} is a pickled Python object, not a plain state_dict (weights_only=True "
                "refused it); unpickling it would run code from the file",
                "re-save it as a state_dict (torch.save(model.state_dict(), path)) or as "
                "safetensors, or pass --trust-pickle if you trust its source",
            ) from None
        obj = _guarded(lambda: _torch_load(path, weights_only=False), base)
    except MonoQuantError:
        raise
    except Exception as e:  # the weights-only unpickler raises many types on garbage bytes
        raise FormatError(
            f"{base} is not a readable PyTorch file ({type(e).__name__}: {str(e)[:160]})",
            "give a file written by torch.save, or a .safetensors file",
        ) from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UsageError(
            f"{base} holds a {type(obj).__name__}, not a state_dict (a dict of name -> tensor)",
            "save model.state_dict()",
        )
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise UsageError(
            f"{base} has non-string keys such as {bad[0]!r}, not a state_dict",
            "save model.state_dict() (string keys)",
        )
    _refuse_nested(base, obj)
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{base} holds a {type(obj).__name__} without tensors, not a state_dict",
            "save model.state_dict()",
        )
    return obj


def _guarded(load: Any, base: str) -> Any:
    try:
        return load()
    except Exception as e:
        raise FormatError(
            f"{base} could not be unpickled ({type(e).__name__}: {str(e)[:160]})",
            "give a file written by torch.save",
        ) from None


def _torch_load(path: str, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zipfile" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)
