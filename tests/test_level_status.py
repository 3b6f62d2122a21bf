"""Noise levels checked on the device (cdm_kernels/level_status.py), on every backend that does so:
the GPU kernels ("cuda", "triton") on a GPU, and on any machine the Triton interpreter and the CUDA
emulation.

A bad sample's output is NaN, never a plausible value; the error the host check would raise comes
at the next call (or from check_pending), names the op, the sample and its values, and is reported
once; levels given as numbers are still refused at once. On a GPU: none of the public ops and
losses synchronises with the host (torch's sync debug mode turns a synchronisation into an error),
and a whole consistency_rollout replays from a CUDA graph with eager's result.
"""

import pytest
import torch

from matrix import cases

import cdm_kernels
from cdm_kernels.level_status import KERNEL_CHECKED, check_pending


def _checked(op):
    return [p for p in cases(op) if p.values[0].backend in KERNEL_CHECKED]


ROLLOUT = _checked("rollout_step")
STF = _checked("stf_target")


def _step(case, kind, x, D, t, tn):
    if kind == "churn":
        return cdm_kernels.rollout_step(x, None, t, kind="churn", num_steps=4, S_churn=1.0, seed=3,
                                        backend=case.backend)[0]
    extra = dict(x_euler=x * 0.5, denoised_euler=D * 0.5) if kind == "heun" else {}
    return cdm_kernels.rollout_step(x, D, t, tn, kind=kind, seed=3, backend=case.backend, **extra)


@pytest.mark.parametrize("case", ROLLOUT)
@pytest.mark.parametrize("kind", ["sde", "euler", "heun", "churn"])
def test_rollout_step_bad_tensor_levels_give_nan_rows_and_the_error_at_the_next_call(case, kind):
    g = torch.Generator().manual_seed(0)
    x, D = case.to(torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g))
    t, good_tn = case.to(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.0, 1.5, 2.0]))
    bad_t = t.clone()
    bad_t[2] = -3.0 if kind == "churn" else 3.0  # churn: t_cur <= 0; the others: t_next > t_cur below
    bad_tn = good_tn.clone()
    bad_tn[2] = 3.5
    out = _step(case, kind, x, D, bad_t, bad_tn)  # no error here: nothing is read back
    rows_nan = torch.isnan(out.flatten(1)).all(1).cpu()
    assert rows_nan.tolist() == [False, False, True, False]
    values = r"t_cur = -3.0" if kind == "churn" else r"t_cur = 3.0, t_next = 3.5"
    with pytest.raises(ValueError, match=rf"an earlier rollout_step on {x.device}.*sample 2 has {values}"):
        check_pending(x.device)
    check_pending(x.device)  # reported once
    _step(case, kind, x, D, bad_t, bad_tn)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match="an earlier rollout_step"):
        _step(case, kind, x, D, t, good_tn)  # the next call reports the earlier one
    _step(case, kind, x, D, t, good_tn)


@pytest.mark.parametrize("case", ROLLOUT)
def test_the_other_rows_of_a_step_with_a_bad_sample_are_the_references(case):
    g = torch.Generator().manual_seed(1)
    x, D = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    t, tn = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, float("nan"), 1.5])
    out = cdm_kernels.rollout_step(*case.to(x, D, t, tn), kind="sde", seed=7, backend=case.backend).cpu()
    # the noise is keyed by the flat element index: the same draws as a batch whose row 1 is valid
    expected = cdm_kernels.rollout_step(x, D, t, torch.tensor([0.5, 1.0, 1.5]), kind="sde", seed=7,
                                        backend="reference")
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], rtol=1e-6, atol=1e-6)
    assert torch.isnan(out[1]).all()
    with pytest.raises(ValueError, match=r"sample 1 has t_cur = 2.0, t_next = nan"):
        check_pending(case.device)


@pytest.mark.parametrize("case", ROLLOUT)
def test_levels_given_as_numbers_are_refused_at_once(case):
    x, D = case.to(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"t_next <= t_cur; sample 0 has t_cur = 1.0, t_next = 2.0"):
        cdm_kernels.rollout_step(x, D, 1.0, 2.0, kind="euler", backend=case.backend)
    with pytest.raises(ValueError, match="consistency_rollout needs sigma_min <= sigma"):
        cdm_kernels.consistency_rollout(lambda x, s, labels: x, x, 1.0, 2.0, backend=case.backend)
    check_pending(case.device)  # nothing was recorded


@pytest.mark.parametrize("case", ROLLOUT)
def test_the_first_record_is_kept_until_reported(case):
    x, D = case.to(torch.randn(3, 8), torch.randn(3, 8))
    t = case.to(torch.tensor([1.0, 1.0, 1.0]))[0]
    cdm_kernels.rollout_step(x, D, t, case.to(torch.tensor([0.5, 2.0, 0.5]))[0], kind="euler", backend=case.backend)
    try:
        cdm_kernels.rollout_step(x, D, t, case.to(torch.tensor([0.5, 0.5, 4.0]))[0], kind="euler",
                                 backend=case.backend)
    except ValueError as exc:  # on the CPU vehicles the copy has landed: the second call reports the first
        assert "sample 1 has t_cur = 1.0, t_next = 2.0" in str(exc)
        return
    with pytest.raises(ValueError, match=r"sample 1 has t_cur = 1.0, t_next = 2.0"):
        check_pending(case.device)


