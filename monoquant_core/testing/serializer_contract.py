"""``SerializerContract``: the tests every file format must pass."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from ..artifacts import Artifact
from ..atomic import atomic_write
from ..components import Serializer
from ..engine import Engine
from ..errors import FormatError, UsageError
from ..qtensor import QTensor
from .asserts import assert_qtensor_equal, assert_roundtrip_exact
from .contract_base import Contract
from .models import mlp, tiny_models

__all__ = ["SerializerContract"]


def plain_tensors() -> dict[str, torch.Tensor]:
    """The kinds of plain tensors a state_dict holds (0-d and bool buffers included)."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "i64.num_batches_tracked": torch.tensor(12345678901),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8, generator=g),
        "mask": torch.tensor([True, False, True]),
        "nonfinite": torch.tensor([math.inf, -math.inf, math.nan, -0.0]),
    }


class SerializerContract(Contract):
    """Contract suite for a serializer (file format).

    Subclass it and name the serializer::

        class TestSafetensorsContract(SerializerContract):
            serializer = "safetensors"

    A file written by the serializer must give back exactly what was written: every plain
    tensor (dtype, shape, bits, NaN included), every QTensor of every registered scheme
    (codes, scales, zero points, extras, layout fields and metadata) that it stores, the
    producers and the run's config. A format for a subset of QTensors (an export format)
    says which it cannot store in ``Serializer.unsupported`` and must refuse them with a
    one-line error, writing nothing. Broken files are a :class:`~monoquant_core.FormatError`,
    never another exception.

    Attributes:
        serializer: the registered name of the serializer under test.
        models: tiny models saved and loaded with every registered scheme.
    """

    serializer: ClassVar[str] = ""
    models: ClassVar[tuple[str, ...]] = ("transformer", "embedding")

    @pytest.fixture(autouse=True)
    def _declared(self) -> None:
        if not self.serializer:
            pytest.fail(f"{type(self).__name__}: set serializer = '<registered name>'")

    def _ser(self, engine: Engine) -> Serializer:
        return engine.serializers.get(self.serializer)

    def _path(self, engine: Engine, folder: Path, stem: str) -> str:
        return str(Path(folder) / f"{stem}{(self._ser(engine).suffixes or ('',))[0]}")

    def _artifact(self, engine: Engine) -> Artifact:
        """The test artifact, without the QTensors the serializer says it cannot store."""
        art = self._full_artifact(engine)
        ser = self._ser(engine)
        art.qtensors = {k: q for k, q in art.qtensors.items() if not ser.unsupported(k, q)}
        return art

    def _full_artifact(self, engine: Engine) -> Artifact:
        art = Artifact(tensors=plain_tensors())
        w = mlp()[0].weight.detach()
        for scheme in engine.schemes.names():
            sch = engine.schemes.get(scheme)
            qt = engine.quantize_weight(w, scheme, sch.default_observer, name=scheme)
            art.qtensors[f"{scheme}.weight"] = qt
        art.qtensors["custom.weight"] = QTensor(
            qdata=torch.arange(-6, 6, dtype=torch.int8).reshape(3, 4),
            scale=torch.ones(3, 1),
            zero_point=None,
            bits=8,
            group_size=None,
            axis=0,
            shape=(3, 4),
            dtype=torch.float32,
            scheme="not-installed",
            extra={"codebook": torch.linspace(-1, 1, 256)},
            meta={"plugin": "nowhere", "layout": "custom", "note": ["any", {"json": 1}]},
        )
        art.producers = {
            "core": {"distribution": "monoquant", "version": "0.1.0"},
            "nowhere": {"distribution": "monoquant-nowhere", "version": "9.9"},
        }
        art.config = {"scheme": "int8", "rules": [], "plugin_options": {"x": {"y": True}}}
        return art

    def _assert_same(self, want: Artifact, got_tensors: dict, got_q: dict) -> None:
        assert set(got_tensors) == set(want.tensors), f"plain tensors: {sorted(got_tensors)}"
        for k, t in want.tensors.items():
            u = got_tensors[k]
            assert u.dtype == t.dtype and u.shape == t.shape, f"{k}: {u.dtype} {tuple(u.shape)}"
            bits = torch.equal(t.reshape(-1).view(torch.uint8), u.reshape(-1).view(torch.uint8))
            assert bits, f"{k}: bits changed"
        assert set(got_q) == set(want.qtensors), f"quantized tensors: {sorted(got_q)}"
        for k, qt in want.qtensors.items():
            assert_qtensor_equal(qt, got_q[k], k)

    # ------------------------------------------------------------------ tests

    def test_registered_with_suffixes(self, contract_engine):
        ser = self._ser(contract_engine)
        assert isinstance(ser, Serializer) and ser.name == self.serializer
        assert isinstance(ser.suffixes, tuple), "declare suffixes (a tuple; empty: by name only)"
        assert all(s.startswith(".") for s in ser.suffixes), ser.suffixes

    def test_artifact_round_trip_is_exact(self, contract_engine, tmp_path):
        ser, art = self._ser(contract_engine), self._artifact(contract_engine)
        path = self._path(contract_engine, tmp_path, "artifact")
        ser.write(art, path)
        assert ser.sniff(path), "sniff() does not recognise the serializer's own file"
        got = ser.read(path)
        self._assert_same(art, got.tensors, got.qtensors)
        assert got.producers == art.producers
        assert got.config == art.config
        assert isinstance(got.format_version, int)

    def test_streaming_reader_and_writer(self, contract_engine, tmp_path):
        ser, art = self._ser(contract_engine), self._artifact(contract_engine)
        path = self._path(contract_engine, tmp_path, "streamed")
        w = ser.open_writer(path)
        for k, t in art.tensors.items():
            w.add_tensor(k, t)
        for k, qt in art.qtensors.items():
            w.add_qtensor(k, qt)
        w.close(art.producers, art.config)
        with ser.open_reader(path) as r:
            tensors = {k: r.source(k).load() for k in r.tensor_names()}
            qtensors = {k: r.qtensor(k) for k in r.qtensor_names()}
            assert r.producers == art.producers and r.quantized_file
            assert isinstance(r.format_version, int)
            for k in art.qtensors:
                info = r.qinfo(k)
                assert info["scheme"] == art.qtensors[k].scheme and info["nbytes"] > 0
        self._assert_same(art, tensors, qtensors)

    def test_every_scheme_round_trips_exactly(self, contract_engine, tmp_path):
        models = tiny_models()
        ser, done = self._ser(contract_engine), 0
        for scheme in contract_engine.schemes.names():
            for name in self.models:
                tm = models[name]
                plan = contract_engine.plan(tm.build(), scheme=scheme, only=tm.only)
                if not plan.selected:  # nothing to quantize: quantize() refuses such a run
                    continue
                qmodel, _ = contract_engine.quantize(tm.build(), scheme=scheme, only=tm.only)
                qts = {
                    f"{m}.{p}" if m else p: qt
                    for m, mod in qmodel.named_modules()
                    if hasattr(mod, "qtensors")
                    for p, qt in mod.qtensors().items()
                }
                if any(ser.unsupported(k, qt) for k, qt in qts.items()):
                    continue  # test_unsupported_tensors_are_refused covers these
                folder = Path(tmp_path) / f"{scheme}-{name}"
                folder.mkdir()
                assert_roundtrip_exact(
                    contract_engine, qmodel, tm.build, tm.inputs, folder, [self.serializer]
                )
                done += 1
        assert done, f"{self.serializer} stores no model quantized with any scheme"

    def test_unsupported_tensors_are_refused(self, contract_engine, tmp_path):
        ser = self._ser(contract_engine)
        full = self._full_artifact(contract_engine)
        refused = {k: q for k, q in full.qtensors.items() if ser.unsupported(k, q)}
        if not refused:
            pytest.skip(f"{self.serializer} stores every QTensor")
        for k, qt in refused.items():
            path = self._path(contract_engine, tmp_path, k.replace(".", "-"))
            reason = ser.unsupported(k, qt)
            assert isinstance(reason, str) and reason, k
            art = Artifact(tensors={"bias": torch.zeros(3)}, qtensors={k: qt})
            with pytest.raises((UsageError, FormatError)) as err:  # written as save() does
                atomic_write(path, lambda tmp, art=art: ser.write(art, tmp), True)
            assert "\n" not in str(err.value), "a one-line error"
            assert not Path(path).exists(), f"{k}: a file was left behind"

    def test_sniff_rejects_other_files(self, contract_engine, tmp_path):
        ser = self._ser(contract_engine)
        for stem, data in [("empty", b""), ("short", b"\x01\x02"), ("text", b"hello world\n" * 9)]:
            path = self._path(contract_engine, tmp_path, stem)
            Path(path).write_bytes(data)
            assert not ser.sniff(path), f"sniff() accepts a {stem} file"

    def test_broken_files_are_format_errors(self, contract_engine, tmp_path):
        ser = self._ser(contract_engine)
        qmodel, _ = contract_engine.quantize(mlp())
        path = self._path(contract_engine, tmp_path, "good")
        contract_engine.save(qmodel, path, serializer=self.serializer)
        data = Path(path).read_bytes()
        for stem, cut in [("half", data[: len(data) // 2]), ("tail", data[:-3])]:
            bad = self._path(contract_engine, tmp_path, stem)
            Path(bad).write_bytes(cut)
            with pytest.raises(FormatError):
                contract_engine.load(bad, dequantize=True)
            if ser.sniff(bad):
                with pytest.raises(FormatError):
                    ser.read(bad)

    def test_missing_scheme_names_the_package(self, contract_engine, tmp_path):
        ser, art = self._ser(contract_engine), self._artifact(contract_engine)
        if "custom.weight" not in art.qtensors:
            pytest.skip(f"{self.serializer} cannot store a third-party scheme's QTensor")
        path = self._path(contract_engine, tmp_path, "custom")
        ser.write(art, path)
        with pytest.raises(FormatError, match="pip install monoquant-nowhere"):
            contract_engine.load(path, dequantize=True)
