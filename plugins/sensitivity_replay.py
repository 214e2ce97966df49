"""Running a model from one layer onward, for the output-error pass of the ``sensitivity``
plugin (:mod:`monoquant_plugins.sensitivity_table`).

Measuring a layer changes only that layer's weight, so every module call that ends before the
layer's first call starts computes exactly what the float model computed. Per batch, one pass
with hooks on every submodule records the order of the module calls; the float reference pass
then keeps the outputs of the calls a measurement can skip, and a measurement replays them
(the module's ``forward`` returns the recorded output) and computes only the rest: on average
about half of the model for a layer in a stack of blocks, almost nothing for the last ones.
Nothing about the architecture is assumed; a module is replayed for a layer only when

* every one of its calls ends before the measured weight is first used (the first call of a
  module holding it: the layer, or a module tied to it), and none lies inside another
  replayed call (the outermost such calls are replayed);
* it holds no tensor sharing storage with the measured weight (tied weights);
* its output is a tensor or a tuple of them (nested, ``None`` and numbers allowed) that
  nothing modifies in place afterwards (version counters, checked after the reference pass
  and after every measurement).

A module must also be a function of its inputs (in eval mode: no state that a later module
reads). Each batch's most replayed run is checked bit for bit against the reference with the
float weights before any measurement; that check or any one above failing later turns replay
off for the rest of the pass, and the measurement is repeated with full forward passes, so
the numbers are those of full forward passes either way. The recorded outputs are capped at
``limit_bytes`` (the modules skipping the most calls per byte are kept).
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from itertools import chain
from typing import Any

import torch
from torch import nn

__all__ = ["REPLAY_LIMIT_BYTES", "Replay", "flat_output"]

#: the most bytes of recorded module outputs kept for replay (all batches together)
REPLAY_LIMIT_BYTES = 2 << 30

Batch = tuple[tuple[Any, ...], dict[str, Any]]


def flat_output(out: Any) -> torch.Tensor:
    """Every tensor of a model's output (nested tuples, lists, dicts, ``to_tuple()`` objects)
    as one flat float64 vector."""
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(-1).to(torch.float64)
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        parts = [flat_output(v) for v in out if isinstance(v, (torch.Tensor, tuple, list, dict))]
        return torch.cat([p for p in parts if p.numel()]) if parts else torch.zeros(0)
    return torch.zeros(0, dtype=torch.float64)


def _tensors(out: Any, acc: list[torch.Tensor]) -> bool:
    """Collect the tensors of ``out``; False when it is not a tensor / tuple of them."""
    if isinstance(out, torch.Tensor):
        acc.append(out)
        return True
    if isinstance(out, tuple):
        return all(_tensors(v, acc) for v in out)
    return out is None or isinstance(out, (bool, int, float, str))


class _Mismatch(Exception):
    """A replayed run did not follow the recorded float run."""


def _run(model: nn.Module, batch: Batch) -> Any:
    args, kwargs = batch
    return model(*args, **kwargs)


class _Trace:
    """One float pass of a batch with hooks: every module call as (start, end) event numbers,
    the bytes of its outputs, and optionally the outputs of some modules."""

    def __init__(self, model: nn.Module, batch: Batch, keep: set[str] = frozenset()):
        self.calls: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.nbytes: dict[str, int] = defaultdict(int)
        self.unfit: set[str] = set()  # some output is not a tensor / tuple of tensors
        self.kept: dict[str, list[tuple[Any, list[tuple[torch.Tensor, int]]]]] = defaultdict(list)
        self._clock = 0
        self._open: dict[str, list[int]] = defaultdict(list)
        handles = []
        try:
            for name, mod in model.named_modules():
                if name:
                    try:
                        handles.append(mod.register_forward_pre_hook(partial(self._pre, name)))
                        handles.append(mod.register_forward_hook(partial(self._post, name, keep)))
                    except RuntimeError as e:  # a scripted module takes no Python hooks
                        raise _Mismatch(f"{name} takes no forward hooks ({e})") from None
            self.output = _run(model, batch)
        finally:
            for h in handles:
                h.remove()

    def _pre(self, name: str, mod: nn.Module, args: Any) -> None:
        self._open[name].append(self._clock)
        self._clock += 1

    def _post(self, name: str, keep: set[str], mod: nn.Module, args: Any, out: Any) -> None:
        self.calls[name].append((self._open[name].pop(), self._clock))
        self._clock += 1
        ts: list[torch.Tensor] = []
        if not _tensors(out, ts):
            self.unfit.add(name)
        self.nbytes[name] += sum(t.numel() * t.element_size() for t in ts)
        if name in keep:
            self.kept[name].append((out, [(t, t._version) for t in ts]))


def _plan(trace: _Trace, holders: set[str], held: dict[str, set[int]], ptrs: set[int]) -> list[str]:
    """The outermost module calls that end before the measured weight is first used (the first
    call of a module holding it: the layer, or a module tied to it) and can be replayed."""
    first = (
        -1
        if "" in holders
        else min((s for h in holders for s, _ in trace.calls.get(h, ())), default=math.inf)
    )
    cands = [
        n
        for n, calls in trace.calls.items()
        if n not in trace.unfit and max(e for _, e in calls) < first and not held[n] & ptrs
    ]
    nested, outer = set(), -1
    for s, e, name in sorted((s, e, n) for n in cands for s, e in trace.calls[n]):
        if s < outer:
            nested.add(name)
        else:
            outer = e
    return [n for n in cands if n not in nested]


def _covered(trace: _Trace, name: str) -> int:
    return sum(e - s for s, e in trace.calls[name])


class Replay:
    """The float reference outputs of ``batches`` and the outputs with one layer changed,
    computed from that layer onward (see the module docstring).

    ``targets``: module name -> the tensors that will be changed in place (the measured
    weights). ``reference``: per batch, the float output as from :func:`flat_output`.
    ``note``: ``"on"``, or why replay is off.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Batch],
        targets: dict[str, list[torch.Tensor]],
        enabled: bool = True,
        limit_bytes: int = REPLAY_LIMIT_BYTES,
    ):
        self.model, self.batches = model, batches
        self.note = "on" if enabled else "off (turned off)"
        self.plans: list[dict[str, list[str]]] = []
        self.kept: list[dict[str, list[tuple[Any, list[tuple[torch.Tensor, int]]]]]] = []
        with torch.no_grad():
            if enabled:
                try:
                    self.reference = self._record(targets, limit_bytes)
                    return
                except _Mismatch as e:
                    self._off(str(e))
            self.reference = [flat_output(_run(model, b)) for b in batches]

    @property
    def enabled(self) -> bool:
        return self.note == "on"

    def _record(self, targets: dict[str, list[torch.Tensor]], limit: int) -> list[torch.Tensor]:
        mods = dict(self.model.named_modules())
        held = {
            n: {t.untyped_storage().data_ptr() for t in chain(m.parameters(), m.buffers())}
            for n, m in mods.items()
        }
        ptrs = {t: {w.untyped_storage().data_ptr() for w in ws} for t, ws in targets.items()}
        own = {n: {t.untyped_storage().data_ptr() for t in chain(m.parameters(recurse=False),
                                                                  m.buffers(recurse=False))}
               for n, m in mods.items()}  # fmt: skip
        self.holders = {t: {n for n, p in own.items() if p & ptrs[t]} for t in targets}
        traces = [_Trace(self.model, b) for b in self.batches]
        plans = [{t: _plan(tr, self.holders[t], held, ptrs[t]) for t in targets} for tr in traces]
        keep = [set(chain.from_iterable(p.values())) for p in plans]
        sizes: dict[str, int] = defaultdict(int)
        for tr, k in zip(traces, keep, strict=True):
            for n in k:
                sizes[n] += tr.nbytes[n]
        worth = {n: sum(_covered(tr, n) for tr in traces) / max(b, 1) for n, b in sizes.items()}
        total, allowed = 0, set()
        for n in sorted(sizes, key=lambda n: -worth[n]):
            if total + sizes[n] <= limit:
                total += sizes[n]
                allowed.add(n)
        reference = []
        for b, batch in enumerate(self.batches):
            rec = _Trace(self.model, batch, keep[b] & allowed)
            reference.append(flat_output(rec.output))
            stale = {n for n, outs in rec.kept.items() if _modified(outs)}
            ok = allowed - stale
            self.plans.append({t: [n for n in p if n in ok] for t, p in plans[b].items()})
            self.kept.append({n: v for n, v in rec.kept.items() if n in ok})
        self._check(traces, reference)
        return reference

    def _check(self, traces: list[_Trace], reference: list[torch.Tensor]) -> None:
        """The most replayed run of every batch, with the float weights, must equal the
        reference bit for bit."""
        for b, tr in enumerate(traces):
            starts = {t: min((s for h in hs for s, _ in tr.calls.get(h, ())), default=None)
                      for t, hs in self.holders.items()}  # fmt: skip
            called = [t for t, s in starts.items() if s is not None]
            if not called:
                continue
            deepest = max(called, key=lambda t: starts[t])
            try:
                same = torch.equal(self._replayed(b, deepest), reference[b])
            except _Mismatch as e:
                self._off(str(e))
                return
            if not same:
                self._off(f"replaying before {deepest} changed the float output of batch {b}")
                return

    def _off(self, why: str) -> None:
        self.note = f"off ({why})"
        self.plans, self.kept = [], []

    def _replayed(self, b: int, target: str) -> torch.Tensor:
        plan, kept = self.plans[b][target], self.kept[b]
        swapped = []
        iters = {}
        try:
            for name in plan:
                mod = self.model.get_submodule(name)
                iters[name] = iter([out for out, _ in kept[name]])
                swapped.append((mod, mod.__dict__.get("forward")))
                mod.forward = partial(_next_output, iters[name], name)
            out = flat_output(_run(self.model, self.batches[b]))
        finally:
            for mod, old in swapped:
                if old is None:
                    del mod.forward
                else:
                    mod.forward = old
        for name in plan:
            if next(iters[name], _END) is not _END:
                raise _Mismatch(f"{name} was called less often than in the float pass")
            if _modified(kept[name]):
                raise _Mismatch(f"the recorded output of {name} was modified in place")
        return out

    def outputs(self, target: str) -> list[torch.Tensor]:
        """Per batch, the model's flat output now (the target's weights as they are)."""
        with torch.no_grad():
            if self.enabled:
                try:
                    return [self._replayed(b, target) for b in range(len(self.batches))]
                except _Mismatch as e:
                    self._off(str(e))
            return [flat_output(_run(self.model, b)) for b in self.batches]


_END = object()


def _next_output(outputs: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return next(outputs)
    except StopIteration:
        raise _Mismatch(f"{name} was called more often than in the float pass") from None


def _modified(outs: list[tuple[Any, list[tuple[torch.Tensor, int]]]]) -> bool:
    return any(t._version != v for _, ts in outs for t, v in ts)
