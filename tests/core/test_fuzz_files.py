"""Fuzzing the readers: a corrupted file is a FormatError (or a UsageError), never a crash.

A small valid Mono Quant file (an int4-group MLP, so qdata/scale/zero_point are all present)
and a plain float safetensors file are corrupted in seeded ways: random bit flips anywhere,
random bytes in the header, truncation (also inside the 8-byte length), absurd header lengths,
and hand-made headers that are valid JSON but lie (other JSON types, deep nesting, impossible
shapes, inconsistent quantization records), and valid headers whose *values* are bad
(NaN/Inf, negative, zero and integer scales). Every variant goes through ``Engine.inspect``,
``load(path, fresh_model)``, ``load(path, dequantize=True)`` and ``Engine.verify`` against the
float original: each call must succeed or raise a one-line FormatError / UsageError, and return
within 5 s. Inputs of checkpoint mode get the same treatment: finite weights near the float32
limit, and ``.pt`` files holding sparse or nested tensors.
"""

from __future__ import annotations

import json
import random
import signal
import struct
import time
from collections import Counter

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from monoquant_plugins.safetensors_io import DTYPES

import monoquant_core as mq
from monoquant_core import Engine, FormatError, UsageError
from monoquant_core.testing import mlp

DIMS = (32, 64, 10)
LIMIT_S = 5.0


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"call did not return within {LIMIT_S} s")


@pytest.fixture(scope="module")
def fz_engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def originals(tmp_path_factory, fz_engine) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("fuzz-originals")
    qmodel, _ = fz_engine.quantize(
        mlp(dims=DIMS), scheme="int4-group", scheme_options={"group_size": 32}
    )
    fz_engine.save(qmodel, str(root / "q.safetensors"))
    write_safetensors(str(root / "p.safetensors"), mlp(dims=DIMS).state_dict(), {"format": "pt"})
    return {
        "quantized": (root / "q.safetensors").read_bytes(),
        "plain": (root / "p.safetensors").read_bytes(),
    }


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def run_all(
    engine: Engine, path: str, tally: Counter | None = None, original: str | None = None
) -> list[str]:
    """The entry points on ``path`` (and ``verify`` against ``original``); returns a
    description of every forbidden outcome (and counts the outcomes in ``tally``)."""
    calls = [
        ("inspect", lambda: engine.inspect(path)),
        ("load(model)", lambda: mq.load(path, mlp(dims=DIMS, seed=1), engine=engine)),
        ("load(dequantize)", lambda: mq.load(path, dequantize=True, engine=engine)),
    ]
    if original is not None:
        calls.append(("verify", lambda: engine.verify(original, path, progress=False)))
    return outcomes(calls, tally)


