"""sources.py: reading checkpoint inputs (a file, a sharded folder with or without its index,
a .pt file): every bad input is a one-line error, and pickles run no code unless trusted."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors

import monoquant_core as mq
from monoquant_core import FormatError, MonoQuantError, UsageError, atomic
from tests.helpers import (
    INDEX,
    SMALL_SELECTED,
    assert_quantized_copy,
    evil_pickle,
    expect_failure,
    raw_safetensors,
    returns_within,
    small_state,
    write_folder,
)


def test_pt_state_dict_input(engine, tmp_path):
    sd = small_state()
    sd["model.layers.0.mlp.up_proj.bias"] = torch.randn(128)[::2]  # a strided view
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.randn(32, 32).t() * 0.02  # not contiguous
    for suffix in (".pt", ".bin"):
        src = tmp_path / f"model{suffix}"
        torch.save(sd, src)
        out = tmp_path / f"q{suffix}.safetensors"
        report = engine.quantize_checkpoint(str(src), str(out), progress=False)
        assert {layer.name for layer in report.layers} == SMALL_SELECTED
        assert_quantized_copy(out, sd, SMALL_SELECTED)


def test_pickled_full_model_needs_trust_pickle(engine, tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    src = tmp_path / "full.pt"
    torch.save(model, src)
    out = tmp_path / "q.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), progress=False),
        out,
        UsageError,
        "--trust-pickle",
    )
    report = engine.quantize_checkpoint(str(src), str(out), trust_pickle=True, progress=False)
    assert {layer.name for layer in report.layers} == {"0.weight", "2.weight"}
    restored = mq.load(
        str(out),
        torch.nn.Sequential(*[torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)]),
    )
    x = torch.randn(4, 32)
    db = mq.sqnr_db(model(x), restored(x))
    print(f"pickled model output SQNR {db:.1f} dB")
    assert db > 30


def test_missing_input_and_folder_without_safetensors(engine, tmp_path):
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(tmp_path / "nope.safetensors"), str(out)),
        out,
        UsageError,
        "does not exist",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2, 2)}, empty / "pytorch_model.bin")
    expect_failure(
        lambda: engine.quantize_checkpoint(str(empty), str(tmp_path / "o")),
        tmp_path / "o",
        UsageError,
        "no .safetensors files",
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 a zip file")
    expect_failure(lambda: engine.quantize_checkpoint(str(junk), str(out)), out, FormatError)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: "{not json", "not valid JSON"),
        (
            lambda d: json.dumps(
                {"weight_map": {**d["weight_map"], "x.weight": "gone.safetensors"}}
            ),
            "gone.safetensors",
        ),
        (
            lambda d: json.dumps(
                {
                    "weight_map": {
                        **d["weight_map"],
                        "lm_head.weight": "model-00001-of-00003.safetensors",
                    }
                }
            ),
            "'lm_head.weight'",
        ),
        (lambda d: json.dumps({"weight_map": ["a", "b"]}), "weight_map"),
        (lambda d: json.dumps({"weight_map": {"x": "../model.safetensors"}}), "not a file name"),
    ],
    ids=["invalid-json", "missing-shard", "wrong-shard", "weight-map-list", "path-in-shard"],
)
def test_broken_index(engine, tmp_path, edit, needle):
    src = tmp_path / "src"
    write_folder(src, small_state(), n_shards=3, extra_files=False)
    doc = json.loads((src / INDEX).read_text())
    (src / INDEX).write_text(edit(doc))
    out = tmp_path / "out"
    expect_failure(lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, needle)


def test_index_metadata_that_is_not_an_object_is_a_format_error(engine, tmp_path):
    """The index's "metadata" is merged with ``{**metadata}``: a string there must be refused
    as a FormatError, not crash with TypeError after every shard was written."""
    src = tmp_path / "src"
    write_folder(src, small_state(), n_shards=2, extra_files=False)
    doc = json.loads((src / INDEX).read_text())
    doc["metadata"] = "total_size=1"
    (src / INDEX).write_text(json.dumps(doc))
    out = tmp_path / "out"
    expect_failure(lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, INDEX)


def test_same_tensor_in_two_shards_is_refused(engine, tmp_path):
    """A name stored in two shards makes the output index ambiguous (weight_map can map it to
    one shard only): the input must be refused, with or without an index."""
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    a = {"x.weight": torch.randn(16, 16, generator=g), "y.weight": torch.randn(16, 16, generator=g)}
    b = {"x.weight": torch.randn(16, 16, generator=g), "z.weight": torch.randn(16, 16, generator=g)}
    write_safetensors(str(src / "a.safetensors"), a, {})
    write_safetensors(str(src / "b.safetensors"), b, {})
    out = tmp_path / "out"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, "x.weight"
    )
    wm = {"x.weight": "a.safetensors", "y.weight": "a.safetensors", "z.weight": "b.safetensors"}
    (src / INDEX).write_text(json.dumps({"weight_map": wm}))
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, "x.weight"
    )


@pytest.mark.parametrize("where", ["file", "shard"])
def test_truncated_input(engine, tmp_path, small_file, where):
    src, sd = small_file
    data = src.read_bytes()
    if where == "file":
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(data[: len(data) - 100])
        out = tmp_path / "out.safetensors"
    else:
        bad = tmp_path / "folder"
        write_folder(bad, sd, n_shards=3, extra_files=False)
        shard = bad / "model-00002-of-00003.safetensors"
        shard.write_bytes(shard.read_bytes()[:-7])
        out = tmp_path / "out"
    expect_failure(lambda: engine.quantize_checkpoint(str(bad), str(out)), out, FormatError)


def _lying_headers():
    ok = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    return {
        "shape-vs-offsets": ({"a.weight": {**ok, "shape": [4, 5]}}, 64, "needs 80 bytes"),
        "offsets-past-end": (
            {"a.weight": {**ok, "shape": [8, 4], "data_offsets": [0, 128]}},
            64,
            "describes 128 bytes",
        ),
        "overlap": ({"a.weight": ok, "b.weight": ok}, 64, "expected 64"),
        "gap": ({"a.weight": {**ok, "data_offsets": [8, 72]}}, 72, "starts at byte 8"),
        "negative": ({"a.weight": {**ok, "data_offsets": [-64, 0]}}, 64, "invalid header entry"),
        "unknown-dtype": ({"a.weight": {**ok, "dtype": "F7"}}, 64, "unknown dtype"),
        "metadata-not-strings": ({"__metadata__": {"a": 1}, "a.weight": ok}, 64, "__metadata__"),
    }


@pytest.mark.parametrize("case", list(_lying_headers()))
def test_header_that_lies_about_sizes(engine, tmp_path, case):
    header, nbytes, needle = _lying_headers()[case]
    bad = tmp_path / "lie.safetensors"
    raw_safetensors(bad, header, bytes(nbytes))
    out = tmp_path / "out.safetensors"
    expect_failure(lambda: engine.quantize_checkpoint(str(bad), str(out)), out, FormatError, needle)
    with pytest.raises(FormatError):
        engine.inspect(str(bad))


def test_malicious_pickle_does_not_run(engine, tmp_path):
    marker = tmp_path / "pwned"
    src = evil_pickle(tmp_path / "evil.pt", marker)
    out = tmp_path / "out.safetensors"
    msg = expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, UsageError, "--trust-pickle"
    )
    print(msg)
    with pytest.raises(UsageError, match="--trust-pickle"):
        engine.plan_checkpoint(str(src))
    with pytest.raises(UsageError, match="--trust-pickle"):
        engine.inspect(str(src))
    assert not marker.exists()


GARBAGE_PT = {
    "text": b"this is not a pickle \x00\x01\x02" * 4,  # weights_only unpickler: IndexError
    "bad-memo": b"\x80\x02" + b"junk" * 10,  # weights_only unpickler: KeyError
    "random": bytes(random.Random(0).randrange(256) for _ in range(200)),
    "empty": b"",
    "zip-header-only": b"PK\x03\x04" + bytes(100),
}


@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust-pickle"])
@pytest.mark.parametrize("case", list(GARBAGE_PT))
def test_garbage_pt_file_is_a_format_error(engine, tmp_path, case, trust):
    """Bytes that are not a torch.save file: a one-line MonoQuantError (a FormatError once
    trusted unpickling failed too), never the unpickler's IndexError / KeyError /
    UnpicklingError."""
    src = tmp_path / "garbage.pt"
    src.write_bytes(GARBAGE_PT[case])
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), trust_pickle=trust),
        out,
        FormatError if trust else MonoQuantError,
    )


def test_pt_with_non_string_keys_is_refused(engine, tmp_path):
    src = tmp_path / "ints.pt"
    torch.save({0: torch.randn(8, 8), 1: torch.randn(8)}, src)
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, (FormatError, UsageError)
    )


@pytest.mark.parametrize(
    "state, needle",
    [
        (
            {"a.weight": torch.randn(8, 8), "extra": {"b.weight": torch.randn(8, 8)}},
            "tensor 'extra.b.weight' sits inside 'extra'",
        ),
        (
            {"a.weight": torch.randn(8, 8), "buffers": [torch.ones(2), {"c": torch.ones(2)}]},
            "tensor 'buffers[0]' sits inside 'buffers' (2 nested tensors)",
        ),
        (
            {"model": {"a.weight": torch.randn(8, 8)}, "epoch": 3},
            "checkpoint['model']",
        ),
    ],
    ids=["dict", "list", "training-checkpoint"],
)
def test_nested_tensors_in_a_pt_file_are_named_not_dropped(engine, tmp_path, state, needle):
    """A tensor inside a dict was left out of the output without a word."""
    src = tmp_path / "nested.pt"
    torch.save(state, src)
    out = tmp_path / "out.safetensors"
    msg = expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), progress=False),
        out,
        UsageError,
        needle,
    )
    assert "flat" in msg
    with pytest.raises(UsageError, match="sits inside"):
        engine.inspect(str(src))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_tensor_in_a_pt_file_is_named(engine, tmp_path, layout):
    """Checkpoint ``quantize`` raised torch's NotImplementedError (a traceback)."""
    w = torch.randn(8, 8)
    sparse = w.to_sparse() if layout == "coo" else w.to_sparse_csr()
    src = tmp_path / "sparse.pt"
    torch.save({"a.weight": torch.randn(8, 8), "s.weight": sparse}, src)
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), progress=False),
        out,
        UsageError,
        "'s.weight' is a torch.sparse_",
        "to_dense()",
    )


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_a_fifo_input_is_refused_without_blocking(engine, tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    out = tmp_path / "out.safetensors"
    for call in (
        lambda: engine.quantize_checkpoint(str(fifo), str(out), progress=False),
        lambda: engine.inspect(str(fifo)),
        lambda: mq.load(str(fifo), dequantize=True),
    ):
        with returns_within(5), pytest.raises(UsageError, match="is a FIFO, not a regular file"):
            call()
    assert not out.exists()


def test_a_folder_of_pytorch_files_says_what_to_pass(engine, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2, 2)}, one / "pytorch_model.bin")
    out = tmp_path / "o"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(one), str(out)),
        out,
        UsageError,
        "only the PyTorch state_dict pytorch_model.bin",
        f"pass that file itself (monoquant quantize {one / 'pytorch_model.bin'} -o",
    )
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for i in (1, 2):
        torch.save({f"w{i}": torch.ones(2, 2)}, sharded / f"pytorch_model-0000{i}-of-00002.bin")
    expect_failure(
        lambda: engine.quantize_checkpoint(str(sharded), str(out)),
        out,
        UsageError,
        "only the PyTorch files pytorch_model-00001-of-00002.bin, pytorch_model-00002",
        "convert the checkpoint to safetensors",
    )


