"""Image data for training anytime networks: an IDX reader (Fashion-MNIST, MNIST), the
train / validation / test splits, and a learnable synthetic dataset of the same shapes.

Every dataset returned here is a ``torch.utils.data.TensorDataset`` of
``(images [N, 1, 28, 28] float32 normalised, labels [N] int64)``.

The **validation split is held out from the training set** (deterministic, seeded), so
threshold calibration never sees the test set.

Where the files are looked up, first match wins:
1. ``data_dir`` (the CLI's ``--data-dir``), 2. ``$ANN_DATA``, 3. the Debian default
   (``/usr/share/datasets/<name>/``, from ``apt-get install dataset-fashion-mnist``).
In each directory both ``<dir>/`` and ``<dir>/<name>/`` are tried, and each file may be
gzipped (``.gz``) or raw, with MNIST's original ``train-images.idx3-ubyte`` spelling too.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATASETS = ("fashion-mnist", "mnist")
SPLITS = ("train", "val", "test")
DEFAULT_ROOT = Path("/usr/share/datasets")
ENV_VAR = "ANN_DATA"
DEFAULT_VAL_SIZE = 5000

# Per-dataset pixel mean / std of the training images (in [0, 1] units).
_STATS = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in ``.gz`` or the bytes start with the gzip
    magic; raw otherwise) into a numpy array of the stored dtype and shape.

    ``expected_magic``: e.g. ``IMAGES_MAGIC`` (0x00000803) or ``LABELS_MAGIC`` (0x00000801).
    Raises ``ValueError`` naming the file for a wrong magic number, a file shorter than its
    header says (truncated), trailing bytes, or a corrupt gzip stream.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    magic = struct.unpack(">I", raw[:4])[0]
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file: bad magic number 0x{magic:08x}")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if expected_magic == IMAGES_MAGIC else 'labels'}, {expected_magic & 0xFF}-dim uint8)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, the header alone needs {header}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise ValueError(
            f"{path}: truncated IDX file: dims {list(dims)} need {need} data bytes, found {have}"
        )
    if have > need:
        raise ValueError(f"{path}: {have - need} unexpected trailing bytes after dims {list(dims)}")
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(dims)), offset=header).reshape(dims).copy()


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
    return name


def _candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    elif os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    else:
        roots.append(DEFAULT_ROOT / name)
    out = []
    for root in roots:
        out += [root, root / name]
    return out


def _find_file(name: str, stem: str, data_dir) -> Path:
    """``stem`` like ``train-images-idx3-ubyte``; returns the first existing variant."""
    dirs = _candidate_dirs(name, data_dir)
    variants = [stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")]
    for d in dirs:
        for v in variants:
            if (d / v).is_file():
                return d / v
    where = ", ".join(str(d) for d in dirs)
    how = (
        "install it with `apt-get install dataset-fashion-mnist`, or "
        if name == "fashion-mnist"
        else ""
    )
    raise FileNotFoundError(
        f"{name}: {stem}[.gz] not found in {where}. To get the data, {how}put the four IDX files "
        f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz) in a directory and pass it with --data-dir DIR "
        f"(or data_dir=..., or set ${ENV_VAR})."
    )


def read_split(name: str, split: str, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """Raw arrays of one file pair: images [N, 28, 28] uint8, labels [N] uint8.
    ``split`` is ``"train"`` (all 60k, before the validation hold-out) or ``"test"``."""
    _check_name(name)
    if split not in _PREFIX:
        raise ValueError(f"split: expected 'train' or 'test' for the IDX files, got {split!r}")
    img_path = _find_file(name, f"{_PREFIX[split]}-images-idx3-ubyte", data_dir)
    lbl_path = _find_file(name, f"{_PREFIX[split]}-labels-idx1-ubyte", data_dir)
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lbl_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    return images, labels


def to_tensor_dataset(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> TensorDataset:
    """uint8 [N, H, W] -> float32 [N, 1, H, W], (x / 255 - mean) / std; labels -> int64 [N]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    x = x.sub_(mean).div_(std).unsqueeze(1)
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(torch.int64)
    return TensorDataset(x, y)