def outcomes(calls, tally: Counter | None = None) -> list[str]:
    """Run each ``(label, call)``: a forbidden outcome is anything but a return or a one-line
    FormatError / UsageError within LIMIT_S."""
    bad = []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for label, call in calls:
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
            outcome = "ok"
            try:
                call()
            except (FormatError, UsageError) as e:
                outcome = type(e).__name__
                msg = str(e)
                if "\n" in msg or not msg.startswith("problem: "):
                    bad.append(f"{label}: not a one-line error: {msg!r:.200}")
            except Exception as e:
                outcome = "forbidden"
                bad.append(f"{label}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - t0
            if tally is not None:
                tally[f"{label} {outcome}"] += 1
            if elapsed > LIMIT_S:
                bad.append(f"{label}: took {elapsed:.1f} s")
    finally:
        signal.signal(signal.SIGALRM, old)
    return bad


def mutate(rng: random.Random, data: bytes, kind: str) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    b = bytearray(data)
    if kind == "flip-anywhere":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "header-bytes":
        for _ in range(rng.randint(1, 4)):
            b[8 + rng.randrange(n)] = rng.randrange(256)
    elif kind == "truncate":
        cut = rng.choice([rng.randrange(9), rng.randrange(8 + n), rng.randrange(len(b))])
        b = b[:cut]
    elif kind == "length-field":
        value = rng.choice(
            [
                0,
                1,
                2,
                n - 1,
                n + 1,
                len(b) - 8,
                len(b),
                2**31,
                2**63,
                2**64 - 1,
                rng.randrange(2**40),
            ]
        )
        b[:8] = struct.pack("<Q", value)
    elif kind == "data-bytes":
        for _ in range(rng.randint(1, 16)):
            b[8 + n + rng.randrange(len(b) - 8 - n)] = rng.randrange(256)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return bytes(b)


KINDS = ("flip-anywhere", "header-bytes", "truncate", "length-field", "data-bytes")


@pytest.mark.slow  # 1500 corrupted files; test_valid_json_that_lies covers each kind of lie
@pytest.mark.parametrize("which", ["quantized", "plain"])
def test_random_corruptions(fz_engine, originals, tmp_path, which):
    rng = random.Random(f"monoquant-fuzz-{which}")
    data = originals[which]
    path = str(tmp_path / "f.safetensors")
    failures, outcomes, tally = [], {"same": 0, "changed": 0}, Counter()
    for i in range(300):
        kind = KINDS[i % len(KINDS)]
        variant = mutate(rng, data, kind)
        outcomes["same" if variant == data else "changed"] += 1
        with open(path, "wb") as f:
            f.write(variant)
        failures += [f"#{i} {kind}: {b}" for b in run_all(fz_engine, path, tally)]
    print(f"{which}: {outcomes}, {dict(sorted(tally.items()))}")
    assert outcomes["changed"] >= 290
    # the corpus reaches past header validation: flipped tensor bytes still load
    assert tally["load(dequantize) ok"] > 20 and tally["load(dequantize) FormatError"] > 100
    assert failures == []


_F32 = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}

#: whole headers (of a file without tensor data)
WHOLE_HEADERS = {
    "empty-list": [],
    "object-a1": {"a": 1},
    "string": "weights",
    "number": 12345,
    "null": None,
    "deep-list": b"[" * 100_000 + b"]" * 100_000,
    "deep-in-entry": b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "metadata-list": {"__metadata__": [1, 2]},
    "metadata-null": {"__metadata__": None},
    "empty-object": {},
    "entry-is-list": {"0.weight": [1, 2, 3]},
    "bool-shape": {"x": {**_F32, "shape": [True]}},
    "float-offsets": {"x": {**_F32, "data_offsets": [0.0, 0.0]}},
    "many-zero-dims": {"x": {**_F32, "shape": [0] * 64}},
    "zero-size-huge-dim": {"x": {**_F32, "shape": [0, 2**63]}},
    "zero-size-huger-dim": {"x": {**_F32, "shape": [0, 10**30]}},
}

#: ``__metadata__`` values of the quantized file replaced
METADATA = [
    ("format_version", "3"),
    ("format_version", "0"),
    ("format_version", "one"),
    ("quantization", "[]"),
    ("quantization", '{"0.weight": 1}'),
    ("quantization", "[" * 100_000 + "]" * 100_000),
    ("producers", "[1]"),
    ("config", "{not json"),
]

#: one field of the quantization record of ``0.weight`` (int4-group, 64x32, g32) replaced
RECORD = [
    ("bits", 3),
    ("bits", 0),
    ("bits", 8),
    ("bits", 16),
    ("bits", 2**70),
    ("group_size", 0),
    ("group_size", 1),
    ("group_size", None),
    ("group_size", 64),
    ("axis", 1),
    ("axis", 5),
    ("axis", None),
    ("shape", []),
    ("shape", [2048]),
    ("shape", [32, 64]),
    ("shape", [64, 32, 1]),
    ("shape", [0, 32]),
    ("shape", [64, 10**20]),
    ("dtype", "int8"),
    ("scheme", "no-such-scheme"),
    ("symmetric", True),
    ("roles", ["qdata", "scale"]),
    ("roles", ["qdata", "scale", "zero_point", "0.bias"]),
    ("roles", ["qdata", "scale", "scale", "zero_point"]),
]

