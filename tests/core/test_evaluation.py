"""``evaluate``: the float model against quantized files on the user's inputs. The numbers are
checked against a direct computation, the gate fails in one line under a threshold, and bad
inputs are one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from monoquant_core import Engine, UsageError, load
from monoquant_core.evaluation import _tensors


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    engine = Engine()
    paths = {}
    for label, scheme in (("q8", "int8"), ("q4", "int4-group")):
        q, _ = engine.quantize(_classifier(), scheme=scheme, scheme_options=_opts(scheme))
        paths[label] = str(root / f"{label}.safetensors")
        engine.save(q, paths[label])
    torch.manual_seed(1)
    data = [torch.randn(16, 64) for _ in range(3)]
    torch.save(data, root / "data.pt")
    return root, paths, data


def _opts(scheme: str) -> dict:
    return {"group_size": 32} if scheme == "int4-group" else {}


def test_numbers_equal_a_direct_computation(files):
    _, paths, data = files
    res = Engine().evaluate(_classifier, [paths["q8"], paths["q4"]], data)
    assert res["batches"] == 3 and [r["path"] for r in res["files"]] == [paths["q8"], paths["q4"]]
    float_model = _classifier().eval()
    for row in res["files"]:
        q = load(row["path"], _classifier()).eval()
        with torch.no_grad():
            ref = torch.cat([float_model(x) for x in data]).double()
            got = torch.cat([q(x) for x in data]).double()
        sqnr = 10 * math.log10(float((ref**2).sum()) / float(((got - ref) ** 2).sum()))
        cos = float((ref * got).sum() / (ref.norm() * got.norm()))
        assert row["sqnr_db"] == pytest.approx(sqnr, abs=1e-9)
        assert row["cosine"] == pytest.approx(cos, abs=1e-12)
        assert row["max_abs_err"] == pytest.approx(float((got - ref).abs().max()), abs=1e-12)
        top1 = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
        assert row["top1_agreement"] == pytest.approx(top1)  # 2-D outputs: classifier-like
    q8, q4 = res["files"]
    assert q8["schemes"] == ["int8"] and q4["schemes"] == ["int4-group"]
    assert q8["sqnr_db"] > q4["sqnr_db"] > 10 and q8["bits_per_weight"] > q4["bits_per_weight"]


def test_an_nn_module_is_copied_not_changed(files):
    _, paths, data = files
    model = _classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = Engine().evaluate(model, paths["q8"], data)
    assert len(res["files"]) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))


def test_outputs_of_any_structure_are_compared():
    out = {"logits": torch.ones(2, 3), "aux": (torch.zeros(1), torch.tensor([1, 2]))}
    assert [t.shape for t in _tensors(out)] == [(2, 3), (1,)]  # floating tensors, in order


def test_cli_table_json_and_the_gate(files, cli):
    root, paths, _ = files
    spec = "tests.core.test_evaluation:_classifier"
    args = ("evaluate", "--model", spec, paths["q8"], paths["q4"], "--data", root / "data.pt")
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "q8.safetensors" in res.output and "int4-group" in res.output and "top-1" in res.output
    data = json.loads(cli(*args, "--json").output)
    assert [r["schemes"] for r in data["files"]] == [["int8"], ["int4-group"]]
    gate = cli(*args, "--min-sqnr", "1000")
    assert gate.exit_code == 1
    assert "below the threshold: " in gate.output and "SQNR" in gate.output
    line = [s for s in gate.output.splitlines() if s.startswith("monoquant: problem:")]
    assert len(line) == 1 and "q4.safetensors" in line[0]
    ok = cli(*args, "--min-cosine", "0.5")
    assert ok.exit_code == 0


def test_bad_inputs_are_one_line_errors(files, tmp_path):
    _, paths, data = files
    with pytest.raises(UsageError, match="does not exist"):
        Engine().evaluate(_classifier, [str(tmp_path / "nope.safetensors")], data)
    with pytest.raises(UsageError, match="no quantized file"):
        Engine().evaluate(_classifier, [], data)
    with pytest.raises(UsageError, match="batch 0 failed in the float model") as err:
        Engine().evaluate(_classifier, [paths["q8"]], [torch.randn(2, 7)])
    msg = err.value.problem
    assert "in module '0' (Linear): RuntimeError:" in msg and "\n" not in msg, msg
    with pytest.raises(UsageError, match="in module '2' \\(Linear\\)"):  # fits 0, not 2
        Engine().evaluate(_wrong_head, [paths["q8"]], data)

    def other() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 16))

    with pytest.raises(Exception, match="does not match the model|has shape"):
        Engine().evaluate(other, [paths["q8"]], data)


def _wrong_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(100, 10))


def _other_classifier() -> nn.Module:
    """The same architecture as ``_classifier`` with other weights: another model."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def test_files_from_different_models_are_refused(files, tmp_path):
    _, paths, data = files
    engine = Engine()
    q, _ = engine.quantize(_other_classifier(), scheme="int8")
    other = str(tmp_path / "other.safetensors")
    engine.save(q, other)
    with pytest.raises(UsageError, match="other.safetensors was quantized from another model: "
                       "its float tensor '0.bias' differs"):  # fmt: skip
        engine.evaluate(_classifier, [paths["q8"], other], data)
    # each file against its own float model is fine
    assert len(engine.evaluate(_other_classifier, [other], data)["files"]) == 1


def _html_values(text: str) -> dict[str, list[tuple[dict, str]]]:
    """Elements carrying numbers in a report page, by tag: ``[(attributes, ...)]``."""
    from html.parser import HTMLParser

    found: dict[str, list[dict]] = {}

    class Reader(HTMLParser):
        def handle_starttag(self, tag, attrs):
            d = dict(attrs)
            if "data-value" in d or "data-x" in d:
                found.setdefault(tag, []).append(d)

    Reader().feed(text)
    return found


def test_the_html_report_holds_the_json_numbers(files, cli, tmp_path):
    root, paths, _ = files
    spec = "tests.core.test_evaluation:_classifier"
    page = tmp_path / "eval.html"
    args = ("evaluate", "--model", spec, paths["q8"], paths["q4"], "--data", root / "data.pt")
    data = json.loads(cli(*args, "--json", "--html", page).output)
    text = page.read_text()
    offline = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text and "http" not in offline
    found = _html_values(text)
    bars = {d["data-label"]: float(d["data-value"]) for d in found["rect"]}
    names = ["q8.safetensors", "q4.safetensors"]
    assert bars == {n: r["sqnr_db"] for n, r in zip(names, data["files"], strict=True)}
    cells = [float(d["data-value"]) for d in found["td"]]
    for r in data["files"]:
        assert r["cosine"] in cells and r["max_abs_err"] in cells and r["bytes"] in cells
