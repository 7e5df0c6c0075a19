"""Tests for :mod:`resu_examples.datasets`: idx parsing, search order, fallback split, real files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from resu_examples import datasets
from resu_examples.datasets import (
    FASHION_MNIST_FILES,
    find_fashion_mnist,
    find_kjv,
    load_digits,
    load_fashion_mnist,
    load_image_data,
    load_kjv_bytes,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REAL_FASHION_MNIST = SHARED_DATA / "fashion-mnist"
REAL_KJV = SHARED_DATA / "kjv" / "kjv.txt.gz"


def _write_gz(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _write_idx_images(path: Path, images: np.ndarray, magic: int = 2051) -> None:
    n, h, w = images.shape
    _write_gz(path, struct.pack(">iiii", magic, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray, magic: int = 2049) -> None:
    _write_gz(path, struct.pack(">ii", magic, len(labels)) + labels.astype(np.uint8).tobytes())


def _fake_fashion_mnist(
    directory: Path, n_train: int = 30, n_test: int = 20, size: tuple[int, int] = (4, 5)
) -> dict[str, np.ndarray]:
    """Write a small but well-formed Fashion-MNIST folder and return the raw arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "test_labels": (np.arange(n_test) * 3) % 10,
    }
    for role, name in FASHION_MNIST_FILES.items():
        write = _write_idx_images if role.endswith("images") else _write_idx_labels
        write(directory / name, arrays[role])
    return arrays


