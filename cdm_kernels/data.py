"""Image data sets for the training loop, held in memory, and a resumable, shardable batch order.

The sources `load_dataset` reads (digits, folders, zips, .npy/.npz) are listed in docs/training.md.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_EXTENSIONS", "BatchOrder", "ImageDataset", "ReferenceDraw", "get_batch", "load_dataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageDataset:
    """Images (N, C, H, W) float32 in [-1, 1] and optional labels (N,) int64 in [0, label_dim)."""

    images: Tensor
    labels: Tensor | None
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    @property
    def label_dim(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def describe(self) -> str:
        N, C, H, W = self.images.shape
        lab = f"{self.label_dim} classes" if self.labels is not None else "no labels"
        return f"{self.name}: {N} images of {C}x{H}x{W}, {lab}"


def load_dataset(source: str = "digits", *, use_labels: bool = True) -> ImageDataset:
    """Loads a data set into memory (see the module docstring for the formats).

    Raises FileNotFoundError for a missing path and ValueError, naming the file, for an empty folder,
    images of mixed sizes, an unreadable image, a bad array shape or labels that do not match."""
    if source == "digits":
        ds = _load_digits()
    else:
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"data set {source!r} does not exist; pass 'digits' (built in), a folder of images, a "
                ".zip of images or a .npy/.npz array"
            )
        if os.path.isdir(path):
            ds = _load_image_files(_FolderFiles(path), source)
        elif path.lower().endswith(".zip"):
            ds = _load_image_files(_ZipFiles(path), source)
        elif path.lower().endswith((".npy", ".npz")):
            ds = _load_array(path)
        else:
            raise ValueError(
                f"data set {source!r}: unknown file type; expected a folder, a .zip, a .npy or a .npz"
            )
    if ds.images.shape[2] != ds.images.shape[3]:
        raise ValueError(f"{ds.name}: images must be square for the U-Net, got {ds.images.shape[2]}x{ds.images.shape[3]}")
    if not use_labels:
        ds.labels = None
    return ds


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are integers 0..16 (ink counts of a 4x4 block); 16 maps to 1, 0 to -1.
    images = torch.from_numpy(d.images.astype(np.float32)).div_(8.0).sub_(1.0).unsqueeze(1)
    return ImageDataset(images.contiguous(), torch.from_numpy(d.target.astype(np.int64)), "digits")


def _to_images(arr: np.ndarray, name: str) -> Tensor:
    """An (N, H, W), (N, H, W, C) or (N, C, H, W) array -> (N, C, H, W) float32 in [-1, 1]."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)
        elif arr.shape[1] in (1, 3, 4):
            pass
        else:
            raise ValueError(
                f"{name}: cannot tell the channel axis of an array of shape {arr.shape}; expected "
                "(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3, 4}"
            )
    else:
        raise ValueError(
            f"{name}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: the array holds no images (shape {arr.shape})")
    if arr.shape[1] == 4:
        arr = arr[:, :3]  # alpha is not part of the image
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(127.5).sub_(1.0)
    elif np.issubdtype(arr.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"{name}: float images must lie in [-1, 1], got values in [{lo}, {hi}] "
                "(store uint8 0..255 for automatic scaling)"
            )
    else:
        raise ValueError(f"{name}: images must be uint8 (0..255) or float ([-1, 1]), got dtype {arr.dtype}")
    return x.contiguous()


def _check_labels(labels, n: int, name: str) -> Tensor:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: labels must have shape ({n},), one per image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise ValueError(f"{name}: labels must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {labels.min()}")
    return torch.from_numpy(labels.astype(np.int64))


