"""streaming.py: checkpoint mode (a safetensors file, a sharded folder or a .pt state_dict,
no model class): the output mirrors the input, round-trips to exactly what module mode gives,
and a refused or failed run writes nothing."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from monoquant_plugins.safetensors_io import SafetensorsReader
from safetensors import safe_open

import monoquant_core as mq
from monoquant_core import CapabilityError, Engine, UsageError
from monoquant_core.demo import demo_model
from tests.helpers import (
    INDEX,
    SMALL_SELECTED,
    BrokenScalePlugin,
    assert_index_consistent,
    expect_failure,
    extreme_weight,
    load_folder,
    one_line,
    small_state,
    stored,
    tree,
    write_folder,
)


def test_single_file_output_mirrors_input(engine, small_file, tmp_path):
    src, sd = small_file
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert os.listdir(out.parent) == ["model.safetensors"]
    assert {layer.name for layer in report.layers} == SMALL_SELECTED
    keys = set(stored(out))
    expected = {n for n in sd if n not in SMALL_SELECTED}
    expected |= {f"{n}.{r}" for n in SMALL_SELECTED for r in ("qdata", "scale")}
    assert keys == expected
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "monoquant" and meta["format_version"] == "1"
    assert set(json.loads(meta["quantization"])) == SMALL_SELECTED
    print(f"{report.model_bytes_before} -> {report.model_bytes_after} bytes")
    assert report.model_bytes_before == sum(t.numel() * t.element_size() for t in sd.values())
    assert (
        report.model_bytes_after
        == os.path.getsize(out) - 8 - struct.unpack("<Q", out.read_bytes()[:8])[0]
    )


def test_sharded_folder_with_index_mirrors_input(engine, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    sd = small_state()
    shards = write_folder(src, sd, n_shards=3)
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert tree(out) == set(shards) | {INDEX, "config.json", os.path.join("tokenizer", "vocab.txt")}
    assert report.extra["not_copied"] == ["pytorch_model.bin"]
    config = json.loads((out / "config.json").read_text())  # marked for transformers
    assert config.pop("quantization_config")["quant_method"] == "monoquant"
    assert config == json.loads((src / "config.json").read_text())
    assert (out / "tokenizer" / "vocab.txt").read_bytes() == b"a\nb\n"
    index = assert_index_consistent(out)
    assert index["metadata"]["note"] == "kept"
    for name in SMALL_SELECTED:
        for role in ("qdata", "scale"):
            assert f"{name}.{role}" in index["weight_map"]
    # every tensor stays in the shard it came from
    for fname, part in shards.items():
        got = mq.load(str(out / fname), dequantize=True)
        assert set(got) == set(part)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_folder_without_index(engine, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    sd = small_state()
    shards = write_folder(src, sd, n_shards=2, index=False, extra_files=False)
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert tree(out) == set(shards)
    assert "not_copied" not in report.extra
    got = load_folder(out)
    assert set(got) == set(sd)
    for n, t in sd.items():
        if n not in SMALL_SELECTED:
            assert torch.equal(got[n], t), n


ROUND_TRIP = [
    ("int8", {}),
    ("int4-group", {}),
    # the same int4-group path as the default group size (which runs by default), slower
    pytest.param("int4-group", {"group_size": 32}, marks=pytest.mark.slow),
    ("fp16", {}),
]


@pytest.mark.parametrize("scheme, options", ROUND_TRIP, ids=lambda x: str(x))
def test_round_trip_equals_module_mode(tmp_path, demo_sd, scheme, options):
    """Acceptance: checkpoint mode == module mode, bit for bit, for every tensor."""
    engine = Engine()
    src = tmp_path / "demo.safetensors"
    write_safetensors(str(src), demo_sd, {"format": "pt"})
    out = tmp_path / "q.safetensors"
    # lm_head is a Linear that checkpoint mode keeps in float unless a rule selects it; the
    # position table "pos" is an nn.Embedding that module mode keeps in float.
    report = engine.quantize_checkpoint(
        str(src),
        str(out),
        scheme=scheme,
        scheme_options=options,
        rules=[f"lm_head={scheme}"],
        skip=["pos"],
        progress=False,
    )
    got = mq.load(str(out), dequantize=True)

    qmodel, mreport = Engine().quantize(demo_model(), scheme=scheme, scheme_options=options)
    saved = tmp_path / "module.safetensors"
    Engine().save(qmodel, str(saved))
    expected = Engine().load(str(saved), dequantize=True)

    linear = {n for n, m in demo_model().named_modules() if isinstance(m, torch.nn.Linear)}
    assert {layer.name for layer in report.layers} == {f"{n}.weight" for n in linear}
    assert set(got) == set(expected) == set(demo_sd)
    differ = [
        n for n in got if got[n].dtype != expected[n].dtype or not torch.equal(got[n], expected[n])
    ]
    assert differ == []
    for n, t in demo_sd.items():
        if n.rpartition(".")[0] not in linear or n.endswith(".bias"):
            assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    # the same numbers from the single per-tensor code path
    cfg = engine.configure(scheme=scheme, scheme_options=options)
    for name in ("blocks.0.attn.q_proj.weight", "blocks.3.mlp.fc2.weight", "lm_head.weight"):
        qt = engine.quantize_weight(
            demo_sd[name], scheme, cfg.observer, 0, cfg.scheme_config, cfg.observer_config
        )
        assert torch.equal(got[name], engine.schemes.get(scheme).dequantize(qt)), name
    sq = {layer.name: layer.sqnr_db for layer in report.layers}
    msq = {layer.name: layer.sqnr_db for layer in mreport.layers}
    print(
        f"{scheme} {options}: min SQNR checkpoint {min(sq.values()):.2f} dB, "
        f"module {min(msq.values()):.2f} dB"
    )
    assert sq == msq


def test_round_trip_sharded_folder_equals_single_file(engine, tmp_path, demo_sd):
    opts = {"group_size": 32}
    src = tmp_path / "src"
    write_folder(src, demo_sd, n_shards=3)
    single = tmp_path / "demo.safetensors"
    write_safetensors(str(single), demo_sd, {"format": "pt"})
    kw = {"scheme": "int4-group", "scheme_options": opts, "progress": False}
    engine.quantize_checkpoint(str(src), str(tmp_path / "out"), **kw)
    Engine().quantize_checkpoint(str(single), str(tmp_path / "one.safetensors"), **kw)
    assert_index_consistent(tmp_path / "out")
    got = load_folder(tmp_path / "out")
    ref = mq.load(str(tmp_path / "one.safetensors"), dequantize=True)
    assert set(got) == set(ref) == set(demo_sd)
    assert [n for n in got if not torch.equal(got[n], ref[n])] == []
    # default selection: lm_head (output head) and embeddings stay in float, bit-identical
    for n in ("lm_head.weight", "embed.weight", "ln_f.weight", "blocks.2.mlp.fc1.bias"):
        assert torch.equal(got[n], demo_sd[n]), n
    w = demo_sd["blocks.1.attn.v_proj.weight"]
    db = mq.sqnr_db(w, got["blocks.1.attn.v_proj.weight"])
    print(f"v_proj SQNR {db:.2f} dB")
    assert 20 < db < 40


def test_nan_or_inf_weight(engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    nan, inf = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    nan[3, 4] = float("nan")
    inf[0, 0], inf[5, 5] = float("inf"), float("-inf")
    good = torch.randn(16, 16, generator=g)
    src = tmp_path / "in.safetensors"
    write_safetensors(str(src), {"good.weight": good, "a.nan.weight": nan, "b.inf.weight": inf}, {})
    out = tmp_path / "out.safetensors"
    with pytest.raises(UsageError) as info:
        engine.quantize_checkpoint(str(src), str(out), progress=False)
    msg = one_line(info.value)
    assert "'a.nan.weight' contains 1 NaN/Inf" in msg and "--allow-nonfinite" in msg, msg
    # good.weight was finished first: kept for --resume, and the message says so
    assert "out.safetensors.monoquant-partial: add --resume to reuse them" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.safetensors", "out.safetensors.monoquant-partial"
    ]  # fmt: skip
    with pytest.raises(UsageError, match="'b.inf.weight' contains 2 NaN/Inf"):
        engine.quantize_checkpoint(str(src), str(out), skip=["a.nan"], progress=False, resume=True)
    assert not out.exists()
    report = engine.quantize_checkpoint(
        str(src), str(out), allow_nonfinite=True, progress=False, resume=True
    )
    assert report.extra["journal"] == [
        "resumed: 1 tensor(s) reused from the unfinished run, 2 computed"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]
    assert [layer.name for layer in report.layers] == ["good.weight"]
    skipped = dict(report.skipped)
    print(skipped)
    assert "1 NaN/Inf" in skipped["a.nan.weight"] and "2 NaN/Inf" in skipped["b.inf.weight"]
    got = mq.load(str(out), dequantize=True)
    assert torch.equal(got["a.nan.weight"].nan_to_num(), nan.nan_to_num())
    assert got["a.nan.weight"].isnan().sum() == 1
    assert torch.equal(got["b.inf.weight"], inf)
    assert set(stored(out)) == {
        "good.weight.qdata",
        "good.weight.scale",
        "a.nan.weight",
        "b.inf.weight",
    }


@pytest.mark.parametrize(
    "scheme, options",
    [
        ("int8", {}),
        ("int8", {"symmetric": False}),
        ("int4-group", {}),
        ("int4-group", {"group_size": 32, "zero": "int", "method": "rtn"}),
    ],
)
def test_all_zero_rows_round_trip_to_zeros(engine, tmp_path, scheme, options):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    w[2] = 0
    w[9, :128] = 0
    src = tmp_path / "z.safetensors"
    write_safetensors(str(src), {"a.weight": w, "zero.weight": torch.zeros(8, 256)}, {})
    out = tmp_path / "q.safetensors"
    report = engine.quantize_checkpoint(
        str(src), str(out), scheme=scheme, scheme_options=options, progress=False
    )
    got = mq.load(str(out), dequantize=True)
    assert torch.equal(got["zero.weight"], torch.zeros(8, 256))
    assert torch.equal(got["a.weight"][2], torch.zeros(256))
    assert torch.equal(got["a.weight"][9, :128], torch.zeros(128))
    assert torch.isfinite(got["a.weight"]).all()
    sq = {layer.name: layer.sqnr_db for layer in report.layers}
    print(f"{scheme} {options}: {sq}")
    assert sq["zero.weight"] == float("inf") and sq["a.weight"] > 15


def test_output_paths_are_checked(engine, tmp_path, small_file):
    src, sd = small_file
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(src), overwrite=True),
        tmp_path / "never",
        UsageError,
        "is the input",
    )
    assert stored(src).keys() == sd.keys()
    folder = tmp_path / "folder"
    write_folder(folder, sd, n_shards=2, extra_files=False)
    before = tree(folder)
    for dst in (folder / "quantized", folder):
        with pytest.raises(UsageError) as e:
            engine.quantize_checkpoint(str(folder), str(dst), overwrite=True)
        one_line(e.value)
        assert tree(folder) == before
    with pytest.raises(UsageError, match="contain one another"):
        engine.quantize_checkpoint(str(folder), str(tmp_path), overwrite=True)
    missing_parent = tmp_path / "no" / "such" / "out.safetensors"
    with pytest.raises(UsageError, match="does not exist"):
        engine.quantize_checkpoint(str(src), str(missing_parent))
    assert not (tmp_path / "no").exists()


def test_existing_output_needs_overwrite(engine, tmp_path, small_file):
    src, sd = small_file
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError) as e:
        engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert "--overwrite" in one_line(e.value)
    assert out.read_bytes() == b"keep me"
    engine.quantize_checkpoint(str(src), str(out), overwrite=True, progress=False)
    assert set(mq.load(str(out), dequantize=True)) == set(sd)
    # folders: an existing output folder is replaced as a whole, never merged into
    folder, dst = tmp_path / "src", tmp_path / "dst"
    write_folder(folder, sd, n_shards=2, extra_files=False)
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists"):
        engine.quantize_checkpoint(str(folder), str(dst), progress=False)
    assert tree(dst) == {"stale.txt"}
    engine.quantize_checkpoint(str(folder), str(dst), overwrite=True, progress=False)
    assert tree(dst) == tree(folder)
    assert sorted(os.listdir(tmp_path)) == ["dst", "in", "out.safetensors", "src"]


def test_already_quantized_input_is_refused(engine, tmp_path, small_file):
    src, _ = small_file
    q = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(q), progress=False)
    out = tmp_path / "qq.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(q), str(out)),
        out,
        UsageError,
        "already quantized",
        "dequantize",
    )


def test_activation_or_unknown_scheme_fails_before_reading(engine, tmp_path, small_file):
    src, _ = small_file
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), scheme="int3"),
        out,
        UsageError,
        "int3",
    )
    expect_failure(
        lambda: engine.quantize_checkpoint(
            str(src), str(out), scheme="int4-group", scheme_options={"group_size": 48}
        ),
        out,
        (UsageError, CapabilityError),
        "48",
    )


def test_unselected_tensors_are_copied_without_loading(engine, tmp_path, monkeypatch):
    src = tmp_path / "src"
    sd = small_state()
    write_folder(src, sd, n_shards=3, extra_files=False)
    loaded: list[str] = []
    real = SafetensorsReader.get

    def recording_get(self, name):
        loaded.append(name)
        return real(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", recording_get)
    report = engine.quantize_checkpoint(str(src), str(tmp_path / "out"), progress=False)
    print(f"loaded {len(loaded)} of {len(sd)} tensors")
    assert sorted(loaded) == sorted(SMALL_SELECTED)
    assert {n for n, _ in report.skipped}.isdisjoint(loaded)
    monkeypatch.setattr(SafetensorsReader, "get", real)
    got = load_folder(tmp_path / "out")
    for n, t in sd.items():
        if n not in SMALL_SELECTED:
            assert torch.equal(got[n], t), n


def test_report_hook_failure_commits_nothing_and_keeps_the_work_for_resume(tmp_path):
    from monoquant_core import Engine, PluginError, hookimpl

    class Boom:
        @hookimpl
        def monoquant_report(self, report, run):
            raise RuntimeError("report sink down")

    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), {"a.weight": torch.randn(32, 256)}, {})
    out = tmp_path / "q.safetensors"
    with pytest.raises(PluginError, match="report sink down") as info:
        Engine(plugins=[Boom()]).quantize_checkpoint(str(src), str(out), progress=False)
    assert not out.exists()
    partial = "q.safetensors.monoquant-partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", partial]
    assert f"{partial}: add --resume to reuse them" in str(info.value)
    report = Engine().quantize_checkpoint(str(src), str(out), progress=False, resume=True)
    assert report.extra["journal"] == [
        "resumed: 1 tensor(s) reused from the unfinished run, 0 computed"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "q.safetensors"]


@pytest.mark.parametrize(
    "scheme, options",
    [("int8", {"symmetric": False}), ("int4-group", {}), ("int4-group", {"method": "rtn"})],
)
def test_weights_at_float32_limits_are_written_with_finite_scales(
    engine, tmp_path, scheme, options
):
    """The run succeeded, the report showed nan and the file held NaN/Inf scales."""
    w = extreme_weight()
    src, out = tmp_path / "x.safetensors", tmp_path / "q.safetensors"
    write_safetensors(str(src), {"a.weight": w}, {})
    report = engine.quantize_checkpoint(
        str(src), str(out), scheme=scheme, scheme_options=options, progress=False
    )
    assert all(math.isfinite(v) for v in (report.layers[0].sqnr_db, report.layers[0].rel_err))
    assert all(torch.isfinite(t.float()).all() for t in stored(out).values())
    assert torch.isfinite(mq.load(str(out), dequantize=True)["a.weight"]).all()


def test_a_weight_that_cannot_be_stored_is_kept_in_float_with_the_reason(tmp_path):
    """As in module mode: the layer stays float, the report says why, the rest is quantized."""
    src, out = tmp_path / "x.safetensors", tmp_path / "q.safetensors"
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    write_safetensors(str(src), {"a.weight": a, "b.weight": b}, {})
    report = Engine(plugins=[BrokenScalePlugin()]).quantize_checkpoint(
        str(src), str(out), rules=["a=broken-int8"], progress=False
    )
    assert [layer.name for layer in report.layers] == ["b.weight"]
    reason = dict(report.skipped)["a.weight"]
    assert reason.startswith("kept in float: a.weight: broken-int8 gives 1 of 4 group(s) a scale")
    got = mq.load(str(out), dequantize=True)
    assert torch.equal(got["a.weight"], a) and mq.sqnr_db(b, got["b.weight"]) > 30


def test_a_run_whose_every_weight_is_refused_is_an_error_and_writes_nothing(tmp_path):
    src, out = tmp_path / "x.safetensors", tmp_path / "q.safetensors"
    write_safetensors(str(src), {"a.weight": torch.randn(4, 8)}, {})
    expect_failure(
        lambda: Engine(plugins=[BrokenScalePlugin()]).quantize_checkpoint(
            str(src), str(out), scheme="broken-int8", progress=False
        ),
        out,
        UsageError,
        "nothing to quantize",
        "a.weight",
    )


def test_a_run_that_would_quantize_nothing_is_an_error_and_writes_nothing(engine, tmp_path):
    """It exited 0 and wrote an unchanged copy."""
    src, out = tmp_path / "x.safetensors", tmp_path / "q.safetensors"
    write_safetensors(
        str(src),
        {
            "a.fc.weight": torch.randn(8, 64),
            "a.fc.bias": torch.randn(8),
            "norm.weight": torch.ones(4, 64),
        },
        {},
    )
    msg = expect_failure(
        lambda: engine.quantize_checkpoint(
            str(src), str(out), scheme="int4-group", only=["a.fc"], progress=False
        ),
        out,
        UsageError,
    )
    assert msg.startswith(
        "problem: nothing to quantize: every one of the tensors your patterns select is kept in "
        "float: 'a.fc.weight' (int4-group: only 64 inputs per row"
    ), msg
    assert "'a.fc.bias' (1-D or empty tensor: nothing to quantize (kept in float))" in msg
    msg = expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), skip=["a.*"], progress=False),
        out,
        UsageError,
        "the checkpoint has no tensor that can be quantized: ",
        "'norm.weight' (normalisation layer",
    )
    plan = engine.plan_checkpoint(str(src), skip=["a.*"])  # the plan verb still plans
    assert not plan.selected and len(plan) == 3


def test_reads_from_several_threads_are_exact(tmp_path):
    """Positional reads: the prefetch thread and the main thread never share a file offset."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    sd = {f"t{i}": torch.randn(257, 63 + i) for i in range(12)}
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, sd, {"format": "pt"})
    with SafetensorsReader(path) as r:

        def read(name):
            buf = io.BytesIO()
            r.copy_to(name, buf)
            return r.get(name), buf.getvalue()

        with ThreadPoolExecutor(4) as pool:
            names = list(sd) * 5
            for name, (t, raw) in zip(names, pool.map(read, names), strict=True):
                assert torch.equal(t, sd[name])
                assert raw == bytes(t.reshape(-1).view(torch.uint8).tolist())


