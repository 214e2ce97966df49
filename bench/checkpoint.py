"""Checkpoint mode at scale: wall time and peak RSS against a plain load+save copy, one run.

    python bench/checkpoint.py --params 1e9            # ~4.4 GB fp32 checkpoint, sharded
    python bench/checkpoint.py --params 1e8 --keep     # smaller; keep the files in --workdir
    python bench/checkpoint.py --threads 1 2           # one table row per thread count

Builds a synthetic LLM-shaped checkpoint (Llama-style: embeddings, per layer q/k/v/o with
grouped KV heads, gate/up/down MLP, two RMSNorm weights; final norm; untied lm_head) in fp32,
sharded like Hugging Face checkpoints (``model-0000X-of-0000N.safetensors`` + index JSON +
config.json), then measures, each in its own subprocess (peak RSS = that process's
``ru_maxrss``):

* ``copy``: the I/O baseline, every shard loaded and saved again with plain safetensors
  (``safetensors.torch.load_file`` + ``save_file`` when NumPy is available, else
  ``safe_open`` + Mono Quant's writer);
* ``int8``: ``Engine().quantize_checkpoint(src, dst, scheme="int8")`` (minmax observer);
* ``int4``: the same with ``scheme="int4-group"`` (default: minmax + lsq, g128);
* ``int4, no read-ahead``: the same with ``MONOQUANT_CHECKPOINT_PREFETCH=0`` (the next tensor
  is not read while one is quantized), so the table shows what overlapping I/O saves;
* ``int4, --workers N`` (``--workers 2 4``): the same split between N local ranks
  (``workers=N``: gloo, one process each), each with ``OMP_NUM_THREADS`` threads (default 1),
  once started the default way (forked where safe) and once spawned
  (``MONOQUANT_WORKER_START=spawn``: each rank imports Python and torch again), and once with
  every rank reading ahead (``MONOQUANT_CHECKPOINT_PREFETCH=1``; by default ranks that fill
  every core do not).

Every Mono Quant row also shows where its time went (quantizing into the journal, then writing
the output from it) and, for workers, the largest peak RSS of one rank.

``--threads 1 2 ...`` repeats the runs per thread count (``OMP_NUM_THREADS``: torch's
intra-op threads, which the optimiser's tensor ops use), so one run shows whether all threads
in one process beat one.

``--baseline CHECKOUT`` adds int8 and int4-group rows run with another checkout's code (an
A/B in the same run, e.g. against the commit before a change).

``--costs`` instead measures the work per element of each scheme and optimiser relative to
``int8`` on one 5632x2048 tensor (the ``Scheme.cost_per_element`` figures a distributed run
balances its ranks with).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from monoquant_core.hardware import isa

HERE = os.path.dirname(os.path.abspath(__file__))


def layout(
    params: float, hidden: int = 2048, inter: int = 5632, vocab: int = 32000, kv: int = 256
) -> list[tuple[str, tuple[int, ...]]]:
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def build(src: str, params: float, shard_bytes: int) -> tuple[int, int]:
    from monoquant_plugins.safetensors_writer import SafetensorsWriter

    os.makedirs(src)
    tensors = layout(params)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(os.path.join(src, fname))
        for name, shape in group:
            t = (
                torch.randn(shape, generator=g) * 0.02
                if len(shape) == 2
                else 1 + 0.1 * torch.randn(shape, generator=g)
            )
            w.add(name, t)
            weight_map[name] = fname
            total += t.numel() * 4
            del t
        w.close({"format": "pt"})
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 2048}, f)
    return sum(math.prod(s) for _, s in tensors), total


COPY = """
import os, sys, shutil
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
try:
    from safetensors.torch import load_file, save_file
    import numpy  # noqa: F401  (save_file needs it)
    how = "safetensors.torch load_file + save_file"
