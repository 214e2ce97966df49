"""Fuzzing the readers: a corrupted file is a FormatError (or a UsageError), never a crash.

A small valid Mono Quant file (an int4-group MLP, so qdata/scale/zero_point are all present)
and a plain float safetensors file are corrupted in seeded ways: random bit flips anywhere,
random bytes in the header, truncation (also inside the 8-byte length), absurd header lengths,
and hand-made headers that are valid JSON but lie (other JSON types, deep nesting, impossible
shapes, inconsistent quantization records). Every variant goes through ``Engine.inspect``,
``load(path, fresh_model)`` and ``load(path, dequantize=True)``: each call must succeed or raise
a one-line FormatError / UsageError, and return within 5 s.
"""

from __future__ import annotations

import json
import random
import signal
import struct
import time
from collections import Counter

import pytest
from monoquant_plugins.safetensors_format import write_safetensors

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


def run_all(engine: Engine, path: str, tally: Counter | None = None) -> list[str]:
    """The three entry points on ``path``; returns a description of every forbidden outcome
    (and counts the outcomes in ``tally``)."""
    calls = (
        ("inspect", lambda: engine.inspect(path)),
        ("load(model)", lambda: mq.load(path, mlp(dims=DIMS, seed=1), engine=engine)),
        ("load(dequantize)", lambda: mq.load(path, dequantize=True, engine=engine)),
    )
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
    ("format_version", "2"),
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
    bad = run_all(fz_engine, str(path))
    print(_case_id(case), bad)
    assert bad == []
