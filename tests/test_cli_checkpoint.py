"""The command line in checkpoint mode: quantize / plan / inspect / verify / dequantize a
safetensors file or a sharded folder, and every bad input as one line with exit code 1."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from click.testing import CliRunner
from monoquant_plugins.safetensors_format import write_safetensors
from safetensors import safe_open

import monoquant_core as mq
from monoquant_core.cli import build_cli

INDEX = "model.safetensors.index.json"


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"model.embed_tokens.weight": r(64, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(32)
        sd[p + "self_attn.q_proj.weight"] = r(32, 32)
        sd[p + "self_attn.q_proj.bias"] = r(32)
        sd[p + "mlp.up_proj.weight"] = r(64, 32)
        sd[p + "mlp.down_proj.weight"] = r(32, 64)
    sd["lm_head.weight"] = r(64, 32)
    return sd


SELECTED = {
    f"model.layers.{i}.{m}.weight"
    for i in range(2)
    for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")
}


def make_folder(folder, sd, n_shards=3, index=True):
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    wm = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n] for n in names[k::n_shards]}
        write_safetensors(os.path.join(folder, fname), part, {"format": "pt"})
        wm.update(dict.fromkeys(part, fname))
    if index:
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write('{"hidden_size": 32}\n')
    return wm


def tree(root) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    }


@pytest.fixture
def run(engine):
    cli = build_cli(engine)

    def invoke(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return invoke


@pytest.fixture
def src_file(tmp_path):
    sd = make_state()
    path = tmp_path / "model.safetensors"
    write_safetensors(str(path), sd, {"format": "pt"})
    return path, sd


@pytest.fixture
def quantized(run, tmp_path, src_file):
    src, _ = src_file
    out = tmp_path / "q.safetensors"
    res = run("quantize", src, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    return out


def ok(res):
    assert res.exit_code == 0 and res.exception is None, (res.output, res.exception)
    assert "Traceback" not in res.output
    return res.output


# --------------------------------------------------------------------------- happy paths


def test_quantize_file(run, tmp_path, src_file):
    src, sd = src_file
    out = tmp_path / "q.safetensors"
    text = ok(run("quantize", src, "-o", out))
    assert f"saved to {out}" in text and "int8 / minmax" in text
    assert f"kept in float ({len(sd) - len(SELECTED)}):" in text
    for name in SELECTED:
        assert name in text
    got = mq.load(str(out), dequantize=True)
    assert set(got) == set(sd)
    for n, t in sd.items():
        if n not in SELECTED:
            assert torch.equal(got[n], t), n
        else:
            assert mq.sqnr_db(t, got[n]) > 35, n


def test_quantize_folder(run, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    sd = make_state()
    make_folder(src, sd)
    torch.save({"x": torch.ones(2)}, src / "pytorch_model.bin")
    text = ok(
        run("quantize", src, "-o", out, "--scheme", "int4-group", "--scheme-opt", "group_size=32")
    )
    assert "int4-group" in text
    assert tree(out) == tree(src) - {"pytorch_model.bin"}
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    index = json.loads((out / INDEX).read_text())
    stored = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            with safe_open(str(out / f), "pt") as h:
                stored.update(dict.fromkeys(h.keys(), f))
    assert index["weight_map"] == stored
    assert {f"{n}.zero_point" for n in SELECTED} <= set(stored)


def test_plan_table_and_json(run, src_file):
    src, sd = src_file
    text = ok(run("plan", src))
    print(text)
    assert f"{len(SELECTED)} of {len(sd)} tensors will be quantized" in text
    assert "'bias' is not a weight" in text
    assert "embedding: kept in float" in text
    assert "output head" in text
    assert "1-D tensor" in text
    data = json.loads(ok(run("plan", src, "--json", "--rule", "lm_head=int8", "--skip", "*.0.*")))
    action = {e["name"]: (e["action"], e["scheme"]) for e in data["entries"]}
    assert action["lm_head.weight"] == ("quantize", "int8")
    assert action["model.layers.0.mlp.up_proj.weight"][0] == "skip"
    assert action["model.layers.1.mlp.up_proj.weight"] == ("quantize", "int8")


def test_inspect_text_and_json(run, quantized, src_file):
    text = ok(run("inspect", quantized))
    print(text)
    assert "monoquant, format version 1" in text
    assert "producers: core (monoquant" in text and "int8 (monoquant" in text
    assert "bits per quantized weight" in text and "bits/w" in text
    info = json.loads(ok(run("inspect", quantized, "--json")))
    assert info["format"] == "monoquant" and info["format_version"] == 1
    assert set(info["producers"]) == {"core", "int8"}
    by = {t["name"]: t for t in info["tensors"]}
    q = by["model.layers.0.mlp.up_proj.weight"]
    # 64x32 int8: 8 bits per code + one float32 scale per row of 32 = 9 bits per weight
    print(f"bits per weight {q['bits_per_weight']}")
    assert q["quantized"] and q["scheme"] == "int8" and q["bits_per_weight"] == 9.0
    assert by["lm_head.weight"]["bits_per_weight"] == 32.0
    assert info["totals"]["quantized"] == len(SELECTED)
    plain = json.loads(ok(run("inspect", src_file[0], "--json")))
    assert plain["format"] == "safetensors (plain)" and plain["format_version"] is None


def test_verify_gate(run, quantized, src_file):
    src, _ = src_file
    text = ok(run("verify", src, quantized, "--min-sqnr", "10"))
    assert "threshold 10.00 dB" in text and "FAIL" not in text
    res = run("verify", src, quantized, "--min-sqnr", "99")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    err = res.stderr.splitlines()
    print(res.stderr)
    assert len(err) == 1 and err[0].startswith("monoquant: problem: verification failed: min SQNR")
    assert "threshold 99.00 dB" in err[0] and "fix: " in err[0]
    assert "FAIL" in res.stdout and "Traceback" not in res.output
    data = json.loads(ok(run("verify", src, quantized, "--json")))
    print(f"min SQNR {data['min_sqnr_db']:.2f} dB, ratio {data['compression_ratio']:.2f}")
    assert 35 < data["min_sqnr_db"] < 99 and data["compression_ratio"] > 1.5
    assert data["missing"] == [] and data["mismatched_copies"] == []


def test_dequantize_file_and_folder(run, tmp_path, quantized, src_file):
    out = tmp_path / "plain.safetensors"
    text = ok(run("dequantize", quantized, out))
    assert f"wrote {out}" in text
    expected = mq.load(str(quantized), dequantize=True)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(got) == set(expected) == set(src_file[1])
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], expected[k]) for k in got)
    # a folder
    src, q, dq = tmp_path / "src", tmp_path / "q", tmp_path / "dq"
    make_folder(src, make_state(1))
    ok(run("quantize", src, "-o", q, "-q", "--scheme", "int4-group"))
    assert ok(run("dequantize", q, dq, "-q")) == ""
    assert tree(dq) == tree(src)
    index = json.loads((dq / INDEX).read_text())
    assert index["weight_map"] == json.loads((src / INDEX).read_text())["weight_map"]
    for shard in sorted(set(index["weight_map"].values())):
        ref = mq.load(str(q / shard), dequantize=True)
        with safe_open(str(dq / shard), "pt") as f:
            assert {k: f.get_tensor(k) for k in f.keys()}.keys() == ref.keys()  # noqa: SIM118
            assert all(torch.equal(f.get_tensor(k), ref[k]) for k in ref)


def test_report_json_and_quiet(run, tmp_path, src_file):
    src, sd = src_file
    rep = tmp_path / "report.json"
    res = run("quantize", src, "-o", tmp_path / "q.safetensors", "--report", rep, "--quiet")
    assert ok(res) == "" and res.stderr == ""
    data = json.loads(rep.read_text())
    assert {layer["name"] for layer in data["layers"]} == SELECTED
    reasons = {s["name"]: s["reason"] for s in data["skipped"]}
    assert set(reasons) == set(sd) - SELECTED
    assert "output head" in reasons["lm_head.weight"]
    assert data["model_bytes_before"] == sum(t.numel() * 4 for t in sd.values())
    print(f"compression {data['compression_ratio']:.2f}x, min SQNR {data['min_sqnr_db']:.2f} dB")
    assert data["compression_ratio"] > 1.3 and data["min_sqnr_db"] > 35
    js = json.loads(ok(run("quantize", src, "-o", tmp_path / "q2.safetensors", "--json")))
    assert {layer["name"] for layer in js["layers"]} == SELECTED


def test_allow_nonfinite_then_verify(run, tmp_path):
    w = torch.randn(16, 16)
    w[0, 1] = float("nan")
    src = tmp_path / "nan.safetensors"
    write_safetensors(str(src), {"bad.weight": w, "good.weight": torch.randn(16, 16)}, {})
    text = ok(run("quantize", src, "-o", tmp_path / "q.safetensors", "--allow-nonfinite"))
    assert "bad.weight: contains 1 NaN/Inf value(s): kept in float" in text
    # the NaN tensor is kept bit for bit, so the quality gate must pass
    res = run("verify", src, tmp_path / "q.safetensors", "--min-sqnr", "10")
    print(res.output)
    assert res.exit_code == 0 and "altered" not in res.output


def test_trust_pickle_flag(run, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    torch.save(model, tmp_path / "full.pt")
    res = run("quantize", tmp_path / "full.pt", "-o", tmp_path / "full.safetensors")
    assert res.exit_code == 1 and "--trust-pickle" in res.output
    ok(run("quantize", tmp_path / "full.pt", "-o", tmp_path / "full.safetensors", "--trust-pickle"))
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        assert "0.weight.qdata" in f.keys()  # noqa: SIM118 - a safe_open handle, not a dict


# --------------------------------------------------------------------------- bad inputs


def _lying_header(tmp_path):
    raw = json.dumps({"a.weight": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}})
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw.encode() + bytes(64))
    return path


def _folder_with(tmp_path, edit_index=None, truncate=None):
    src = tmp_path / "src"
    make_folder(src, make_state())
    if edit_index is not None:
        doc = json.loads((src / INDEX).read_text())
        (src / INDEX).write_text(edit_index(doc))
    if truncate:
        shard = src / truncate
        shard.write_bytes(shard.read_bytes()[:-5])
    return src


def _nan(tmp_path):
    w = torch.randn(8, 8)
    w[2, 2] = float("inf")
    path = tmp_path / "nan.safetensors"
    write_safetensors(str(path), {"layer.weight": w}, {})
    return path


def _evil_pt(tmp_path):
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2, 2), "payload": Payload()}, path)
    return path


def _garbage_pt(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a pickle \x00\x01\x02" * 4)
    return path


def _two_shards_same_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(str(src / "a.safetensors"), {"x.weight": torch.randn(8, 8)}, {})
    write_safetensors(str(src / "b.safetensors"), {"x.weight": torch.randn(8, 8)}, {})
    return src


def _write_file(tmp_path, sd, name="m.safetensors"):
    path = tmp_path / name
    write_safetensors(str(path), sd, {})
    return path


def _already_quantized(tmp_path):
    path = _write_file(tmp_path, {"fc.weight": torch.randn(8, 8)})
    mq.Engine().quantize_checkpoint(str(path), str(tmp_path / "q.safetensors"), progress=False)
    return tmp_path / "q.safetensors"


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _wm_wrong_shard(doc):
    wm = dict(doc["weight_map"])
    wm["lm_head.weight"] = next(v for k, v in wm.items() if v != wm["lm_head.weight"])
    return json.dumps({"weight_map": wm})


# (id, build the source -> path, extra args, needle, output is a folder)
BAD = [
    ("missing-file", lambda t: t / "nope.safetensors", [], "does not exist", False),
    ("no-safetensors", _empty_dir, [], "no .safetensors files", True),
    (
        "index-invalid-json",
        lambda t: _folder_with(t, lambda d: "{oops"),
        [],
        "not valid JSON",
        True,
    ),
    (
        "index-missing-shard",
        lambda t: _folder_with(t, lambda d: json.dumps({"weight_map": {"x": "gone.safetensors"}})),
        [],
        "gone.safetensors",
        True,
    ),
    ("index-wrong-shard", lambda t: _folder_with(t, _wm_wrong_shard), [], "'lm_head.weight'", True),
    (
        "index-metadata-not-object",
        lambda t: _folder_with(t, lambda d: json.dumps({**d, "metadata": "x"})),
        [],
        INDEX,
        True,
    ),
    (
        "truncated-shard",
        lambda t: _folder_with(t, truncate="model-00002-of-00003.safetensors"),
        [],
        "model-00002-of-00003.safetensors",
        True,
    ),
    ("same-name-in-two-shards", _two_shards_same_name, [], "x.weight", True),
    ("header-lies", _lying_header, [], "needs 80 bytes", False),
    ("nan-weight", _nan, [], "--allow-nonfinite", False),
    (
        "1d-by-rule",
        lambda t: _write_file(t, {"fc.weight": torch.randn(8, 8), "fc.bias": torch.randn(8)}),
        ["--rule", "fc.bias=int8"],
        "cannot be quantized",
        False,
    ),
    (
        "empty-by-only",
        lambda t: _write_file(t, {"fc.weight": torch.randn(8, 8), "e.weight": torch.zeros(0, 8)}),
        ["--only", "e"],
        "cannot be quantized",
        False,
    ),
    ("malicious-pickle", _evil_pt, [], "--trust-pickle", False),
    ("garbage-pt-trusted", _garbage_pt, ["--trust-pickle"], "garbage.pt", False),
    ("already-quantized", _already_quantized, [], "already quantized", False),
]


@pytest.mark.parametrize(
    "build, args, needle, folder", [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, build, args, needle, folder):
    work = tmp_path / "work"
    work.mkdir()
    src = build(work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / ("q" if folder else "q.safetensors")
    before = tree(tmp_path)
    res = run("quantize", src, "-o", dst, *args)
    print(res.output)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.output.startswith("monoquant: problem: ") and res.output.count("\n") == 1
    assert needle in res.output and " fix: " in res.output and "Traceback" not in res.output
    assert res.stdout == ""
    assert tree(tmp_path) == before and os.listdir(out_dir) == []
    assert not (tmp_path / f"{work.name}-pwned").exists()


def test_output_paths(run, tmp_path, src_file):
    src, _ = src_file
    before = src.read_bytes()
    res = run("quantize", src, "-o", src, "--overwrite")
    assert res.exit_code == 1 and "is the input" in res.output and res.output.count("\n") == 1
    assert src.read_bytes() == before
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    res = run("quantize", src, "-o", out)
    assert res.exit_code == 1 and "--overwrite" in res.output and out.read_bytes() == b"keep"
    ok(run("quantize", src, "-o", out, "--overwrite", "-q"))
    assert set(mq.load(str(out), dequantize=True)) == set(src_file[1])
    folder = tmp_path / "folder"
    make_folder(folder, make_state())
    listing = tree(folder)
    res = run("quantize", folder, "-o", folder / "inside")
    assert res.exit_code == 1 and "contain one another" in res.output
    assert tree(folder) == listing
    res = run("quantize", src)
    assert res.exit_code == 1 and "needs an output" in res.output
    res = run("quantize", src, "--demo", "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 1 and "exclusive" in res.output
    for cmd in (
        ["inspect", tmp_path / "nope"],
        ["plan", tmp_path / "nope"],
        ["verify", src, tmp_path / "nope"],
        ["dequantize", src, tmp_path / "d"],
    ):
        res = run(*cmd)
        assert res.exit_code == 1 and res.output.startswith("monoquant: problem: "), res.output
        assert res.output.count("\n") == 1 and isinstance(res.exception, SystemExit)
