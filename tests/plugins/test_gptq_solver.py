"""gptq_solver.py: the solver against the textbook algorithm, and its fallbacks.

The textbook reference below is GPTQ as published (IST-DASLab/gptq ``fasterquant``): the
upper Cholesky factor of ``H^-1`` from ``cholesky -> cholesky_inverse -> cholesky(upper)``,
column blocks with lazy updates, group parameters computed from the error-updated weights when
a group starts. The plugin's solver must round the same way.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from monoquant_plugins.gptq_solver import gptq_solve

from monoquant_core import QParams, QuantSpec, minmax_qparams, sqnr_db
from monoquant_core.affine import round_params
from monoquant_core.layout import to_groups

pytestmark = pytest.mark.usefixtures("single_thread")


def minmax_grid(spec: QuantSpec):
    def grid(cols: torch.Tensor) -> QParams:
        g = to_groups(cols, 0, spec.group_size)
        qp = minmax_qparams(g.amin(-1), g.amax(-1), spec)
        return round_params(qp, spec.param_dtype)

    return grid


def quant_col(x, s, z, spec):
    q = torch.floor(torch.clamp(x / s + (0 if z is None else z) + 0.5, spec.qmin, spec.qmax + 0.5))
    return (q - (0 if z is None else z)) * s


def textbook_gptq(w, h, spec, block=128, damp=0.01):
    """Reference GPTQ (dynamic groups from the updated weights), float64."""
    w = w.double().clone()
    h = h.double().clone()
    k = w.shape[1]
    gs = spec.group_size or k
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    grid = minmax_grid(spec)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if (i1 + i) % gs == 0:
                qp = grid(w1[:, i : i + gs].float())
                s = qp.scale[:, 0].double()
                z = None if qp.zero_point is None else qp.zero_point[:, 0].double()
            col = w1[:, i]
            qc = quant_col(col, s, z, spec)
            q[:, i1 + i] = qc
            e = (col - qc) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= e.unsqueeze(1) * hinv[i1 + i, i1 + i : i2].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.float()


def correlated_inputs(n: int, k: int, seed: int = 0, outliers: int = 4) -> torch.Tensor:
    """Activations with a decaying spectrum and a few outlier channels (like real ones)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k).unsqueeze(1)
    x = torch.randn(n, k, generator=g) @ mix
    x[:, :outliers] *= 8.0
    return x


def out_db(x, w, wq):
    return sqnr_db(x @ w.T, x @ wq.T)


def rtn(w, spec):
    qp = minmax_grid(spec)(w)
    return quant_col(
        to_groups(w, 0, spec.group_size), qp.scale.unsqueeze(-1), qp.zero_point.unsqueeze(-1), spec
    ).reshape(w.shape[0], -1)[:, : w.shape[1]]


# --------------------------------------------------------------------------- the solver


@pytest.mark.parametrize("gs,block", [(32, 128), (64, 64), (32, 48), (128, 32)])
def test_solver_matches_textbook_gptq(gs, block):
    """Same codes as the textbook; the block size changes the speed, never the result."""
    spec = QuantSpec(4, False, 0, gs, True, torch.float16)
    x = correlated_inputs(512, 192)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(48, 192) * 0.05
    ref = textbook_gptq(w, h, spec, block=128)
    res = gptq_solve(w, h, spec, grid=minmax_grid(spec), block_size=block)
    got = res.qweight()
    same = torch.isclose(got, ref, rtol=1e-5, atol=1e-7).float().mean().item()
    assert res.fallback is None and res.damp == 0.01
    assert same >= 0.99, f"only {same:.2%} of the codes match the textbook GPTQ"
    d_ref, d_got = out_db(x, w, ref), out_db(x, w, got)
    assert abs(d_ref - d_got) < 0.1, f"output SQNR {d_got:.2f} dB vs textbook {d_ref:.2f} dB"


def test_gptq_beats_rtn_on_correlated_inputs():
    x = correlated_inputs(1024, 256)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(64, 256) * 0.05
    spec = QuantSpec(4, False, 0, 128, True, torch.float16)
    got = gptq_solve(w, h, spec, grid=minmax_grid(spec)).qweight()
    gain = out_db(x, w, got) - out_db(x, w, rtn(w, spec))
    assert gain >= 3.0, f"GPTQ gains only {gain:.2f} dB output SQNR over RTN"


