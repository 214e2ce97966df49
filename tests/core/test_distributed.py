"""Distributed checkpoint mode: real ranks (gloo, on this machine), byte-identical outputs,
a failing rank, idle ranks, the cost-balanced split; torchrun itself in the slow set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monoquant_plugins.safetensors_format import write_safetensors

from monoquant_core import Engine, UsageError
from monoquant_core.distributed import Group, assign, current_group, start_method
from monoquant_core.journal import work_folder
from tests.helpers import cli_ok, cli_one_line_error, one_line, write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def folder_bytes(root) -> dict[str, bytes]:
    """Every file under ``root`` by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def mixed_folder(path) -> None:
    """A sharded folder with tensors of unequal sizes (so the split is uneven)."""
    g = torch.Generator().manual_seed(1)
    sd = {f"blocks.{i}.attn.weight": torch.randn(32 * (i + 1), 256, generator=g) for i in range(5)}
    sd.update({f"blocks.{i}.mlp.weight": torch.randn(96, 128, generator=g) for i in range(4)})
    sd["head.weight"] = torch.randn(64, 256, generator=g)
    sd["norm.weight"] = torch.ones(256)
    write_folder(path, sd, n_shards=3)


@given(st.lists(st.floats(0, 1e6), max_size=40), st.integers(1, 6))
@settings(max_examples=60, deadline=None)
def test_the_split_balances_cost_and_is_deterministic(costs, world):
    owner = assign(costs, world)
    assert owner == assign(costs, world) and all(0 <= r < world for r in owner)
    load = [sum(c for c, r in zip(costs, owner, strict=True) if r == k) for k in range(world)]
    # longest-first to the least loaded: no rank exceeds another by more than one item
    assert max(load) - min(load) <= max(costs, default=0) + 1e-6


def test_the_split_gives_the_biggest_tensors_to_different_ranks():
    assert assign([1, 8, 2, 7], 2) == [0, 0, 1, 1]  # 8 | 7, then 2 to the 7, 1 to the 8
    assert assign([5, 5, 5], 4) == [0, 1, 2]  # rank 3 idles


def test_a_single_process_is_a_group_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    g = current_group()
    assert (g.rank, g.world, g.is_root) == (0, 1, True)
    assert g.gather("x") == ["x"] and g.broadcast(3) == 3

    def boom():
        raise UsageError("bad input", "fix it")

    with pytest.raises(UsageError, match="bad input"):  # unchanged on one process
        g.step("testing", boom)


def test_torchrun_variables_without_a_master_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError) as e:
        current_group()
    assert "WORLD_SIZE=2 is set but MASTER_ADDR is not" in one_line(e.value)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_two_workers_write_the_same_bytes_as_one_process_cli(cli, tmp_path, monkeypatch, start):
    monkeypatch.setenv("MONOQUANT_WORKER_START", start)
    src = tmp_path / "src"
    mixed_folder(src)
    rules = ["--rule", "blocks.1.*=int8", "--rule", "head=fp16", "--rule", "blocks.3.mlp=skip"]
    args = ["quantize", str(src), "--scheme", "int4-group", "--scheme-opt", "group_size=64"]
    cli_ok(cli(*args, "-o", tmp_path / "one", "-q", *rules))
    out = cli_ok(cli(*args, "-o", tmp_path / "two", "--workers", "2", *rules))
    assert "saved to" in out and out.count("weights quantized") == 1
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    assert not os.path.exists(work_folder(str(tmp_path / "two")))


def test_a_failing_rank_fails_the_run_naming_rank_and_tensor_and_writes_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(256, 64, generator=g), "b.weight": torch.randn(128, 64)}
    sd["b.weight"][5, 5] = float("nan")  # the second biggest: rank 1's
    src, out = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    write_safetensors(str(src), sd, {})
    with pytest.raises(UsageError) as e:
        Engine().quantize_checkpoint(str(src), str(out), workers=2, progress=False)
    msg = one_line(e.value)
    assert msg.startswith("problem: rank 1 of 2 (host "), msg
    assert "failed while quantizing: tensor 'b.weight' contains 1 NaN/Inf value(s)" in msg, msg
    assert not out.exists()
    # rank 0's finished tensor is kept for --resume, and the message says where
    assert f"{work_folder(str(out))}: add --resume to reuse them" in msg
    sd["b.weight"][5, 5] = 0.0
    write_safetensors(str(src), sd, {})
    # resumed on one process: the journal does not depend on the number of ranks
    report = Engine().quantize_checkpoint(str(src), str(out), progress=False, resume=True)
    assert report.extra["journal"] == [
        "resumed: 1 tensor(s) reused from the unfinished run, 1 computed"
    ]
    ref = tmp_path / "ref.safetensors"
    Engine().quantize_checkpoint(str(src), str(ref), progress=False)
    assert out.read_bytes() == ref.read_bytes()


