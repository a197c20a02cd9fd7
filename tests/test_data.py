"""IDX reader, dataset lookup, splits and the synthetic dataset (ann_kernels.train.data)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ann_kernels.train import data as D


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = True, cut: int = 0) -> Path:
    """Write ``array`` (uint8) as an IDX file; ``magic`` overrides the header, ``cut`` drops
    that many bytes from the end (a truncated file)."""
    if magic is None:
        magic = 0x0800 | array.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if cut:
        raw = raw[:-cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_fake_dataset(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz=gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.random.default_rng(1).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    path = write_idx(tmp_path / ("x.gz" if gz else "x"), arr, gz=gz)
    out = D.read_idx(path, D.IMAGES_MAGIC)
    assert out.dtype == np.uint8 and out.shape == (7, 28, 28)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_wrong_magic_names_file(tmp_path):
    labels = write_idx(tmp_path / "labels.gz", np.arange(10))
    with pytest.raises(ValueError, match=r"labels\.gz.*wrong magic number 0x00000801, expected 0x00000803"):
        D.read_idx(labels, D.IMAGES_MAGIC)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(ValueError, match=r"junk.*bad magic number 0x12345678"):
        D.read_idx(junk)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_truncated(tmp_path, gz):
    path = write_idx(tmp_path / "images", np.zeros((5, 28, 28)), gz=gz, cut=30)
    with pytest.raises(ValueError, match=r"images: truncated IDX file: dims \[5, 28, 28\] need 3920 data bytes, found 3890"):
        D.read_idx(path, D.IMAGES_MAGIC)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">I", D.IMAGES_MAGIC) + b"\x00\x00")
    with pytest.raises(ValueError, match="header alone needs 16"):
        D.read_idx(short)


def test_read_idx_truncated_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.zeros((50, 28, 28)))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"images\.gz: corrupt or truncated gzip stream"):
        D.read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(struct.pack(">II", D.LABELS_MAGIC, 3) + bytes(5))
    with pytest.raises(ValueError, match="2 unexpected trailing bytes"):
        D.read_idx(path, D.LABELS_MAGIC)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"):
        D.load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mnist: t10k-images-idx3-ubyte\[\.gz\] not found.*--data-dir"):
        D.load_dataset("mnist", "test", data_dir=tmp_path)


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="dataset: expected one of .* got 'cifar'"):
        D.load_dataset("cifar", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split: expected one of .* got 'dev'"):
        D.load_dataset("mnist", "dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match="limit: expected a positive"):
        D.load_dataset("mnist", "train", data_dir=tmp_path, limit=0)


def test_count_mismatch_between_images_and_labels(tmp_path):
    make_fake_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(7))
    with pytest.raises(ValueError, match="has 20 images but .*t10k-labels-idx1-ubyte.gz has 7 labels"):
        D.load_dataset("fashion-mnist", "test", data_dir=tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_load_dataset_splits_from_data_dir(tmp_path, gz):
    make_fake_dataset(tmp_path, gz=gz)
    train = D.load_dataset("fashion-mnist", "train", data_dir=tmp_path, val_size=10)
    val = D.load_dataset("fashion-mnist", "val", data_dir=tmp_path, val_size=10)
    test = D.load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert train.tensors[0].shape == (50, 1, 28, 28) and train.tensors[0].dtype == torch.float32
    assert val.tensors[0].shape == (10, 1, 28, 28) and test.tensors[0].shape == (20, 1, 28, 28)
    assert train.tensors[1].dtype == torch.int64
    # The validation split is held out of the training set: disjoint, together all 60.
    train_idx, val_idx = D.holdout_indices(60, 10, 0)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(60))
    # Labels were arange % 10, so each split's labels tell which rows it took.
    torch.testing.assert_close(val.tensors[1], val_idx % 10)
    torch.testing.assert_close(train.tensors[1], train_idx % 10)
    # Deterministic; a different split seed gives a different hold-out.
    again = D.load_dataset("fashion-mnist", "val", data_dir=tmp_path, val_size=10)
    assert torch.equal(again.tensors[0], val.tensors[0])
    other = D.holdout_indices(60, 10, 1)[1]
    assert not torch.equal(other, val_idx)
    # Normalisation: (x / 255 - mean) / std with the Fashion-MNIST constants.
    raw = D.read_idx(tmp_path / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}")
    expect = (torch.from_numpy(raw).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(test.tensors[0][:, 0], expect)


def test_env_var_and_subdirectory_lookup(tmp_path, monkeypatch):
    make_fake_dataset(tmp_path / "fashion-mnist")
    monkeypatch.setenv("ANN_DATA", str(tmp_path))
    assert len(D.load_dataset("fashion-mnist", "test")) == 20
    monkeypatch.setenv("ANN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.load_dataset("fashion-mnist", "test")


def test_load_splits_limits(tmp_path):
    make_fake_dataset(tmp_path)
    s = D.load_splits("fashion-mnist", tmp_path, val_size=10, limit_train=8, limit_eval=5)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 5, 5)
    assert s.num_classes == 10 and s.input_shape == (1, 28, 28)
    with pytest.raises(ValueError, match="limit_train: expected a positive"):
        D.load_splits("fashion-mnist", tmp_path, limit_train=0)
    with pytest.raises(ValueError, match="val_size: expected 0 <= val_size < 60"):
        D.load_splits("fashion-mnist", tmp_path, val_size=60)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split():
    test = D.load_dataset("fashion-mnist", "test", limit=1000)
    x, y = test.tensors
    assert x.shape == (1000, 1, 28, 28) and y.min() == 0 and y.max() == 9
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1


def test_synthetic_dataset_shapes_and_determinism():
    a = D.synthetic_dataset(64, seed=3)
    b = D.synthetic_dataset(64, seed=3)
    c = D.synthetic_dataset(64, seed=4)
    assert a.tensors[0].shape == (64, 1, 28, 28) and a.tensors[1].shape == (64,)
    assert torch.equal(a.tensors[0], b.tensors[0]) and not torch.equal(a.tensors[0], c.tensors[0])
    rgb = D.synthetic_dataset(8, num_classes=5, shape=(3, 32, 32))
    assert rgb.tensors[0].shape == (8, 3, 32, 32) and rgb.tensors[1].max() < 5
    with pytest.raises(ValueError, match="n: expected a positive"):
        D.synthetic_dataset(0)
    with pytest.raises(ValueError, match="shape: expected"):
        D.synthetic_dataset(4, shape=(28, 28))


def test_synthetic_dataset_is_learnable():
    """Nearest class mean (estimated on one seed) classifies another seed far above chance;
    with more noise it does worse: the data has class structure, and difficulty."""
    def nearest_mean_acc(noise):
        x, y = D.synthetic_dataset(2000, seed=0, noise=noise).tensors
        xt, yt = D.synthetic_dataset(1000, seed=1, noise=noise).tensors
        means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
        pred = torch.cdist(xt.flatten(1), means).argmin(1)
        return (pred == yt).float().mean().item()

    easy, default = nearest_mean_acc(1.0), nearest_mean_acc(4.0)
    assert easy > 0.9
    assert 0.3 < default < easy
