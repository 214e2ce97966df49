"""``onnx`` serializer: a quantized model as an ONNX graph for onnxruntime (CPU).

ONNX holds a graph, not just tensors, so this format needs the model (``needs_model``):
``monoquant export QUANTIZED --format onnx --model PKG.MOD:FACTORY --example-input FILE -o
model.onnx`` (or ``Engine().export(..., model=..., example_inputs=...)``). The core builds the
float model with the file's dequantized weights; :meth:`OnnxSerializer.export_model` traces it
with ``torch.onnx.export`` (the dynamo exporter, no graph optimisation, so every weight stays
an initializer named after its parameter) and then puts the stored codes back in place of
each quantized weight:

* ``int8`` (per channel or per tensor, symmetric): the weight initializer becomes
  ``DequantizeLinear(codes int8, scale, zero 0, axis=0)`` producing the same name, so any
  consumer (``Gemm``, ``MatMul``, ``Conv``, ``Gather``) reads the dequantized weight;
  onnxruntime folds or fuses it.
* ``int4-group`` on a Linear (``Transpose`` + ``MatMul``, or ``Gemm`` with ``transB=1``): one
  ``com.microsoft.MatMulNBits`` (``bits=4``, ``block_size`` = the group size) with the stored
  nibbles as its packed weight (signed codes XOR 8, onnxruntime's default zero point), the
  scales, and the zero points as floats for asymmetric weights (``w = (u - z) * s`` exactly as
  Mono Quant's), then ``Add`` for the bias.

Refused in one line, before anything is written: int8 or int4 layers with run-time input
quantization (``activations`` other than ``none``: the export keeps weight quantization only),
asymmetric int8, extra tensors (outlier columns), int4 weights whose consumer is not a
Linear-shaped ``MatMul``/``Gemm``, other schemes. Needs the ``onnx`` extra (``onnx``,
``onnxscript``; ``onnxruntime`` to run the result).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

import torch
from torch import nn

from monoquant_core import Artifact, FormatError, QTensor, Serializer, UsageError, hookimpl

_FIX_EXTRA = "pip install 'monoquant[onnx]' (onnx and onnxscript; onnxruntime to run it)"
_FIX = "quantize with activations=none (weight-only int8 or int4-group), or keep safetensors"
_DTYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # onnx TensorProto types


def _why_not(name: str, qt: QTensor) -> str | None:
    if qt.extra:
        return f"the extra tensors {sorted(qt.extra)} (outlier columns or static input scales)"
    if qt.activations != "none":
        return f"run-time input quantization (activations={qt.activations!r})"
    if qt.scheme == "int8" and qt.bits == 8 and qt.group_size is None:
        return None if qt.symmetric else "asymmetric int8 weights"
    if qt.scheme == "int4-group" and qt.bits == 4 and len(qt.shape) == 2 and qt.axis == 0:
        gs = qt.group_size  # onnxruntime: a power of two >= 16; a last partial block is fine
        return None if gs and gs >= 16 and gs & (gs - 1) == 0 else f"group size {gs}"
    return f"{qt.scheme} ({qt.bits}-bit) weights"


class OnnxSerializer(Serializer):
    name = "onnx"
    suffixes = ()  # chosen by name (--format onnx); it needs the model, not just tensors
    needs_model = True

    def sniff(self, path: str) -> bool:
        return False  # Mono Quant does not read ONNX back

    def write(self, artifact: Artifact, path: str) -> None:
        raise UsageError(
            "the onnx format needs the model's graph, not only its tensors",
            "use monoquant export QUANTIZED --format onnx --model PKG.MOD:FACTORY "
            "--example-input FILE -o model.onnx",
        )

    def read(self, path: str) -> Artifact:
        raise FormatError(
            f"{path}: Mono Quant does not read ONNX files", "load the safetensors file"
        )

    def unsupported(self, name: str, qt: QTensor) -> str | None:
        why = _why_not(name, qt)
        return "needs the model graph (monoquant export --format onnx)" if why is None else why

    def export_model(
        self, model: nn.Module, example: tuple[Any, ...], artifact: Artifact, path: str
    ) -> dict[str, Any]:
        try:
            import onnx  # deferred: an optional extra
        except ImportError as e:
            raise UsageError(f"the onnx format needs the onnx package ({e})", _FIX_EXTRA) from None
        for name, qt in artifact.qtensors.items():
            why = _why_not(name, qt)
            if why is not None:
                raise UsageError(f"{name}: ONNX export cannot store {why}", _FIX)
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the exporter's notes about optional torchvision ops
        with (
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore", FutureWarning)
            try:
                program = torch.onnx.export(
                    model.eval(), example, dynamo=True, optimize=False, verbose=False,
                    dynamic_shapes=_dynamic(example),
                )  # fmt: skip
            except ImportError as e:
                raise UsageError(f"torch.onnx.export needs onnxscript ({e})", _FIX_EXTRA) from None
            except Exception as e:
                root, where = _trace_failure(model, e)
                raise UsageError(
                    f"torch.onnx.export could not trace the model{where}: "
                    f"{type(root).__name__}: {_first_line(root)}",
                    "make that module traceable by torch.export (no Python branches on tensor "
                    "values, no .item()/.numpy()), or check that the example input is what the "
                    "model's forward takes",
                ) from None
            finally:
                quiet.setLevel(level)
        proto = program.model_proto
        counts = _rewrite(proto, artifact)
        onnx.save_model(proto, path)
        return counts


def _trace_failure(model: nn.Module, exc: BaseException) -> tuple[BaseException, str]:
    """The first error of ``exc``'s chain (what the exporter wrapped) and `` in module 'NAME'
    (Type)``: the innermost of ``model``'s modules whose code was running when it failed (from
    the tracebacks; ``""`` when no module's frame is in them)."""
    names = {id(m): n for n, m in model.named_modules() if n}
    where, root, seen = "", exc, set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        root = e
        tb = e.__traceback__
        while tb is not None:
            name = names.get(id(tb.tb_frame.f_locals.get("self")))
            if name is not None:
                module = model.get_submodule(name)
                where = f" in module {name!r} ({type(module).__name__})"
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return root, where


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _dynamic(example: tuple[Any, ...]) -> tuple[Any, ...]:
    """Every dimension of every tensor input dynamic where the model allows it (the exporter
    keeps a dimension static where the model's code needs it, e.g. a feature size that meets a
    weight), so the exported graph takes other batch sizes and sequence lengths."""
    auto = torch.export.Dim.AUTO
    return tuple(
        {d: auto for d in range(a.dim())} if isinstance(a, torch.Tensor) else None for a in example
    )


