"""Real data for the examples, the tests and the benchmarks (``resu_examples.datasets``).

Sparse-training claims only mean something on real data, so every example trains on one of:

* **Fashion-MNIST** (60,000 + 10,000 images, 28x28, 10 classes) in its upstream idx/gzip format, found
  through :func:`find_fashion_mnist`. Debian/Ubuntu ship it as ``dataset-fashion-mnist``.
* **scikit-learn's digits** (1,797 images, 8x8, 10 classes), bundled with scikit-learn, so there is
  always *some* real image data even on a machine without downloads. It is the fallback of
  :func:`load_image_data`.
* **The King James Bible** as raw bytes (:func:`load_kjv_bytes`) for byte-level language models.

Nothing here downloads anything: the loaders read files the user already has, which keeps runs
reproducible and usable offline (the GPU machines have no network).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATA_ENV_VAR",
    "FASHION_MNIST_FILES",
    "SYSTEM_FASHION_MNIST_DIR",
    "ImageData",
    "find_fashion_mnist",
    "find_kjv",
    "load_digits",
    "load_fashion_mnist",
    "load_image_data",
    "load_kjv_bytes",
]

#: Environment variable naming the data folder (e.g. ``../shared/data`` of this project).
DATA_ENV_VAR = "RESU_DATA"

#: Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The four upstream files, keyed by role.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

_FASHION_MNIST_CLASSES = 10
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_KJV_FILE = "kjv.txt.gz"


@dataclass(frozen=True, eq=False)
class ImageData:
    """A classification image data set, flattened and normalised, ready for an MLP.

    Images are rows of ``train_x`` / ``test_x`` (``float32``, ``H*W`` columns): pixel values scaled to
    [0, 1], then standardised with the *train* split's scalar mean and standard deviation (the test
    split uses the train statistics, so no test information leaks into training).
    ``source`` says where the images came from, so a printout can say what its numbers are about.
    ``eq=False`` because element-wise tensor comparison has no single truth value.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    image_size: tuple[int, int]
    source: str = ""


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def _missing_fashion_mnist_files(directory: Path) -> list[str]:
    return [name for name in FASHION_MNIST_FILES.values() if not (directory / name).is_file()]


def _fashion_mnist_in(directory: Path) -> Path | None:
    """``directory`` itself or its ``fashion-mnist/`` subfolder, whichever holds all four files."""
    for candidate in (directory, directory / "fashion-mnist"):
        if not _missing_fashion_mnist_files(candidate):
            return candidate
    return None


def find_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Locate the folder holding the four Fashion-MNIST idx ``.gz`` files.

    Search order: ``data_dir``; ``$RESU_DATA``; :data:`SYSTEM_FASHION_MNIST_DIR`. Each of the first
    two may hold the files directly or in a ``fashion-mnist/`` subfolder. Returns ``None`` when no
    candidate has them, so callers can fall back to :func:`load_digits`.

    Raises:
        FileNotFoundError: ``data_dir`` was given but lacks the files. An explicit folder is a
            request for that data, and silently training on something else would mislead.
    """
    if data_dir is not None:
        directory = Path(data_dir)
        found = _fashion_mnist_in(directory)
        if found is None:
            missing = ", ".join(_missing_fashion_mnist_files(directory))
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {directory} (nor in {directory / 'fashion-mnist'}): "
                f"missing {missing}"
            )
        return found
    env_dir = os.environ.get(DATA_ENV_VAR)
    if env_dir:
        found = _fashion_mnist_in(Path(env_dir))
        if found is not None:
            return found
    if not _missing_fashion_mnist_files(SYSTEM_FASHION_MNIST_DIR):
        return SYSTEM_FASHION_MNIST_DIR
    return None


def _read_gzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; truncated streams raise EOFError.
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from exc


def _idx_header(path: Path, raw: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """Check an idx header (big-endian int32s: magic, then one size per dimension) and the length."""
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: {len(raw)} bytes is shorter than the {header_len}-byte idx header"
        )
    fields = np.frombuffer(raw, dtype=">i4", count=1 + ndim)
    if int(fields[0]) != magic:
        raise ValueError(f"{path}: idx magic number {int(fields[0])}, expected {magic}")
    dims = tuple(int(d) for d in fields[1:])
    if any(d <= 0 for d in dims):
        raise ValueError(f"{path}: invalid idx dimensions {dims}")
    expected = header_len + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, expected {expected} for idx dimensions {dims}")
    return dims


def _read_idx_images(path: Path) -> np.ndarray:
    """``(N, H, W)`` uint8 images from an idx3 file (16-byte header)."""
    raw = _read_gzip(path)
    n, h, w = _idx_header(path, raw, _IDX_IMAGES_MAGIC, ndim=3)
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


def _read_idx_labels(path: Path, num_classes: int) -> np.ndarray:
    """``(N,)`` uint8 labels from an idx1 file (8-byte header), checked to lie in the class range."""
    raw = _read_gzip(path)
    _idx_header(path, raw, _IDX_LABELS_MAGIC, ndim=1)
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if labels.max(initial=0) >= num_classes:
        raise ValueError(f"{path}: label {int(labels.max())} outside 0..{num_classes - 1}")
    return labels


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``float32`` images already in [0, 1]; standardise both splits with the train stats.

    Statistics are float32 reductions in torch (pairwise-summed, agreeing with float64 to ~1e-7 on
    Fashion-MNIST) because a float64 pass over 47M pixels costs seconds in every test run.
    """
    train_x = torch.from_numpy(train).reshape(len(train), -1)
    test_x = torch.from_numpy(test).reshape(len(test), -1)
    std, mean = torch.std_mean(train_x, correction=0)
    if std.item() == 0.0:
        raise ValueError("train images are constant; cannot standardise")
    return train_x.sub_(mean).div_(std), test_x.sub_(mean).div_(std)


