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
from tests.helpers import STATIC_ARGS, act_scale, one_line


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
        (["--sequential"], "--sequential needs --calibration"),
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


def test_a_misspelt_model_attribute_gets_a_did_you_mean(tmp_path, monkeypatch):
    (tmp_path / "zoo_models.py").write_text(
        "import torch\n"
        "def build_model():\n    return torch.nn.Linear(2, 2)\n"
        "class Family:\n    def tiny():\n        return torch.nn.Linear(2, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "zoo_models", raising=False)
    with pytest.raises(UsageError) as e:
        import_factory("zoo_models:bulid_model")
    msg = one_line(e.value)
    assert "--model: 'zoo_models' has no attribute 'bulid_model'" in msg
    assert "fix: did you mean --model zoo_models:build_model? " in msg
    with pytest.raises(UsageError) as e:
        import_factory("zoo_models:Family.tinny")
    msg = one_line(e.value)
    assert "'zoo_models:Family' has no attribute 'tinny'" in msg
    assert "did you mean --model zoo_models:Family.tiny?" in msg
    with pytest.raises(UsageError) as e:
        import_factory("zoo_models:qqqqqq")
    assert "did you mean" not in str(e.value)


BATCH_ENCODING = """
from collections import UserDict

class BatchEncoding(UserDict):
    '''Stands in for transformers.BatchEncoding (also a UserDict subclass).'''
"""


def test_a_saved_batch_encoding_says_to_save_a_dict(tmp_path, monkeypatch):
    (tmp_path / "fake_tokenizers.py").write_text(BATCH_ENCODING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_tokenizers", raising=False)
    import fake_tokenizers

    batch = fake_tokenizers.BatchEncoding({"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    path = tmp_path / "calib.pt"
    torch.save(batch, path)
    with pytest.raises(UsageError) as e:
        load_calibration(str(path))
    msg = one_line(e.value)
    assert "holds a fake_tokenizers.BatchEncoding object" in msg
    assert "torch.save(dict(batch), path)" in msg
    torch.save(dict(batch), path)  # what the message says works
    assert set(load_calibration(str(path))) == {"input_ids"}
    torch.save([fake_tokenizers.BatchEncoding(), torch.ones(2)], path)
    with pytest.raises(UsageError, match="holds a fake_tokenizers.BatchEncoding object"):
        load_calibration(str(path))


def test_a_pickled_model_as_weights_names_its_class(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UsageError) as e:
        load_weights(torch.nn.Linear(2, 2), str(path))
    msg = one_line(e.value)
    assert "holds a torch.nn.modules.linear.Linear object" in msg
    assert "torch.save(model.state_dict(), path)" in msg


def test_weights_errors_name_the_first_few_keys_and_count_the_rest(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(50)])
    other = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(40)])
    path = tmp_path / "w.pt"
    torch.save({f"model.{k}": v for k, v in other.state_dict().items()}, path)
    with pytest.raises(UsageError) as e:
        load_weights(model, str(path))
    msg = one_line(e.value)
    assert "100 missing key(s): '0.weight', '0.bias', '1.weight' and 97 more" in msg, msg
    assert "80 unexpected key(s): 'model.0.weight', 'model.0.bias', 'model.1.weight' and 77" in msg
    assert len(msg) < 400, msg
    wide = {
        k: torch.zeros(5, 5) if k.endswith("weight") else v for k, v in model.state_dict().items()
    }
    torch.save(wide, path)
    with pytest.raises(UsageError) as e:
        load_weights(model, str(path))
    msg = one_line(e.value)
    assert (
        "50 tensor(s) of another shape: '0.weight' is (5, 5) in the file, (4, 4) in the model, "
        in msg
    )
    assert "and 47 more" in msg and len(msg) < 400, msg


@pytest.mark.parametrize(
    "data, needle",
    [
        ([], "calibration data is empty"),
        ([torch.ones(2), "text"], "calibration batch 1 is a str"),
        (3, "calibration data of type int is not a tensor or an iterable"),
    ],
)
def test_the_batches_of_a_calibration_file_are_checked_when_it_is_read(tmp_path, data, needle):
    path = tmp_path / "calib.pt"
    torch.save(data, path)
    with pytest.raises(UsageError) as e:
        load_calibration(str(path))
    msg = one_line(e.value)
    assert msg.startswith(f"problem: --calibration {str(path)!r}: ") and needle in msg, msg