def test_act_order_static_groups_keep_standard_groups():
    x = correlated_inputs(1024, 256)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(64, 256) * 0.05
    spec = QuantSpec(4, False, 0, 64, True, torch.float16)
    params = minmax_grid(spec)(w)
    res = gptq_solve(w, h, spec, params=params, act_order=True)
    assert res.params is params  # the static grid is the stored one
    q = res.qweight()
    # every value is on its (standard, consecutive) group's grid
    codes = to_groups(q, 0, 64) / params.scale.unsqueeze(-1) + params.zero_point.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    gain = out_db(x, w, q) - out_db(x, w, rtn(w, spec))
    assert gain >= 3.0, f"act-order GPTQ gains only {gain:.2f} dB over RTN"


def test_rank_deficient_hessian_is_damped_not_nan():
    z = torch.randn(300, 3)
    x = z @ torch.randn(3, 128)  # rank 3
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 128) * 0.05
    spec = QuantSpec(4, False, 0, 32, True, torch.float16)
    res = gptq_solve(w, h, spec, grid=minmax_grid(spec))
    q = res.qweight()
    assert res.fallback is None and torch.isfinite(q).all()
    gain = out_db(x, w, q) - out_db(x, w, rtn(w, spec))
    assert gain >= 10.0, f"rank-3 inputs: GPTQ gains only {gain:.2f} dB over RTN"


def test_dead_inputs_are_rounded_to_nearest():
    x = correlated_inputs(512, 128)
    x[:, 40:56] = 0.0  # inputs that never fire
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 128) * 0.05
    spec = QuantSpec(4, False, 0, 32, True, torch.float16)
    res = gptq_solve(w, h, spec, grid=minmax_grid(spec))
    q = res.qweight()
    assert torch.isfinite(q).all() and res.fallback is None
    # a dead column passes no error on and is itself on its group's grid, near its weight
    s = res.params.scale[:, 1:2]
    assert (q[:, 40:56] - res.weight[:, 40:56]).abs().le(s / 2 + 1e-6).all()


@pytest.mark.parametrize(
    "h,why",
    [
        (
            2.5 * torch.ones(64, 64) - 1.5 * torch.eye(64),
            "Cholesky factorization failed up to damp=1 ",
        ),
        (-torch.eye(64), "negative diagonal"),
        (torch.full((64, 64), float("nan")), "NaN"),
        (torch.zeros(64, 64), "no calibration data"),
        (None, "no calibration data"),
    ],
)
def test_bad_hessian_falls_back_to_rtn(h, why):
    w = torch.randn(16, 64) * 0.05
    spec = QuantSpec(4, False, 0, 32, True, torch.float16)
    res = gptq_solve(w, h, spec, grid=minmax_grid(spec), retries=2)
    assert res.fallback is not None and why in res.fallback, res.fallback
    assert torch.equal(res.qweight(), rtn(w, spec))


def test_damping_is_raised_until_the_factorization_works():
    k = 64
    q, _ = torch.linalg.qr(torch.randn(k, k))
    h = q @ torch.diag(torch.cat([torch.ones(k - 1), torch.tensor([-0.5])])) @ q.T
    w = torch.randn(16, k) * 0.05
    spec = QuantSpec(4, False, 0, 32, True, torch.float16)
    res = gptq_solve(w, h, spec, grid=minmax_grid(spec), damp=0.01)
    # mean diagonal ~0.98: 0.01 and 0.1 leave it indefinite, 1.0 does not
    assert res.fallback is None and res.damp == pytest.approx(1.0)
    assert torch.isfinite(res.qweight()).all()


def test_the_callers_weight_is_never_written():
    """A transposed view (GPT-2 Conv1D's [in, out] weight seen as [out, in]) stays intact."""
    base = torch.randn(128, 32) * 0.05  # [K, C]
    keep = base.clone()
    x = correlated_inputs(256, 128)
    spec = QuantSpec(4, False, 0, 32, True, torch.float16)
    for act in (False, True):
        kw = {"params": minmax_grid(spec)(base.t()), "act_order": True} if act else {}
        res = gptq_solve(base.t(), 2 * x.T @ x, spec, grid=minmax_grid(spec), **kw)
        assert not torch.equal(res.weight, base.t())
        assert torch.equal(base, keep)