def _rewrite(proto: Any, artifact: Artifact) -> dict[str, int]:
    """Replace every quantized weight's initializer in ``proto`` (in place)."""
    from onnx import helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    counts = {"int8": 0, "int4": 0}
    missing = [n for n in artifact.qtensors if n not in inits]
    if missing:
        raise UsageError(
            f"the traced graph has no initializer for {missing[:3]} (the exporter folded or "
            "renamed them)",
            "export a model whose quantized weights are plain parameters used by its layers",
        )
    nodes = list(graph.node)
    for name, qt in artifact.qtensors.items():
        init = inits[name]
        float_type = init.data_type
        float_dtype = {v: k for k, v in _DTYPES.items()}.get(float_type, torch.float32)
        graph.initializer.remove(init)
        if qt.bits == 8:
            n = qt.shape[0]
            scale = qt.scale.reshape(-1).to(float_dtype)
            if qt.axis is None:
                scale, zero = scale.reshape(()), torch.zeros((), dtype=torch.int8)
            else:
                zero = torch.zeros(n, dtype=torch.int8)
            graph.initializer.extend(
                [
                    _tensor(f"{name}_quantized", qt.qdata.reshape(qt.shape)),
                    _tensor(f"{name}_scale", scale),
                    _tensor(f"{name}_zero_point", zero),
                ]
            )
            attrs = {"axis": 0} if qt.axis is not None else {}
            dq = helper.make_node(
                "DequantizeLinear",
                [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                [name],
                name=f"{name}_dequantize",
                **attrs,
            )
            nodes.insert(0, dq)
            counts["int8"] += 1
            continue
        nodes = _matmul_nbits(nodes, graph, name, qt, float_dtype)
        counts["int4"] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    if counts["int4"] and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def _tensor(name: str, t: torch.Tensor) -> Any:
    from onnx import helper

    t = t.detach().contiguous()
    onnx_type = {
        torch.float32: 1,
        torch.uint8: 2,
        torch.int8: 3,
        torch.float16: 10,
        torch.bfloat16: 16,
        torch.int64: 7,
    }[t.dtype]
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return helper.make_tensor(name, onnx_type, list(t.shape), raw, raw=True)


def _matmul_nbits(nodes: list, graph: Any, name: str, qt: QTensor, float_dtype: torch.dtype):
    """Replace ``Transpose(W) -> MatMul(x, .)`` or ``Gemm(x, W, b, transB=1)`` by
    ``MatMulNBits`` (+ ``Add`` for the bias)."""
    from onnx import helper

    n, k = qt.shape
    gs = qt.group_size
    users = [nd for nd in nodes if name in nd.input]
    if len(users) != 1:
        raise UsageError(
            f"{name}: the int4 weight is used by {len(users)} graph nodes; ONNX export packs an "
            "int4 weight used by one Linear",
            _FIX,
        )
    (user,) = users
    if user.op_type == "Transpose":
        (t_out,) = user.output
        mms = [nd for nd in nodes if t_out in nd.input]
        if len(mms) != 1 or mms[0].op_type != "MatMul" or list(mms[0].input)[1] != t_out:
            raise UsageError(f"{name}: the int4 weight does not feed a Linear MatMul", _FIX)
        (mm,) = mms
        x, out, bias, drop = mm.input[0], mm.output[0], None, [user, mm]
    elif user.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in user.attribute}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) or list(user.input)[1] != name:
            raise UsageError(f"{name}: the int4 weight does not feed a Linear Gemm", _FIX)
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise UsageError(f"{name}: a scaled Gemm", _FIX)
        x, out, drop = user.input[0], user.output[0], [user]
        bias = user.input[2] if len(user.input) > 2 and user.input[2] else None
    else:
        raise UsageError(f"{name}: the int4 weight feeds a {user.op_type}, not a Linear", _FIX)
    blocks = -(-k // gs)  # the last group padded in Mono Quant's layout, as MatMulNBits expects
    codes = qt.qdata.reshape(n, blocks * gs // 2)
    packed = (torch.bitwise_xor(codes, 0x88) if qt.symmetric else codes).reshape(n, blocks, gs // 2)
    inputs = [x, f"{name}_packed", f"{name}_scales"]
    graph.initializer.extend(
        [
            _tensor(f"{name}_packed", packed),
            _tensor(f"{name}_scales", qt.scale.reshape(n * blocks).to(float_dtype)),
        ]
    )
    if not qt.symmetric:
        zero = qt.zero_point.reshape(n * blocks).to(float_dtype)
        graph.initializer.append(_tensor(f"{name}_zero_points", zero))
        inputs.append(f"{name}_zero_points")
    mm_out = out if bias is None else f"{name}_matmul"
    new = [
        helper.make_node(
            "MatMulNBits",
            inputs,
            [mm_out],
            name=f"{name}_matmul_nbits",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=gs,
        )
    ]
    if bias is not None:
        new.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{name}_bias"))
    # where the MatMul / Gemm was: its input x is computed before it (topological order)
    last = nodes.index(drop[-1])
    kept = [nd for nd in nodes if all(nd is not d for d in drop)]
    at = sum(1 for nd in nodes[:last] if all(nd is not d for d in drop))
    return kept[:at] + new + kept[at:]


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "onnx"


@hookimpl
def monoquant_register_serializers(register):
    register(OnnxSerializer())


__all__ = ["OnnxSerializer"]
