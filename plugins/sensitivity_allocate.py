"""The allocators of the ``sensitivity`` plugin: one candidate per layer from a sensitivity
table (:func:`monoquant_plugins.sensitivity_table.measure`) under a bit budget or for a target
output SQNR, greedy or exact, and the size/accuracy trade-off curve of the HTML report."""

from __future__ import annotations

import math
from typing import Any

from monoquant_core import UsageError

__all__ = ["EXACT_STEPS", "allocate", "check_budget", "feasible", "tradeoff"]


def _options_of(row: dict[str, Any], numel: int, total: int) -> list[tuple[float, float, str]]:
    """``(bits, noise, label)`` per usable candidate. With an output SQNR, noise =
    10^(-SQNR/10) (output noise power relative to the signal; the layers' noises add up
    approximately). Data-free, from the weight SQNR, the same times the layer's share of the
    weights (``numel / total``): the sum is then the relative noise of all the selected
    weights together, so a small layer does not count as much as a large one."""
    share = 1.0 if any("output_sqnr_db" in v for v in row["candidates"].values()) else numel / total
    out = []
    for label, v in row["candidates"].items():
        if "error" in v:
            continue
        if "noise" in v:  # a relative noise power given directly (the in-context tables)
            out.append((v["bits_per_weight"] * numel, v["noise"], label))
            continue
        db = v.get("output_sqnr_db", v["weight_sqnr_db"])
        noise = 0.0 if db == math.inf else 10 ** (-db / 10) if math.isfinite(db) else math.inf
        out.append((v["bits_per_weight"] * numel, noise * share, label))
    return sorted(out)


#: bits-axis resolution of the exact allocator: the budget in this many steps (each option's
#: bits rounded up to a step, so the choice never exceeds the budget)
EXACT_STEPS = 4000


def allocate(
    table: dict[str, Any],
    budget: float | None = None,
    target_sqnr: float | None = None,
    method: str = "greedy",
) -> dict[str, Any]:
    """Choose one candidate per layer of a :func:`measure` table, minimising the estimated
    output noise (``sum 10^(-SQNR/10)`` over layers) under the budget (average bits per
    weight), or the bits needed to reach ``target_sqnr``.

    ``method="greedy"``: from the cheapest candidate of every layer, repeatedly take the
    upgrade that removes the most noise per added bit while it fits. ``"exact"``: a
    multiple-choice knapsack solved by dynamic programming over the budget in
    :data:`EXACT_STEPS` steps (a target: the smallest budget, by bisection, whose optimum
    reaches it).

    Returns ``{"choice": {weight name: label}, "bits_per_weight", "estimated_sqnr_db",
    "noise"}`` (``noise``: the estimated relative output noise power the dB figure is of).
    """
    if method not in ("greedy", "exact"):
        raise UsageError(f"allocation method {method!r}", "use greedy or exact")
    if budget is not None:
        check_budget(table, budget)
    if method == "exact":
        return _allocate_exact(table, budget, target_sqnr)
    layers = _layers(table)
    total = sum(n for _, n, _ in layers)
    pick = {name: 0 for name, _, _ in layers}
    bits = sum(opts[0][0] for _, _, opts in layers)
    noise = sum(opts[0][1] for _, _, opts in layers)

    def done() -> bool:
        return target_sqnr is not None and _db(noise) >= target_sqnr

    while not done():
        best = None
        for name, _, opts in layers:
            b0, n0, _ = opts[pick[name]]
            for j, (b1, n1, _) in enumerate(opts):
                if b1 <= b0 or n1 >= n0:
                    continue
                if budget is not None and bits + b1 - b0 > budget * total * (1 + 1e-9):
                    continue
                gain = (n0 - n1) / (b1 - b0)
                if best is None or gain > best[0]:
                    best = (gain, name, j, b1 - b0, n1 - n0)
        if best is None:
            break
        _, name, j, db_, dn = best
        pick[name], bits, noise = j, bits + db_, noise + dn
    if target_sqnr is not None and not done():
        raise UsageError(
            f"target SQNR {target_sqnr:g} dB is out of reach: the best candidates give an "
            f"estimated {_db(noise):.1f} dB",
            "lower --sensitivity-target-sqnr, or add a more precise candidate (e.g. fp16)",
        )
    return {
        "choice": {name: opts[pick[name]][2] for name, _, opts in layers},
        "bits_per_weight": bits / total,
        "estimated_sqnr_db": _db(noise),
        "noise": noise,
    }


def feasible(table: dict[str, Any]) -> tuple[float, float]:
    """The budgets a table allows: ``(cheapest, dearest)`` average bits per weight (every
    layer at its cheapest candidate, every layer at its dearest)."""
    layers = _layers(table)
    total = sum(n for _, n, _ in layers)
    low = sum(opts[0][0] for _, _, opts in layers)
    high = sum(max(o[0] for o in opts) for _, _, opts in layers)
    return low / total, high / total


def check_budget(table: dict[str, Any], budget: float) -> None:
    """A one-line error with the feasible range when ``budget`` is outside it."""
    low, high = feasible(table)
    lo = f"{math.ceil(low * 1000 - 1e-6) / 1000:.3f}"  # within the range when given back
    hi = f"{math.floor(high * 1000 + 1e-6) / 1000:.3f}"
    fix = f"give --sensitivity-budget from {lo} to {hi} bits/weight, or other candidates"
    if budget < low * (1 - 1e-9):
        raise UsageError(
            f"budget {budget:g} bits/weight is below the cheapest candidates' {lo} "
            f"(feasible: {lo} to {hi})",
            fix,
        )
    if budget > high * (1 + 1e-9):
        raise UsageError(
            f"budget {budget:g} bits/weight is above the dearest candidates' {hi} "
            f"(feasible: {lo} to {hi})",
            fix,
        )


