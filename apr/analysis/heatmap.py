"""Fourier heat map (Yin et al. 2019; gatheluck/FourierHeatmap): model error under a perturbation
along each single Fourier basis image ``U_{i,j}``.

The value at ``(i, j)`` is the top-1 error on ``clamp(x + eps * r * U_{i,j}, 0, 1)`` with a random sign
``r`` per image and channel, added *before* mean/std normalisation. A model that relies on high
frequencies (as plain training does) shows high error far from the centre; APR pushes the error
towards the low frequencies. One pass over the images per frequency, so the work is batched (many
frequencies x many images per forward pass), can run in bf16, and is resumable: after each chunk of
frequencies the partial error counts are saved atomically and a rerun with the same parameters
continues where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from apr.fourier import fourier_basis_batch, mirror_half_spectrum_map
from apr.inference import check_precision, eval_mode
from apr.io import atomic_open, atomic_write_text

from .common import as_images, as_labels, classifier_for, resolve_device

__all__ = ["HEATMAP_SCHEMA", "HeatmapResult", "default_eps", "heatmap_frequencies", "perturbation_signs",
           "fourier_heatmap"]

HEATMAP_SCHEMA = "apr.heatmap/1"


def default_eps(image_size: int) -> float:
    """The perturbation norms of FourierHeatmap: 4.0 for CIFAR-sized, 15.7 for ImageNet-sized inputs."""
    return 4.0 if image_size <= 64 else 15.7


def _signed(index: int, size: int) -> int:
    """Signed frequency of FFT index ``index`` (0..size-1): 0, 1, ..., -2, -1."""
    return index if index <= size // 2 else index - size


def _self_mirrored_column(j: int, width: int) -> bool:
    # in columns 0 and (even W) W/2 of the half spectrum, (i, j) and (-i, j) are the same
    # real basis image, so only rows with signed frequency >= 0 need computing
    return j == 0 or (width % 2 == 0 and j == width // 2)


def heatmap_frequencies(height: int, width: int, max_frequency: int | None = None) -> list[tuple[int, int]]:
    """The distinct half-spectrum frequencies ``(i, j)`` a heat map evaluates, row-major.

    ``max_frequency`` keeps only ``|signed i| <= m`` and ``j <= m``. In the self-mirrored
    columns (0 and, for even W, W/2) ``(i, j)`` and ``(H - i, j)`` give the same basis image,
    so the second is not evaluated again but copied (this also makes the map exactly
    point-symmetric).
    """
    if max_frequency is not None and max_frequency < 0:
        raise ValueError(f"max_frequency must be >= 0, got {max_frequency}")
    out = []
    for i in range(height):
        for j in range(width // 2 + 1):
            if max_frequency is not None and (abs(_signed(i, height)) > max_frequency or j > max_frequency):
                continue
            if _self_mirrored_column(j, width) and i > height // 2:
                continue
            out.append((i, j))
    return out


def perturbation_signs(seed: int, i: int, j: int, num_images: int, channels: int) -> np.ndarray:
    """The random signs r (num_images x channels, values +-1) used for frequency (i, j).

    Drawn from a generator keyed by (seed, i, j), so they do not depend on how frequencies
    are grouped into chunks: an interrupted and resumed run gives the same matrix.
    """
    rng = np.random.default_rng([int(seed), int(i), int(j)])
    return rng.integers(0, 2, size=(num_images, channels), dtype=np.int8) * 2 - 1


@dataclass
class HeatmapResult:
    """A Fourier heat map: error per frequency (half spectrum) and its centred mirror image.

    ``half_errors[i, j]`` is the top-1 error for basis ``U_{i,j}`` of ``rfft2`` (NaN where
    not evaluated: outside ``max_frequency`` or not yet done); ``full_map`` puts frequency
    (0, 0) at ``[H // 2, W // 2]``.
    """

    half_errors: np.ndarray
    done: np.ndarray
    eps: float
    max_frequency: int | None
    image_size: tuple[int, int]
    num_images: int
    clean_error: float
    params: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        height, width = self.image_size
        return all(self.done[i, j] for i, j in heatmap_frequencies(height, width, self.max_frequency))

    @property
    def full_map(self) -> np.ndarray:
        _, width = self.image_size
        return mirror_half_spectrum_map(torch.from_numpy(self.half_errors.astype(np.float64)), width).numpy()

    def display_extent(self) -> tuple[int, int]:
        """Largest |vertical|, |horizontal| frequency of the symmetric region that is shown."""
        height, width = self.image_size
        limit = math.inf if self.max_frequency is None else self.max_frequency
        return int(min(limit, (height - 1) // 2)), int(min(limit, (width - 1) // 2))

    def display_map(self) -> np.ndarray:
        """The centred map cropped to a symmetric (2a+1) x (2b+1) block around frequency 0.

        For even sizes this drops the lone Nyquist row/column (as FourierHeatmap's (H-1)x(H-1)
        maps do); with ``max_frequency`` it is the evaluated region only.
        """
        height, width = self.image_size
        a, b = self.display_extent()
        ci, cj = height // 2, width // 2
        return self.full_map[ci - a: ci + a + 1, cj - b: cj + b + 1]

    def to_dict(self) -> dict:
        def clean(array):
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in array]

        a, b = self.display_extent()
        return {
            "schema": HEATMAP_SCHEMA,
            "eps": self.eps,
            "max_frequency": self.max_frequency,
            "image_size": list(self.image_size),
            "num_images": self.num_images,
            "clean_error": self.clean_error,
            "complete": self.complete,
            "params": self.params,
            "half_errors": clean(self.half_errors),
            "map": clean(self.full_map),
            "map_center": [self.image_size[0] // 2, self.image_size[1] // 2],
            "display_map": clean(self.display_map()),
            "display_frequencies": {"vertical": list(range(-a, a + 1)), "horizontal": list(range(-b, b + 1))},
            "mean_error": float(np.nanmean(self.display_map())) if np.isfinite(self.display_map()).any() else None,
        }

    def save(self, out_dir: str | Path, stem: str = "heatmap") -> dict[str, Path]:
        """Write ``<stem>_half.npy``, ``<stem>_map.npy`` and ``<stem>.json`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"half": out_dir / f"{stem}_half.npy", "map": out_dir / f"{stem}_map.npy",
                 "json": out_dir / f"{stem}.json"}
        np.save(paths["half"], self.half_errors)
        np.save(paths["map"], self.full_map)
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=1))
        return paths

    @classmethod
    def load(cls, json_path: str | Path) -> "HeatmapResult":
        """Rebuild a result from the JSON written by :meth:`save` (for plots without a model)."""
        data = json.loads(Path(json_path).read_text())
        if data.get("schema") != HEATMAP_SCHEMA:
            raise ValueError(f"{json_path} is not a heat-map JSON (schema {data.get('schema')!r})")
        half = np.array([[np.nan if v is None else v for v in row] for row in data["half_errors"]], dtype=np.float64)
        return cls(half_errors=half, done=np.isfinite(half), eps=data["eps"], max_frequency=data["max_frequency"],
                   image_size=tuple(data["image_size"]), num_images=data["num_images"],
                   clean_error=data["clean_error"], params=data["params"])


def _save_progress(path: Path, counts: np.ndarray, done: np.ndarray, clean_errors: int, params: dict) -> None:
    """Partial error counts + done mask, written to a temporary file and renamed (atomic)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, counts=counts, done=done, clean_errors=np.int64(clean_errors),
                 params=np.array(json.dumps(params, sort_keys=True)))


def _load_progress(path: Path, params: dict, shape: tuple[int, int]):
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = json.loads(str(data["params"]))
            counts, done, clean_errors = data["counts"], data["done"], int(data["clean_errors"])
    except Exception as exc:  # truncated or foreign file
        raise ValueError(f"cannot read heat-map progress file {path} ({exc}); delete it to start over") from exc
    wanted = json.loads(json.dumps(params, sort_keys=True))
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ValueError(
            f"heat-map progress file {path} was made with different parameters (differing: {', '.join(diff)}); "
            "delete it or choose another resume_path"
        )
    if counts.shape != shape or done.shape != shape:
        raise ValueError(f"heat-map progress file {path} has shape {counts.shape}, expected {shape}")
    return counts.astype(np.int64), done.astype(bool), clean_errors


def _fingerprint_tensor(hasher, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous().reshape(-1)
    hasher.update(str(tensor.dtype).encode())
    hasher.update(tensor.view(torch.uint8).numpy().tobytes())


def _fingerprint_model(model: nn.Module) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    # values only, in order: a wrapper (torch.compile's "_orig_mod.", DDP's "module.") renames the
    # keys but is the same model, and a resumed run may well be wrapped differently
    for tensor in model.state_dict().values():
        hasher.update(str(tuple(tensor.shape)).encode())
        _fingerprint_tensor(hasher, tensor)
    return hasher.hexdigest()


def fourier_heatmap(
    model: nn.Module,
    images,
    labels,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    eps: float | None = None,
    max_frequency: int | None = None,
    batch_size: int = 256,
    device=None,
    precision: str = "fp32",
    channels_last: bool = False,
    seed: int = 0,
    progress: bool = True,
    resume_path: str | Path | None = None,
    max_chunks: int | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> HeatmapResult:
    """Top-1 error of ``model`` under ``eps``-norm perturbations along each Fourier basis image.

    ``images``: N x C x H x W in [0, 1] (float, or uint8), *not* normalised; ``mean``/``std``
    are applied after the perturbation (None/None: the model takes [0, 1] input).
    ``eps``: L2 norm of the perturbation per channel (default 4.0 up to 64 px, else 15.7).
    ``max_frequency``: evaluate only ``|i|, |j| <= m`` (cost ~ (2m+1)(m+1) frequencies).
    ``batch_size``: perturbed images per forward pass; when it exceeds N, several frequencies
    share one pass. ``precision``: "fp32" | "bf16" (autocast).
    ``resume_path``: an .npz file updated after every chunk; rerunning with the same
    parameters (model weights, images, eps, ...) continues from it.
    ``max_chunks``: stop after this many chunks in this call (the result is then partial:
    ``result.complete`` is False). ``on_chunk(done, total)`` is called after each chunk.
    """
    images = as_images(images)
    n, channels, height, width = images.shape
    if n == 0:
        raise ValueError("fourier_heatmap needs at least one image")
    labels = as_labels(labels, n)
    eps = float(default_eps(max(height, width)) if eps is None else eps)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_precision(precision)
    device = resolve_device(model, device)
    classifier = classifier_for(model, mean, std, channels, device, precision, channels_last)
    frequencies = heatmap_frequencies(height, width, max_frequency)
    params = _heatmap_params(model, images, labels, eps=eps, max_frequency=max_frequency, seed=seed,
                             precision=precision, mean=mean, std=std)
    resume_path = None if resume_path is None else Path(resume_path)
    counts, done, clean_errors = _start_progress(resume_path, params, (height, width // 2 + 1))
    images, labels = images.to(device), labels.to(device)
    image_batch = min(n, batch_size)
    per_pass = max(1, batch_size // image_batch)  # frequencies sharing one forward pass
    pending = [f for f in frequencies if not done[f]]
    from tqdm.auto import tqdm

    with eval_mode(classifier), torch.inference_mode():
        if clean_errors < 0:
            clean_errors = sum(int(_wrong(classifier, images[k:k + image_batch], labels[k:k + image_batch]).sum())
                               for k in range(0, n, image_batch))
        finished = len(frequencies) - len(pending)
        with tqdm(total=len(frequencies), initial=finished, disable=not progress, desc="Fourier heat map",
                  unit="freq", dynamic_ncols=True) as bar:
            for chunks, c0 in enumerate(range(0, len(pending), per_pass), start=1):
                chunk = pending[c0:c0 + per_pass]
                errors = _chunk_errors(classifier, images, labels, chunk, eps, seed, image_batch)
                for (i, j), e in zip(chunk, errors):
                    counts[i, j], done[i, j] = int(e), True
                if resume_path is not None:
                    _save_progress(resume_path, counts, done, int(clean_errors), params)
                bar.update(len(chunk))
                finished += len(chunk)
                if on_chunk is not None:
                    on_chunk(finished, len(frequencies))
                if max_chunks is not None and chunks >= max_chunks:
                    break
    half = _half_map(counts, done, n, width)
    return HeatmapResult(half_errors=half, done=np.isfinite(half), eps=eps, max_frequency=max_frequency,
                         image_size=(height, width), num_images=n, clean_error=int(clean_errors) / n, params=params)


def _heatmap_params(model, images, labels, *, eps, max_frequency, seed, precision, mean, std) -> dict:
    """Everything a saved partial map depends on: a resume with other values must start over."""
    n, channels, height, width = images.shape
    return {
        "eps": eps, "max_frequency": max_frequency, "image_shape": [n, channels, height, width],
        "seed": int(seed), "precision": precision,
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "images": _fingerprint_images(images), "labels": _fingerprint_images(labels),
        "model": _fingerprint_model(model),
    }


def _start_progress(resume_path: Path | None, params: dict, half_shape: tuple[int, int]):
    """(counts, done, clean_errors) from the progress file, or a fresh start (clean_errors -1: not yet)."""
    if resume_path is not None and resume_path.exists():
        return _load_progress(resume_path, params, half_shape)
    return np.zeros(half_shape, dtype=np.int64), np.zeros(half_shape, dtype=bool), -1


def _wrong(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boolean per image: the classifier's top-1 class is not the label."""
    return classifier(images).argmax(-1) != labels


def _chunk_errors(classifier, images, labels, chunk, eps: float, seed: int, image_batch: int) -> np.ndarray:
    """Error counts for the frequencies of ``chunk``: all of them perturb each image batch in one pass."""
    n, channels, height, width = images.shape
    device, dtype, k = images.device, images.dtype, len(chunk)
    basis = fourier_basis_batch(height, width, torch.tensor(chunk), device=device, dtype=dtype)
    signs = torch.from_numpy(np.stack([perturbation_signs(seed, i, j, n, channels) for i, j in chunk]))
    signs = signs.to(device=device, dtype=dtype)  # k x N x C
    errors = torch.zeros(k, dtype=torch.long, device=device)
    for start in range(0, n, image_batch):
        x = images[start:start + image_batch]
        b = x.shape[0]
        noise = (eps * signs[:, start:start + b, :, None, None]) * basis[:, None, None]
        perturbed = (x[None] + noise).clamp_(0.0, 1.0).reshape(k * b, channels, height, width)
        errors += _wrong(classifier, perturbed, labels[start:start + b].repeat(k)).view(k, b).sum(dim=1)
    return errors.cpu().numpy()


def _half_map(counts: np.ndarray, done: np.ndarray, n: int, width: int) -> np.ndarray:
    """Error rates (NaN where not done), with the self-mirrored columns' duplicates copied in
    (see heatmap_frequencies)."""
    height = counts.shape[0]
    half = np.full(counts.shape, np.nan)
    half[done] = counts[done] / n
    for j in range(width // 2 + 1):
        if _self_mirrored_column(j, width):
            for i in range(height // 2 + 1, height):
                half[i, j] = half[height - i, j]
    return half


def _fingerprint_images(tensor: torch.Tensor) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(str(tuple(tensor.shape)).encode())
    _fingerprint_tensor(hasher, tensor)
    return hasher.hexdigest()


