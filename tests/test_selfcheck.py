"""The first-use self-check of the GPU backends (cdm_kernels/selfcheck.py): every correct vehicle
passes its own check in every precision and dtype it has, a backend made wrong on purpose fails it
(a warning and the reference for "auto", an error for the backend by name), and the check keeps out
of what it must not touch: compile tracing, dispatch modes, graph capture, random state, memory."""

from __future__ import annotations

import contextlib
import gc
import math
import random
import re
import threading
import types
import warnings

import numpy as np
import pytest
import torch
from matrix import cases, mode_cases

import cdm_kernels
from cdm_kernels import registry, rollout_reference, selfcheck, stf_reference
from cdm_kernels import random as philox
from cdm_kernels.selfcheck import SelfCheckError, SelfCheckWarning

CPU = torch.device("cpu")
F32, F64 = torch.float32, torch.float64
# Every (precision, dtype) a stable-target backend with every mode has.
MODES = [("ieee", F32), ("tf32x3", F32), ("tf32", F32), ("bf16", F32), ("ieee", F64)]


@pytest.fixture
def fresh(monkeypatch):
    """A copy of the registry and no self-check record for the test (the package's come back after),
    the check on, and "auto" for CPU tensors preferring the backend name "triton" (under which the
    tests register their backends)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for name in ("_RESOLVED", "_CHOSEN"):
        monkeypatch.setattr(registry, name, {})
    for name in ("_RECORDS", "_TRACED"):
        monkeypatch.setattr(selfcheck, name, {})
    monkeypatch.delenv("CDM_SELFCHECK", raising=False)
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", ("triton", "cpu", "reference"))
    return registry


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# ----------------------------------------------------------------------------------------------
# Backends made wrong on purpose: the reference with one planted bug each
# ----------------------------------------------------------------------------------------------

F, BW = stf_reference.stf_forward, stf_reference.stf_backward


def _last_start(n, chunk):
    return ((n - 1) // chunk) * chunk


def _fwd_drop_last_chunk(x, s, ref, c, chunk, p, keep):
    mu, lse, aux, _ = F(x, s, ref[: _last_start(ref.shape[0], chunk)], c, chunk, p, False)
    return mu, lse, aux, F(x, s, ref, c, chunk, p, keep)[3]


def _bwd_drop_last_chunk(gm, gl, x, s, ref, c, mu, aux, dist, chunk, p, ref_grad):
    last = _last_start(ref.shape[0], chunk)
    gx, gs, gr = BW(gm, gl, x, s, ref[:last], c, mu, aux, dist[: x.shape[0] * last], chunk, p, ref_grad)
    return gx, gs, torch.cat([gr, torch.zeros_like(ref[last:])]) if ref_grad else gr


def _fwd_skip_first_of_each_chunk(x, s, ref, c, chunk, p, keep):
    kept = torch.arange(ref.shape[0]) % chunk != 0
    mu, lse, aux, _ = F(x, s, ref[kept], c, chunk - 1, p, False)
    return mu, lse, aux, F(x, s, ref, c, chunk, p, keep)[3]


def _with(module, name, make):
    """A forward that runs the reference with module.name replaced by make(original)."""

    def forward(*args):
        with _patched(module, name, make(getattr(module, name))):
            return F(*args)

    return forward


def _no_rescale(rebase):
    def wrong(state, m_new, k):  # the merge rescales l, l2, t but not the accumulator
        out = rebase(state, m_new, k)
        out.a = state.a * (state.m != torch.inf)[:, None].to(state.a.dtype)
        return out

    return wrong


def _previous_reference(chunk_state):
    return lambda d, k, ro, p, start=0: chunk_state(d, k, tuple(torch.roll(t, 1, 0) for t in ro), p, start)


def _last_feature_dropped(distances):
    def wrong(xo, xn, ro, rn):
        xo = tuple(t.clone() for t in xo)
        for t in xo:
            t[:, -1] = 0
        return distances(xo, xn, ro, rn)

    return wrong


def _fwd_last_row_copied(*args):
    mu, lse, aux, dist = (t.clone() for t in F(*args))
    mu[-1], lse[-1], aux[-1] = mu[-2], lse[-2], aux[-2]
    return mu, lse, aux, dist


def _tf32_always(fn, at):
    def wrong(*args):
        args = list(args)
        args[at] = "tf32" if args[0].dtype == torch.float32 else args[at]
        return fn(*args)

    return wrong


def _bwd_without_grad_lse(gm, gl, *args):
    return BW(gm, torch.zeros_like(gl), *args)


STF_BUGS = {
    "the forward drops the last chunk": (_fwd_drop_last_chunk, BW),
    "the backward drops the last chunk": (F, _bwd_drop_last_chunk),
    "the merge does not rescale the accumulator": (_with(stf_reference, "rebase", _no_rescale), BW),
    "the accumulator takes r_(j-1) for r_j": (_with(stf_reference, "chunk_state", _previous_reference), BW),
    "the first reference of each chunk is skipped": (_fwd_skip_first_of_each_chunk, BW),
    "the distances drop the last feature": (_with(stf_reference, "distances", _last_feature_dropped), BW),
    "the last row is the one before": (_fwd_last_row_copied, BW),
    "the backward ignores grad_lse": (F, _bwd_without_grad_lse),
    "every product in TF32": (_tf32_always(F, 5), _tf32_always(BW, 10)),
}


def _stf_backend(forward, backward):
    return types.SimpleNamespace(stf_forward=forward, stf_backward=backward)


def _register_stf(reg, forward=F, backward=BW, backend="triton"):
    reg.register(backend, ("cpu",), {"stf_target": _stf_backend(forward, backward)},
                 precisions={"stf_target": registry.PRECISIONS})


@pytest.mark.parametrize("bug", STF_BUGS)
@pytest.mark.parametrize("precision, dtype", MODES, ids=[f"{p}-{str(d)[6:]}" for p, d in MODES])
def test_a_wrong_stable_target_fails_its_check_in_every_mode(fresh, bug, precision, dtype):
    if bug == "every product in TF32" and (precision in ("tf32", "bf16") or dtype == F64):
        pytest.skip("TF32 is the mode itself, or more accurate than it (bf16), or not applied (float64)")
    _register_stf(fresh, *STF_BUGS[bug])
    rec = selfcheck.verdict("stf_target", CPU, "triton", precision, dtype)
    assert rec.status == "failed", (bug, rec.detail)
    # By a margin: the worst quantity is at least twice its budget.
    assert max(e / t for _, e, t in rec.rows) >= 2, rec.rows


def _sde_coefficient_halved(x, D, tc, tn, xe, De, z, seed, offset, kind, s):
    if kind == "sde":  # h (x - D) / t for 2 h (x - D) / t
        D = 0.5 * (x + D)
    return rollout_reference.rollout_step(x, D, tc, tn, xe, De, z, seed, offset, kind, s)


def _noise_32bit(anchor, shape, seed, offset):
    """Philox noise whose counters offset + i wrap at 2^32 (a 32-bit index)."""
    n, base = math.prod(shape), offset & 0xFFFFFFFF
    head = min(n, (1 << 32) - base)
    parts = [philox.philox_randn(anchor, [head], seed, base), philox.philox_randn(anchor, [n - head], seed, 0)]
    return torch.cat(parts).reshape(shape)


def _noise_counter(shift: int, wrap: bool = False):
    def wrong(x, D, tc, tn, xe, De, z, seed, offset, kind, s):
        if z is None and kind in ("sde", "churn"):
            z = (_noise_32bit(x, list(x.shape), seed, offset) if wrap else
                 philox.philox_randn(x, list(x.shape), seed, offset + shift)).to(x.dtype)
        return rollout_reference.rollout_step(x, D, tc, tn, xe, De, z, seed, offset, kind, s)

    return wrong


def _philox_key_low_word(x, D, tc, tn, xe, De, z, seed, offset, kind, s):
    return rollout_reference.rollout_step(x, D, tc, tn, xe, De, z, seed & 0xFFFFFFFF, offset, kind, s)


def _heun_at_t_cur(x, D, tc, tn, xe, De, z, seed, offset, kind, s):
    return rollout_reference.rollout_step(x, D, tc, tc if kind == "heun" else tn, xe, De, z, seed, offset, kind, s)


def _churn_without_s_noise(x, D, tc, tn, xe, De, z, seed, offset, kind, s):
    return rollout_reference.rollout_step(x, D, tc, tn, xe, De, z, seed, offset, kind, 1.0)


def _last_column_unwritten(*args):
    out = rollout_reference.rollout_step(*args).clone()
    out[:, -1] = 0
    return out


ROLLOUT_BUGS = {
    "the sde step's drift is halved": _sde_coefficient_halved,
    "the noise counter is one off": _noise_counter(1),
    "the noise counter wraps at 2^32": _noise_counter(0, wrap=True),
    "the Philox key loses its high word": _philox_key_low_word,
    "heun's correction at t_cur": _heun_at_t_cur,
    "churn ignores S_noise": _churn_without_s_noise,
    "the last column is not written": _last_column_unwritten,
}


@pytest.mark.parametrize("bug", ROLLOUT_BUGS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_a_wrong_rollout_step_fails_its_check(fresh, bug, dtype):
    fresh.register("triton", ("cpu",), {"rollout_step": {"rollout_step": ROLLOUT_BUGS[bug]}})
    rec = selfcheck.verdict("rollout_step", CPU, "triton", None, dtype)
    assert rec.status == "failed", (bug, rec.detail)


def _loss_backward_without_lambda(grad, D0, D1a, D1b, y, w, lambda_m):
    g0, _, _ = rollout_reference.martingale_loss_backward(grad, D0, D1a, D1b, y, w, lambda_m)
    _, ga, gb = rollout_reference.martingale_loss_backward(grad, D0, D1a, D1b, y, w, 1.0)
    return g0, ga, gb


def _loss_weight_of_row_zero(D0, D1a, D1b, y, w, lambda_m):
    w = w[:1].expand_as(w) if w.dim() == 1 else w  # a per-row weight read from row 0 only
    return rollout_reference.martingale_loss_forward(D0, D1a, D1b, y, w, lambda_m)


LOSS_BUGS = {
    "the backward's D1a, D1b gradients drop lambda_m": {"martingale_loss_forward": rollout_reference.martingale_loss_forward,
                                                         "martingale_loss_backward": _loss_backward_without_lambda},
    "a per-row weight from row 0": {"martingale_loss_forward": _loss_weight_of_row_zero,
                                    "martingale_loss_backward": rollout_reference.martingale_loss_backward},
}


@pytest.mark.parametrize("bug", LOSS_BUGS)
def test_a_wrong_martingale_loss_fails_its_check(fresh, bug):
    fresh.register("triton", ("cpu",), {"martingale_loss": LOSS_BUGS[bug]})
    assert selfcheck.verdict("martingale_loss", CPU, "triton", None, F32).status == "failed"


@pytest.mark.parametrize("wrong", [lambda a, shape, seed, offset: philox.philox_randn(a, shape, seed, offset + 1),
                                   _noise_32bit,
                                   lambda a, shape, seed, offset: philox.philox_randn(a, shape, seed & 0xFFFFFFFF, offset)],
                         ids=["counter one off", "counter wraps at 2^32", "key loses its high word"])
def test_a_wrong_noise_generator_fails_its_check(fresh, wrong):
    fresh.register("triton", ("cpu",), {"randn": {"philox_randn": wrong}})
    assert selfcheck.verdict("randn", CPU, "triton", None, F32).status == "failed"


# ----------------------------------------------------------------------------------------------
# Every correct vehicle passes, with a margin
# ----------------------------------------------------------------------------------------------


def _vehicle_params():
    out = []
    for op in selfcheck._CHECKS:
        params = mode_cases(op) if registry.OPS[op].has_precision else cases(op)
        for param in params:
            case, precision = (param.values if len(param.values) == 2 else (param.values[0], None))
            if case.backend not in selfcheck.CHECKED:
                continue
            dtypes = [F32] if op == "randn" or precision not in (None, "ieee") else [F32, F64]
            for dtype in dtypes:
                out.append(pytest.param(case, precision, dtype, marks=param.marks,
                                        id=f"{op}-{param.id}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("case, precision, dtype", _vehicle_params())
def test_every_vehicle_passes_its_own_check(case, precision, dtype):
    # The suite's records (shared with every other test's first use of the vehicle).
    rec = selfcheck.verdict(case.op, torch.device(case.device), case.backend, precision, dtype)
    assert rec is not None and rec.passed, rec and rec.detail
    # By a margin: every quantity within half its budget (the measured margins: docs/contributing.md).
    assert all(e <= t / 2 for _, e, t in rec.rows), rec.rows


def test_the_problem_exceeds_every_block_and_spreads_the_weights():
    triton_stf = pytest.importorskip("cdm_kernels.triton.stf")
    triton_rollout = pytest.importorskip("cdm_kernels.triton.rollout")
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "csrc", "cuda", "stf_kernels.h")) as f:
        header = f.read()
    with open(os.path.join(root, "csrc", "cuda", "rollout.cu")) as f:
        threads = int(re.search(r"constexpr int kThreads = (\d+);", f.read()).group(1))
    lanes = [int(re.search(rf"constexpr int64_t {k} = (\d+);", header).group(1)) for k in ("LANES", "PARTS")]
    for device_type, (B, n, D, chunk) in selfcheck.STF_SHAPES.items():
        blocks = triton_stf._blocks(torch.device(device_type))
        assert B > blocks["rows"] and B % blocks["rows"]
        assert D > blocks["d"] and all(D % b for b in (blocks["d"], blocks["cols"], *lanes))
        assert chunk > blocks["cols"] and all(chunk % b for b in (blocks["cols"], *lanes)) and n % chunk
        (x, sigma, ref, centre, _, _), _ = selfcheck._stf_problem(device_type, F64)
        assert centre.abs().min() > 1  # the operands are shifted
        _, _, aux, _ = F(x, sigma, ref, centre, chunk, "ieee", False)
        n_eff = aux[:, 3]
        assert (n_eff > n / 20).all() and (n_eff < n / 2).all(), n_eff  # spread, not uniform
    M = selfcheck.ELEMENTWISE_SHAPE[1]
    assert M > triton_rollout.BLOCK and M % triton_rollout.BLOCK and M > threads and M % threads
    lo, hi = selfcheck.PHILOX_OFFSET, selfcheck.PHILOX_OFFSET + math.prod(selfcheck.ELEMENTWISE_SHAPE)
    assert lo >> 32 != (hi - 1) >> 32 and selfcheck.PHILOX_SEED >> 32 and selfcheck.PHILOX_SEED & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# The consequences of a failed check: one warning and the reference, or an error
# ----------------------------------------------------------------------------------------------


def _problem():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 9, generator=g), torch.rand(4, generator=g) + 0.5, torch.randn(30, 9, generator=g)


def test_auto_warns_once_and_takes_the_reference_explicit_raises(fresh):
    _register_stf(fresh, *STF_BUGS["the forward drops the last chunk"])
    x, s, r = _problem()
    want = cdm_kernels.stf_target(x, s, r, backend="reference")
    with pytest.warns(SelfCheckWarning) as caught:
        got = cdm_kernels.stf_target(x, s, r)
    assert len(caught) == 1 and caught[0].filename == __file__  # at the caller's line
    text = str(caught[0].message)
    assert re.search(r"backend 'triton' on cpu, stf_target precision 'ieee', float32 is outside its error budget on "
                     r"its first use: w_max relative error \d\.\d\de-\d\d against the float64 reference, budget "
                     r"\d\.\d\de-\d\d \(10 of 10 quantities outside their budgets: mu, lse, n_eff, ", text), text
    assert "backend='auto' uses 'reference'" in text
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        torch.testing.assert_close(cdm_kernels.stf_target(x, s, r), want, rtol=0, atol=0)
        assert cdm_kernels.stf_score(x, s, r).shape == x.shape
    assert fresh.resolve_backend("stf_target", "cpu", dtype=F32) == "reference"
    assert fresh.resolve_backend("stf_target", "cpu") == "triton"  # the registry's answer, before the check
    for _ in range(2):  # every call, with the warning's text
        with pytest.raises(SelfCheckError, match=re.escape(text)):
            cdm_kernels.stf_target(x, s, r, backend="triton")
    status = cdm_kernels.extension_status()
    assert re.search(r"backend 'triton' on cpu, stf_target precision 'ieee', float32: FAILED, backend='auto' uses "
                     r"'reference' \(w_max relative error", status), status


def test_each_combination_is_checked_on_its_own(fresh):
    # A backend wrong in one mode only: "tf32" falls back, the other modes and float64 keep it.
    def forward(x, s, ref, c, chunk, p, keep):
        return (_fwd_drop_last_chunk if p == "tf32" else F)(x, s, ref, c, chunk, p, keep)

    _register_stf(fresh, forward)
    x, s, r = _problem()
    with pytest.warns(SelfCheckWarning, match="precision 'tf32', float32"):
        cdm_kernels.stf_target(x, s, r, precision="tf32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p, dt in (("ieee", F32), ("bf16", F32), ("ieee", F64)):
            cdm_kernels.stf_target(x.to(dt), s.to(dt), r.to(dt), precision=p)
            assert fresh.resolve_backend("stf_target", "cpu", "auto", p, dtype=dt) == "triton"
    assert fresh.resolve_backend("stf_target", "cpu", "auto", "tf32", dtype=F32) == "reference"
    got = {(r.precision, r.dtype): r.status for r in selfcheck.records()}
    assert got == {("tf32", F32): "failed", ("ieee", F32): "passed", ("bf16", F32): "passed", ("ieee", F64): "passed"}


def test_the_rollout_families_fall_back_and_raise(fresh):
    fresh.register("triton", ("cpu",), {"rollout_step": {"rollout_step": ROLLOUT_BUGS["the noise counter is one off"]},
                                        "martingale_loss": LOSS_BUGS["a per-row weight from row 0"],
                                        "randn": {"philox_randn": lambda a, sh, se, o: philox.philox_randn(a, sh, se, o + 1)}})
    x = torch.randn(2, 3, 4)
    t, tn = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    calls = [("rollout_step", lambda b: cdm_kernels.rollout_step(x, x * 0.5, t, tn, kind="sde", seed=3, backend=b)),
             ("rollout_step", lambda b: cdm_kernels.consistency_rollout(lambda v, s, lab: 0.5 * v, x, 1.0, 0.1, seed=3,
                                                                       backend=b)[0]),
             ("martingale_loss", lambda b: cdm_kernels.martingale_loss(x, x + 1, x - 1, x * 0, t.reshape(2, 1, 1),
                                                                       backend=b)),
             ("randn", lambda b: cdm_kernels.randn((5, 7), 11, backend=b))]
    warned = set()
    for op, call in calls:
        want = call("reference")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.testing.assert_close(call("auto"), want, rtol=0, atol=0)
        # One warning per combination: consistency_rollout's steps are rollout_step's, already fallen back.
        assert [str(w.message).split(" is outside")[0] for w in caught if w.category is SelfCheckWarning] == (
            [] if op in warned else [f"cdm_kernels self-check: backend 'triton' on cpu, {op} float32"])
        warned.add(op)
        with pytest.raises(SelfCheckError, match=rf"backend 'triton' on cpu, {op} float32 is outside its error budget"):
            call("triton")


def test_off_with_CDM_SELFCHECK_0(fresh, monkeypatch):
    monkeypatch.setenv("CDM_SELFCHECK", "0")
    _register_stf(fresh, *STF_BUGS["the last row is the one before"])
    x, s, r = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrong = cdm_kernels.stf_target(x, s, r)
    assert not torch.allclose(wrong, cdm_kernels.stf_target(x, s, r, backend="reference"))  # used unchecked
    assert selfcheck.records() == []
    assert "self-check of the GPU backends on first use: off (CDM_SELFCHECK=0)" in cdm_kernels.extension_status()


def test_a_backend_that_raises_fails_and_out_of_memory_is_tried_again(fresh, monkeypatch):
    def raising(*args):
        raise IndexError("index 7 is out of bounds")

    _register_stf(fresh, raising)
    rec = selfcheck.verdict("stf_target", CPU, "triton", "ieee", F32)
    assert rec.status == "failed" and "it raised IndexError: index 7 is out of bounds" in rec.detail
    tries = []

    def oom_once(*args):
        tries.append(1)
        if len(tries) == 1:
            raise torch.OutOfMemoryError("no memory for the check")
        return F(*args)

    _register_stf(fresh, oom_once)  # registered again: checked anew
    assert selfcheck.records() == []
    x, s, r = _problem()
    cdm_kernels.stf_target(x, s, r)  # the check could not run: the call goes on with the backend
    assert [r.status for r in selfcheck.records()] == ["not run"]
    assert "out of memory" in selfcheck.records()[0].detail and ("stf_target", CPU, "auto", "ieee", F32) not in \
        fresh._CHOSEN
    cdm_kernels.stf_target(x, s, r)  # tried again
    assert [r.status for r in selfcheck.records()] == ["passed"]
    # Where the reference itself cannot run, the backend is used unchecked, once and for all.
    _register_stf(fresh)

    def no_problem(*args):
        raise RuntimeError("the reference cannot run here")

    monkeypatch.setattr(selfcheck, "_stf_problem", no_problem)
    for _ in range(2):
        cdm_kernels.stf_target(x, s, r)
    ((status, detail),) = [(r.status, r.detail) for r in selfcheck.records()]
    assert status == "unchecked" and "the reference could not run (RuntimeError: the reference cannot run here)" in detail
    assert fresh._CHOSEN[("stf_target", CPU, "auto", "ieee", F32)] == "triton"


# ----------------------------------------------------------------------------------------------
# Where a check cannot run, and what it must not touch
# ----------------------------------------------------------------------------------------------


def test_compile_tracing_runs_it_unchecked_until_an_eager_call_checks_it(fresh):
    _register_stf(fresh, *STF_BUGS["the last row is the one before"])
    x, s, r = _problem()
    want = cdm_kernels.stf_target(x, s, r, backend="reference")

    def f(x, s, r):
        return cdm_kernels.stf_target(x, s, r) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = compiled(x, s, r) / 2  # traced before any check: the backend unchecked, and no error
    assert not torch.allclose(first, want)
    assert selfcheck.records() == []
    assert "stf_target precision 'ieee', float32: not run (first used inside torch.compile tracing" in \
        cdm_kernels.extension_status()
    with pytest.warns(SelfCheckWarning):
        cdm_kernels.stf_target(x, s, r)
    torch.testing.assert_close(compiled(x, s, r) / 2, want, rtol=0, atol=0)  # retraced: it follows the verdict
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_dispatch_modes_and_traces_see_no_check(fresh):
    from matrix import RecordOps

    _register_stf(fresh)
    x, s, r = _problem()
    with RecordOps() as first:  # first met inside a dispatch mode: not checked (and not cached)
        cdm_kernels.stf_target(x, s, r)
    (rec,) = selfcheck.records()
    assert rec.status == "not run" and "dispatch or function mode" in rec.detail and not fresh._CHOSEN
    cdm_kernels.stf_target(x, s, r)  # checked here
    assert [r.status for r in selfcheck.records()] == ["passed"]
    with RecordOps() as later:
        cdm_kernels.stf_target(x, s, r)
    assert first.ops == later.ops  # the mode saw the call's own ops only
    seen = []
    torch.jit.trace(lambda t: seen.append(selfcheck.not_now(CPU)) or 2 * t, (torch.ones(2),), check_trace=False)
    assert "torch.jit trace" in seen[0]


def test_not_now_names_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert "inside CUDA graph capture" in selfcheck.not_now(torch.device("cuda", 0))
    assert selfcheck.not_now(CPU) is None


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "grad", "deterministic"])
def test_the_check_runs_whatever_the_grad_and_determinism_settings(fresh, context):
    _register_stf(fresh, *STF_BUGS["the merge does not rescale the accumulator"])
    x, s, r = _problem()
    want = cdm_kernels.stf_target(x, s, r, backend="reference")
    settings = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(), "grad": contextlib.nullcontext(),
                "deterministic": contextlib.nullcontext()}[context]
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(context == "deterministic")
        with settings, pytest.warns(SelfCheckWarning):
            xs = x.clone().requires_grad_(context == "grad")
            got = cdm_kernels.stf_target(xs, s, r)
        if context == "grad":
            got.sum().backward()  # through the op with backend "reference"
            assert xs.grad is not None
    finally:
        torch.use_deterministic_algorithms(was)
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


def _live_tensors() -> set:
    gc.collect()
    return {id(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def test_the_check_leaves_no_random_state_changed_and_no_tensor_behind(fresh):
    _register_stf(fresh, *STF_BUGS["the forward drops the last chunk"])
    fresh.register("triton", ("cpu",), {"rollout_step": rollout_reference, "martingale_loss": rollout_reference,
                                        "randn": philox})
    for op, p in (("stf_target", "tf32"), ("rollout_step", None), ("martingale_loss", None), ("randn", None)):
        selfcheck.verdict(op, CPU, "triton", p, F32)  # every code path once (lazy imports, caches)
    selfcheck._RECORDS.clear()
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    before = _live_tensors()
    for op, p in (("stf_target", "tf32"), ("rollout_step", None), ("martingale_loss", None), ("randn", None)):
        assert selfcheck.verdict(op, CPU, "triton", p, F32) is not None
    assert not _live_tensors() - before  # (earlier tests' tensors may have gone meanwhile)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    for rec in selfcheck.records():  # what a record keeps: numbers and words
        assert not any(isinstance(v, torch.Tensor) for v in vars(rec).values())


def test_one_check_however_many_threads_ask_at_once(fresh):
    shape = list(selfcheck.ELEMENTWISE_SHAPE)
    checks, lock = [], threading.Lock()

    def counting(anchor, shp, seed, offset):
        if list(shp) == shape and seed == selfcheck.PHILOX_SEED:
            with lock:
                checks.append(threading.get_ident())
        return philox.philox_randn(anchor, shp, seed, offset)

    fresh.register("triton", ("cpu",), {"randn": {"philox_randn": counting}})
    barrier, out, errors = threading.Barrier(8), [], []

    def user():
        try:
            barrier.wait()
            out.append(cdm_kernels.randn((3, 5), 9))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=user) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(checks) == 1 and len(out) == 8
    assert [r.status for r in selfcheck.records()] == ["passed"]


def test_after_the_first_call_a_dict_lookup(fresh, monkeypatch):
    _register_stf(fresh)
    x, s, r = _problem()
    cdm_kernels.stf_target(x, s, r)

    def no_first_use(*args):
        raise AssertionError("the resolution went past its cache")

    monkeypatch.setattr(registry, "_first_use", no_first_use)
    cdm_kernels.stf_target(x, s, r)
    assert registry.backend_for("stf_target", x.device, "auto", "ieee", F32) == "triton"


@pytest.mark.gpu
def test_on_a_gpu_the_check_keeps_memory_and_the_cuda_rng_and_skips_graph_capture(fresh):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device())
    backend = registry.resolve_backend("stf_target", dev)
    torch.cuda.synchronize()
    allocated, rng = torch.cuda.memory_allocated(dev), torch.cuda.get_rng_state(dev)
    rec = selfcheck.verdict("stf_target", dev, backend, "tf32", F32)
    torch.cuda.synchronize()
    assert rec.passed, rec.detail
    assert torch.cuda.memory_allocated(dev) == allocated and torch.equal(torch.cuda.get_rng_state(dev), rng)
    print(f"first-use check of {backend} stf_target tf32 float32 on {torch.cuda.get_device_name(dev)}: "
          f"{1e3 * rec.seconds:.1f} ms")
    # First met inside a capture: not run there, checked at the next call outside it.
    x, r = torch.randn(8, 64, device=dev), torch.randn(100, 64, device=dev)
    sigma = torch.ones(8, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cdm_kernels.stf_target(x, sigma, r, precision="bf16")  # warm-up outside the capture (this checks bf16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cdm_kernels.stf_target(x.double(), sigma.double(), r.double())  # float64: first met here
    graph.replay()
    statuses = {(r.precision, r.dtype): r.status for r in selfcheck.records()}
    assert statuses[("bf16", F32)] == "passed" and statuses[("ieee", F64)] == "not run", statuses
    cdm_kernels.stf_target(x.double(), sigma.double(), r.double())
    assert {(r.precision, r.dtype): r.status for r in selfcheck.records()}[("ieee", F64)] == "passed"
