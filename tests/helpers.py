"""Helpers shared by the test modules: checkpoint files and folders, one-line errors, model
state snapshots, stand-in layers and small numeric shortcuts.

Fixtures live in ``tests/conftest.py``; this module holds plain functions and classes so that a
test module imports exactly what it uses (``from tests.helpers import small_state``).
"""

from __future__ import annotations

import json
import os
import struct
import textwrap
from typing import Any

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from safetensors import safe_open
from torch import nn

import monoquant_core as mq
from monoquant_core import Backend, Engine, MonoQuantError
from monoquant_core.metrics import error_stats
from monoquant_core.testing import mlp

# --------------------------------------------------------------------------- checkpoints

#: the Hugging Face index file of a sharded checkpoint folder
INDEX = "model.safetensors.index.json"


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama-style state_dict (names are what the name-based selection looks at).

    By default checkpoint mode quantizes exactly :data:`SMALL_SELECTED`; the embedding, the
    norms, the bias and the top-level ``lm_head`` stay in float.
    """
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": r(96, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(32)
        sd[p + "self_attn.q_proj.weight"] = r(32, 32)
        sd[p + "self_attn.k_proj.weight"] = r(32, 32)
        sd[p + "self_attn.q_proj.bias"] = r(32)
        sd[p + "mlp.up_proj.weight"] = r(64, 32)
        sd[p + "mlp.down_proj.weight"] = r(32, 64)
    sd["model.norm.weight"] = 1 + r(32)
    sd["lm_head.weight"] = r(96, 32)
    return sd


#: the tensors of :func:`small_state` that checkpoint mode quantizes by default
SMALL_SELECTED = frozenset(
    f"model.layers.{i}.{m}.weight"
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
)


def write_file(path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """``sd`` as one safetensors file at ``path`` (returned)."""
    write_safetensors(str(path), sd, {} if metadata is None else metadata)
    return path


def write_folder(folder, sd, n_shards=3, index=True, extra_files=True):
    """Split ``sd`` into ``n_shards`` HF-style shards; returns ``{shard file: its tensors}``.

    ``index`` writes :data:`INDEX`; ``extra_files`` writes a ``config.json`` and a
    ``tokenizer/vocab.txt`` (copied to an output folder) and a ``pytorch_model.bin`` (another
    weights format, never copied).
    """
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    shards = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n] for n in names[k::n_shards]}
        write_safetensors(os.path.join(folder, fname), part, {"format": "pt"})
        shards[fname] = part
    if index:
        wm = {n: f for f, part in shards.items() for n in part}
        doc = {"metadata": {"total_size": 1, "note": "kept"}, "weight_map": wm}
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump(doc, f)
    if extra_files:
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write('{"model_type": "llama",\n "hidden_size": 32}\n')
        os.makedirs(os.path.join(folder, "tokenizer"))
        with open(os.path.join(folder, "tokenizer", "vocab.txt"), "w") as f:
            f.write("a\nb\n")
        torch.save({"model.norm.weight": torch.ones(2)}, os.path.join(folder, "pytorch_model.bin"))
    return shards


def tree(root) -> set[str]:
    """Every file under ``root``, as paths relative to it."""
    return {
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    }


def stored(path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a safetensors file, read by the reference implementation."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def load_folder(folder) -> dict[str, torch.Tensor]:
    """Every shard of ``folder`` loaded with ``dequantize=True``, as one dict."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            part = mq.load(os.path.join(folder, name), dequantize=True)
            assert not set(part) & set(out), f"tensor names repeated across shards: {name}"
            out.update(part)
    return out


def assert_index_consistent(folder) -> dict[str, Any]:
    """The folder's index maps every stored name to its shard and states the true size."""
    with open(os.path.join(folder, INDEX)) as f:
        index = json.load(f)
    wm = index["weight_map"]
    seen: list[str] = []
    total = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        for k, t in stored(os.path.join(folder, name)).items():
            seen.append(k)
            assert wm.get(k) == name, f"{k} is in {name} but the index says {wm.get(k)}"
            total += t.numel() * t.element_size()
    assert len(seen) == len(set(seen)), "a stored name appears in two shards"
    assert set(seen) == set(wm), f"index names not stored: {sorted(set(wm) - set(seen))}"
    assert index["metadata"]["total_size"] == total
    return index