@pytest.mark.parametrize("case", ROLLOUT)
def test_consistency_rollout_bad_sigma_min_gives_nan_trajectories_and_a_later_error(case):
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 2, 4, 4, generator=g)
    sigma, sigma_min = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([0.5, 1.5, 0.1])

    def net(x, s, labels):
        return 0.9 * x

    out, last = cdm_kernels.consistency_rollout(net, *case.to(x_t, sigma, sigma_min), num_steps=4, seed=11,
                                                backend=case.backend)
    nan = torch.isnan(out.cpu().flatten(2)).all(2)  # (K, B)
    assert nan.tolist() == [[False, True, False], [False, True, False]]
    host, _ = cdm_kernels.consistency_rollout(net, x_t, sigma.clamp(1.5, 3.0), sigma_min.clamp(0.1, 1.5), num_steps=4,
                                              seed=11, backend="reference")
    torch.testing.assert_close(out.cpu()[:, [0, 2]], host[:, [0, 2]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"an earlier consistency_rollout.*sample 1 has sigma = 1.0, sigma_min = 1.5"):
        check_pending(case.device)


@pytest.mark.parametrize("case", STF)
def test_stf_target_bad_sigma_gives_a_nan_row_and_a_later_error_and_keeps_the_gradient(case):
    g = torch.Generator().manual_seed(3)
    x, ref = torch.randn(4, 3, 4, 4, generator=g), torch.randn(20, 3, 4, 4, generator=g)
    sigma = torch.tensor([0.5, -1.0, 2.0, 1.0])
    xs, ss = (v.clone().to(case.device).requires_grad_() for v in (x, sigma))
    mu = cdm_kernels.stf_target(xs, ss, ref.to(case.device), backend=case.backend)
    assert torch.isnan(mu.detach().cpu().flatten(1)).all(1).tolist() == [False, True, False, False]
    good = [0, 2, 3]
    expected = cdm_kernels.stf_target(x[good].double(), sigma[good].double(), ref.double(), backend="reference")
    torch.testing.assert_close(mu.detach().cpu()[good].double(), expected, rtol=1e-4, atol=1e-5)
    mu[good].sum().backward()
    assert torch.isfinite(ss.grad[good]).all() and (ss.grad[good] != 0).any()
    with pytest.raises(ValueError, match=r"an earlier stf_target on .*sample 1 has sigma = -1.0"):
        check_pending(case.device)
    with pytest.raises(ValueError, match=r"sigma must be positive and finite, got -1.0"):
        cdm_kernels.stf_target(xs, -1.0, ref.to(case.device), backend=case.backend)  # a number: at once


# ----------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------


class _SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, sigma, labels=None, augment_labels=None):
        return x + 0.1 * self.conv(x) / (1 + sigma.reshape(-1, 1, 1, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not cdm_kernels.has_cuda_kernels(), reason="the CUDA extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_compiled_check_agrees_with_the_triton_check(dtype):
    # LevelStatus.check takes the CUDA extension's kernel where it is built: the same NaN, the same
    # record (the lowest bad sample, with its two values) as the Triton check it replaces.
    from cdm_kernels._ext import module
    from cdm_kernels.level_status import STF_TARGET, CONSISTENCY_ROLLOUT, status_of
    from cdm_kernels.triton.levels import check_levels

    dev = torch.device("cuda", torch.cuda.current_device())
    status = status_of(dev)
    check_pending(dev)  # nothing left over from an earlier test
    B = 1000
    a = torch.rand(B, dtype=dtype, device=dev) + 1.0
    b = a * 0.5
    a[[700, 900]] = torch.tensor([-1.0, float("inf")], dtype=dtype, device=dev)
    b[[400, 950]] = torch.tensor([float("nan"), 3.0], dtype=dtype, device=dev)
    for source, other in ((STF_TARGET, None), (CONSISTENCY_ROLLOUT, b)):
        words = []
        for check in (lambda: module().check_levels(a, other, source),
                      lambda: (check_levels(a, other, status.dev, source), status.publish())[0]):
            out = check()
            torch.cuda.synchronize(dev)
            words.append(status.host.tolist())
            status.dev.zero_()
            status.host.zero_()
            bad = torch.isnan(out)
            expected = (~((a > 0) & torch.isfinite(a))) if other is None else (
                ~((a > 0) & torch.isfinite(a) & (b > 0) & torch.isfinite(b) & (b <= a)))
            assert torch.equal(bad, expected)
            assert torch.equal(out[~bad], a[~bad])
        first = 700 if other is None else 400
        assert words[0] == words[1] and words[0][:2] == [source, first], words


@pytest.mark.gpu
def test_no_op_or_loss_synchronises_with_the_host_on_a_gpu():
    from cdm_kernels.losses import CDMLoss, EDMLoss, STFLoss

    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = _SmallNet().to(dev)
    images = torch.randn(8, 3, 8, 8, device=dev)
    ref = torch.randn(64, 3, 8, 8, device=dev)
    t = torch.rand(8, device=dev) + 0.5
    x, D = torch.randn_like(images), torch.randn_like(images)
    for _ in range(2):  # the first pass compiles and allocates (the status word's pinned memory among them)
        torch.cuda.set_sync_debug_mode("error" if _ else "default")
        try:
            with torch.no_grad():
                for kind in ("sde", "euler"):
                    cdm_kernels.rollout_step(x, D, t, t * 0.5, kind=kind, seed=1)
                cdm_kernels.rollout_step(x, D, t, t * 0.5, kind="heun", x_euler=x, denoised_euler=D)
                cdm_kernels.consistency_rollout(net, images, t, t * 0.1, num_steps=3, seed=2)
                cdm_kernels.stf_target(x, t, ref)
            leaves = [v.clone().requires_grad_() for v in (x, D, images)]
            cdm_kernels.martingale_loss(*leaves, images, 0.5).sum().backward()
            gen = torch.Generator(device=dev).manual_seed(0)
            for loss in (EDMLoss()(net, images, generator=gen), STFLoss(rbatch=64)(net, images, ref=ref, generator=gen),
                         CDMLoss(num_steps=3)(net, images, generator=gen)):
                loss.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_whole_consistency_rollout_replays_from_a_cuda_graph(backend):
    if backend not in cdm_kernels.available_backends("rollout_step", "cuda"):
        pytest.skip(f"backend {backend!r} is not built here")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    net = _SmallNet().to(dev).eval()
    x_t = torch.randn(4, 3, 8, 8, device=dev)
    sigma = torch.rand(4, device=dev) + 1.0
    sigma_min = sigma * 0.1

    def rollout():
        with torch.no_grad():
            return cdm_kernels.consistency_rollout(net, x_t, sigma, sigma_min, num_steps=4, seed=5, backend=backend)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compilation, workspaces, the status word
        for _ in range(2):
            rollout()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rollout()
    for seed in (1, 2):
        g = torch.Generator(device=dev).manual_seed(seed)
        x_t.copy_(torch.randn(x_t.shape, generator=g, device=dev))
        sigma.copy_(torch.rand(4, generator=g, device=dev) + 1.0)
        sigma_min.copy_(sigma * 0.2)
        graph.replay()
        torch.testing.assert_close(captured, rollout(), rtol=1e-6, atol=1e-6)
    sigma_min[1] = sigma[1] * 2  # a bad level inside the graph: NaN trajectories, the error after
    graph.replay()
    assert torch.isnan(captured[:, 1]).all() and torch.isfinite(captured[:, [0, 2, 3]]).all()
    with pytest.raises(ValueError, match="an earlier consistency_rollout.*sample 1"):
        check_pending(dev)


@pytest.mark.skipif(not cdm_kernels.has_cuda_kernels(), reason="the CUDA extension is not built")
def test_the_compiled_check_refuses_what_is_not_a_cuda_vector_of_levels():
    from cdm_kernels._ext import module
    from cdm_kernels.level_status import STF_TARGET

    for a in (torch.ones(4), torch.ones(2, 2), torch.ones(4, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"check_levels \(cuda\): a must be a contiguous 1-D float32 or "
                                             r"float64 CUDA tensor, got"):
            module().check_levels(a, None, STF_TARGET)


def test_no_synchronisation_or_copy_while_a_cuda_graph_is_captured(monkeypatch):
    # A CUDA graph capture forbids synchronising and synchronous copies: during one the word is
    # neither copied nor read (the record waits for the next call outside the capture), and an
    # explicit check_pending says why it cannot wait. A CUDA status word with CPU tensors stands in.
    from cdm_kernels import level_status

    status = object.__new__(level_status.LevelStatus)
    status.device = torch.device("cuda", 0)
    status.dev = torch.tensor([1, 3, 0, 0])  # a record on the device: source 1, sample 3
    status.host = torch.zeros(4, dtype=torch.int64)
    status._view = status.host.numpy()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def no_sync(*_):
        raise AssertionError("synchronised during a capture")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    status.publish()
    assert status.host.tolist() == [0, 0, 0, 0], "copied during a capture"
    status.host[0] = 1  # an earlier copy had landed before the capture began
    status.raise_pending()  # nothing raised, nothing waited for
    with pytest.raises(RuntimeError, match="cannot synchronise while a CUDA graph is being captured"):
        status.raise_pending(wait=True)
    assert status.dev.tolist() == [1, 3, 0, 0], "the record was cleared during a capture"

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    with pytest.raises(ValueError, match="sample 3"):  # after the capture the record is reported
        status.raise_pending()