def _load_array(path: str) -> ImageDataset:
    name = os.path.basename(path)
    labels = None
    try:
        if path.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.keys()}
    except Exception as exc:  # numpy raises several types (ValueError, OSError, EOFError, ...) for a damaged file
        raise ValueError(f"{name}: cannot read the array file ({type(exc).__name__}: {exc})") from exc
    if path.lower().endswith(".npz"):
        keys = list(arrays)
        key = next((k for k in ("images", "x") if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(
                f"{name}: an .npz must hold its images under 'images' (or 'x', or be its only array); found {keys}"
            )
        arr = arrays[key]
        lkey = next((k for k in ("labels", "y") if k in keys), None)
        labels = None if lkey is None else arrays[lkey]
    images = _to_images(arr, name)
    lab = None if labels is None else _check_labels(labels, images.shape[0], name)
    return ImageDataset(images, lab, name)


class _FolderFiles:
    def __init__(self, root: str):
        self.root = root

    def names(self) -> list[str]:
        out = []
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                out.append(os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/"))
        return sorted(out)

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def close(self):
        pass


class _ZipFiles:
    def __init__(self, path: str):
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{os.path.basename(path)}: not a readable zip file ({exc})") from exc

    def names(self) -> list[str]:
        return sorted(n for n in self.zip.namelist() if not n.endswith("/"))

    def read(self, name: str) -> bytes:
        return self.zip.read(name)

    def close(self):
        self.zip.close()


def _load_image_files(files, source: str) -> ImageDataset:
    from PIL import Image, UnidentifiedImageError

    try:
        all_names = files.names()
        names = [n for n in all_names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not names:
            raise ValueError(
                f"data set {source!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}; "
                f"found {len(all_names)} other files)"
            )
        pics, modes = [], set()
        first_size = first_name = None
        for n in names:
            try:
                img = Image.open(io.BytesIO(files.read(n)))
                img.load()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise ValueError(f"data set {source!r}: cannot read image {n!r} ({type(exc).__name__}: {exc})") from exc
            if first_size is None:
                first_size, first_name = img.size, n
            elif img.size != first_size:
                raise ValueError(
                    f"data set {source!r}: images have mixed sizes: {first_name!r} is "
                    f"{first_size[0]}x{first_size[1]} but {n!r} is {img.size[0]}x{img.size[1]} (W x H)"
                )
            modes.add(img.mode)
            pics.append(img)
        gray = modes <= {"L", "1", "I", "I;16", "F"}
        arr = np.stack([np.asarray(p.convert("L" if gray else "RGB"), dtype=np.uint8) for p in pics])
        images = _to_images(arr if gray else arr.transpose(0, 3, 1, 2), source)
        labels = None
        if "dataset.json" in all_names:
            labels = _json_labels(files.read("dataset.json"), names, source)
    finally:
        files.close()
    return ImageDataset(images, labels, os.path.basename(os.path.normpath(source)))


def _json_labels(raw: bytes, names: list[str], source: str) -> Tensor | None:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"data set {source!r}: dataset.json is not valid JSON ({exc})") from exc
    entries = meta.get("labels") if isinstance(meta, dict) else None
    if entries is None:
        return None  # EDM writes "labels": null for unlabelled sets
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 for e in entries):
        raise ValueError(f'data set {source!r}: dataset.json "labels" must be a list of [file name, label] pairs')
    table = {}
    for fname, lab in entries:
        if isinstance(lab, bool) or not isinstance(lab, int):
            raise ValueError(f"data set {source!r}: dataset.json gives {fname!r} the label {lab!r}; labels must be ints")
        table[str(fname).replace("\\", "/")] = lab
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(
            f"data set {source!r}: dataset.json has no label for {len(missing)} of {len(names)} images, "
            f"e.g. {missing[0]!r}"
        )
    extra = sorted(set(table) - set(names))
    if extra:
        raise ValueError(f"data set {source!r}: dataset.json labels {len(extra)} files that are not images here, e.g. {extra[0]!r}")
    return _check_labels([table[n] for n in names], len(names), f"data set {source!r}")


class BatchOrder:
    """The order in which training draws images: a fresh permutation and x-flip draw per epoch, from
    a generator keyed by (seed, epoch), so the whole order is a function of (seed, epoch, position)
    and resumes exactly from `state_dict()`.

    Each call of `next_batch(global_batch)` takes the next `global_batch` indices of the epoch's
    permutation (an epoch ends when fewer remain; the rest are skipped); process `rank` of
    `world_size` gets the slice [rank::world_size] of them, so the P processes together see the
    same images as one process with the whole batch.
    """

    def __init__(self, num_images: int, seed: int, xflip: bool = False, rank: int = 0, world_size: int = 1):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images, self.seed, self.xflip = num_images, int(seed), xflip
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self.last_global: tuple[Tensor, Tensor] | None = None
        self._make_epoch()

    def _make_epoch(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self._perm = torch.randperm(self.num_images, generator=g)
        self._flip = torch.rand(self.num_images, generator=g) < 0.5

    def next_batch(self, global_batch: int) -> tuple[Tensor, Tensor]:
        """(indices (b,) int64, flip (b,) bool) for this process, b = global_batch / world_size."""
        if global_batch > self.num_images:
            raise ValueError(f"batch size {global_batch} is larger than the data set ({self.num_images} images)")
        if self.pos + global_batch > self.num_images:
            self.epoch, self.pos = self.epoch + 1, 0
            self._make_epoch()
        whole = slice(self.pos, self.pos + global_batch)
        self.pos += global_batch
        # The whole global batch (every process's images), kept for draws that must avoid it.
        g_idx = self._perm[whole]
        g_flip = self._flip[whole] if self.xflip else torch.zeros(global_batch, dtype=torch.bool)
        self.last_global = (g_idx, g_flip)
        # This process's share: every world_size-th image from position rank.
        return g_idx[self.rank :: self.world_size], g_flip[self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "num_images": self.num_images}

    def load_state_dict(self, state: dict) -> None:
        if state["num_images"] != self.num_images:
            raise ValueError(
                f"the checkpoint's data order is for {state['num_images']} images but the data set has "
                f"{self.num_images}; resume with the same data set"
            )
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._make_epoch()


class ReferenceDraw:
    """The other references of each training step's STF reference batch, disjoint across processes.

    A process's reference batch is its own b = global_batch / P images, then k = rbatch - b others
    from a pool of `num_refs` references (the data set, and its x-flips when they are used). With
    P processes the stable target is taken over the union of the P reference batches, so the draws
    avoid duplicates in that union: each step, every process makes the same permutation of the pool
    (a generator keyed by (seed, step), shared by all processes) without the step's global batch,
    and process `rank` takes positions [rank k, (rank + 1) k) of it. The union is then the global
    batch plus P k distinct other references. When P k exceeds the M = num_refs - global_batch
    references outside the batch, the slices wrap around the permutation: each process's k are still
    distinct, and the union repeats P k - M of them (`overlap`; the loop says so once).

    The draw is a function of (seed, step, the global batch): nothing to save in a checkpoint.
    """

    def __init__(self, num_refs: int, per_process: int, global_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.available = num_refs - global_batch
        if per_process > self.available:
            raise ValueError(
                f"cannot draw {per_process} references besides the batch from the {self.available} outside the "
                f"global batch of {global_batch}"
            )
        self.num_refs, self.k, self.seed = num_refs, per_process, int(seed)
        self.rank, self.world_size = rank, world_size
        self.overlap = max(0, world_size * per_process - self.available)

    def generator(self, step: int) -> torch.Generator:
        """The generator of step `step`'s permutation (the same on every process)."""
        key = np.random.SeedSequence([self.seed % (1 << 64), int(step), 0x5EF]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(key) >> 1)

    def draw(self, step: int, exclude: Tensor, rank: int | None = None) -> Tensor:
        """Indices (k,) int64 into the pool: process `rank`'s (default: this process's) other
        references of step `step`, avoiding `exclude` (the global batch's indices into the pool)."""
        rank = self.rank if rank is None else rank
        if self.k == 0:
            return torch.zeros(0, dtype=torch.int64)
        perm = torch.randperm(self.num_refs, generator=self.generator(step))
        keep = torch.ones(self.num_refs, dtype=torch.bool)
        keep[exclude] = False
        perm = perm[keep[perm]]
        pos = (rank * self.k + torch.arange(self.k)) % perm.shape[0]
        return perm[pos]


def get_batch(ds: ImageDataset, idx: Tensor, flip: Tensor) -> tuple[Tensor, Tensor | None]:
    """Images (b, C, H, W) with the drawn x-flips applied, and their labels (b,) or None."""
    images = ds.images[idx]
    if bool(flip.any()):
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    labels = None if ds.labels is None else ds.labels[idx]
    return images, labels