def raw_safetensors(path, header, data: bytes) -> None:
    """A safetensors file with exactly this ``header`` (a dict) and ``data`` (no checks)."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


class _TouchOnLoad:
    """Unpickling this runs ``touch <marker>``: proof that untrusted code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(path, marker):
    """A ``torch.save`` state_dict at ``path`` whose unpickling would create ``marker``."""
    torch.save({"w": torch.ones(4, 4), "payload": _TouchOnLoad(marker)}, path)
    return path


# --------------------------------------------------------------------------- command line, terminal

#: ``--scheme-opt`` for int8 with calibrated static activations (needs --calibration)
STATIC_ARGS = ["--scheme-opt", "activations=static"]


def act_scale(engine: Engine, path) -> torch.Tensor:
    """The calibrated input scale of layer ``0`` of a saved test-kit ``mlp``."""
    return engine.load(str(path), mlp())[0].qtensor().extra["act_scale"]


class Terminal:
    """A stand-in for stderr: a terminal (or not, with ``tty=False``) that keeps the text."""

    def __init__(self, tty: bool = True):
        self.text, self.tty = "", tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------- errors


def one_line(err: MonoQuantError) -> str:
    """The message of ``err``, checked to be one ``problem: ... fix: ...`` line."""
    msg = str(err)
    assert "\n" not in msg and msg.startswith("problem: ") and " fix: " in msg, msg
    return msg


