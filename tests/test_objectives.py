"""benchmarks/objectives.py at tiny sizes: the whole script end to end, and each measurement against
the definition or a property it must have. No comparison of the objectives is asserted."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from benchmarks import objectives as ob
from cdm_kernels import EmpiricalDenoiser

TINY = ["--images", "64", "--seeds", "2", "--channels", "4", "--sigmas", "3", "--eval-images", "8",
        "--mart-images", "4", "--samples", "6", "--sample-steps", "2", "--rbatch", "96", "--threads", "1"]


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_every_output_with_one_image_budget(tmp_path):
    assert ob.main(TINY + ["--losses", "edm,stf+cdm", "--out", str(tmp_path)]) == 0
    runs = _read(tmp_path / "objectives_runs.csv")
    assert [(r["loss"], r["seed"]) for r in runs] == [("edm", "0"), ("stf+cdm", "0"), ("edm", "1"), ("stf+cdm", "1")]
    assert {r["images"] for r in runs} == {"64"} and all(float(r["seconds"]) > 0 < float(r["cpu_seconds"]) for r in runs)
    rows = _read(tmp_path / "objectives_sigma.csv")
    assert len(rows) == 3 * 2 * 3  # (two objectives and the exact denoiser) x seeds x sigmas
    for r in rows:
        assert all(math.isfinite(float(r[q])) for q in ("mse_train", "mse_heldout", "martingale"))
        if r["model"] == "exact":
            assert float(r["mse_train"]) == 0.0  # the truth against itself
    samples = _read(tmp_path / "objectives_samples.csv")
    assert {r["model"] for r in samples} == {"edm", "stf+cdm", "exact"}
    md = (tmp_path / "objectives.md").read_text()
    for heading in ("## Training", "training split", "held-out split", "## Martingale", "## Samples"):
        assert heading in md
    assert (tmp_path / "objectives.png").stat().st_size > 0
    assert "--losses edm,stf+cdm" in (tmp_path / "objectives_command.txt").read_text()


def test_split_is_stratified_and_disjoint():
    tr_x, tr_y, te_x, te_y = ob.split_digits(0.2, seed=0)
    assert len(tr_x) + len(te_x) == 1797
    assert torch.bincount(te_y, minlength=10).tolist() == [round(0.2 * n) for n in torch.bincount(
        torch.cat([tr_y, te_y]), minlength=10).tolist()]
    assert ob.nn_rms(te_x[:50], te_x).max() == 0 and ob.nn_rms(te_x, tr_x).median() > 0.1


def _posterior_mean(x, sigma, refs):
    # E[x0 | x] over the uniform distribution on refs, in float64 from the definition.
    d2 = (x.double().flatten(1)[:, None, :] - refs.double().flatten(1)[None]).pow(2).sum(-1)
    w = torch.softmax(-d2 / (2 * sigma**2), dim=1)
    return (w @ refs.double().flatten(1)).reshape(x.shape)


@pytest.mark.parametrize("sigma", [0.05, 0.7, 20.0])
def test_error_to_truth_is_the_mse_to_the_posterior_mean(sigma):
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1
    images = refs[:7]
    truth = EmpiricalDenoiser(refs)

    def zero(x, s):
        return torch.zeros_like(x)

    got = ob.error_to_truth(zero, truth, images, [sigma], seed=3)[0]
    x = images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    want = float(_posterior_mean(x, sigma, refs).pow(2).mean())
    assert got == pytest.approx(want, rel=1e-4)


def test_martingale_violation_sees_an_inconsistent_denoiser():
    # The exact denoiser is a martingale along the reverse SDE (up to the discretisation); adding
    # 10 sigma to it makes D1 - D0 = -10 eps per element, eps ~ U[0, 0.05]: E = 100 E[eps^2] = 1/12.
    tr_x = ob.split_digits(0.2, seed=0)[0][:200]
    truth = EmpiricalDenoiser(tr_x)

    def shifted(x, s, class_labels=None):
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return truth(x, s) + 10 * s

    c = ob.train_config(ob.Config(), "cdm", 0, "", "")
    sigmas = [0.3, 3.0]
    exact = ob.martingale_violation(truth, tr_x[:64], sigmas, 0, c)
    bad = ob.martingale_violation(shifted, tr_x[:64], sigmas, 0, c)
    for e, b in zip(exact, bad):
        assert 0.6 / 12 < b < 1.4 / 12
        assert abs(e) < 1e-2 / 12


def test_sample_quality_of_real_digits_and_of_copies():
    tr_x, tr_y, te_x, _ = ob.split_digits(0.2, seed=0)
    clf = ob.fit_classifier(tr_x, tr_y)
    copies = ob.sample_quality(tr_x[:300], clf, tr_x)
    assert copies["copies"] == 1.0 and copies["nn_median"] == 0.0
    fresh = ob.sample_quality(te_x, clf, tr_x)
    assert fresh["confident"] > 0.8 and fresh["class_entropy"] > 0.99 and fresh["copies"] < 0.05
    assert fresh["min_class_share"] > 0.05 and fresh["max_class_share"] < 0.15


def test_bad_options_are_one_line_errors(capsys):
    for argv in (["--losses", "edm,sft"], ["--images", "0"], ["--images", "32", "--batch", "64"]):
        with pytest.raises(SystemExit) as e:
            ob.parse_args(argv)
        assert e.value.code == 2
    assert "--losses" in capsys.readouterr().err
