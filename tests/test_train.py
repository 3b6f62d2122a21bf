"""The training loop on the CPU with a tiny U-Net: one step of each loss, the named steps of the loop,
exact resumption after a kill (an exception, and real SIGKILLs in the middle of a checkpoint write),
the output folder (refused when it holds another run, unless --overwrite; --resume with changed
options refused; --resume continuing in its own folder for its own duration, then having nothing to
do; a half-written log line; a damaged newest checkpoint; leftover temporary files), the reference
draws, the command line (one-line errors with status 2, every default in --help) and the progress
lines of a run whose output is not a terminal."""

import json
import math
import os

import pytest
import torch

from cdm_kernels.data import BatchOrder, ReferenceDraw, load_dataset
from cdm_kernels.train import LOSSES, TrainConfig, build_model, main, parse_args, train


class Killed(Exception):
    pass


def tiny(outdir, **kw):
    args = dict(
        data="digits", outdir=str(outdir), loss="edm", batch=8, rbatch=32, cdm_steps=3, steps=2, snap=1000,
        grid=0, model_channels=8, channel_mult=(1, 2), attn_resolutions=(4,), progress=False, threads=1,
        lr=1e-3, lr_rampup=16, ema_halflife=100,
    )
    args.update(kw)
    return TrainConfig(**args)


def _initial_weights(c):
    torch.manual_seed(c.seed)
    return build_model(c, 8, 1, 10 if c.cond else 0).state_dict()


@pytest.mark.parametrize("loss", LOSSES)
def test_one_step_of_each_loss_changes_every_weight_and_is_finite(tmp_path, loss):
    c = tiny(tmp_path, loss=loss, steps=1, cond=loss in ("edm", "cdm"))  # conditioning where it applies
    records = []
    summary = train(c, on_step=lambda step, rec: records.append(rec))
    assert len(records) == 1 and records[0]["step"] == 1
    assert math.isfinite(records[0]["loss"]) and summary["loss"] == records[0]["loss"]
    if loss in ("edm", "stf"):  # a weighted square; the martingale term of CDM may be negative
        assert records[0]["loss"] > 0
    before = _initial_weights(c)
    after = summary["net"].state_dict()
    # The first Adam step moves every weight with a gradient above Adam's eps by about lr; a few
    # GroupNorm scales behind the near-zero output layers get gradients below it and stay at 1.
    for k in ("model.conv_in.weight", "model.map_layer0.weight", "model.enc.0.conv0.weight", "model.conv_out.weight"):
        assert not torch.equal(before[k], after[k]), f"{k} was not updated by the step"
    moved = sum(int((before[k] != after[k]).sum()) for k in before)
    total = sum(v.numel() for k, v in before.items() if k != "model.map_noise.freqs")
    assert moved > 0.75 * total, f"only {moved} of {total} weights moved"
    assert torch.equal(before["model.map_noise.freqs"], after["model.map_noise.freqs"])  # a fixed buffer
    assert all(torch.isfinite(v).all() for v in after.values())
    # the EMA moved towards the new weights, not all the way
    ema = summary["ema"].state_dict()
    k = "model.conv_in.weight"
    assert not torch.equal(ema[k], before[k]) and not torch.equal(ema[k], after[k])