def test_ranks_are_forked_only_where_a_forked_child_is_safe(monkeypatch):
    import threading

    monkeypatch.delenv("MONOQUANT_WORKER_START", raising=False)
    assert start_method(2) == "spawn"  # several threads per rank: OpenMP after fork hangs
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        assert start_method(1) == "fork"
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert start_method(1) == "spawn"  # another Python thread could hold a lock
    finally:
        stop.set()
        t.join()
    monkeypatch.setenv("MONOQUANT_WORKER_START", "spawn")
    assert start_method(1) == "spawn"
    monkeypatch.setenv("MONOQUANT_WORKER_START", "thread")
    with pytest.raises(UsageError, match="MONOQUANT_WORKER_START='thread'"):
        start_method(1)


def test_workers_are_refused_in_module_mode_and_under_torchrun(cli, engine, monkeypatch):
    cli_one_line_error(cli("quantize", "--demo", "--workers", "2"), "--workers is for checkpoint")
    cli_one_line_error(cli("quantize", "--demo", "--resume"), "--resume is for checkpoint")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="inside a distributed run"):
        engine.quantize_checkpoint("x.safetensors", "y.safetensors", workers=2)


def test_plugins_given_as_objects_must_travel_to_the_workers(tmp_path):
    class Local:  # defined in a function: cannot be pickled
        monoquant_plugin_name = "local"

    with pytest.raises(UsageError, match="plugin 'local' cannot be sent to the worker"):
        Engine(plugins=[Local()]).quantize_checkpoint("a", "b", workers=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme, options, world",
    [("int8", {}, 2), ("int4-group", {}, 2), ("int4-group", {"method": "rtn"}, 4)],
)
def test_workers_write_the_same_bytes_for_each_scheme(tmp_path, scheme, options, world):
    src = tmp_path / "src"
    mixed_folder(src)
    outs = []
    for n in (1, world):
        out = tmp_path / f"out{n}"
        Engine().quantize_checkpoint(
            str(src), str(out), scheme=scheme, scheme_options=options, workers=n, progress=False
        )
        outs.append(folder_bytes(out))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_more_ranks_than_tensors_idle_and_torchrun_gives_the_same_bytes(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(64, 64, generator=g), "b.weight": torch.randn(32, 64)}
    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), sd, {})
    ref = tmp_path / "ref.safetensors"
    Engine().quantize_checkpoint(str(src), str(ref), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tr.safetensors"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
         "-m", "monoquant_core", "quantize", str(src), "-o", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == ref.read_bytes()
    assert res.stdout.count("saved to") == 1  # only rank 0 prints the report


def test_group_step_names_the_failing_rank():
    """The message every rank raises when one failed (the gathered statuses)."""

    class Two(Group):
        def gather(self, obj):
            return [None, ("tensor 'x' is bad", "fix x", "node-7")]

    g = Two(rank=0, world=2)
    with pytest.raises(UsageError) as e:
        g.step("quantizing", lambda: 1)
    assert one_line(e.value) == (
        "problem: rank 1 of 2 (host node-7) failed while quantizing: tensor 'x' is bad fix: fix x"
    )
    assert e.value.echo is True
    g1 = Two(rank=1, world=2)
    with pytest.raises(UsageError) as e:
        g1.step("quantizing", lambda: 1)
    assert e.value.echo is False  # the CLI of rank 1 stays silent: rank 0 says it


def test_distributed_false_runs_alone_under_torchrun_variables(tmp_path, monkeypatch):
    """Rank 0 of someone else's torchrun job quantizing a checkpoint by itself."""
    src, out = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    write_safetensors(str(src), {"a.weight": torch.randn(16, 64)}, {})
    for var, value in (("WORLD_SIZE", "8"), ("RANK", "0"), ("MASTER_ADDR", "10.9.9.9")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("MASTER_PORT", "1")
    report = Engine().quantize_checkpoint(str(src), str(out), progress=False, distributed=False)
    assert [layer.name for layer in report.layers] == ["a.weight"] and out.exists()
