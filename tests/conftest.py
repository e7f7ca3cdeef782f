"""Shared fixtures: tiny real-image datasets in ImageNet layout, written once per test session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    """The decode-check cache (apr.data.layout.check_files) of a test session lives in a temporary folder."""
    import tempfile

    os.environ.setdefault("APR_CACHE_DIR", tempfile.mkdtemp(prefix="apr-test-cache-"))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def digits_rgb(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real handwritten digits as uint8 RGB images (N, size, size, 3)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # 8x8 grey, 0..16 -> 0..255
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    tints = np.array([[1.0, 0.9, 0.8], [0.8, 1.0, 0.9], [0.9, 0.8, 1.0]])
    for i, img in enumerate(images):
        big = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), dtype=np.float32)
        out[i] = (big[..., None] * tints[i % 3]).clip(0, 255).astype(np.uint8)
    return out, digits.target.astype(np.int64)


def write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                      quality: int = 90) -> Path:
    """Write images as <root>/<class_name>/<index>.JPEG."""
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / class_names[label] / f"img_{i:05d}.JPEG", quality=quality)
    return root


@pytest.fixture(scope="session")
def digits_images() -> tuple[np.ndarray, np.ndarray]:
    return digits_rgb(32)


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory, digits_images) -> Path:
    """A tiny ImageNet-layout tree of real digit photos: root/{train,val}/<wnid>/*.JPEG.

    4 classes with WordNet-style names (n0000000k = digit k), 16 train and 6 val images each,
    32x32 RGB JPEG.
    """
    images, labels = digits_images
    root = tmp_path_factory.mktemp("imagenet_tree")
    classes = [f"n{k:08d}" for k in range(4)]
    rng = np.random.default_rng(0)
    train_idx, val_idx = [], []
    for k in range(4):
        idx = rng.permutation(np.flatnonzero(labels == k))
        train_idx += list(idx[:16])
        val_idx += list(idx[16:22])
    write_imagefolder(root / "train", images[train_idx], labels[train_idx], classes)
    write_imagefolder(root / "val", images[val_idx], labels[val_idx], classes)
    return root


def write_cifar10_folder(folder: Path, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                         test_labels: np.ndarray) -> Path:
    """The official python-pickle layout (cifar-10-batches-py) holding the given uint8 N x 32 x 32 x 3 images."""
    import pickle

    def rows(x):  # R plane, G plane, B plane per row, as the official files
        return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)

    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rows(images[part]), b"labels": [int(v) for v in labels[part]]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rows(test_images), b"labels": [int(v) for v in test_labels]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"digit_{k}".encode() for k in range(10)]}, f)
    return folder


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory, digits_images) -> Path:
    """Real digits in the CIFAR-10 pickle layout: 80 train and 40 test images, 10 classes."""
    images, labels = digits_images
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    return write_cifar10_folder(root, images[:80], labels[:80], images[100:140], labels[100:140])


def sample_photos(height: int, width: int) -> np.ndarray:
    """scikit-learn's two real sample photos (china, flower) resized to height x width: uint8 2 x H x W x 3."""
    from sklearn.datasets import load_sample_images

    return np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.BILINEAR))
                     for im in load_sample_images().images])


def image_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per image: ||got - want|| / ||want|| (L2 over C x H x W), computed on the CPU in float64."""
    got, want = got.detach().cpu().double().flatten(1), want.detach().cpu().double().flatten(1)
    return (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-12)


def assert_images_close(got: torch.Tensor, want: torch.Tensor, worst: float = 1e-2, typical: float = 1e-4) -> None:
    """CUDA against CPU, image by image. float32 FFT / kernel noise is ~1e-6 relative; a value that sits on a
    0..255 rounding edge may flip one level (1/255 of one value: ~2e-4 relative on a 32 x 32 photo, a little
    more once a Fourier swap spreads it), rarely and in a few images. So every image within ``worst`` (50x a
    flip) and the median image within ``typical`` (most images flip nothing); a wrong op, permutation,
    transform axis, clamp or normalisation moves an image by 1e-2 or more, a bf16 path every image by ~2e-3."""
    errors = image_errors(got, want)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert errors.max() <= worst, f"worst image {int(errors.argmax())}: {float(errors.max()):.2e} > {worst}"
    assert errors.median() <= typical, f"median image error {float(errors.median()):.2e} > {typical}"


def has_dali() -> bool:
    """DALI is importable here (the dev extra brings its CPU twin; the GPU machine has none)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def single_thread():
    """cnn_tiny on 32 px is ~15x faster on one thread than on two when the 2-core box is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """A module's tests on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with single_thread():
        yield


from slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture: a real one-node slurm)