def test_hidden_files_are_copied_but_not_git_caches_or_leftovers(engine, tmp_path):
    """Hidden files (``.gitattributes``) were not copied; a repository, a download cache, a
    FIFO and the temporary leftovers of a killed write must not be."""
    src = tmp_path / "src"
    write_folder(src, small_state(), n_shards=2)
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (src / ".hidden-dir").mkdir()
    (src / ".hidden-dir" / "x").write_text("x")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (src / ".cache" / "huggingface").mkdir(parents=True)
    os.mkfifo(src / "pipe")
    leftover = f".model.safetensors.{atomic.temp_tag()}-0a1b2c3d"
    (src / leftover).write_bytes(b"partial")
    out = tmp_path / "out"
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert (out / ".gitattributes").read_text() == "*.safetensors filter=lfs\n"
    assert (out / ".hidden-dir" / "x").read_text() == "x"
    for name in (".git", ".cache", "pipe", leftover, "pytorch_model.bin"):
        assert not (out / name).exists(), name
    assert sorted(report.extra["not_copied"]) == [".cache", ".git", "pipe", "pytorch_model.bin"]


# --------------------------------------------------------------------------- load(folder)


def test_load_takes_the_output_folder_of_checkpoint_mode(engine, tmp_path):
    """load() refused a folder, so a sharded result had no way back into the model."""
    from monoquant_core.demo import demo_inputs, demo_model

    sd = {k: v.contiguous() for k, v in demo_model().state_dict().items()}
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, sd, n_shards=3, extra_files=False)
    single = tmp_path / "one.safetensors"
    write_safetensors(str(single), sd, {})
    engine.quantize_checkpoint(str(src), str(out), progress=False)
    engine.quantize_checkpoint(str(single), str(tmp_path / "one-q.safetensors"), progress=False)
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) == 3
    x = demo_inputs()
    from_folder = mq.load(str(out), demo_model(), engine=engine)
    from_file = mq.load(str(tmp_path / "one-q.safetensors"), demo_model(), engine=engine)
    with torch.no_grad():
        assert torch.equal(from_folder(x), from_file(x))
    floats = mq.load(str(out), dequantize=True, engine=engine)
    assert floats.keys() == sd.keys()
    demo_model().load_state_dict(floats, strict=True)
    os.remove(out / INDEX)  # without the index: every *.safetensors file is a shard
    assert mq.load(str(out), dequantize=True, engine=engine).keys() == sd.keys()


def test_a_folder_with_one_tensor_in_two_shards_is_refused(engine, tmp_path):
    write_safetensors(str(tmp_path / "a.safetensors"), {"x.weight": torch.ones(2, 2)}, {})
    write_safetensors(str(tmp_path / "b.safetensors"), {"x.weight": torch.ones(2, 2)}, {})
    with pytest.raises(FormatError, match="'x.weight' is in both a.safetensors and b.safetensors"):
        mq.load(str(tmp_path), dequantize=True, engine=engine)