#: header entry of one stored piece of ``0.weight`` edited (sizes kept consistent)
PIECES = [
    ("qdata", {"dtype": "I8"}),
    ("qdata", {"dtype": "BOOL"}),
    ("scale", {"dtype": "I16"}),
    ("zero_point", {"shape": [1, 64]}),
]

CASES = (
    [("whole", k) for k in WHOLE_HEADERS]
    + [("metadata", i) for i in range(len(METADATA))]
    + [("record", i) for i in range(len(RECORD))]
    + [("piece", i) for i in range(len(PIECES))]
)


def _case_id(case) -> str:
    kind, key = case
    if kind == "whole":
        return f"header-{key}"
    if kind == "metadata":
        k, v = METADATA[key]
        return f"metadata-{k}={v[:12]}"
    if kind == "record":
        k, v = RECORD[key]
        return f"record-{k}={json.dumps(v)[:24]}"
    k, v = PIECES[key]
    return f"piece-{k}-{json.dumps(v)}"


def build(originals, case) -> bytes:
    kind, key = case
    if kind == "whole":
        return join(WHOLE_HEADERS[key], b"")  # every entry above describes 0 bytes
    header, body = split(originals["quantized"])
    meta = header["__metadata__"]
    if kind == "metadata":
        k, v = METADATA[key]
        header["__metadata__"] = {**meta, k: v}
    elif kind == "record":
        k, v = RECORD[key]
        quant = json.loads(meta["quantization"])
        assert quant["0.weight"]["scheme"] == "int4-group"
        quant["0.weight"] = {**quant["0.weight"], k: v}
        meta["quantization"] = json.dumps(quant)
    else:
        k, v = PIECES[key]
        header[f"0.weight.{k}"].update(v)
    return join(header, body)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_valid_json_that_lies(fz_engine, originals, tmp_path, case):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(build(originals, case))
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(originals["plain"])
    bad = run_all(fz_engine, str(path), original=str(plain))
    print(_case_id(case), bad)
    assert bad == []


