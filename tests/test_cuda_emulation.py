"""The host emulation of the CUDA stable-target kernels (tests/cuda_emulation.py) as a test vehicle.

The emulation is backend "cuda" for CPU tensors in this test session (tests/conftest.py), so every
stable-target test of the op x backend matrix runs the CUDA kernels' thread code on the host. What
only the emulation can show is checked here: no kernel depends on the order of its threads (a thread
that read what another thread of the same launch writes would give other results in reverse order:
the race a GPU would show as a moving error), the chunk pipeline's two streams are ordered by their
events (adversarial schedules give the one-stream bits), and the vehicle is never what "auto" picks.
"""

from __future__ import annotations

import cuda_emulation
import pytest
import torch
from problems import cluster_problem

import cdm_kernels
from cdm_kernels import stf_reference
from cdm_kernels.registry import PRECISIONS

pytestmark = pytest.mark.skipif(not cuda_emulation.available(), reason="no C++ compiler for the CUDA emulation")


@pytest.fixture
def reverse_order():
    cuda_emulation.reverse_threads(True)
    yield
    cuda_emulation.reverse_threads(False)


def _run(x, sigma, ref, chunk, precision, ref_grad=True, keep=False):
    L = cuda_emulation.launchers()
    c = stf_reference.centre_of(ref)
    mu, lse, aux, dist = L.stf_forward(x, sigma, ref, c, chunk, precision, keep)
    g = torch.Generator().manual_seed(9)
    grad_mu, grad_lse = torch.randn(x.shape, generator=g, dtype=x.dtype), torch.randn(x.shape[0], generator=g,
                                                                                   dtype=x.dtype)
    grads = L.stf_backward(grad_mu, grad_lse, x, sigma, ref, c, mu, aux, dist, chunk, precision, ref_grad)
    return (mu, lse, aux, *grads)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,D,n,chunk", [(3, 7, 5, 2), (37, 67, 130, 48), (5, 33, 40, 40)])
def test_kernels_do_not_depend_on_the_order_of_their_threads(precision, B, D, n, chunk, request):
    x, sigma, ref = cluster_problem(B, D, n, seed=1)
    forward = _run(x, sigma, ref, chunk, precision)
    request.getfixturevalue("reverse_order")
    backward = _run(x, sigma, ref, chunk, precision)
    for a, b in zip(forward, backward):
        assert torch.equal(a, b), "a kernel's result depends on the order of its threads"
    assert all(torch.isfinite(t).all() for t in forward), "the NaN-filled workspace was read before written"


@pytest.fixture
def pipeline_schedule():
    def set_schedule(name):
        cuda_emulation.schedule(name)

    yield set_schedule
    cuda_emulation.schedule("one stream")


@pytest.mark.parametrize("schedule", ["main first", "side first", "random 1", "random 2", "random 3"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,D,n,chunk", [(3, 7, 5, 2), (37, 67, 130, 48), (4, 9, 12, 3)])
def test_the_chunk_pipeline_gives_the_one_stream_bits(schedule, precision, B, D, n, chunk, pipeline_schedule):
    # The shift of chunk k + 1 on a side stream beside chunk k's products (ChunkFeed) reorders work
    # between streams only. Each stream run as far ahead of the other as its waits allow reads a
    # slot before its shift or overwrites it before its readers if a wait or a record is missing;
    # random interleavings also put the side's work between two main-stream kernels that share a
    # buffer with it.
    x, sigma, ref = cluster_problem(B, D, n, seed=2)
    one_stream = _run(x, sigma, ref, chunk, precision)
    pipeline_schedule(schedule)
    pipelined = _run(x, sigma, ref, chunk, precision)
    for a, b in zip(one_stream, pipelined):
        assert torch.equal(a, b), f"the chunk pipeline ({schedule}) changes the results"
    assert all(torch.isfinite(t).all() for t in pipelined), "the NaN-filled workspace was read before written"


@pytest.mark.parametrize("schedule", ["one stream", "random 1"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,D,n,chunk", [(3, 7, 5, 2), (37, 67, 130, 48), (5, 33, 40, 40)])
def test_kept_distances_give_the_recomputed_bits(schedule, precision, B, D, n, chunk, pipeline_schedule):
    # The forward's distances, kept for the backward (its product of x' then skipped), are what the
    # backward would recompute: with the emulation's products (one order of summation whatever the
    # product's shape) every result keeps its bits, with the reference gradient's two sweeps and with
    # the chunk pipeline. The kept tensor starts NaN: each of its elements is written.
    x, sigma, ref = cluster_problem(B, D, n, seed=3)
    pipeline_schedule(schedule)
    recomputed = _run(x, sigma, ref, chunk, precision)
    kept = _run(x, sigma, ref, chunk, precision, keep=True)
    for name, a, b in zip(("mu", "lse", "aux", "dL/dx", "dL/dsigma", "dL/dref"), recomputed, kept):
        assert torch.equal(a, b), f"{precision}: keeping the distances changes {name}"
    L = cuda_emulation.launchers()
    dist = L.stf_forward(x, sigma, ref, stf_reference.centre_of(ref), chunk, precision, True)[3]
    assert dist.shape == (B * n,) and torch.isfinite(dist).all()


def test_the_emulation_is_a_test_vehicle_never_picked_by_auto():
    assert "cuda" in cdm_kernels.available_backends("stf_target", "cpu")
    for precision in PRECISIONS:
        if precision == "ieee":
            assert cdm_kernels.resolve_backend("stf_target", "cpu", "auto", precision) == "cpu"
        else:
            with pytest.raises(ValueError, match="not supported by any backend that 'auto' picks"):
                cdm_kernels.resolve_backend("stf_target", "cpu", "auto", precision)