def holdout_indices(n: int, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split of range(n): (train_idx, val_idx), val_idx of length ``val_size``,
    both sorted. Same (n, val_size, seed) -> same split on every machine."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size: expected 0 <= val_size < {n} (the training set size), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int = DEFAULT_VAL_SIZE,
    split_seed: int = 0,
    limit: int | None = None,
) -> TensorDataset:
    """One split of a real dataset as a TensorDataset ``(x [N,1,28,28] float32, y [N] int64)``.

    ``split``: ``"train"`` (training images minus the validation hold-out: 55,000 by
    default), ``"val"`` (``val_size`` images held out of the training set, chosen by
    ``split_seed``), or ``"test"`` (the 10,000 test images). ``limit``: keep the first
    ``limit`` images of the split (``--limit-train``).
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit: expected a positive number of images, got {limit}")
    images, labels = read_split(name, "test" if split == "test" else "train", data_dir)
    if split != "test":
        train_idx, val_idx = holdout_indices(images.shape[0], val_size, split_seed)
        idx = (train_idx if split == "train" else val_idx).numpy()
        images, labels = images[idx], labels[idx]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return to_tensor_dataset(images, labels, *_STATS[name])


class DataSplits(NamedTuple):
    """Train / validation (held out of train) / test TensorDatasets and the class count."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]


def load_splits(
    name: str,
    data_dir=None,
    *,
    val_size: int = DEFAULT_VAL_SIZE,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    seed: int = 0,
) -> DataSplits:
    """All three splits of ``name`` in {"fashion-mnist", "mnist", "synthetic"} (reads each
    file once). ``limit_train`` caps the training split, ``limit_eval`` the val and test
    splits. For ``"synthetic"``: 2,000 training images (or ``limit_train``), 500 val, 500 test.
    ``seed`` only matters for the synthetic data; the real validation hold-out always uses
    split seed 0 so that runs with different seeds see the same split.
    """
    for arg, v in (("limit_train", limit_train), ("limit_eval", limit_eval)):
        if v is not None and v <= 0:
            raise ValueError(f"{arg}: expected a positive number of images, got {v}")
    if name == "synthetic":
        n_train = limit_train or 2000
        n_eval = limit_eval or 500
        full = synthetic_dataset(n_train + 2 * n_eval, seed=seed)
        x, y = full.tensors
        a, b = n_train, n_train + n_eval
        return DataSplits(TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]),
                          TensorDataset(x[b:], y[b:]), 10, tuple(x.shape[1:]))
    _check_name(name)
    images, labels = read_split(name, "train", data_dir)
    train_idx, val_idx = holdout_indices(images.shape[0], val_size, 0)
    if limit_train is not None:
        train_idx = train_idx[:limit_train]
    if limit_eval is not None:
        val_idx = val_idx[:limit_eval]
    mean, std = _STATS[name]
    train = to_tensor_dataset(images[train_idx.numpy()], labels[train_idx.numpy()], mean, std)
    val = to_tensor_dataset(images[val_idx.numpy()], labels[val_idx.numpy()], mean, std)
    t_images, t_labels = read_split(name, "test", data_dir)
    if limit_eval is not None:
        t_images, t_labels = t_images[:limit_eval], t_labels[:limit_eval]
    test = to_tensor_dataset(t_images, t_labels, mean, std)
    return DataSplits(train, val, test, 10, tuple(train.tensors[0].shape[1:]))


def synthetic_dataset(
    n: int,
    num_classes: int = 10,
    shape: tuple[int, ...] = (1, 28, 28),
    seed: int = 0,
    *,
    noise: float = 4.0,
) -> TensorDataset:
    """A learnable stand-in for Fashion-MNIST: ``(x [n, *shape] float32, y [n] int64)``.

    Each class has a fixed smooth random template (fixed by ``num_classes`` and ``shape``,
    not by ``seed``); a sample is its class template times a random contrast in [0.5, 1.5],
    shifted by up to 2 pixels, plus N(0, noise^2) pixel noise. ``seed`` picks the samples
    and labels. A linear model gets well above chance, a small CNN does better: different
    exits reach different accuracies, as on real data.
    """
    if n <= 0:
        raise ValueError(f"n: expected a positive number of samples, got {n}")
    if num_classes < 2:
        raise ValueError(f"num_classes: expected at least 2, got {num_classes}")
    if len(shape) != 3:
        raise ValueError(f"shape: expected (channels, height, width), got {shape}")
    c, h, w = shape
    tgen = torch.Generator().manual_seed(12345 + 7 * num_classes + h * w * c)
    coarse = torch.randn(num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=tgen)
    templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
    x = templates[y] * contrast
    shifts = torch.randint(-2, 3, (n, 2), generator=gen)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if sel.any():
                x[sel] = torch.roll(x[sel], shifts=(dy, dx), dims=(2, 3))
    x = x + noise * torch.randn(x.shape, generator=gen)
    return TensorDataset(x.contiguous(), y)