def expect_failure(call, dst, exc_type, *needles) -> str:
    """``call()`` raises ``exc_type`` (one line naming ``needles``) and writes nothing next to
    ``dst``; returns the message."""
    parent = os.path.dirname(os.fspath(dst))
    before = sorted(os.listdir(parent))
    with pytest.raises(exc_type) as info:
        call()
    msg = one_line(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert not os.path.exists(dst)
    assert sorted(os.listdir(parent)) == before, "temporary files were left behind"
    return msg


def cli_ok(res) -> str:
    """A CLI result that succeeded without a traceback; returns its output."""
    assert res.exit_code == 0 and res.exception is None, (res.output, res.exception)
    assert "Traceback" not in res.output
    return res.output


def cli_one_line_error(res, *needles) -> str:
    """A CLI result that failed with exit code 1 and one ``monoquant: problem: ... fix: ...``
    line on stderr naming every needle; returns that line."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert res.stderr.startswith("monoquant: problem: ") and res.stderr.count("\n") == 1, res.stderr
    assert " fix: " in res.stderr and "Traceback" not in res.output
    for needle in needles:
        assert needle in res.stderr, res.stderr
    return res.stderr


# --------------------------------------------------------------------------- models


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state_dict, to check later that it did not change."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """True when ``model``'s state_dict equals the :func:`snapshot` ``before`` exactly."""
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks still registered anywhere in ``model``."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def quantized_names(model: nn.Module) -> set[str]:
    """Names of the modules of ``model`` that were replaced by quantized ones."""
    return {n for n, m in model.named_modules() if isinstance(m, mq.QuantizedModule)}


class Conv1D(nn.Module):
    """Stand-in for ``transformers.pytorch_utils.Conv1D`` (weight ``[nx, nf]``, ``addmm``
    forward), found by its qualified class name, so ``transformers`` is not needed."""

    __module__ = "transformers.pytorch_utils"

    def __init__(self, nf: int, nx: int, std: float = 0.02, bias_std: float = 0.0):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * std)
        self.bias = nn.Parameter(torch.randn(nf) * bias_std if bias_std else torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Branchy(nn.Module):
    """An MoE-like model: ``used`` runs, ``unused`` never does (it sees no calibration data)."""

    def __init__(self, dim_in: int = 32, dim_out: int = 32):
        super().__init__()
        self.used = nn.Linear(dim_in, dim_out)
        self.unused = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


# --------------------------------------------------------------------------- backends


class FakeGpuBackend(Backend):
    """Never available (says why), so it is passed over with that reason."""

    name = "fake-gpu"
    device_types = ("cpu",)
    priority = 10

    def available(self):
        return "no CUDA device found"

    def linear(self, x, prepared, bias):  # pragma: no cover - never selected
        raise AssertionError("unavailable backend was used")


class PickyBackend(Backend):
    """Preferred, but only for weights with ``N % 16 == 0`` (computes with the float weight)."""

    name = "picky"
    priority = 20

    def supports(self, info):
        return None if info.shape[0] % 16 == 0 else "N % 16 != 0"

    def linear(self, x, prepared, bias):
        qt, scheme = prepared
        return nn.functional.linear(x, scheme.dequantize(qt).to(x.dtype), bias)


class RaisingBackend(FakeGpuBackend):
    """Its ``available()`` raises: a reason, never a crash."""

    name = "raising"

    def available(self):
        raise OSError("driver exploded")


# --------------------------------------------------------------------------- numbers


def int8_qtensor(shape=(4, 8), **overrides) -> mq.QTensor:
    """A valid all-zero symmetric per-channel int8 QTensor of ``shape`` (fields overridable)."""
    fields = dict(
        qdata=torch.zeros(*shape, dtype=torch.int8),
        scale=torch.ones(shape[0], 1),
        zero_point=None,
        bits=8,
        group_size=None,
        axis=0,
        shape=shape,
        dtype=torch.float32,
        scheme="int8",
    )
    return mq.QTensor(**{**fields, **overrides})


def assert_quantized_copy(path, sd: dict[str, torch.Tensor], selected, floor_db=35.0) -> None:
    """``load(path, dequantize=True)`` holds every tensor of ``sd``: the ``selected`` ones
    within ``floor_db`` of the original, the others bit-identical."""
    got = mq.load(str(path), dequantize=True)
    assert set(got) == set(sd)
    for n, t in sd.items():
        if n in selected:
            assert mq.sqnr_db(t, got[n]) > floor_db, n
        else:
            assert torch.equal(got[n], t), n


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ``||got - ref|| / ||ref||`` (float64 accumulation)."""
    return error_stats(ref.float(), got.float())[2]


def assert_gemv_rows_match_reference(fast, ref, n: int, k: int, dtype, rows) -> None:
    """A float32-arithmetic GEMV layer ``fast`` against the reference backend ``ref`` at each M
    in ``rows``: float32 inputs to float32 rounding, bfloat16 ones to the reference of their
    float32 value within one output rounding; then a 3-D, non-contiguous input."""
    for m in rows:
        x = torch.randn(m, k)
        with torch.no_grad():
            y, r = fast(x.to(dtype)), ref(x.to(dtype).float())
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_err(y, r) < (1e-6 if dtype == torch.float32 else 4e-3), (m, rel_err(y, r))
    x3 = torch.randn(2, 3, 2 * k)[:, :, ::2]  # 3-D, not contiguous
    with torch.no_grad():
        assert rel_err(fast(x3), ref(x3)) < 1e-6


def quantize_tensor(engine: Engine, w: torch.Tensor, scheme: str, observer=None, **options):
    """``w`` through the per-tensor path with validated options: ``(qtensor, sqnr_db)``."""
    cfg = engine.configure(scheme=scheme, observer=observer, scheme_options=options)
    qt = engine.quantize_weight(w, scheme, cfg.observer, 0, cfg.scheme_config, cfg.observer_config)
    qt.validate()
    return qt, mq.sqnr_db(w, qt.dequantize())


def fast_and_reference(n: int, k: int, scheme: str, options: dict, bias=True, seed=0):
    """One ``Linear(k, n)`` quantized twice: with the automatically chosen backend and with
    ``reference`` (same weights, so the same QTensor): ``(fast, ref)`` models."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(k, n, bias=bias))
    state = base.state_dict()
    fast, _ = Engine().quantize(base, scheme=scheme, scheme_options=options)
    other = nn.Sequential(nn.Linear(k, n, bias=bias))
    other.load_state_dict(state)
    ref, _ = Engine().quantize(other, scheme=scheme, scheme_options=options, backend="reference")
    return fast, ref


# --------------------------------------------------------------------------- plugins

#: a third-party scheme plugin (``round8``: symmetric int8 codes) for fake distributions
SCHEME_PLUGIN = textwrap.dedent(
    """
    import torch
    from monoquant_core import QTensor, QuantSpec, Scheme, hookimpl
    from monoquant_core.layout import to_groups

    class Round8Scheme(Scheme):
        name = "round8"

        def spec(self, shape, axis, config):
            return QuantSpec(bits=8, symmetric=True, axis=axis)

        def quantize(self, weight, qparams, spec, config):
            g = to_groups(weight.float(), spec.axis, None)
            q = torch.round(g / qparams.scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
            return QTensor(q.reshape(q.shape[0], -1), qparams.scale, None, 8, None, spec.axis,
                           tuple(weight.shape), weight.dtype, self.name)

    @hookimpl
    def monoquant_register_schemes(register):
        register(Round8Scheme())
    """
)


# --------------------------------------------------------------------------- edited files


def edited_copy(path, out, edit_meta=None, edit_tensors=None):
    """A copy of the safetensors file ``path`` at ``out`` (returned) after ``edit_meta(meta)``
    and ``edit_tensors(tensors)`` changed its metadata / tensors in place."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    write_safetensors(str(out), tensors, meta)
    return out


class returns_within:  # used like a function: ``with returns_within(5):``
    """Fail (instead of hanging the test run) when the block has not returned after
    ``seconds`` (SIGALRM; the main thread only)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def _expire(self, signum, frame):
        raise AssertionError(f"blocked for more than {self.seconds} s")

    def __enter__(self):
        import signal  # deferred: keeps the additions to this module at its end

        self._old = signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        import signal  # deferred: see __enter__

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)