def test_prefetching_the_next_tensor_changes_no_byte(engine, tmp_path, monkeypatch):
    import threading

    from monoquant_core import checkpoint_tensors

    src = tmp_path / "src"
    write_folder(src, small_state(), n_shards=2, extra_files=False)
    threads: list[str] = []
    real = SafetensorsReader.get

    def recording_get(self, name):
        threads.append(threading.current_thread().name)
        return real(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", recording_get)
    outs = []
    for on in (True, False):
        threads.clear()
        monkeypatch.setattr(checkpoint_tensors, "_PREFETCH", on)  # forced (the env switch)
        out = tmp_path / f"out-{on}"
        engine.quantize_checkpoint(
            str(src), str(out), scheme="int4-group", scheme_options={"group_size": 32},
            progress=False,
        )  # fmt: skip
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
        read_ahead = sum(t.startswith("monoquant-read") for t in threads)
        assert (read_ahead > 0) is on, threads  # the next tensor is read in the worker thread
    assert outs[0] == outs[1]


def test_read_ahead_only_where_a_core_is_free(monkeypatch):
    """One process always reads ahead; several ranks on one machine only when their threads
    leave a core free; MONOQUANT_CHECKPOINT_PREFETCH forces it either way."""
    from monoquant_core import checkpoint_tensors as ct

    monkeypatch.setattr(ct, "_PREFETCH", None)
    monkeypatch.setattr(ct.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert ct.read_ahead(1, 4) and ct.read_ahead(1, 1)
    assert ct.read_ahead(2, 1) and ct.read_ahead(3, 1)  # 2-3 one-thread ranks on 4 cores
    assert not ct.read_ahead(4, 1) and not ct.read_ahead(2, 2)  # every core quantizes
    monkeypatch.setattr(ct, "_PREFETCH", True)
    assert ct.read_ahead(4, 1)
    monkeypatch.setattr(ct, "_PREFETCH", False)
    assert not ct.read_ahead(1, 1)