def _values(data: bytes, key: str, fn) -> bytes:
    """``data`` with the stored tensor ``key`` replaced by ``fn(tensor)`` (same dtype and
    size, so the header stays valid)."""
    header, body = split(data)
    info = header[key]
    start, end = info["data_offsets"]
    dtype = {"F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}[info["dtype"]]
    t = torch.frombuffer(bytearray(body[start:end]), dtype=dtype).clone()
    raw = bytes(fn(t).to(dtype).contiguous().view(torch.uint8).tolist())
    return join(header, body[:start] + raw + body[end:])


def _first(value):
    def fn(t):
        t = t.clone()
        t[0] = value
        return t

    return fn


#: stored values of ``0.weight`` (int4-group: float16 scale and zero point) replaced
VALUES = {
    "scale-nan": ("0.weight.scale", _first(float("nan"))),
    "scale-inf": ("0.weight.scale", _first(float("inf"))),
    "scale-minus-inf": ("0.weight.scale", _first(float("-inf"))),
    "scale-negative": ("0.weight.scale", lambda t: -t),
    "scale-zero": ("0.weight.scale", lambda t: torch.zeros_like(t)),
    "scale-tiny": ("0.weight.scale", lambda t: torch.full_like(t, 6e-8)),
    "scale-max": ("0.weight.scale", lambda t: torch.full_like(t, 65504.0)),
    "zero-point-nan": ("0.weight.zero_point", _first(float("nan"))),
    "zero-point-inf": ("0.weight.zero_point", _first(float("inf"))),
    "zero-point-huge": ("0.weight.zero_point", lambda t: torch.full_like(t, -65504.0)),
    "bias-inf": ("0.bias", _first(float("inf"))),
}

#: header dtypes of a piece changed to an integer type of the same size
INT_PIECES = {
    "scale-I16": ("0.weight.scale", "I16"),
    "scale-U16": ("0.weight.scale", "U16"),
    "zero-point-I16": ("0.weight.zero_point", "I16"),
}


@pytest.mark.parametrize("case", [*VALUES, *INT_PIECES])
def test_bad_values_in_a_valid_header(fz_engine, originals, tmp_path, case):
    """NaN/Inf, negative, zero and integer scales were loaded as garbage (exit 0), and an Inf
    scale made ``verify`` fail with 'math domain error'."""
    if case in VALUES:
        key, fn = VALUES[case]
        data = _values(originals["quantized"], key, fn)
    else:
        key, dtype = INT_PIECES[case]
        header, body = split(originals["quantized"])
        if dtype not in DTYPES:
            pytest.skip(f"this torch has no {dtype}")
        header[key]["dtype"] = dtype
        data = join(header, body)
    path = tmp_path / "values.safetensors"
    path.write_bytes(data)
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(originals["plain"])
    tally: Counter = Counter()
    bad = run_all(fz_engine, str(path), tally, original=str(plain))
    print(case, dict(tally), bad)
    assert bad == []
    if case in REFUSED:
        assert tally["load(dequantize) FormatError"] == 1, "garbage was loaded"


#: the cases a loader must refuse (the others are odd but valid numbers)
REFUSED = {
    "scale-nan",
    "scale-inf",
    "scale-minus-inf",
    "scale-negative",
    "scale-zero",
    "zero-point-nan",
    "zero-point-inf",
    "scale-I16",
    "scale-U16",
}


@pytest.mark.parametrize("scheme", ["int8", "int4-group"])
def test_extreme_finite_weights(fz_engine, tmp_path, scheme):
    """Weights near +-3.4e38 are finite, so checkpoint mode quantizes them: the run and every
    reader of its output succeed or refuse in one line (never a non-finite scale loaded)."""
    big = torch.finfo(torch.float32).max
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    w[0, 0], w[0, 1], w[1, 1], w[2, :] = big, -big, -big, big / 3  # row 0 spans 2 * max
    src = tmp_path / "extreme.safetensors"
    write_safetensors(str(src), {"0.weight": w, "0.bias": torch.zeros(64)}, {})
    out = tmp_path / "q.safetensors"
    opts = {"symmetric": False} if scheme == "int8" else {}

    def quantize():
        fz_engine.quantize_checkpoint(
            str(src), str(out), scheme=scheme, scheme_options=opts, progress=False
        )

    loaded: list[dict] = []
    tally: Counter = Counter()
    bad = outcomes([("quantize", quantize)], tally)
    if out.exists():
        bad += outcomes(
            [
                ("inspect", lambda: fz_engine.inspect(str(out))),
                (
                    "load(dequantize)",
                    lambda: loaded.append(mq.load(str(out), dequantize=True, engine=fz_engine)),
                ),
                ("verify", lambda: fz_engine.verify(str(src), str(out), progress=False)),
            ],
            tally,
        )
    print(scheme, dict(tally), bad)
    assert bad == []
    for state in loaded:  # what loads is finite: a NaN/Inf scale is never handed out
        assert all(bool(torch.isfinite(t).all()) for t in state.values())


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("case", ["sparse-coo", "sparse-csr", "nested-dict", "nested-list"])
def test_sparse_and_nested_pt_inputs(fz_engine, tmp_path, case):
    w = torch.randn(16, 16)
    state = {"a.weight": torch.randn(16, 16)}
    if case == "sparse-coo":
        state["s.weight"] = w.to_sparse()
    elif case == "sparse-csr":
        state["s.weight"] = w.to_sparse_csr()
    elif case == "nested-dict":
        state["inner"] = {"deeper": {"s.weight": w}}
    else:
        state["inner"] = [w, (w, {"x": w})]
    src = tmp_path / "in.pt"
    torch.save(state, src)
    out = tmp_path / "q.safetensors"
    tally: Counter = Counter()
    bad = outcomes(
        [
            ("plan", lambda: fz_engine.plan_checkpoint(str(src))),
            ("inspect", lambda: fz_engine.inspect(str(src))),
            (
                "quantize",
                lambda: fz_engine.quantize_checkpoint(str(src), str(out), progress=False),
            ),
        ],
        tally,
    )
    print(case, dict(tally), bad)
    assert bad == [] and not out.exists()
    assert tally["quantize UsageError"] == 1