def _layers(table: dict[str, Any]) -> list[tuple[str, int, list[tuple[float, float, str]]]]:
    out = []
    total = sum(math.prod(row["shape"]) for row in table["layers"])
    for row in table["layers"]:
        numel = math.prod(row["shape"])
        opts = _options_of(row, numel, total)
        if not opts:
            raise UsageError(
                f"{row['name']}: no candidate applies to it",
                "add a candidate that can store it (e.g. int8), or leave it out with --skip",
            )
        out.append((row["name"], numel, opts))
    return out


def _knapsack(layers, limit_bits: float) -> tuple[float, dict[str, int]] | None:
    """Least total noise with total bits <= ``limit_bits``: the DP on bits rounded to steps,
    its choice checked in exact bits and solved again with a tighter limit if the rounding
    let it overflow."""
    cap = limit_bits
    for _ in range(50):
        found = _knapsack_steps(layers, cap, limit_bits)
        if found is None:
            return None
        noise, choice = found
        bits = sum(opts[choice[name]][0] for name, _, opts in layers)
        if bits <= limit_bits * (1 + 1e-9):
            return noise, choice
        cap -= max(bits - limit_bits, limit_bits / EXACT_STEPS)
    return None


def _knapsack_steps(layers, cap_bits: float, limit_bits: float):
    step = limit_bits / EXACT_STEPS
    capacity = int(cap_bits / step + 1e-9)
    if capacity < 0:
        return None
    inf = math.inf
    best = [0.0] * (capacity + 1)  # best[c]: least noise of the layers so far in c steps
    picks: list[list[int]] = []
    for _, _, opts in layers:
        new = [inf] * (capacity + 1)
        arg = [-1] * (capacity + 1)
        costs = [round(b / step) for b, _, _ in opts]
        for c_all in range(capacity + 1):
            for j, (c, (_, noise, _)) in enumerate(zip(costs, opts, strict=True)):
                if c <= c_all and best[c_all - c] + noise < new[c_all]:
                    new[c_all], arg[c_all] = best[c_all - c] + noise, j
        best = new
        picks.append(arg)
    if best[capacity] == inf:
        return None
    choice, c_all = {}, capacity
    for (name, _, opts), arg in zip(reversed(layers), reversed(picks), strict=True):
        j = arg[c_all]
        choice[name] = j
        c_all -= round(opts[j][0] / step)
    return best[capacity], choice


def _allocate_exact(table, budget, target_sqnr) -> dict[str, Any]:
    layers = _layers(table)
    total = sum(n for _, n, _ in layers)
    low = sum(opts[0][0] for _, _, opts in layers)
    high = sum(max(o[0] for o in opts) for _, _, opts in layers)
    if budget is not None:
        found = _knapsack(layers, budget * total)
        if found is None:  # rounding to steps: the cheapest choice is always feasible
            found = (0.0, {name: 0 for name, _, _ in layers})
    else:
        target = 10 ** (-target_sqnr / 10)
        top = _knapsack(layers, high * (1 + 1e-6))
        if top is None or top[0] > target:
            best_db = _db(min(sum(min(o[1] for o in opts) for _, _, opts in layers), math.inf))
            raise UsageError(
                f"target SQNR {target_sqnr:g} dB is out of reach: the best candidates give an "
                f"estimated {best_db:.1f} dB",
                "lower --sensitivity-target-sqnr, or add a more precise candidate (e.g. fp16)",
            )
        lo, hi, found = low, high * (1 + 1e-6), top
        for _ in range(20):
            mid = (lo + hi) / 2
            got = _knapsack(layers, mid)
            if got is not None and got[0] <= target:
                hi, found = mid, got
            else:
                lo = mid
    _, pick = found
    bits = sum(opts[pick[name]][0] for name, _, opts in layers)
    noise = sum(opts[pick[name]][1] for name, _, opts in layers)
    return {
        "choice": {name: opts[pick[name]][2] for name, _, opts in layers},
        "bits_per_weight": bits / total,
        "estimated_sqnr_db": _db(noise),
        "noise": noise,
    }


def _db(noise: float) -> float:
    return math.inf if noise <= 0 else -10 * math.log10(noise)


def tradeoff(table: dict[str, Any], points: int = 8) -> dict[str, list[tuple[float, float]]]:
    """The allocator's estimated output SQNR at budgets from the cheapest to the dearest
    choice, and each candidate used for every layer (the uniform reference points):
    ``{series: [(bits per weight, estimated SQNR dB)]}``."""
    layers = _layers(table)
    total = sum(n for _, n, _ in layers)
    low = sum(opts[0][0] for _, _, opts in layers) / total
    high = sum(max(o[0] for o in opts) for _, _, opts in layers) / total
    curve = []
    for k in range(points):
        budget = low + (high - low) * k / max(points - 1, 1)
        res = allocate(table, budget=budget)
        curve.append((res["bits_per_weight"], res["estimated_sqnr_db"]))
    out: dict[str, list[tuple[float, float]]] = {"allocator (greedy)": curve}
    for label in table["candidates"]:
        picks = [[o for o in opts if o[2] == label] for _, _, opts in layers]
        if not all(picks):
            continue
        bits = sum(p[0][0] for p in picks) / total
        noise = sum(p[0][1] for p in picks if math.isfinite(p[0][1]))
        out[f"uniform {label}"] = [(bits, _db(noise))]
    return out
