"""cli/inputs.py: ``--model`` factories, ``--weights`` files and ``--calibration`` data (a .pt
file, a .safetensors file or a ``pkg.module:function``), each failure one line naming the flag."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors

import monoquant_core as mq
from monoquant_core import UsageError
from monoquant_core.cli.inputs import import_factory, load_calibration, load_weights
from tests.helpers import STATIC_ARGS, act_scale


def test_model_factory_and_weights(cli, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent(
            """
        import torch
        def build():
            nn = torch.nn
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        """
        )
    )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(4)
    trained = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    write_safetensors(str(tmp_path / "w.safetensors"), trained.state_dict(), {})
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        out = tmp_path / f"q-{weights}.safetensors"
        res = cli("quantize", "--model", "mymodels:build", "--weights", weights, "-o", out)
        assert res.exit_code == 0, res.output
        import mymodels

        q = mq.load(str(out), mymodels.build())
        x = torch.randn(3, 8)
        assert mq.sqnr_db(trained(x), q(x)) > 30
    torch.save(trained, tmp_path / "pickled.pt")
    res = cli("quantize", "--model", "mymodels:build", "--weights", "pickled.pt")
    assert res.exit_code == 1 and "weights_only=True" in res.output
    bad = torch.nn.Linear(3, 3)
    write_safetensors(str(tmp_path / "bad.safetensors"), bad.state_dict(), {})
    res = cli("quantize", "--model", "mymodels:build", "--weights", "bad.safetensors")
    assert res.exit_code == 1 and "does not fit the model" in res.output


def test_pt_and_safetensors_and_callable_calibration_give_the_same_model(
    cli, engine, tmp_path, model_args, monkeypatch
):
    batches = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pt = tmp_path / "calib.pt"
    torch.save(batches, pt)
    st = tmp_path / "calib.safetensors"
    # names sort numerically: batch 10 would come after batch 2
    write_safetensors(str(st), {str(i): b for i, b in enumerate(batches)}, {"format": "pt"})
    pkg = tmp_path / "calibpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text(
        textwrap.dedent(
            """
            import torch

            def batches():
                for i in range(3):
                    yield torch.randn(16, 32, generator=torch.Generator().manual_seed(i))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "calibpkg", raising=False)
    scales = []
    for i, source in enumerate([pt, st, "calibpkg.data:batches"]):
        out = tmp_path / f"q{i}.safetensors"
        res = cli("quantize", *model_args, *STATIC_ARGS, "--calibration", source, "-o", out)
        assert res.exit_code == 0, res.output
        scales.append(act_scale(engine, out))
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])


def test_safetensors_batches_come_in_natural_name_order(tmp_path):
    path = tmp_path / "c.safetensors"
    write_safetensors(str(path), {f"b{i}": torch.full((1,), float(i)) for i in range(12)}, {})
    assert [int(t.item()) for t in load_calibration(str(path))] == list(range(12))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([*STATIC_ARGS], "activations='static' needs calibration data"),
        (["--sequential"], "sequential=True needs calibration data"),
        (["--calibration", "missing.pt"], "--calibration file 'missing.pt' does not exist"),
        (["--calibration", "nopkg_xyz.mod:fn"], "--calibration: cannot import 'nopkg_xyz.mod'"),
        (["--calibration", "BAD"], "does not exist"),
    ],
)
def test_calibration_errors_are_one_line(cli, model_args, extra, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("quantize", *model_args, *extra)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "fix:" in lines[0], res.output


def test_wrong_shapes_in_a_calibration_file(cli, model_args, tmp_path):
    pt = tmp_path / "calib.pt"
    torch.save([torch.randn(8, 31)], pt)
    res = cli("quantize", *model_args, *STATIC_ARGS, "--calibration", pt)
    assert res.exit_code == 1
    assert "calibration batch 0 (inputs 8x31) failed in the model" in res.output


def test_a_calibration_function_that_raises_or_a_file_that_is_not_torch(tmp_path, monkeypatch):
    (tmp_path / "badcalib.py").write_text("def data():\n    raise KeyError('no shard')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "badcalib", raising=False)
    with pytest.raises(UsageError, match="--calibration 'badcalib:data' raised KeyError"):
        load_calibration("badcalib:data")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match=r"is not loadable with torch.load\(weights_only=True\)"):
        load_calibration(str(junk))


def test_factories_must_be_callables_and_weights_a_state_dict(tmp_path):
    with pytest.raises(UsageError, match="--model: 'math:pi' is not callable"):
        import_factory("math:pi")
    assert import_factory("collections:OrderedDict")() == {}
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="holds a list, not a state_dict"):
        load_weights(torch.nn.Linear(2, 2), str(tmp_path / "list.pt"))
    with pytest.raises(UsageError, match="--weights file .* does not exist"):
        load_weights(torch.nn.Linear(2, 2), str(tmp_path / "none.pt"))
