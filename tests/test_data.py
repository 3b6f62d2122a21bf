"""Data sets of the training loop: every format loads to the expected pixels and labels, every bad
input gives its error (naming the file), and the batch order resumes and shards exactly."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cdm_kernels.data import BatchOrder, get_batch, load_dataset


def _pixels(rng, n, h, w, c=None):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _expected(arr_nhwc):
    # uint8 0..255 -> [-1, 1], (N, C, H, W)
    a = arr_nhwc if arr_nhwc.ndim == 4 else arr_nhwc[..., None]
    return torch.from_numpy(a.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1.0)


def _write_pngs(folder, arr, names=None):
    os.makedirs(folder, exist_ok=True)
    names = names or [f"img{i:03d}.png" for i in range(len(arr))]
    for name, a in zip(names, arr):
        os.makedirs(os.path.dirname(os.path.join(folder, name)) or folder, exist_ok=True)
        Image.fromarray(a).save(os.path.join(folder, name))
    return names


def test_digits_is_the_sklearn_set_scaled_to_minus_one_one():
    from sklearn.datasets import load_digits

    ds = load_digits()
    d = load_dataset("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert d.label_dim == 10 and d.labels.tolist() == ds.target.tolist()
    # 0 ink -> -1, 16 (full) -> +1, linear in between
    torch.testing.assert_close(d.images[:, 0].double(), torch.from_numpy(ds.images) / 8.0 - 1.0, rtol=0, atol=1e-7)
    assert float(d.images.min()) == -1.0 and float(d.images.max()) == 1.0
    assert load_dataset("digits", use_labels=False).labels is None


def test_folder_of_gray_pngs_with_dataset_json(tmp_path):
    rng = np.random.default_rng(1)
    arr = _pixels(rng, 5, 6, 6)
    names = [f"sub/{i}.png" for i in range(5)]
    _write_pngs(tmp_path, arr, names)
    labels = [3, 0, 2, 2, 1]
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, l] for n, l in zip(names, labels)][::-1]}))
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_dataset(str(tmp_path))
    assert d.images.shape == (5, 1, 6, 6)
    torch.testing.assert_close(d.images.double(), _expected(arr), rtol=0, atol=1e-6)
    assert d.labels.tolist() == labels and d.label_dim == 4


def test_folder_of_rgb_pngs_without_labels(tmp_path):
    rng = np.random.default_rng(2)
    arr = _pixels(rng, 3, 4, 4, 3)
    _write_pngs(tmp_path, arr)
    d = load_dataset(str(tmp_path))
    assert d.images.shape == (3, 3, 4, 4) and d.labels is None
    torch.testing.assert_close(d.images.double(), _expected(arr), rtol=0, atol=1e-6)


def test_zip_in_edm_dataset_tool_layout(tmp_path):
    rng = np.random.default_rng(3)
    arr = _pixels(rng, 4, 8, 8, 3)
    src = tmp_path / "src"
    names = _write_pngs(src, arr, [f"00000/img{i:08d}.png" for i in range(4)])
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.write(src / n, n)
        z.writestr("dataset.json", json.dumps({"labels": [[n, i % 2] for i, n in enumerate(names)]}))
    d = load_dataset(str(path))
    torch.testing.assert_close(d.images.double(), _expected(arr), rtol=0, atol=1e-6)
    assert d.labels.tolist() == [0, 1, 0, 1]
    # EDM writes "labels": null for an unlabelled set
    path2 = tmp_path / "set2.zip"
    with zipfile.ZipFile(path2, "w") as z:
        for n in names:
            z.write(src / n, n)
        z.writestr("dataset.json", json.dumps({"labels": None}))
    assert load_dataset(str(path2)).labels is None


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npy_layouts(tmp_path, layout):
    rng = np.random.default_rng(4)
    arr = _pixels(rng, 6, 5, 5, None if layout == "nhw" else 3)
    stored = arr.transpose(0, 3, 1, 2) if layout == "nchw" else arr
    np.save(tmp_path / "x.npy", stored)
    d = load_dataset(str(tmp_path / "x.npy"))
    torch.testing.assert_close(d.images.double(), _expected(arr), rtol=0, atol=1e-6)
    assert d.labels is None


def test_npz_with_labels_and_float_images(tmp_path):
    rng = np.random.default_rng(5)
    imgs = rng.uniform(-1, 1, size=(7, 4, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 5])
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels)
    d = load_dataset(str(tmp_path / "d.npz"))
    torch.testing.assert_close(d.images[:, 0], torch.from_numpy(imgs), rtol=0, atol=0)
    assert d.labels.tolist() == labels.tolist() and d.label_dim == 6


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def test_missing_path():
    with pytest.raises(FileNotFoundError, match=r"'/no/such/set' does not exist"):
        load_dataset("/no/such/set")


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no images \(looked for \.png.*found 1 other files"):
        load_dataset(str(tmp_path))


def test_mixed_sizes_names_both_files(tmp_path):
    rng = np.random.default_rng(6)
    _write_pngs(tmp_path, _pixels(rng, 1, 4, 4), ["a.png"])
    _write_pngs(tmp_path, _pixels(rng, 1, 5, 5), ["b.png"])
    with pytest.raises(ValueError, match=r"mixed sizes: 'a.png' is 4x4 but 'b.png' is 5x5"):
        load_dataset(str(tmp_path))


def test_corrupt_image_is_named(tmp_path):
    rng = np.random.default_rng(7)
    _write_pngs(tmp_path, _pixels(rng, 2, 4, 4))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image 'broken.png'"):
        load_dataset(str(tmp_path))


def test_corrupt_zip(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"bad.zip: not a readable zip file"):
        load_dataset(str(tmp_path / "bad.zip"))


def test_labels_missing_for_an_image(tmp_path):
    rng = np.random.default_rng(8)
    names = _write_pngs(tmp_path, _pixels(rng, 3, 4, 4))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[names[0], 1], [names[1], 0]]}))
    with pytest.raises(ValueError, match=r"no label for 1 of 3 images, e.g. 'img002.png'"):
        load_dataset(str(tmp_path))


def test_labels_for_files_that_are_not_there(tmp_path):
    rng = np.random.default_rng(9)
    names = _write_pngs(tmp_path, _pixels(rng, 2, 4, 4))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, 0] for n in names] + [["ghost.png", 1]]}))
    with pytest.raises(ValueError, match=r"labels 1 files that are not images here, e.g. 'ghost.png'"):
        load_dataset(str(tmp_path))


def test_non_integer_label(tmp_path):
    rng = np.random.default_rng(10)
    names = _write_pngs(tmp_path, _pixels(rng, 2, 4, 4))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[names[0], 0], [names[1], "cat"]]}))
    with pytest.raises(ValueError, match=r"gives 'img001.png' the label 'cat'; labels must be ints"):
        load_dataset(str(tmp_path))


def test_npz_label_count_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 3, 3), np.uint8), labels=np.arange(3))
    with pytest.raises(ValueError, match=r"d.npz: labels must have shape \(4,\), one per image, got shape \(3,\)"):
        load_dataset(str(tmp_path / "d.npz"))


def test_bad_array_shapes_and_values(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 5, 5, 7), np.uint8))
    with pytest.raises(ValueError, match=r"a.npy: cannot tell the channel axis of an array of shape \(4, 5, 5, 7\)"):
        load_dataset(str(tmp_path / "a.npy"))
    np.save(tmp_path / "b.npy", np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"b.npy: images must have shape \(N, H, W\)"):
        load_dataset(str(tmp_path / "b.npy"))
    np.save(tmp_path / "c.npy", np.full((2, 3, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"c.npy: float images must lie in \[-1, 1\], got values in \[2.0, 2.0\]"):
        load_dataset(str(tmp_path / "c.npy"))
    (tmp_path / "d.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"d.npy: cannot read the array file"):
        load_dataset(str(tmp_path / "d.npy"))
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown file type"):
        load_dataset(str(tmp_path / "e.txt"))


def test_non_square_images_are_refused(tmp_path):
    np.save(tmp_path / "r.npy", np.zeros((2, 4, 6), np.uint8))
    with pytest.raises(ValueError, match=r"images must be square for the U-Net, got 4x6"):
        load_dataset(str(tmp_path / "r.npy"))


# ---------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------


def test_batch_order_covers_each_epoch_once_and_resumes():
    order = BatchOrder(10, seed=3)
    first_epoch = torch.cat([order.next_batch(5)[0] for _ in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    order.next_batch(5)
    state = order.state_dict()
    rest = [order.next_batch(5)[0] for _ in range(5)]
    again = BatchOrder(10, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, again.next_batch(5)[0]) for a in rest)
    # a different seed gives a different order
    assert not torch.equal(first_epoch[:5], BatchOrder(10, seed=4).next_batch(5)[0])


def test_batch_order_shards_add_up_to_the_single_process_batch():
    single = BatchOrder(23, seed=1, xflip=True)
    shards = [BatchOrder(23, seed=1, xflip=True, rank=r, world_size=3) for r in range(3)]
    for _ in range(6):  # crosses epoch boundaries (23 is not a multiple of 6)
        idx, flip = single.next_batch(6)
        parts = [s.next_batch(6) for s in shards]
        for r, (i, f) in enumerate(parts):
            assert torch.equal(i, idx[r::3]) and torch.equal(f, flip[r::3])


def test_get_batch_applies_xflip():
    d = load_dataset("digits")
    order = BatchOrder(len(d), seed=0, xflip=True)
    idx, flip = order.next_batch(64)
    assert 0 < int(flip.sum()) < 64
    images, labels = get_batch(d, idx, flip)
    for k in range(64):
        expect = d.images[idx[k]].flip(-1) if flip[k] else d.images[idx[k]]
        assert torch.equal(images[k], expect)
    assert torch.equal(labels, d.labels[idx])


def test_batch_larger_than_data_set():
    with pytest.raises(ValueError, match=r"batch size 11 is larger than the data set \(10 images\)"):
        BatchOrder(10, seed=0).next_batch(11)
