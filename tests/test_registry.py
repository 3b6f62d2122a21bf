"""The seam every backend plugs into (cdm_kernels/registry.py): registration, "auto", capabilities,
the resolution cache, the 0.1 aliases, and the launcher contract and device guard that every
backend's launchers get from the registry."""

from __future__ import annotations

import types

import pytest
import torch

import cdm_kernels
from cdm_kernels import backends, contract, registry, selfcheck, stf_reference
from cdm_kernels.contract import ContractError


@pytest.fixture
def scratch_registry(monkeypatch):
    """An empty registry and no self-check record for the test (the package's registrations and
    records come back afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_RESOLVED", {})
    monkeypatch.setattr(registry, "_CHOSEN", {})
    monkeypatch.setattr(selfcheck, "_RECORDS", {})
    monkeypatch.setattr(selfcheck, "_TRACED", {})
    return registry


def _fake_stf(calls, name):
    def stf_forward(x, sigma, ref, centre, chunk_size, precision, keep):
        calls.append((name, precision))
        return stf_reference.stf_forward(x, sigma, ref, centre, chunk_size, precision, keep)

    def stf_backward(*args):
        return stf_reference.stf_backward(*args)

    return types.SimpleNamespace(stf_forward=stf_forward, stf_backward=stf_backward)


def test_every_op_family_has_every_backend_registered_in_one_place():
    for op in registry.OPS:
        names = cdm_kernels.available_backends(op, "cpu")
        assert names[0] == ("cpu" if cdm_kernels.has_cpu_kernels() else "reference")
        assert "reference" in names
        assert cdm_kernels.resolve_backend(op, "cpu") == names[0]
        # Every registered implementation provides every launcher of its family, under its name.
        for b in names:
            ns = registry.launchers(op, b, "cpu")
            assert sorted(vars(ns)) == sorted(registry.OPS[op].launchers)
        if torch.cuda.is_available() or cdm_kernels.has_cuda_kernels():
            assert cdm_kernels.available_backends(op, "cuda")[-1] == "reference"


def test_auto_takes_the_first_backend_of_the_order_with_the_precision(scratch_registry, monkeypatch):
    calls = []
    scratch_registry.register("reference", ("cpu",), {"stf_target": _fake_stf(calls, "reference")})
    scratch_registry.register("cuda", ("cpu",), {"stf_target": _fake_stf(calls, "cuda")},
                              precisions={"stf_target": ("ieee",)})
    scratch_registry.register("triton", ("cpu",), {"stf_target": _fake_stf(calls, "triton")},
                              precisions={"stf_target": registry.PRECISIONS})
    # Under the GPU's preference order for CPU tensors (no GPU needed): cuda, triton, reference.
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", registry.AUTO_ORDER["cuda"])
    x, s, r = torch.randn(4, 6), torch.ones(4), torch.randn(10, 6)
    for precision, want in (("ieee", "cuda"), ("tf32x3", "triton"), ("tf32", "triton"), ("bf16", "triton")):
        assert cdm_kernels.resolve_backend("stf_target", "cpu", "auto", precision) == want
        cdm_kernels.stf_target(x, s, r, precision=precision)
        assert calls[-1] == (want, precision)
    with pytest.raises(ValueError, match=r"precision 'tf32' is not supported by the 'cuda' backend"):
        cdm_kernels.resolve_backend("stf_target", "cpu", "cuda", "tf32")
    del scratch_registry._REGISTRY[("stf_target", "triton", "cpu")]
    scratch_registry._RESOLVED.clear()
    scratch_registry._CHOSEN.clear()
    with pytest.raises(ValueError, match=r"precision 'bf16' is not supported by any backend that 'auto' picks"):
        cdm_kernels.stf_target(x, s, r, precision="bf16")


def test_backends_beyond_the_order_are_listed_but_never_auto(scratch_registry):
    scratch_registry.register("reference", ("cpu",), {"randn": cdm_kernels.random})
    scratch_registry.register("triton", ("cpu",), {"randn": cdm_kernels.random})
    assert scratch_registry.available_backends("randn", "cpu") == ["reference", "triton"]
    assert scratch_registry.resolve_backend("randn", "cpu") == "reference"


def test_resolution_is_cached_and_registration_clears_the_cache(scratch_registry):
    scratch_registry.register("reference", ("cpu",), {"randn": cdm_kernels.random})
    assert scratch_registry.resolve_backend("randn", "cpu") == "reference"
    assert scratch_registry._RESOLVED
    scratch_registry.register("cpu", ("cpu",), {"randn": cdm_kernels.random})
    assert not scratch_registry._RESOLVED
    assert scratch_registry.resolve_backend("randn", "cpu") == "cpu"


def test_registering_again_clears_the_choices_and_the_self_check_records(scratch_registry, monkeypatch):
    # A GPU backend's choice is cached per (op, device, backend, precision, dtype) after its self-check
    # (cdm_kernels/selfcheck.py); a new implementation is chosen and checked anew.
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", ("triton", "reference"))
    scratch_registry.register("reference", ("cpu",), {"randn": cdm_kernels.random})
    scratch_registry.register("triton", ("cpu",), {"randn": cdm_kernels.random})
    assert cdm_kernels.randn(3, 1).shape == (3,)
    assert scratch_registry._CHOSEN == {("randn", torch.device("cpu"), "auto", None, torch.float32): "triton"}
    assert [(r.op, r.backend, r.status) for r in selfcheck.records()] == [("randn", "triton", "passed")]
    scratch_registry.register("triton", ("cpu",), {"randn": cdm_kernels.random})
    assert not scratch_registry._CHOSEN and selfcheck.records() == []


def test_registration_errors(scratch_registry):
    with pytest.raises(ValueError, match=r"backend name must be one of"):
        scratch_registry.register("fast", ("cpu",), {"randn": cdm_kernels.random})
    with pytest.raises(ValueError, match=r"op must be one of"):
        scratch_registry.register("cpu", ("cpu",), {"softmax": cdm_kernels.random})
    with pytest.raises(ValueError, match=r"precisions of 'stf_target' must be among"):
        scratch_registry.register("cpu", ("cpu",), {"stf_target": stf_reference}, precisions={"stf_target": ("fp8",)})
    scratch_registry.register("cpu", ("cpu",), {"rollout_step": types.SimpleNamespace()})
    with pytest.raises(RuntimeError, match=r"registered 'rollout_step' without the launcher 'rollout_step'"):
        scratch_registry.launchers("rollout_step", "cpu", "cpu")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available for cpu tensors \(available: \['cpu'\]\)"):
        scratch_registry.resolve_backend("rollout_step", "cpu", "cuda")


def test_legacy_device_first_forms_warn_and_mean_the_stable_target():
    with pytest.warns(DeprecationWarning, match=r"name the op family first"):
        assert cdm_kernels.available_backends("cpu") == cdm_kernels.available_backends("stf_target", "cpu")
    with pytest.warns(DeprecationWarning):
        assert cdm_kernels.resolve_backend("cpu") == cdm_kernels.resolve_backend("stf_target", "cpu")
    with pytest.warns(DeprecationWarning):
        assert cdm_kernels.resolve_backend("cpu", "reference") == "reference"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not supported by any backend"):
        cdm_kernels.resolve_backend("cpu", "auto", "tf32")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not supported by any backend"):
        cdm_kernels.resolve_backend(torch.device("cpu"), precision="tf32")
    from cdm_kernels.rollout import available_rollout_backends, resolve_rollout_backend

    assert available_rollout_backends("cpu") == cdm_kernels.available_backends("rollout_step", "cpu")
    assert resolve_rollout_backend("cpu") == cdm_kernels.resolve_backend("rollout_step", "cpu")


def _contract_form(op: str, backend: str):
    """(error type, the op name's suffix, a shape's text, float32's name) of a backend's contract errors.
    The registry checks the contract in Python (ContractError) unless the backend's launchers check it
    themselves: the compiled ops, in C++ (csrc/contract.h), with a ValueError of the same wording in
    ATen's forms."""
    if registry._REGISTRY[(op, backend, "cpu")].checks_contract:
        return ValueError, r" \(cpu\)", lambda *d: r"\[" + ", ".join(map(str, d)) + r"\]", "Float"
    return (ContractError, "", lambda *d: r"\(" + ", ".join(map(str, d)) + ("," if len(d) == 1 else "") + r"\)",
            r"torch\.float32")


@pytest.mark.parametrize("backend", cdm_kernels.available_backends("stf_target", "cpu"))
def test_every_backend_gets_the_contract_check(backend):
    ns = registry.launchers("stf_target", backend, "cpu")
    error, on, shape, float32 = _contract_form("stf_target", backend)
    x, s, r = torch.randn(3, 4), torch.ones(3), torch.randn(5, 4)
    c = r.mean(0)
    with pytest.raises(error, match=rf"stf_forward{on}: sigma must be a contiguous {float32} tensor"):
        ns.stf_forward(x, s.double(), r, c, 4, "ieee", False)
    with pytest.raises(error, match=rf"stf_forward{on}: centre must have shape {shape(4)}, got {shape(3)}"):
        ns.stf_forward(x, s, r, c[:3], 4, "ieee", False)
    with pytest.raises(error, match=rf"stf_forward{on}: chunk_size must be a positive int, got 0"):
        ns.stf_forward(x, s, r, c, 0, "ieee", False)
    with pytest.raises(error, match=r"x must be a contiguous"):
        ns.stf_forward(x.t().contiguous().t(), s, r, c, 4, "ieee", False)
    # The backward takes the forward's kept distances whole, (B n,) = (15,), or none, (0,).
    mu, lse, aux, dist = ns.stf_forward(x, s, r, c, 4, "ieee", True)
    assert dist.shape == (15,)
    with pytest.raises(error, match=rf"stf_backward{on}: dist must be the forward's kept distances "
                                    rf"\(B n,\) = \(15,\) or empty \(0,\), got {shape(7)}"):
        ns.stf_backward(torch.ones_like(mu), torch.ones_like(lse), x, s, r, c, mu, aux, dist[:7], 4, "ieee", False)


def test_rollout_launchers_get_the_contract_check():
    for backend in cdm_kernels.available_backends("rollout_step", "cpu"):
        ns = registry.launchers("rollout_step", backend, "cpu")
        error, on, shape, _ = _contract_form("rollout_step", backend)
        x = torch.randn(2, 5)
        t = torch.ones(2)
        with pytest.raises(error, match=rf"rollout_step{on}: kind must be one of \('sde', 'euler', 'heun', 'churn'\), "
                                        r"got 'rk4'"):
            ns.rollout_step(x, x, t, t, None, None, None, 0, 0, "rk4", 1.0)
        with pytest.raises(error, match=rf"rollout_step{on}: t_next must have shape {shape(2)}, got {shape(3)}"):
            ns.rollout_step(x, x, t, torch.ones(3), None, None, None, 0, 0, "euler", 1.0)
        with pytest.raises(error, match=rf"rollout_step{on}: kind 'heun' needs x_euler and denoised_euler"):
            ns.rollout_step(x, x, t, t, None, None, None, 0, 0, "heun", 1.0)


def test_only_the_launchers_that_check_the_contract_themselves_are_unwrapped():
    for op, backend, dt in registry.registrations():
        entry = registry._REGISTRY[(op, backend, dt)]
        assert entry.checks_contract == (entry.impl is backends._COMPILED)  # the ops of cdm_kernels_C
        ns = registry.launchers(op, backend, dt)
        for name in registry.OPS[op].launchers:
            assert hasattr(getattr(ns, name), "unwrapped") != entry.checks_contract, (op, backend, dt, name)


def test_the_public_functions_check_before_the_contract():
    # A user's mistake is reported by the public function, in its words, not as a contract error.
    with pytest.raises(ValueError, match=r"sigma must have shape \(B,\)"):
        cdm_kernels.stf_target(torch.randn(3, 4), torch.ones(2), torch.randn(5, 4))
    assert issubclass(ContractError, ValueError)
    assert contract.KINDS == cdm_kernels.rollout.KINDS


@pytest.mark.gpu
def test_launchers_run_on_their_tensors_device():
    # The device guard: a launch on tensors of the last GPU while another one is current.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x, r = torch.randn(3, 8, device=dev), torch.randn(20, 8, device=dev)
    with torch.cuda.device(0):
        for b in cdm_kernels.available_backends("stf_target", "cuda"):
            mu = cdm_kernels.stf_target(x, 0.5, r, backend=b)
            assert mu.device == dev
            torch.testing.assert_close(mu.cpu(), cdm_kernels.stf_target(x.cpu(), 0.5, r.cpu()), rtol=1e-4, atol=1e-5)