except ImportError:
    from safetensors import safe_open
    sys.path.insert(0, os.path.dirname(src))
    from monoquant_plugins.safetensors_format import write_safetensors as _w
    def load_file(p):
        with safe_open(p, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    def save_file(t, p, metadata=None):
        _w(p, t, metadata or {})
    how = "safe_open + Mono Quant writer (no NumPy)"
for n in sorted(os.listdir(src)):
    if n.endswith(".safetensors"):
        save_file(load_file(os.path.join(src, n)), os.path.join(dst, n), metadata={"format": "pt"})
    else:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
print("HOW", how)
"""

QUANT = """
import sys
from monoquant_core import Engine
src, dst, scheme, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rep = Engine().quantize_checkpoint(src, dst, scheme=scheme, progress=False, workers=workers)
ph = rep.extra["phase_s"]
print("HOW", f"{len(rep.layers)} tensors, min SQNR {rep.min_sqnr_db:.2f} dB, "
      f"{rep.model_bytes_before / 2**30:.2f} -> {rep.model_bytes_after / 2**30:.2f} GiB; "
      f"quantize {ph['quantize']:.1f} s + write {ph['write']:.1f} s"
      + (f" (ranks busy {', '.join(f'{b:.1f}' for b in ph['ranks'])} s)" if workers > 1 else ""))
"""

BASELINE = """
import sys
from monoquant_core import Engine
src, dst, scheme = sys.argv[1], sys.argv[2], sys.argv[3]
rep = Engine().quantize_checkpoint(src, dst, scheme=scheme, progress=False)
print("HOW", f"{len(rep.layers)} tensors, min SQNR {rep.min_sqnr_db:.2f} dB (baseline checkout)")
"""


def baseline_path(checkout: str) -> str:
    """A folder that makes ``checkout``'s packages importable under their import names."""
    links = tempfile.mkdtemp(prefix="mq-baseline-")
    os.symlink(
        os.path.join(os.path.abspath(checkout), "monoquant_core"),
        os.path.join(links, "monoquant_core"),
    )
    os.symlink(
        os.path.join(os.path.abspath(checkout), "plugins"), os.path.join(links, "monoquant_plugins")
    )
    return links


COSTS = """
import time, torch
from monoquant_core import Engine
torch.manual_seed(0)
w = torch.randn(5632, 2048) * 0.02
e = Engine()
def seconds(scheme, **opts):
    cfg = e.configure(scheme, scheme_options=opts)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        e.quantize_weight(w, scheme, cfg.observer, 0, cfg.scheme_config, cfg.observer_config)
        best = min(best, time.perf_counter() - t)
    return best
base = seconds("int8")
print("| scheme | s per tensor | per element vs int8 | cost_per_element |")
print("|---|---|---|---|")
for label, scheme, opts in [("int8", "int8", {}), ("fp16", "fp16", {}),
                            ("int4-group rtn", "int4-group", {"method": "rtn"}),
                            ("int4-group lsq (default)", "int4-group", {}),
                            ("int4-group hqq", "int4-group", {"method": "hqq"})]:
    s = seconds(scheme, **opts)
    cfg = e.configure(scheme, scheme_options=opts)
    declared = e.schemes.get(scheme).cost_per_element(cfg.scheme_config)
    print(f"| {label} | {s:.3f} | {s / base:.1f} | {declared:g} |")
"""

WRAP = """
import resource, runpy, sys, time
t = time.perf_counter()
code = sys.argv[1]
sys.argv = sys.argv[1:]
exec(compile(code, "<bench>", "exec"), {"__name__": "__main__"})
print("WALL", time.perf_counter() - t)
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("CHILD_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run(code: str, *args: str, threads: int | None, env_extra=None) -> dict[str, object]:
    env = dict(os.environ, **(env_extra or {}))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t = time.perf_counter()
    cwd = env.get("PYTHONPATH") if env_extra and "PYTHONPATH" in env_extra else None
    proc = subprocess.run(
        [sys.executable, "-c", WRAP, code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return {
        "wall": float(out["WALL"]),
        "rss_mb": int(out["RSS_KB"]) / 1024,
        "rank_rss_mb": int(out.get("CHILD_RSS_KB", 0)) / 1024,
        "how": out.get("HOW", ""),
        "total": time.perf_counter() - t,
    }


def measure(work, label, code, src, extra, threads, env) -> tuple:
    dst = os.path.join(work, "out")
    shutil.rmtree(dst, ignore_errors=True)
    res = run(code, src, dst, *extra, threads=threads, env_extra=env)
    out = (label, threads, res, dir_bytes(dst))
    shutil.rmtree(dst, ignore_errors=True)
    return out


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--threads", type=int, nargs="*", default=None, help="OMP threads (default: all)"
    )
    ap.add_argument(
        "--workers", type=int, nargs="*", default=[], help="also int4-group with N ranks"
    )
    ap.add_argument(
        "--worker-threads", type=int, default=1, help="OMP threads per rank (default 1)"
    )
    ap.add_argument("--costs", action="store_true", help="only the per-element cost table")
    ap.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        help="also run int8 and int4-group with another checkout's code (e.g. a `git worktree` "
        "of an older commit), right after this one's rows: an A/B in one run",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    print(
        f"CPU: {', '.join(isa()) or 'unknown'}; torch {torch.__version__}; {os.cpu_count()} CPUs\n"
    )
    if args.costs:
        subprocess.run(
            [sys.executable, "-c", COSTS],
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")),
        )
        return
    work = args.workdir or tempfile.mkdtemp(prefix="mq-ckpt-bench-")
    src = os.path.join(work, "src")
    try:
        if not os.path.isdir(src):
            t = time.perf_counter()
            n, total = build(src, args.params, int(args.shard_gb * 2**30))
            print(
                f"built {n / 1e9:.2f}B params, {total / 2**30:.2f} GiB fp32, "
                f"{len([f for f in os.listdir(src) if f.endswith('.safetensors')])} shards "
                f"in {time.perf_counter() - t:.0f} s",
                file=sys.stderr,
            )
        rows = []
        no_prefetch = {"MONOQUANT_CHECKPOINT_PREFETCH": "0"}
        for threads in args.threads or [None]:
            for label, code, extra, env in [
                ("plain load+save copy", COPY, [], None),
                ("Mono Quant int8 (minmax)", QUANT, ["int8", "1"], None),
                ("Mono Quant int4-group (minmax + lsq, g128)", QUANT, ["int4-group", "1"], None),
                ("int4-group, no read-ahead", QUANT, ["int4-group", "1"], no_prefetch),
            ]:
                rows.append(measure(work, label, code, src, extra, threads, env))
            if args.baseline:
                env = {"PYTHONPATH": baseline_path(args.baseline)}
                for scheme in ("int8", "int4-group"):
                    label = f"{scheme}, baseline {os.path.basename(args.baseline.rstrip('/'))}"
                    rows.append(measure(work, label, BASELINE, src, [scheme], threads, env))
        for n in args.workers:
            extra = ["int4-group", str(n)]
            variants = [  # default start (forked where safe), ranks reading ahead, spawned
                ("", None),
                (", read-ahead forced on", {"MONOQUANT_CHECKPOINT_PREFETCH": "1"}),
                (", spawned ranks", {"MONOQUANT_WORKER_START": "spawn"}),
            ]
            for suffix, env in variants:
                label = f"int4-group, --workers {n}{suffix}"
                rows.append(measure(work, label, QUANT, src, extra, args.worker_threads, env))
        base = rows[0][2]["wall"]
        src_bytes = dir_bytes(src)
        print(
            f"Checkpoint: {src_bytes / 2**30:.2f} GiB fp32 (`--params {args.params:g}`), "
            f"torch {torch.__version__}, {os.cpu_count()} CPUs\n"
        )
        one = next(r[2]["wall"] for r in rows if r[0].startswith("Mono Quant int4"))
        print(
            "| run | threads | wall s | x copy time | x one-process int4 speed | peak RSS MiB "
            "(largest rank) | output GiB | note |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, threads, res, out_bytes in rows:
            rank = f" ({res['rank_rss_mb']:.0f})" if "workers" in label else ""
            per = f"{threads or 'all'}" + (" per rank" if "workers" in label else "")
            print(
                f"| {label} | {per} | {res['wall']:.1f} | {res['wall'] / base:.2f} | "
                f"{one / res['wall']:.2f} | {res['rss_mb']:.0f}{rank} | "
                f"{out_bytes / 2**30:.2f} | {res['how']} |"
            )
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