def test_killed_run_resumes_to_the_same_weights_bitwise(tmp_path):
    # STF + CDM draws from every source: sigma, noise, the reference bank, eps, rollout seeds.
    kw = dict(loss="stf+cdm", steps=4, snap=2, grid=4, sample_steps=2)
    full = train(tiny(tmp_path / "full", **kw))

    def kill_after_step_3(step, rec):
        if step == 3:
            raise Killed  # step 3 is done but was never snapshotted: lost, like a killed process

    with pytest.raises(Killed):
        train(tiny(tmp_path / "killed", **kw), on_step=kill_after_step_3)
    assert sorted(os.listdir(tmp_path / "killed")) == [
        "checkpoint-0000002.pt", "log.jsonl", "loss.png", "samples-0000002.png"
    ]
    resumed = train(tiny(tmp_path / "killed", resume=str(tmp_path / "killed"), **kw))
    assert resumed["steps"] == 4

    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a["step"] == b["step"] == 4 and a["images_seen"] == b["images_seen"] == 32
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert a["data_order"] == b["data_order"]

    # the log of the resumed run holds each step once, with the uninterrupted run's losses
    def losses(folder):
        with open(os.path.join(folder, "log.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f)]

    assert losses(tmp_path / "killed") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 4


def test_output_folder_and_checkpoint_contents(tmp_path):
    c = tiny(tmp_path, loss="stf", steps=3, snap=2, grid=9, sample_steps=2)
    summary = train(c)
    files = sorted(os.listdir(tmp_path))
    assert files == [
        "checkpoint-0000002.pt", "checkpoint-0000003.pt", "log.jsonl", "loss.png",
        "samples-0000002.png", "samples-0000003.png",
    ]  # no temporary file left behind
    ckpt = torch.load(summary["checkpoint"], weights_only=True)  # tensors and plain data only
    assert set(ckpt) == {
        "model", "ema", "optimizer", "step", "images_seen", "rng", "data_order", "world_size", "param_checksums",
        "config", "image_shape", "label_dim",
    }
    assert ckpt["image_shape"] == [1, 8, 8] and ckpt["label_dim"] == 0
    assert ckpt["config"]["loss"] == "stf" and ckpt["world_size"] == 1
    assert set(ckpt["rng"][0]) == {"torch", "numpy", "python"}
    with open(tmp_path / "log.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs] == [1, 2, 3] and [r["images"] for r in recs] == [8, 16, 24]
    # learning-rate warm-up over lr_rampup = 16 images, counting the current step's images
    assert [r["lr"] for r in recs] == pytest.approx([0.5e-3, 1e-3, 1e-3])
    from PIL import Image

    assert Image.open(tmp_path / "samples-0000003.png").size[0] >= 24 * 10
    assert Image.open(tmp_path / "loss.png").format == "PNG"


def test_ema_follows_edm_half_life_rule(tmp_path):
    c = tiny(tmp_path, steps=1, ema_halflife=8, ema_rampup=0.0)
    s = train(c)
    beta = 0.5 ** (8 / 8)
    before = _initial_weights(c)
    k = "model.conv_in.weight"
    expect = s["net"].state_dict()[k] * (1 - beta) + before[k] * beta
    torch.testing.assert_close(s["ema"].state_dict()[k], expect, rtol=1e-6, atol=1e-7)


def test_command_line(tmp_path, capsys):
    argv = [
        "--loss", "cdm", "--batch", "8", "--rbatch", "16", "--cdm-steps", "3", "--lambda-m", "1.5", "--eps-max",
        "0.1", "--lr", "0.001", "--lr-rampup", "100", "--ema-halflife", "50", "--steps", "1", "--seed", "3",
        "--snap", "5", "--channels", "8", "--channel-mult", "1,2", "--attn", "4", "--grid", "4", "--sample-steps",
        "2", "--outdir", str(tmp_path), "--no-progress", "--threads", "1", "--cond",
    ]
    c = parse_args(argv)
    assert (c.loss, c.batch, c.rbatch, c.cdm_steps, c.lambda_m, c.eps_max, c.seed, c.channel_mult, c.cond) == (
        "cdm", 8, 16, 3, 1.5, 0.1, 3, (1, 2), True
    )
    main(argv)
    out = capsys.readouterr().out
    assert "digits: 1797 images of 1x8x8" in out and "done: 1 steps (8 images) of loss cdm" in out
    assert os.path.exists(tmp_path / "checkpoint-0000001.pt")
    # sampling from the run's EMA weights, the way the snapshot grid was made: the same images
    png = str(tmp_path / "again.png")
    main(["--sample-only", png, "--resume", str(tmp_path), "--grid", "4", "--sample-steps", "2", "--seed", "3"])
    assert "wrote 4 samples" in capsys.readouterr().out
    from PIL import Image
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "samples-0000001.png")))


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(loss="ddpm"), ValueError, r"loss must be one of \('edm', 'stf', 'cdm', 'stf\+cdm'\), got 'ddpm'"),
        (dict(loss="stf", rbatch=4), ValueError, r"rbatch \(4\) must be at least the per-process batch \(8\)"),
        (dict(loss="stf", rbatch=5000), ValueError,
         r"needs 4992 references besides the batch but the data set offers 1789 outside the global batch of 8"),
        (dict(batch=0), ValueError, r"batch must be a positive int, got 0"),
        (dict(lr=-1.0), ValueError, r"lr must be positive and finite, got -1.0"),
        (dict(batch=4000), ValueError, r"--batch 4000 is larger than the data set \(1797 images\)"),
        (dict(data="/nonexistent/set"), FileNotFoundError, r"'/nonexistent/set' does not exist"),
        (dict(resume="/nonexistent/ckpt.pt"), FileNotFoundError, r"--resume '/nonexistent/ckpt.pt': no such checkpoint"),
        (dict(device="tpu"), ValueError, r"device must be 'auto', 'cpu' or 'cuda\[:i\]', got 'tpu'"),
        (dict(cdm_steps=1, loss="cdm"), ValueError, r"--cdm-steps must be an int >= 2 \(the points of each rollout"),
        (dict(eps_min=0.1, eps_max=0.05), ValueError, r"--eps-max must be finite and >= --eps-min \(0.1\), got 0.05"),
        (dict(dropout=1.0), ValueError, r"--dropout must be in \[0, 1\), got 1.0"),
        (dict(channel_mult=()), ValueError, r"--channel-mult must be a list of positive ints, got \(\)"),
        (dict(steps=0), ValueError, r"--steps must be a positive int, got 0"),
        (dict(loss="stf", backend="nope"), ValueError, r"--backend nope: backend must be .auto. or one of"),
    ],
)
def test_bad_options_are_named(tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        train(tiny(tmp_path, **kw))


def test_resume_from_an_empty_folder(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"the folder holds no checkpoint-<step>.pt"):
        train(tiny(tmp_path / "run", resume=str(tmp_path / "empty")))


def test_class_conditioning(tmp_path):
    s = train(tiny(tmp_path, steps=1, cond=True))
    assert s["net"].label_dim == load_dataset("digits").label_dim == 10
    s = train(tiny(tmp_path / "u", steps=1))
    assert s["net"].label_dim == 0
    with pytest.raises(ValueError, match=r"--cond cannot be used with loss 'stf\+cdm': the stable target averages"):
        train(tiny(tmp_path / "s", loss="stf+cdm", cond=True))
    import numpy as np

    np.save(tmp_path / "nolabels.npy", np.zeros((20, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"--cond needs labels, but the data set .* has none"):
        train(tiny(tmp_path / "n", data=str(tmp_path / "nolabels.npy"), cond=True))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from cdm_kernels.train import checkpoints as train_mod

    path = str(tmp_path / "checkpoint-0000001.pt")
    train_mod._atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(train_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train_mod._atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["checkpoint-0000001.pt"]  # no temporary file left
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous snapshot is intact


def test_profile_splits_a_step_into_kernels_and_the_rest(tmp_path):
    from cdm_kernels.train import profile_training

    r = profile_training(tiny(tmp_path, loss="stf+cdm"), steps=1)
    assert {"cdm_kernels::stf_forward", "cdm_kernels::rollout_step", "cdm_kernels::martingale_loss"} <= set(r["by_op"])
    assert 0 < r["kernel_seconds_per_step"] < r["seconds_per_step"] and 0 < r["kernel_share"] < 1
    assert r["kernel_seconds_per_step"] == pytest.approx(sum(r["by_op"].values()))
    assert not os.path.exists(tmp_path / "log.jsonl")  # the profile writes into a temporary folder


def _files(folder):
    return sorted(os.listdir(folder))


def test_fresh_run_refuses_a_folder_with_checkpoints_unless_overwrite(tmp_path):
    # The old run: checkpoints at steps 2 and 4.
    train(tiny(tmp_path, steps=4, snap=2, grid=4, sample_steps=2))
    (tmp_path / "notes.txt").write_text("mine")
    old = _files(tmp_path)
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(checkpoint-0000004.pt the latest\): "
                       r"continue that run with --resume .*, choose another --outdir, or pass --overwrite"):
        train(tiny(tmp_path, seed=1))
    assert _files(tmp_path) == old  # nothing touched

    # --overwrite: a new run (seed 1), killed after its first step, before any snapshot. The old
    # run's outputs are gone, so --resume cannot continue the OLD run from its step-4 checkpoint.
    def kill(step, rec):
        raise Killed

    with pytest.raises(Killed):
        train(tiny(tmp_path, seed=1, steps=4, snap=2, overwrite=True), on_step=kill)
    assert _files(tmp_path) == ["log.jsonl", "notes.txt"]  # files that are not a run's output stay
    with pytest.raises(FileNotFoundError, match="the folder holds no checkpoint-<step>.pt"):
        train(tiny(tmp_path, seed=1, steps=4, snap=2, resume=str(tmp_path)))

    # The command line: the flag, and --overwrite with --resume is refused.
    assert parse_args(["--overwrite"]).overwrite and not parse_args([]).overwrite
    with pytest.raises(ValueError, match="--overwrite starts a fresh run and --resume continues one"):
        train(tiny(tmp_path, resume=str(tmp_path), overwrite=True))


def test_resume_refuses_changed_options_and_allows_the_duration_to_change(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, loss="stf", steps=2, snap=2))
    with pytest.raises(ValueError) as err:
        train(tiny(run, loss="stf", rbatch=16, seed=3, model_channels=16, channel_mult=(1, 1), steps=3,
                   resume=str(run)))
    msg = str(err.value)
    ckpt = run / "checkpoint-0000002.pt"
    assert msg.startswith(f"--resume {ckpt}: this run's options differ from the checkpoint's: ")
    assert "--rbatch 16 (the checkpoint has 32)" in msg and "--seed 3 (the checkpoint has 0)" in msg
    assert "--channels 16 (the checkpoint has 8)" in msg and "--channel-mult 1,1 (the checkpoint has 1,2)" in msg
    assert "--steps" not in msg and "start a new run in another --outdir" in msg
    with pytest.raises(ValueError, match=r"checkpoint's: --loss cdm \(the checkpoint has stf\)\. Resume"):
        train(tiny(run, loss="cdm", steps=3, resume=str(run)))
    # the duration, snapshots, threads, device and the grid may change
    s = train(tiny(run, loss="stf", steps=3, snap=5, threads=2, device="cpu", grid=4, sample_steps=2,
                   resume=str(run)))
    assert s["steps"] == 3
    # resuming into a folder that holds another run's checkpoints is refused
    other = tmp_path / "other"
    train(tiny(other, steps=1))
    with pytest.raises(FileExistsError, match=r"already holds checkpoints of another run than --resume"):
        train(tiny(other, loss="stf", steps=4, resume=str(run)))


def test_a_half_written_last_log_line_is_dropped(tmp_path):
    from cdm_kernels.train import _plot_losses

    kw = dict(loss="edm", steps=2, snap=2)
    train(tiny(tmp_path, **kw))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "images": 24, "lo')  # the run was killed while writing step 3's line
    _plot_losses(str(tmp_path / "log.jsonl"), str(tmp_path / "loss.png"))
    s = train(tiny(tmp_path, resume=str(tmp_path), **dict(kw, steps=3)))
    assert s["steps"] == 3
    with open(tmp_path / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    # a damaged line that is not the last is an error naming it
    with open(tmp_path / "log.jsonl") as f:
        lines = f.readlines()
    with open(tmp_path / "log.jsonl", "w") as f:
        f.writelines([lines[0], "garbage\n", *lines[1:]])
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a JSON record of a step"):
        _plot_losses(str(tmp_path / "log.jsonl"), str(tmp_path / "loss.png"))


def test_checkpoint_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    import stat

    from cdm_kernels.train import checkpoints as train_mod

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(train_mod.os, "fsync", fsync)
    train_mod._atomic_save({"step": 1}, str(tmp_path / "checkpoint-0000001.pt"))
    assert synced == ["file", "dir"]

    def no_fsync(fd):  # a platform that cannot sync a folder: the checkpoint is still written
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError("not supported")
        real_fsync(fd)

    monkeypatch.setattr(train_mod.os, "fsync", no_fsync)
    train_mod._atomic_save({"step": 2}, str(tmp_path / "checkpoint-0000002.pt"))
    assert torch.load(tmp_path / "checkpoint-0000002.pt", weights_only=True)["step"] == 2


def test_reference_draws_avoid_the_batch_and_are_disjoint_across_processes():
    N, batch, world, rbatch = 100, 8, 2, 30
    order = BatchOrder(N, seed=0, world_size=world)
    order.next_batch(batch)
    g_idx = order.last_global[0]
    draws = [ReferenceDraw(N, rbatch - batch // world, batch, seed=0, rank=r, world_size=world) for r in range(world)]
    assert draws[0].overlap == 0
    got = [d.draw(5, g_idx) for d in draws]
    assert torch.equal(got[1], draws[0].draw(5, g_idx, rank=1))  # every process can compute any rank's
    union = torch.cat([g_idx, *got])
    assert union.numel() == batch + world * 26 and union.unique().numel() == union.numel()
    assert torch.equal(draws[0].draw(5, g_idx), got[0]) and not torch.equal(draws[0].draw(6, g_idx), got[0])
    # more references than the data set holds outside the batch: each process's are still distinct,
    # the union covers all 92 and repeats the rest
    big = [ReferenceDraw(N, 60, batch, seed=0, rank=r, world_size=world) for r in range(world)]
    assert big[0].overlap == 2 * 60 - 92
    got = [d.draw(0, g_idx) for d in big]
    assert all(g.unique().numel() == 60 and not (g[:, None] == g_idx).any() for g in got)
    assert torch.cat(got).unique().numel() == 92
    with pytest.raises(ValueError, match="cannot draw 93 references besides the batch from the 92 outside"):
        ReferenceDraw(N, 93, batch, seed=0)


def test_stf_reference_batch_of_a_run_holds_distinct_images(tmp_path, monkeypatch):
    # The loop passes each step's reference batch: the batch's images, then others, none twice.
    from cdm_kernels import losses

    seen = []
    real = losses.STFLoss.__call__

    def spy(self, net, images, labels=None, augment_pipe=None, *, ref=None, generator=None):
        seen.append((images.clone(), ref.clone()))
        return real(self, net, images, labels, augment_pipe, ref=ref, generator=generator)

    monkeypatch.setattr(losses.STFLoss, "__call__", spy)
    # 40 distinct images and their 40 x-flips: 24 others of 80 would hit the batch's 8 images about
    # 2.4 times a step if drawn from the whole pool
    import numpy as np

    np.save(tmp_path / "small.npy", np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    train(tiny(tmp_path / "run", data=str(tmp_path / "small.npy"), loss="stf", steps=3, xflip=True))
    assert len(seen) == 3
    for images, ref in seen:
        assert ref.shape == (32, 1, 8, 8) and torch.equal(ref[:8], images)
        assert torch.unique(ref.reshape(32, -1), dim=0).shape[0] == 32


def test_profile_wall_time_leaves_out_the_profiler_itself(tmp_path, monkeypatch):
    # prof.stop() processes every recorded event (tens of ms for a real step): not part of a step.
    from torch.profiler import profile

    from cdm_kernels.train import profile_training

    real_stop = profile.stop

    def slow_stop(self):
        real_stop(self)
        import time

        time.sleep(2.0)

    monkeypatch.setattr(profile, "stop", slow_stop)
    r = profile_training(tiny(tmp_path, loss="edm"), steps=1)
    assert r["seconds_per_step"] < 1.5


def test_the_named_steps_are_the_loop(tmp_path):
    # set_up, train_step and snapshot, called one by one, make the run that train() makes.
    from cdm_kernels.train import set_up, snapshot, train_step

    kw = dict(loss="stf+cdm", steps=2, snap=2)
    whole = train(tiny(tmp_path / "whole", **kw))
    run = set_up(tiny(tmp_path / "steps", **kw))
    assert (run.step, run.total_steps) == (0, 2) and not os.path.exists(tmp_path / "steps")  # set-up writes nothing
    records = [train_step(run), train_step(run)]
    assert [r["step"] for r in records] == [1, 2] and (run.step, run.images_seen) == (2, 16)
    assert records[-1]["loss"] == whole["loss"]
    os.makedirs(tmp_path / "steps")
    paths = snapshot(run)
    assert os.path.basename(paths["checkpoint"]) == "checkpoint-0000002.pt"
    a = torch.load(whole["checkpoint"], weights_only=True)
    b = torch.load(paths["checkpoint"], weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]) and a["data_order"] == b["data_order"]


def test_no_function_of_the_training_loop_exceeds_100_lines_nor_a_module_300():
    import ast
    import glob

    from cdm_kernels import train as train_mod

    modules = sorted(glob.glob(os.path.join(os.path.dirname(train_mod.__file__), "*.py")))
    assert len(modules) >= 8, modules  # the loop is a package of modules, each named for what it holds
    long = []
    for path in modules:
        with open(path) as f:
            source = f.read()
        if source.count("\n") > 300:
            long.append((os.path.basename(path), source.count("\n")))
        long += [(f"{os.path.basename(path)}: {f.name}", f.end_lineno - f.lineno + 1) for f in ast.walk(ast.parse(source))
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 100]
    assert not long, long


def _listing(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_resume_continues_in_its_folder_for_its_duration_and_then_has_nothing_to_do(tmp_path, monkeypatch, capsys):
    import dataclasses

    monkeypatch.chdir(tmp_path)  # where the default output folder (runs/train) would appear
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny(run, steps=5, snap=2), on_step=lambda step, rec: (_ for _ in ()).throw(Killed) if step == 3 else None)
    # No --outdir, no duration: the run continues in its own folder, to the checkpoint's 5 steps.
    again = dataclasses.replace(tiny(None, steps=None), outdir=None, images=None, resume=str(run))
    s = train(again)
    assert s["steps"] == 5 and s["checkpoint"] == str(run / "checkpoint-0000005.pt")
    assert not (tmp_path / "runs").exists()
    with open(run / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]
    capsys.readouterr()
    # Nothing left to train: it says so and writes nothing.
    before = _listing(run)
    s = train(again)
    out = capsys.readouterr().out
    assert out.startswith(f"nothing to do: {run / 'checkpoint-0000005.pt'} is at step 5, the end of this run's 5 steps")
    assert s["steps"] == 5 and math.isfinite(s["loss"]) and _listing(run) == before and "last loss nan" not in out
    s = train(dataclasses.replace(again, steps=3))
    assert "is at step 5, past the end of this run's 3 steps" in capsys.readouterr().out and _listing(run) == before
    # A new duration continues it; an explicit --outdir elsewhere (an empty folder) still works.
    assert train(dataclasses.replace(again, steps=6))["steps"] == 6
    assert train(dataclasses.replace(again, steps=7, outdir=str(tmp_path / "copy")))["steps"] == 7
    assert sorted(os.listdir(tmp_path / "copy"))[0] == "checkpoint-0000007.pt"
    assert not (tmp_path / "runs").exists()


def test_resume_skips_a_damaged_newest_checkpoint_and_removes_temporary_files(tmp_path, capsys):
    kw = dict(loss="stf+cdm", steps=6, snap=2)
    full = train(tiny(tmp_path / "full", **kw))
    run = tmp_path / "run"
    train(tiny(run, **dict(kw, steps=4)))  # checkpoints at steps 2 and 4
    newest = run / "checkpoint-0000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a copy truncated to half its size
    (run / "checkpoint-0000006.pt.tmp4242").write_bytes(b"\0" * 4096)  # writes a killed run left half done
    (run / "loss.png.tmp.png").write_bytes(b"\0" * 16)
    (run / "log.jsonl.tmp").write_text("")
    capsys.readouterr()

    resumed = train(tiny(run, resume=str(run), **kw))
    out = capsys.readouterr().out
    assert f"warning: {newest} cannot be read (RuntimeError: " in out
    assert f"resumed {run / 'checkpoint-0000002.pt'} at step 2" in out
    assert "removed 3 temporary file(s) of interrupted writes: checkpoint-0000006.pt.tmp4242, log.jsonl.tmp, " \
           "loss.png.tmp.png" in out
    assert sorted(os.listdir(run)) == [
        "checkpoint-0000002.pt", "checkpoint-0000004.pt", "checkpoint-0000004.pt.damaged", "checkpoint-0000006.pt",
        "log.jsonl", "loss.png",
    ]
    assert (run / "checkpoint-0000004.pt.damaged").read_bytes() == data[: len(data) // 2]  # kept, out of the way
    # From the older checkpoint the run is exact again.
    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]) and a["data_order"] == b["data_order"]
    with open(run / "log.jsonl") as f, open(tmp_path / "full" / "log.jsonl") as g:
        assert [json.loads(line)["loss"] for line in f] == [json.loads(line)["loss"] for line in g]


def test_unreadable_checkpoints_are_named(tmp_path):
    from cdm_kernels.train import CheckpointError, load_checkpoint

    train(tiny(tmp_path, steps=2, snap=1))
    for name in ("checkpoint-0000001.pt", "checkpoint-0000002.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    one = str(tmp_path / "checkpoint-0000001.pt")
    with pytest.raises(CheckpointError, match=rf"^{one} cannot be read \(RuntimeError: "):
        load_checkpoint(one)  # a file named on purpose is not replaced by another
    warnings = []
    with pytest.raises(CheckpointError, match=r"none of its 2 checkpoints can be read \(.*checkpoint-0000001.pt cannot"):
        load_checkpoint(str(tmp_path), warn=warnings.append)
    assert len(warnings) == 2 and "checkpoint-0000002.pt cannot be read" in warnings[0]
    torch.save({"model": {}}, tmp_path / "checkpoint-0000003.pt")  # loads, but is not one of this loop's
    with pytest.raises(CheckpointError, match=r"checkpoint-0000003.pt is not a checkpoint of cdm_kernels.train "
                                              r"\(it lacks ema, optimizer, step"):
        load_checkpoint(str(tmp_path / "checkpoint-0000003.pt"))


# A training run, as the command line starts it, that SIGKILLs itself at a chosen moment: "checkpoint N"
# once the temporary file of checkpoint N is written and before its rename, "step N" once step N is
# logged (not snapshotted). A real kill: no finally block, no flush, the temporary file left behind.
_KILLER = r"""
import os, signal, sys
import torch
from cdm_kernels import train as T

where, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "checkpoint":
    real_save = torch.save

    def save(obj, f):
        real_save(obj, f)
        if isinstance(obj, dict) and obj.get("step") == at:
            f.flush()
            die()

    torch.save = save
T.fit(T.set_up(T.parse_args(argv)), on_step=(lambda step, rec: die() if step == at else None) if where == "step" else None)
"""


def test_runs_killed_with_sigkill_resume_bit_for_bit(tmp_path):
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    kw = dict(loss="stf+cdm", steps=6, snap=2, grid=4, sample_steps=2)
    full = train(tiny(tmp_path / "full", **kw))
    run = str(tmp_path / "run")
    argv = ["--loss", "stf+cdm", "--batch", "8", "--rbatch", "32", "--cdm-steps", "3", "--steps", "6", "--snap", "2",
            "--grid", "4", "--sample-steps", "2", "--channels", "8", "--lr", "1e-3", "--lr-rampup", "16",
            "--ema-halflife", "100", "--threads", "1", "--no-progress", "--outdir", run]

    def start(*how, resume=True):
        proc = subprocess.run([sys.executable, "-c", _KILLER, *how, *argv, *(["--resume", run] if resume else [])],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)
        return proc

    # Killed while writing checkpoint 4: checkpoint 2 stands, with the log of 4 steps and the temporary file.
    proc = start("checkpoint", "4", resume=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(os.listdir(run))
    assert left[:2] == ["checkpoint-0000002.pt", "checkpoint-0000004.pt.tmp" + left[1].rsplit("tmp", 1)[1]]
    # Resumed from step 2, killed after step 5 (logged, never snapshotted).
    proc = start("step", "5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "removed 1 temporary file(s) of interrupted writes: checkpoint-0000004.pt.tmp" in proc.stdout
    assert f"resumed {run}/checkpoint-0000002.pt at step 2" in proc.stdout
    # Resumed from step 4 to the end.
    proc = start("none", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed {run}/checkpoint-0000004.pt at step 4" in proc.stdout
    assert not [name for name in os.listdir(run) if ".tmp" in name]

    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(os.path.join(run, "checkpoint-0000006.pt"), weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]) and a["data_order"] == b["data_order"]
    with open(os.path.join(run, "log.jsonl")) as f, open(tmp_path / "full" / "log.jsonl") as g:
        assert [(r["step"], r["loss"]) for r in map(json.loads, f)] == [(r["step"], r["loss"]) for r in map(json.loads, g)]


def _cli_error(capsys, argv):
    """main(argv) must end with status 2 and one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("cdm-train: error: ") and "Traceback" not in err, err
    return err


def test_command_line_errors_are_one_line_and_status_2(tmp_path, capsys):
    common = ["--channels", "8", "--batch", "8", "--rbatch", "32", "--steps", "2", "--snap", "2", "--grid", "0",
              "--no-progress", "--threads", "1", "--loss", "edm"]
    run = str(tmp_path / "run")
    main([*common, "--outdir", run])
    capsys.readouterr()
    # a changed option on --resume
    err = _cli_error(capsys, [*common, "--resume", run, "--seed", "3"])
    assert "--seed 3 (the checkpoint has 0)" in err
    # a folder that holds checkpoints
    assert "already holds checkpoints" in _cli_error(capsys, [*common, "--outdir", run])
    # a missing data path, a missing checkpoint, a damaged one named on purpose
    assert "'/nonexistent/set' does not exist" in _cli_error(capsys, [*common, "--data", "/nonexistent/set",
                                                                      "--outdir", str(tmp_path / "b")])
    assert "no such checkpoint" in _cli_error(capsys, [*common, "--resume", str(tmp_path / "nope.pt")])
    ckpt = tmp_path / "run" / "checkpoint-0000002.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert f"{ckpt} cannot be read" in _cli_error(capsys, [*common, "--resume", str(ckpt), "--steps", "3"])
    # bad option values: argparse's and the loop's own checks
    for argv, expect in [
        (["--batch", "abc"], "argument --batch: invalid int value: 'abc' (see cdm-train --help)"),
        (["--loss", "ddpm"], "argument --loss: invalid choice: 'ddpm'"),
        (["--channel-mult", "1,x"], "expected a comma-separated list of ints, got '1,x'"),
        (["--batch", "0"], "--batch must be a positive int, got 0"),
        (["--lr", "nan"], "--lr must be positive and finite, got nan"),
        (["--device", "tpu"], "--device must be 'auto', 'cpu' or 'cuda[:i]', got 'tpu'"),
        (["--sample-only", str(tmp_path / "x.png")], "--sample-only needs --resume"),
        (["--profile", "1", "--batch", "0"], "--batch must be a positive int, got 0"),
    ]:
        assert expect in _cli_error(capsys, [*argv, "--outdir", str(tmp_path / "c")]), argv
    assert not (tmp_path / "c").exists() and not (tmp_path / "b").exists()


def test_help_states_every_default_once(capsys):
    from cdm_kernels.train import build_parser

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif line.startswith("    ") and current:
            blocks[current] += " " + line.strip()
        else:
            current = None
    parser = build_parser()
    flags = [a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"]
    assert set(flags) <= set(blocks) and len(flags) > 30
    for flag in flags:
        block = " ".join(blocks[flag].split())
        assert block.count("default") == 1 and "(default: " in block, block
    defaults = TrainConfig()
    for flag, value in [("--batch", defaults.batch), ("--rbatch", defaults.rbatch), ("--lr", defaults.lr),
                        ("--loss", defaults.loss), ("--channel-mult", "1,2"), ("--images", 19200),
                        ("--outdir", "runs/train")]:
        assert f"(default: {value}" in " ".join(blocks[flag].split()), flag


def test_progress_in_a_log_file_is_a_line_every_few_steps(tmp_path, capsys):
    from cdm_kernels.progress import LineProgress, line_interval

    assert [line_interval(n) for n in (1, 20, 21, 300, 1000, 19_200)] == [1, 1, 2, 20, 50, 1000]
    train(tiny(tmp_path, steps=7, progress=True))  # pytest's captured stdout is not a terminal
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.split()[0].endswith("/7")]
    assert [line.split()[0] for line in lines] == [f"{k}/7" for k in range(1, 8)]
    assert all(", loss " in line and "images/s" in line for line in lines)

    import io

    f = io.StringIO()
    bar = LineProgress(45, initial=3, desc="sweep", unit="cases", file=f)  # 42 to go: a line every 5
    for _ in range(42):
        bar.update()
    bar.close()
    got = [line.split(",")[0] for line in f.getvalue().splitlines()]
    assert got == [f"sweep: {k}/45 cases ({100 * k // 45}%)" for k in (5, 10, 15, 20, 25, 30, 35, 40, 45)]


@pytest.mark.gpu
def test_device_cuda_runs_every_op_of_a_step_on_a_gpu_backend(tmp_path, monkeypatch):
    # `--device cuda` with the default backends: one stf+cdm step asks the registry for the stable
    # target, the rollout step and the martingale loss on the GPU, and gets a GPU backend for each.
    from cdm_kernels import registry
    from cdm_kernels.train import set_up, train_step

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    resolved, resolve = [], registry.backend_for

    def recording(op, device, *args):
        name = resolve(op, device, *args)
        resolved.append((op, torch.device(device).type, name))
        return name

    monkeypatch.setattr(registry, "backend_for", recording)
    run = set_up(parse_args(["--data", "digits", "--loss", "stf+cdm", "--device", "cuda", "--batch", "8",
                             "--rbatch", "32", "--cdm-steps", "3", "--channels", "8", "--channel-mult", "1,2", "--steps", "1",
                             "--attn", "4", "--outdir", str(tmp_path / "run"), "--grid", "0"]))
    record = train_step(run)
    assert math.isfinite(record["loss"])
    ops = {op for op, _, _ in resolved}
    assert {"stf_target", "rollout_step", "martingale_loss"} <= ops, resolved
    assert all(dev == "cuda" and name in ("cuda", "triton") for _, dev, name in resolved), resolved
    assert {name for op, _, name in resolved if op == "stf_target"} == {registry.resolve_backend("stf_target", "cuda")}