@pytest.fixture
def no_default_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide $RESU_DATA and the system folder so only what a test sets up can be found."""
    monkeypatch.delenv(datasets.DATA_ENV_VAR, raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-dir")


# --- idx parsing -----------------------------------------------------------------------------------


def test_load_fashion_mnist_parses_idx(tmp_path: Path) -> None:
    raw = _fake_fashion_mnist(tmp_path)
    data = load_fashion_mnist(tmp_path)

    assert data.name == "fashion-mnist"
    assert data.image_size == (4, 5)
    assert data.num_classes == 10
    assert data.train_x.shape == (30, 20) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (20, 20) and data.test_x.dtype == torch.float32
    assert data.train_y.dtype == torch.int64 and data.test_y.dtype == torch.int64
    assert data.train_y.tolist() == raw["train_labels"].tolist()
    assert data.test_y.tolist() == raw["test_labels"].tolist()

    # Standardised with the train statistics, applied to both splits, row-major pixel order.
    assert abs(data.train_x.mean().item()) < 1e-5
    assert abs(data.train_x.std(correction=0).item() - 1.0) < 1e-5
    train01 = raw["train_images"].reshape(30, -1) / 255.0
    mean, std = train01.mean(), train01.std()
    torch.testing.assert_close(
        data.train_x, torch.from_numpy((train01 - mean) / std).float(), atol=1e-5, rtol=0
    )
    test01 = raw["test_images"].reshape(20, -1) / 255.0
    torch.testing.assert_close(
        data.test_x, torch.from_numpy((test01 - mean) / std).float(), atol=1e-5, rtol=0
    )


def _corrupt_magic(path: Path) -> None:
    _write_idx_images(path, np.zeros((30, 4, 5), dtype=np.uint8), magic=2049)


def _truncate(path: Path) -> None:
    _write_gz(path, gzip.decompress(path.read_bytes())[:-1])


def _short_header(path: Path) -> None:
    _write_gz(path, b"\x00\x00\x08")


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"this is not gzip data at all")


def _label_count_mismatch(path: Path) -> None:
    _write_idx_labels(path, np.zeros(29, dtype=np.uint8))


def _label_out_of_range(path: Path) -> None:
    _write_idx_labels(path, np.full(30, 10, dtype=np.uint8))


@pytest.mark.parametrize(
    ("role", "corrupt"),
    [
        ("train_images", _corrupt_magic),
        ("train_images", _truncate),
        ("train_images", _short_header),
        ("test_images", _not_gzip),
        ("train_labels", _label_count_mismatch),
        ("train_labels", _label_out_of_range),
        ("test_labels", _corrupt_magic),
    ],
)
def test_load_fashion_mnist_rejects_corrupt_files(tmp_path: Path, role: str, corrupt) -> None:
    _fake_fashion_mnist(tmp_path)
    corrupt(tmp_path / FASHION_MNIST_FILES[role])
    with pytest.raises(ValueError):
        load_fashion_mnist(tmp_path)


def test_load_fashion_mnist_rejects_mismatched_image_sizes(tmp_path: Path) -> None:
    _fake_fashion_mnist(tmp_path)
    _write_idx_images(
        tmp_path / FASHION_MNIST_FILES["test_images"], np.zeros((20, 5, 4), dtype=np.uint8)
    )
    with pytest.raises(ValueError, match="image"):
        load_fashion_mnist(tmp_path)


# --- search order ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_default_data")
def test_find_fashion_mnist_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert find_fashion_mnist() is None

    # $RESU_DATA holding the files directly, or in a fashion-mnist/ subfolder.
    direct = tmp_path / "direct"
    _fake_fashion_mnist(direct)
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(direct))
    assert find_fashion_mnist() == direct

    root = tmp_path / "root"
    _fake_fashion_mnist(root / "fashion-mnist")
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(root))
    assert find_fashion_mnist() == root / "fashion-mnist"

    # The argument wins over $RESU_DATA.
    explicit = tmp_path / "explicit"
    _fake_fashion_mnist(explicit)
    assert find_fashion_mnist(explicit) == explicit
    assert find_fashion_mnist(str(explicit)) == explicit

    # $RESU_DATA without the files falls through to the system folder.
    system = tmp_path / "system"
    _fake_fashion_mnist(system)
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", system)
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "empty"))
    assert find_fashion_mnist() == system


@pytest.mark.usefixtures("no_default_data")
def test_find_fashion_mnist_explicit_dir_missing_files(tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    _fake_fashion_mnist(partial)
    (partial / FASHION_MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match=FASHION_MNIST_FILES["test_labels"]) as info:
        find_fashion_mnist(partial)
    assert FASHION_MNIST_FILES["train_images"] not in str(info.value)

    with pytest.raises(FileNotFoundError) as info:
        load_image_data(tmp_path / "nowhere")
    for name in FASHION_MNIST_FILES.values():
        assert name in str(info.value)


@pytest.mark.usefixtures("no_default_data")
def test_load_image_data_prefers_fashion_mnist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path))
    data = load_image_data()
    assert data.name == "fashion-mnist"
    assert data.source == str(tmp_path / "fashion-mnist")  # where it was found, for the printout


# --- digits fallback -------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_default_data")
def test_load_image_data_falls_back_to_digits() -> None:
    pytest.importorskip("sklearn")
    data = load_image_data()
    assert data.name == "digits"
    # The printout says it is the fallback, and where Fashion-MNIST was looked for.
    assert "digits" in data.source and datasets.DATA_ENV_VAR in data.source
    assert str(datasets.SYSTEM_FASHION_MNIST_DIR) in data.source


def test_load_digits_split() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits as sklearn_load_digits

    data = load_digits()
    assert data.image_size == (8, 8)
    assert data.num_classes == 10
    assert data.train_x.shape == (1437, 64) and data.test_x.shape == (360, 64)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert abs(data.train_x.mean().item()) < 1e-5
    assert abs(data.train_x.std(correction=0).item() - 1.0) < 1e-5

    # Stratified: every class keeps ~20% of its images in test, and nothing is lost or duplicated.
    per_class = torch.from_numpy(sklearn_load_digits().target).bincount()
    test_counts = data.test_y.bincount(minlength=10)
    assert torch.equal(data.train_y.bincount(minlength=10) + test_counts, per_class)
    assert ((test_counts - per_class * 0.2).abs() <= 1).all()

    # Deterministic: the same split every call; another seed gives another split.
    again = load_digits()
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.test_y, data.test_y)
    assert not torch.equal(load_digits(seed=1).test_x, data.test_x)


# --- KJV bytes -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_default_data")
def test_load_kjv_bytes_split_and_search(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = b"In the beginning God created the heaven and the earth.\n" * 20
    (tmp_path / "kjv").mkdir()
    _write_gz(tmp_path / "kjv" / "kjv.txt.gz", text)

    assert find_kjv() is None
    with pytest.raises(FileNotFoundError):
        load_kjv_bytes()
    with pytest.raises(FileNotFoundError):
        find_kjv(tmp_path / "fashion-mnist")

    train, val = load_kjv_bytes(tmp_path, holdout_fraction=0.1)
    assert train.dtype == torch.uint8 and val.dtype == torch.uint8
    assert len(val) == round(len(text) * 0.1)
    assert bytes(torch.cat([train, val]).tolist()) == text

    # $RESU_DATA naming the fashion-mnist folder (kjv is a sibling) or the data root.
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "fashion-mnist"))
    assert find_kjv() == tmp_path / "kjv" / "kjv.txt.gz"
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path))
    assert find_kjv() == tmp_path / "kjv" / "kjv.txt.gz"

    with pytest.raises(ValueError):
        load_kjv_bytes(tmp_path, holdout_fraction=1.0)


# --- the real files --------------------------------------------------------------------------------


@pytest.mark.skipif(
    not all((REAL_FASHION_MNIST / name).is_file() for name in FASHION_MNIST_FILES.values()),
    reason=f"real Fashion-MNIST not at {REAL_FASHION_MNIST}",
)
def test_real_fashion_mnist() -> None:
    data = load_fashion_mnist(find_fashion_mnist(SHARED_DATA))
    assert data.image_size == (28, 28)
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert data.train_y.bincount().tolist() == [6000] * 10
    assert data.test_y.bincount().tolist() == [1000] * 10
    assert abs(data.train_x.mean().item()) < 1e-4
    assert abs(data.train_x.std().item() - 1.0) < 1e-4


@pytest.mark.skipif(not REAL_KJV.is_file(), reason=f"real KJV text not at {REAL_KJV}")
def test_real_kjv() -> None:
    train, val = load_kjv_bytes(SHARED_DATA)
    assert len(train) + len(val) == 4_151_332
    assert bytes(train[:9].tolist()) == b"\nGenesis "
    assert 0.049 < len(val) / (len(train) + len(val)) < 0.051