def load_fashion_mnist(path: str | os.PathLike[str]) -> ImageData:
    """Read Fashion-MNIST from a folder holding the four upstream idx ``.gz`` files.

    Use :func:`find_fashion_mnist` to get ``path``. Raises ``ValueError`` on a corrupt file (bad
    gzip stream, wrong magic number, length not matching the header, image/label count mismatch,
    train/test image sizes differing, label out of range) rather than training on garbage.
    """
    directory = Path(path)
    missing = _missing_fashion_mnist_files(directory)
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory}: missing {', '.join(missing)}"
        )
    files = {role: directory / name for role, name in FASHION_MNIST_FILES.items()}
    train_images = _read_idx_images(files["train_images"])
    test_images = _read_idx_images(files["test_images"])
    train_labels = _read_idx_labels(files["train_labels"], _FASHION_MNIST_CLASSES)
    test_labels = _read_idx_labels(files["test_labels"], _FASHION_MNIST_CLASSES)
    for images, labels, split in (
        (train_images, train_labels, "train"),
        (test_images, test_labels, "test"),
    ):
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"train images are {train_images.shape[1:]} but test images {test_images.shape[1:]}"
        )
    train_x, test_x = _standardise(
        train_images.astype(np.float32) / 255.0, test_images.astype(np.float32) / 255.0
    )
    height, width = train_images.shape[1:]
    return ImageData(
        name="fashion-mnist",
        train_x=train_x,
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=_FASHION_MNIST_CLASSES,
        image_size=(int(height), int(width)),
        source=str(directory),
    )


# --------------------------------------------------------------------------------------------------
# scikit-learn digits: the embedded fallback
# --------------------------------------------------------------------------------------------------


def load_digits(*, seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits, split 80/20 into train/test, stratified by class.

    The split is seeded so every run (and every machine) sees the same test set, and stratified so
    that with only ~180 images per class each class keeps its share in both splits.
    scikit-learn is an optional dependency (the ``examples`` extra), hence the lazy import.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "load_digits needs scikit-learn: pip install scikit-learn "
            "(or pip install 'resu-compile[examples]')"
        ) from exc
    bunch = sklearn_load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    train_x, test_x = _standardise(train_images, test_images)
    height, width = images.shape[1:]
    return ImageData(
        name="digits",
        train_x=train_x,
        train_y=torch.from_numpy(np.ascontiguousarray(train_labels)),
        test_x=test_x,
        test_y=torch.from_numpy(np.ascontiguousarray(test_labels)),
        num_classes=len(bunch.target_names),
        image_size=(int(height), int(width)),
        source="scikit-learn's bundled digits",
    )


def load_image_data(data_dir: str | os.PathLike[str] | None = None) -> ImageData:
    """Fashion-MNIST when :func:`find_fashion_mnist` finds it, otherwise the bundled digits.

    An explicit ``data_dir`` without the files still raises (see :func:`find_fashion_mnist`); only
    the automatic search falls back.
    """
    path = find_fashion_mnist(data_dir)
    if path is not None:
        return load_fashion_mnist(path)
    digits = load_digits()
    searched = f"${DATA_ENV_VAR}, {SYSTEM_FASHION_MNIST_DIR}"
    return replace(digits, source=f"{digits.source} (no Fashion-MNIST in {searched})")


# --------------------------------------------------------------------------------------------------
# King James Bible bytes
# --------------------------------------------------------------------------------------------------


def find_kjv(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Locate ``kjv.txt.gz``: in ``data_dir`` (or its ``kjv/``), else ``$RESU_DATA/../kjv`` or
    ``$RESU_DATA/kjv``.

    ``$RESU_DATA`` may name either the data root or its ``fashion-mnist/`` folder, hence both
    relative places. Returns ``None`` when absent; an explicit ``data_dir`` without the file raises
    ``FileNotFoundError``, as in :func:`find_fashion_mnist`.
    """
    if data_dir is not None:
        directory = Path(data_dir)
        for candidate in (directory / _KJV_FILE, directory / "kjv" / _KJV_FILE):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{_KJV_FILE} not found in {directory} nor in {directory / 'kjv'}")
    env_dir = os.environ.get(DATA_ENV_VAR)
    if env_dir:
        root = Path(env_dir)
        for candidate in (root.parent / "kjv" / _KJV_FILE, root / "kjv" / _KJV_FILE):
            if candidate.is_file():
                return candidate
    return None


def load_kjv_bytes(
    data_dir: str | os.PathLike[str] | None = None, *, holdout_fraction: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """The King James Bible as ``(train, validation)`` 1-D ``uint8`` byte tensors.

    Validation is the last ``holdout_fraction`` of the text (with the default 5%, the closing
    books of the New Testament), a contiguous hold-out so that no validation context also appears in training.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    path = find_kjv(data_dir)
    if path is None:
        raise FileNotFoundError(
            f"{_KJV_FILE} not found: pass data_dir or set ${DATA_ENV_VAR} to the data folder"
        )
    text = torch.from_numpy(np.frombuffer(_read_gzip(path), dtype=np.uint8).copy())
    split = len(text) - max(1, round(len(text) * holdout_fraction))
    if split <= 0:
        raise ValueError(f"{path}: {len(text)} bytes is too short to hold out {holdout_fraction}")
    return text[:split], text[split:]