def test_per_channel_int8_static_params():
    x = correlated_inputs(512, 128)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 128) * 0.05
    spec = QuantSpec(8, True, 0, None)
    amax = w.abs().amax(1, keepdim=True)
    params = QParams(amax / 127, None)
    res = gptq_solve(w, h, spec, params=params)
    q = res.qweight()
    r = (w / params.scale).round().clamp(-128, 127) * params.scale
    gain = out_db(x, w, q) - out_db(x, w, r)
    assert gain >= 3.0, f"int8 GPTQ gains only {gain:.2f} dB over RTN"


# --------------------------------------------------------------------------- timing


@pytest.mark.slow
@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "dynamic_groups"])
def test_4096_layer_within_two_matmuls_single_thread(act_order):
    """One thread, Hessian given: the solve costs at most 2x one fp32 4096x4096 matmul timed in
    the same run (machines differ: an absolute bound failed on a slower CI machine). CPU time
    of this thread (best of 7), so that time another process takes does not count. The bound
    was 1.8x until an Intel Xeon (AVX512, no AMX), whose matmul is fast next to the solve's
    Cholesky (torch's ``cholesky_ex`` zeroes the upper triangle with a ``tril`` of 100-200 ms
    there): 1.75x alone, 1.83x and 2.11x in two CI runs' slow sets; 2x is the test's name."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(8192, 4096)
        h = 2 * x.T @ x / x.shape[0]
        w = torch.randn(4096, 4096) * 0.02
        spec = QuantSpec(4, False, 0, 128, True, torch.float16)
        grid = minmax_grid(spec)
        kw = {"params": grid(w), "act_order": True} if act_order else {"grid": grid}
        cpu = wall = matmul = math.inf
        for _ in range(7):
            c0 = time.thread_time()
            torch.mm(w, h)
            matmul = min(matmul, time.thread_time() - c0)
            t0, c0 = time.perf_counter(), time.thread_time()
            res = gptq_solve(w, h, spec, **kw)
            cpu = min(cpu, time.thread_time() - c0)
            wall = min(wall, time.perf_counter() - t0)
            assert res.fallback is None
    finally:
        torch.set_num_threads(threads)
    assert cpu < 2.0 * matmul, (
        f"GPTQ on 4096x4096 took {cpu:.2f} s CPU ({wall:.2f} s wall), one thread: "
        f"{cpu / matmul:.2f}x one fp32 4096x4096 matmul ({matmul:.2f} s)"
    )


@pytest.mark.parametrize(
    "scheme,opts",
    [
        ("int4-group", {"group_size": 32}),
        ("int4-group", {"group_size": 64, "symmetric": True}),
        ("int4-group", {"zero": "int", "method": "rtn"}),
        ("int8", {}),
        ("int8", {"symmetric": False}),
        ("int8", {"granularity": "per-tensor"}),
    ],
)
@pytest.mark.parametrize("act_order", [False, True])
def test_the_scheme_packs_exactly_the_codes_gptq_chose(engine, scheme, opts, act_order):
    """scheme.quantize(W', params) reproduces GPTQ's rounding bit for bit, in every layout."""
    from monoquant_core import QParams

    sch = engine.schemes.get(scheme)
    cfg = engine.scheme_config(scheme, opts)
    x = correlated_inputs(512, 256)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(48, 256) * 0.05
    spec = sch.spec(tuple(w.shape), 0, cfg)
    obs = engine.observers.get("minmax")

    def grid(cols):
        sp = sch.spec(tuple(cols.shape), 0, cfg)
        o = obs(sp, obs.config_class())
        o.update(cols)
        qt = sch.quantize(cols.contiguous(), o.qparams(), sp, cfg)
        z = None if qt.zero_point is None else qt.zero_point.float()
        return QParams(qt.scale.float(), z)

    static = act_order or spec.group_size is None
    shift = -spec.qmin if scheme == "int4-group" else 0
    res = gptq_solve(
        w,
        h,
        spec,
        grid=None if static else grid,
        params=grid(w) if static else None,
        act_order=act_order,
        code_shift=shift,
    )
    final = cfg if scheme == "int8" else type(cfg)(**{**cfg.__dict__, "method": "rtn"})
    qt = sch.quantize(res.weight.contiguous(), res.params, spec, final)
    qt.validate()
    assert torch.equal(qt.dequantize(torch.float32), res.qweight())
    gain = out_db(x, w, res.qweight()) - out_db(
        x, w, sch.quantize(w, grid(w), spec, cfg).dequantize()
    )
    assert gain >= 1.0, f"{scheme} {opts}: GPTQ gains only {gain:.2f} dB over the plain scheme"