# --------------------------------------------------------------------------- extreme weights

#: float32's largest finite value
F32_MAX = torch.finfo(torch.float32).max


def extreme_weight(rows: int = 8, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """A Gaussian ``[rows, cols]`` weight whose row 0 holds ``+-F32_MAX`` among ordinary
    values, row 1 is ``-F32_MAX`` throughout and row 2 is subnormal (``~1e-40``); rows 3 on
    are ordinary."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0, 0], w[0, 1] = F32_MAX, -F32_MAX
    w[1] = -F32_MAX
    w[2] = torch.randn(cols, generator=torch.Generator().manual_seed(seed + 1)) * 1e-40
    return w


def assert_extremes_survive(w: torch.Tensor, qt: mq.QTensor, rel: float, normal_db: float):
    """Finite parameters and values back; the ``F32_MAX`` entries of :func:`extreme_weight`
    within ``rel``; rows 3 on at least ``normal_db`` (unless per tensor)."""
    assert torch.isfinite(qt.scale.float()).all() and (qt.scale.float() > 0).all(), qt.scale
    if qt.zero_point is not None:
        assert torch.isfinite(qt.zero_point.float()).all(), qt.zero_point
    back = qt.dequantize().double()
    assert torch.isfinite(back).all(), "codes dequantize to inf"
    wd = w.double()
    big = wd.abs() > 1e38
    err = ((back - wd).abs() / wd.abs())[big].max().item()
    assert err <= rel, f"values near float32's limit come back {err:.3f} off"
    assert back[2].abs().max().item() < 1e-36, "a subnormal row came back large"
    if qt.axis is not None:
        ref, got = wd[3:], back[3:]
        db = 10 * torch.log10(ref.square().sum() / (ref - got).square().sum()).item()
        assert db >= normal_db, f"ordinary rows next to extreme ones: {db:.2f} dB"


class BrokenScaleScheme(mq.Scheme):
    """``broken-int8``: symmetric int8 codes whose first scale is inf (a scheme bug)."""

    name = "broken-int8"

    def spec(self, shape, axis, config):
        return mq.QuantSpec(bits=8, symmetric=True, axis=axis)

    def quantize(self, weight, qparams, spec, config):
        scale = qparams.scale.clone()
        scale[0] = float("inf")
        q = torch.zeros(weight.shape[0], weight[0].numel(), dtype=torch.int8)
        return mq.QTensor(
            q, scale, None, 8, None, spec.axis, tuple(weight.shape), weight.dtype, self.name
        )


class BrokenScalePlugin:
    """Registers :class:`BrokenScaleScheme`."""

    monoquant_plugin_name = "broken"

    @mq.hookimpl
    def monoquant_register_schemes(self, register):
        register(BrokenScaleScheme())


def tiny_bert(path):
    """A small random transformers ``BertModel`` (2 layers, hidden 128) saved with
    ``save_pretrained`` at ``path``: ``(model, config)``. Needs transformers."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(path)
    return model, cfg


def with_1_and_2_threads(fn):
    """``(fn() with one torch thread, fn() with two)``, the thread count restored after."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        return one, fn()
    finally:
        torch.set_num_threads(threads)


def cpu_gemm_fixture(which: str):
    """A module-scoped autouse fixture that makes torch-cpu choose its ``which`` (``"bf16"`` or
    ``"f32"``) many-row GEMMs, as on CPUs whose bfloat16 dot products beat (or do not beat) their
    float32 FMAs: ``_gemms = cpu_gemm_fixture("bf16")`` at a test module's top level."""

    @pytest.fixture(autouse=True, scope="module")
    def _gemms():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MONOQUANT_CPU_GEMM", which)
            yield

    return _gemms
