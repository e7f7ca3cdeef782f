"""Frequency analysis of trained models: Fourier heat maps and amplitude/phase swaps.

Two questions from the APR paper, answered for any checkpoint:

* **Fourier heat map** (Yin et al. 2019; gatheluck/FourierHeatmap): how sensitive is the
  model to a perturbation along each single Fourier basis direction ``U_{i,j}``? The value
  at ``(i, j)`` is the top-1 error on ``clamp(x + eps * r * U_{i,j}, 0, 1)`` with a random
  sign ``r`` per image and channel, added *before* mean/std normalisation. A model that
  relies on high frequencies (as plain training does) shows high error far from the
  centre; APR pushes the error towards the low frequencies.
* **Amplitude/phase swap**: give image A the amplitude spectrum of image B. Does the model
  follow the amplitude (predicts B) or the phase (predicts A)? Humans follow the phase.

Heat maps are expensive (one pass over the images per frequency), so the work is batched
(many frequencies x many images per forward pass), can run in bf16, and is resumable:
after each chunk of frequencies the partial error counts are saved atomically and a rerun
with the same parameters continues where the last one stopped.

Library use (e.g. from a notebook)::

    result = fourier_heatmap(model, images, labels, mean=cfg.data.mean, std=cfg.data.std)
    plot_heatmap(result, "heatmap.png")

Command line: ``python -m apr.analysis heatmap ...`` and ``python -m apr.analysis swap ...``
(``--help`` on each).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from apr.io import atomic_open, atomic_write_text
from apr.fourier import fourier_basis_batch, mirror_half_spectrum_map, recombine

__all__ = [
    "HeatmapResult",
    "default_eps",
    "heatmap_frequencies",
    "perturbation_signs",
    "fourier_heatmap",
    "plot_heatmap",
    "plot_heatmaps_side_by_side",
    "swap_predictions",
    "swap_figure",
    "class_derangement",
    "amplitude_follow_fraction",
    "main",
]

HEATMAP_SCHEMA = "apr.heatmap/1"
PRECISIONS = ("fp32", "no", "bf16", "fp16")  # "no" = fp32, accelerate's spelling


# ---------------------------------------------------------------------------------------
# small shared helpers


def default_eps(image_size: int) -> float:
    """The perturbation norms of FourierHeatmap: 4.0 for CIFAR-sized, 15.7 for ImageNet-sized inputs."""
    return 4.0 if image_size <= 64 else 15.7


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _autocast(device: torch.device, precision: str):
    """Mixed precision for inference; 'no'/'fp32' means plain float32 (or the model's dtype)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision in ("no", "fp32"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Normalise:
    """(x - mean) / std per channel, on the device; identity when mean and std are None."""

    def __init__(self, mean, std, channels: int, device: torch.device, dtype: torch.dtype):
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (for a model that takes [0, 1] images)")
        self.identity = mean is None
        if self.identity:
            return
        mean_t = torch.as_tensor(list(mean), dtype=dtype, device=device).reshape(-1)
        std_t = torch.as_tensor(list(std), dtype=dtype, device=device).reshape(-1)
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got "
                             f"{mean_t.numel()} and {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = mean_t.view(1, -1, 1, 1)
        self.std = std_t.view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else (x - self.mean) / self.std


def _as_images(images, name: str = "images") -> torch.Tensor:
    """N x C x H x W floats in [0, 1]; uint8 images are scaled by 1/255."""
    images = torch.as_tensor(images)
    if images.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor N x C x H x W, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1] or uint8, got dtype {images.dtype}")
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    return images


def _as_labels(labels, n: int) -> torch.Tensor:
    # on the CPU whatever the caller's device: counts and pairings are tallied there
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.numel() != n:
        raise ValueError(f"got {n} images but {labels.numel()} labels")
    return labels


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _predict(model, x, normalise, device, precision, channels_last=False) -> torch.Tensor:
    """Softmax probabilities of ``model`` on [0, 1] images ``x`` (already on ``device``)."""
    x = normalise(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        logits = model(x)
    return logits.float().softmax(dim=-1)


# ---------------------------------------------------------------------------------------
# Fourier heat map


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
    share one pass. ``precision``: "fp32" | "bf16" | "fp16" (autocast).
    ``resume_path``: an .npz file updated after every chunk; rerunning with the same
    parameters (model weights, images, eps, ...) continues from it.
    ``max_chunks``: stop after this many chunks in this call (the result is then partial:
    ``result.complete`` is False). ``on_chunk(done, total)`` is called after each chunk.
    """
    images = _as_images(images)
    n, channels, height, width = images.shape
    if n == 0:
        raise ValueError("fourier_heatmap needs at least one image")
    labels = _as_labels(labels, n)
    if eps is None:
        eps = default_eps(max(height, width))
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    device = _resolve_device(model, device)
    model.to(device)
    frequencies = heatmap_frequencies(height, width, max_frequency)
    half_shape = (height, width // 2 + 1)

    params = {
        "eps": eps, "max_frequency": max_frequency, "image_shape": [n, channels, height, width],
        "seed": int(seed), "precision": "fp32" if precision == "no" else precision,
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "images": _fingerprint_images(images), "labels": _fingerprint_images(labels),
        "model": _fingerprint_model(model),
    }
    counts = np.zeros(half_shape, dtype=np.int64)
    done = np.zeros(half_shape, dtype=bool)
    clean_errors = -1
    resume_path = None if resume_path is None else Path(resume_path)
    if resume_path is not None and resume_path.exists():
        counts, done, clean_errors = _load_progress(resume_path, params, half_shape)

    dtype = images.dtype
    images = images.to(device)
    labels = labels.to(device)
    normalise = _Normalise(mean, std, channels, device, dtype)
    image_batch = min(n, batch_size)
    per_pass = max(1, batch_size // image_batch)  # frequencies sharing one forward pass

    pending = [f for f in frequencies if not done[f]]
    from tqdm.auto import tqdm

    with _eval_mode(model), torch.inference_mode():
        if clean_errors < 0:
            clean_errors = 0
            for start in range(0, n, image_batch):
                probs = _predict(model, images[start:start + image_batch], normalise, device, precision, channels_last)
                clean_errors += int((probs.argmax(-1) != labels[start:start + image_batch]).sum())
        bar = tqdm(total=len(frequencies), initial=len(frequencies) - len(pending), disable=not progress,
                   desc="Fourier heat map", unit="freq", dynamic_ncols=True)
        chunks, finished = 0, len(frequencies) - len(pending)
        try:
            for c0 in range(0, len(pending), per_pass):
                chunk = pending[c0:c0 + per_pass]
                k = len(chunk)
                basis = fourier_basis_batch(height, width, torch.tensor(chunk), device=device, dtype=dtype)
                signs = torch.from_numpy(np.stack([perturbation_signs(seed, i, j, n, channels) for i, j in chunk]))
                signs = signs.to(device=device, dtype=dtype)  # k x N x C
                errors = torch.zeros(k, dtype=torch.long, device=device)
                for start in range(0, n, image_batch):
                    x = images[start:start + image_batch]
                    b = x.shape[0]
                    noise = (eps * signs[:, start:start + b, :, None, None]) * basis[:, None, None]
                    perturbed = (x[None] + noise).clamp_(0.0, 1.0).reshape(k * b, channels, height, width)
                    probs = _predict(model, perturbed, normalise, device, precision, channels_last)
                    wrong = probs.argmax(-1).view(k, b) != labels[None, start:start + b]
                    errors += wrong.sum(dim=1)
                errors = errors.cpu().numpy()
                for (i, j), e in zip(chunk, errors):
                    counts[i, j] = int(e)
                    done[i, j] = True
                if resume_path is not None:
                    _save_progress(resume_path, counts, done, clean_errors, params)
                bar.update(k)
                chunks += 1
                finished += k
                if on_chunk is not None:
                    on_chunk(finished, len(frequencies))
                if max_chunks is not None and chunks >= max_chunks:
                    break
        finally:
            bar.close()

    half = np.full(half_shape, np.nan)
    half[done] = counts[done] / n
    for j in range(width // 2 + 1):  # copy the self-mirrored columns' duplicates (see heatmap_frequencies)
        if _self_mirrored_column(j, width):
            for i in range(height // 2 + 1, height):
                half[i, j] = half[height - i, j]
    return HeatmapResult(half_errors=half, done=np.isfinite(half), eps=eps, max_frequency=max_frequency,
                         image_size=(height, width), num_images=n, clean_error=clean_errors / n, params=params)


def _fingerprint_images(tensor: torch.Tensor) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(str(tuple(tensor.shape)).encode())
    _fingerprint_tensor(hasher, tensor)
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------
# plots (object-oriented matplotlib: no pyplot state, works headless and in notebooks)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _heatmap_image(ax, result, cmap: str, vmin: float, vmax: float):
    import matplotlib

    if isinstance(result, HeatmapResult):
        data = result.display_map()
        a, b = result.display_extent()
    else:  # a centred map given directly: shown whole
        data = np.asarray(result, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(f"a heat map must be 2-D, got shape {data.shape}")
        a, b = data.shape[0] // 2, data.shape[1] // 2
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="0.8")  # grey: frequencies not evaluated
    top, left = -a, -b
    extent = (left - 0.5, left + data.shape[1] - 0.5, top + data.shape[0] - 0.5, top - 0.5)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=colormap, vmin=vmin, vmax=vmax, extent=extent,
                      interpolation="nearest")
    ax.set_xlabel("horizontal frequency")
    ax.set_ylabel("vertical frequency")
    return image


def plot_heatmap(result, path: str | Path | None = None, *, title: str | None = None, cmap: str = "viridis",
                 vmin: float = 0.0, vmax: float = 1.0):
    """One heat map with a colour bar on a fixed 0..1 error scale; saved as PNG when ``path`` is given.

    ``result``: a :class:`HeatmapResult` (its symmetric display region is shown) or a centred
    2-D array. Returns the matplotlib Figure.
    """
    fig = _new_figure(5.2, 4.4)
    ax = fig.add_subplot()
    image = _heatmap_image(ax, result, cmap, vmin, vmax)
    if title is None and isinstance(result, HeatmapResult):
        title = f"Fourier heat map (eps={result.eps:g}, {result.num_images} images)"
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="top-1 error")
    if path is not None:
        fig.savefig(path)
    return fig


def plot_heatmaps_side_by_side(results: Sequence, path: str | Path | None = None, *,
                               titles: Sequence[str] | None = None, cmap: str = "viridis",
                               vmin: float = 0.0, vmax: float = 1.0):
    """Several heat maps (e.g. baseline vs APR-SP) in one row with one shared colour scale."""
    results = list(results)
    if not results:
        raise ValueError("plot_heatmaps_side_by_side needs at least one heat map")
    if titles is not None and len(titles) != len(results):
        raise ValueError(f"got {len(results)} heat maps but {len(titles)} titles")
    fig = _new_figure(4.2 * len(results) + 1.2, 4.2)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    image = None
    for k, (ax, result) in enumerate(zip(axes, results)):
        image = _heatmap_image(ax, result, cmap, vmin, vmax)
        if titles is not None:
            ax.set_title(titles[k])
        if k:
            ax.set_ylabel("")
    fig.colorbar(image, ax=list(axes), label="top-1 error")
    if path is not None:
        fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------------------
# amplitude / phase swap


def _per_model(value, names: Sequence[str], what: str) -> dict:
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{what} has no entry for model(s) {', '.join(missing)}")
        return {n: value[n] for n in names}
    return {n: value for n in names}


SWAP_COLUMNS = ("A", "B", "amplitude B + phase A", "amplitude A + phase B")


def swap_predictions(models: Mapping[str, nn.Module], images_a, images_b, *, mean=None, std=None, device=None,
                     precision: str = "fp32", dim: Sequence[int] = (-3, -2, -1)) -> dict:
    """Predictions of each model on A, B and both recombinations, for pairs of images.

    Returns ``{"images": 4 x P x C x H x W tensor (columns as SWAP_COLUMNS),
    "predictions": {name: (4 x P) class indices}, "confidences": {name: (4 x P)}}``.
    ``mean``/``std``: one value for all models or a mapping name -> value.
    """
    a = _as_images(images_a, "images_a")
    b = _as_images(images_b, "images_b")
    if a.shape != b.shape:
        raise ValueError(f"images_a and images_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not models:
        raise ValueError("swap_predictions needs at least one model")
    names = list(models)
    means, stds = _per_model(mean, names, "mean"), _per_model(std, names, "std")
    grid = torch.stack([a, b, recombine(b, a, dim=dim), recombine(a, b, dim=dim)])
    predictions, confidences = {}, {}
    for name in names:
        model = models[name]
        dev = _resolve_device(model, device)
        model.to(dev)
        normalise = _Normalise(means[name], stds[name], a.shape[1], dev, grid.dtype)
        with _eval_mode(model), torch.inference_mode():
            probs = _predict(model, grid.flatten(0, 1).to(dev), normalise, dev, precision)
        conf, pred = probs.max(dim=-1)
        predictions[name] = pred.view(4, -1).cpu()
        confidences[name] = conf.view(4, -1).cpu()
    return {"images": grid, "predictions": predictions, "confidences": confidences}


def swap_figure(models: Mapping[str, nn.Module], images_a, images_b, path: str | Path | None = None, *,
                classes: Sequence[str] | None = None, labels_a=None, labels_b=None, mean=None, std=None,
                device=None, precision: str = "fp32", dim: Sequence[int] = (-3, -2, -1)):
    """Grid of pairs: A, B, amplitude(B)+phase(A), amplitude(A)+phase(B), each with every model's top
    prediction and confidence underneath. Saved as PNG when ``path`` is given; returns the Figure."""
    out = swap_predictions(models, images_a, images_b, mean=mean, std=std, device=device, precision=precision,
                           dim=dim)
    grid = out["images"]
    pairs = grid.shape[1]
    names = list(models)

    def label_name(k: int) -> str:
        return classes[k] if classes is not None and 0 <= k < len(classes) else str(k)

    truth = {0: labels_a, 1: labels_b}
    fig = _new_figure(3.0 * 4, (2.6 + 0.22 * len(names)) * pairs)
    axes = fig.subplots(pairs, 4, squeeze=False)
    for p in range(pairs):
        for c in range(4):
            ax = axes[p, c]
            image = grid[c, p].float().clamp(0, 1).permute(1, 2, 0).numpy()
            grey = image.shape[-1] == 1
            ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            title = SWAP_COLUMNS[c]
            if c in truth and truth[c] is not None:
                title += f" (true: {label_name(int(torch.as_tensor(truth[c]).reshape(-1)[p]))})"
            ax.set_title(title, fontsize=9)
            lines = [f"{name}: {label_name(int(out['predictions'][name][c, p]))} "
                     f"({100 * float(out['confidences'][name][c, p]):.0f}%)" for name in names]
            ax.set_xlabel("\n".join(lines), fontsize=8)
    if path is not None:
        fig.savefig(path)
    return fig


def class_derangement(labels, seed: int = 0) -> np.ndarray:
    """A random permutation ``perm`` with ``labels[perm[i]] != labels[i]`` for every i.

    Each image is used once as a partner. Impossible when one class holds more than half of
    the images (pigeonhole), which is reported as an error.
    """
    labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    n = labels.size
    _, counts = np.unique(labels, return_counts=True)
    if n < 2 or counts.max() * 2 > n:
        raise ValueError(
            f"cannot pair every image with one of another class: the largest class has {counts.max()} of "
            f"{n} images (needs at most half)"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    for _ in range(1000):
        bad = np.flatnonzero(labels[perm] == labels)
        if bad.size == 0:
            return perm
        for i in bad:
            if labels[perm[i]] != labels[i]:
                continue  # fixed by an earlier swap
            # swap partners with a random position j when both end up valid
            for j in rng.permutation(n):
                if labels[perm[j]] != labels[i] and labels[perm[i]] != labels[j]:
                    perm[i], perm[j] = perm[j], perm[i]
                    break
    raise RuntimeError("class_derangement did not converge")  # not reached for valid input


def amplitude_follow_fraction(model: nn.Module, images, labels, *, mean=None, std=None, batch_size: int = 256,
                              device=None, precision: str = "fp32", seed: int = 0,
                              dim: Sequence[int] = (-3, -2, -1), progress: bool = False) -> dict:
    """How often the model follows the amplitude rather than the phase of an image.

    Each image A is paired with an image B of another class (:func:`class_derangement`); the
    model sees recombine(amplitude=B, phase=A). Counts predictions equal to B's label
    ("amplitude"), to A's label ("phase") or neither, over all pairs and over the pairs whose
    two originals the model classifies correctly ("both_correct").
    """
    images = _as_images(images)
    labels = _as_labels(labels, images.shape[0])
    perm = torch.from_numpy(class_derangement(labels, seed))
    dev = _resolve_device(model, device)
    model.to(dev)
    normalise = _Normalise(mean, std, images.shape[1], dev, images.dtype)
    tallies = {key: np.zeros(3, dtype=np.int64) for key in ("all", "both_correct")}
    from tqdm.auto import tqdm

    with _eval_mode(model), torch.inference_mode():
        clean = torch.empty(images.shape[0], dtype=torch.long)
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(dev)
            clean[start:start + batch_size] = _predict(model, x, normalise, dev, precision).argmax(-1).cpu()
        correct = clean == labels
        for start in tqdm(range(0, images.shape[0], batch_size), disable=not progress, desc="amplitude swap"):
            idx = torch.arange(start, min(start + batch_size, images.shape[0]))
            a, b = images[idx].to(dev), images[perm[idx]].to(dev)
            pred = _predict(model, recombine(b, a, dim=dim), normalise, dev, precision).argmax(-1).cpu()
            la, lb = labels[idx], labels[perm[idx]]
            kinds = torch.where(pred == lb, 0, torch.where(pred == la, 1, 2))
            both = correct[idx] & correct[perm[idx]]
            tallies["all"] += np.bincount(kinds.numpy(), minlength=3)
            tallies["both_correct"] += np.bincount(kinds[both].numpy(), minlength=3)

    def summary(t: np.ndarray) -> dict:
        total = int(t.sum())
        frac = (lambda v: float(v) / total if total else None)
        return {"pairs": total, "amplitude_count": int(t[0]), "phase_count": int(t[1]), "neither_count": int(t[2]),
                "amplitude_fraction": frac(t[0]), "phase_fraction": frac(t[1]), "neither_fraction": frac(t[2])}

    result = summary(tallies["all"])
    result["both_correct"] = summary(tallies["both_correct"])
    result["clean_accuracy"] = float(correct.float().mean())
    result["dim"] = list(dim)
    result["seed"] = seed
    return result


# ---------------------------------------------------------------------------------------
# command line: python -m apr.analysis {heatmap,swap}


def _stratified_subset(labels: Sequence[int], max_images: int | None, seed: int) -> np.ndarray:
    """Up to ``max_images`` indices spread evenly over the classes (random within each class).

    Folder order is class by class, so "the first N images" would be one or two classes only.
    """
    labels = np.asarray(labels).reshape(-1)
    if max_images is None or max_images <= 0 or max_images >= labels.size:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[r] for r in range(max(len(p) for p in per_class)) for idx in per_class if r < len(idx)]
    return np.sort(np.asarray(order[:max_images], dtype=np.int64))


def _run_name(path: Path, cfg, used: set[str]) -> str:
    name = cfg.train.run_name or (path.parent.name if path.stem.startswith("checkpoint") else path.stem)
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"
    base, k = name, 2
    while name in used:
        name, k = f"{base}-{k}", k + 1
    used.add(name)
    return name


def _load_models(paths: Sequence[str], device: torch.device):
    from apr.checkpoint import load_model_for_eval

    used: set[str] = set()
    out = []
    for text in paths:
        path = Path(text)
        model, cfg, classes, info = load_model_for_eval(path, map_location="cpu")
        out.append({"path": path, "name": _run_name(path, cfg, used), "model": model.to(device), "cfg": cfg,
                    "classes": classes, "info": info})
    return out


def _load_eval_images(args, cfg, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to --max-images test images (class-balanced) as N x 3 x H x W floats in [0, 1] on the CPU."""
    if args.cifar:
        from apr.data import load_cifar

        name = cfg.data.dataset if cfg.data.dataset.startswith("cifar") else (
            "cifar100" if len(classes) == 100 else "cifar10")
        images, labels, _ = load_cifar(args.cifar, name, train=False)
        keep = _stratified_subset(labels, args.max_images, args.seed)
        x = torch.from_numpy(np.ascontiguousarray(images[keep])).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.as_tensor(np.asarray(labels)[keep], dtype=torch.long)

    from apr.data import build_image_loader, scan_image_folder

    index = scan_image_folder(args.data, classes=classes, verify=True, allow_missing_classes=True, allow_empty=True,
                              warn=False)
    if not index.files:
        raise ValueError(f"no readable images under {args.data}")
    keep = _stratified_subset(index.labels, args.max_images, args.seed)
    # the project's own eval loader (same resize + centre crop as validation) over the chosen files
    resize = args.resize if args.resize is not None else cfg.data.val_resize
    loader = build_image_loader([index.files[k] for k in keep], [index.labels[k] for k in keep], classes,
                                backend=args.backend, batch_size=min(256, len(keep)), train=False,
                                image_size=cfg.data.image_size, resize=resize, num_workers=args.workers,
                                device=torch.device("cpu"), roots=[str(args.data)])
    xs, ys = [], []
    for images, labels in loader:
        xs.append(images.cpu())
        ys.append(labels.cpu())
    return torch.cat(xs), torch.cat(ys)


def _images_for(args, entry, cache: dict):
    cfg = entry["cfg"]
    key = (cfg.data.image_size, cfg.data.val_resize, tuple(entry["classes"]), cfg.data.dataset)
    if key not in cache:
        cache[key] = _load_eval_images(args, cfg, entry["classes"])
    return cache[key]


def _cmd_heatmap(args) -> int:
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = _load_models(args.checkpoint, device)
    cache: dict = {}
    results, titles, summary = [], [], []
    for entry in entries:
        cfg = entry["cfg"]
        images, labels = _images_for(args, entry, cache)
        size = max(images.shape[-2:])
        max_frequency = args.max_frequency
        if max_frequency is None and size > 64:
            max_frequency = 31  # FourierHeatmap's central 63 x 63 region for ImageNet-sized inputs
        model_dir = out_dir / entry["name"]
        print(f"[heatmap] {entry['name']}: {entry['path']} on {images.shape[0]} images "
              f"({images.shape[-2]}x{images.shape[-1]}), max_frequency={max_frequency}", file=sys.stderr)
        result = fourier_heatmap(
            entry["model"], images, labels, mean=cfg.data.mean, std=cfg.data.std, eps=args.eps,
            max_frequency=max_frequency, batch_size=args.batch_size, device=device, precision=precision,
            channels_last=cfg.model.channels_last and device.type == "cuda", seed=args.seed,
            progress=args.progress, resume_path=model_dir / "progress.npz")
        title = f"{entry['name']} ({cfg.aug.name})"
        result.params.update({"checkpoint": str(entry["path"]), "run_name": entry["name"], "aug": cfg.aug.name,
                              "model_name": entry["info"].get("model_name")})
        paths = result.save(model_dir, "heatmap")
        plot_heatmap(result, model_dir / "heatmap.png", title=title)
        results.append(result)
        titles.append(title)
        summary.append({"name": entry["name"], "checkpoint": str(entry["path"]), "aug": cfg.aug.name,
                        "json": str(paths["json"]), "png": str(model_dir / "heatmap.png"),
                        "clean_error": result.clean_error, "mean_error": result.to_dict()["mean_error"],
                        "eps": result.eps, "max_frequency": result.max_frequency,
                        "num_images": result.num_images})
        print(f"[heatmap] {entry['name']}: clean error {result.clean_error:.3f}, mean heat-map error "
              f"{summary[-1]['mean_error']:.3f} -> {model_dir}", file=sys.stderr)
    if len(results) > 1:
        plot_heatmaps_side_by_side(results, out_dir / "heatmaps_side_by_side.png", titles=titles)
    atomic_write_text(out_dir / "heatmaps.json", json.dumps({"schema": "apr.heatmaps/1", "models": summary},
                                                             indent=1))
    print(f"[heatmap] wrote {out_dir / 'heatmaps.json'}", file=sys.stderr)
    return 0


def _cmd_swap(args) -> int:
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = _load_models(args.checkpoint, device)
    classes = entries[0]["classes"]
    for entry in entries[1:]:
        if entry["classes"] != classes:
            raise SystemExit(f"error: {entry['path']} has other classes than {entries[0]['path']}; "
                             "a swap figure compares models on the same classes")
    images, labels = _images_for(args, entries[0], {})
    if args.pairs < 1:
        raise SystemExit("error: --pairs must be >= 1")
    perm = class_derangement(labels, args.seed)
    order = _stratified_subset(labels, args.pairs, args.seed)  # pairs from different classes
    a, b = order, perm[order]
    models = {e["name"]: e["model"] for e in entries}
    means = {e["name"]: e["cfg"].data.mean for e in entries}
    stds = {e["name"]: e["cfg"].data.std for e in entries}
    swap_figure(models, images[a], images[b], out_dir / "swap.png", classes=classes, labels_a=labels[a],
                labels_b=labels[b], mean=means, std=stds, device=device, precision=precision)
    follow = {}
    if args.follow:
        for e in entries:
            follow[e["name"]] = amplitude_follow_fraction(
                e["model"], images, labels, mean=means[e["name"]], std=stds[e["name"]], batch_size=args.batch_size,
                device=device, precision=precision, seed=args.seed, progress=args.progress)
            print(f"[swap] {e['name']}: follows amplitude {follow[e['name']]['amplitude_fraction']:.3f}, "
                  f"phase {follow[e['name']]['phase_fraction']:.3f} over {follow[e['name']]['pairs']} pairs",
                  file=sys.stderr)
    atomic_write_text(out_dir / "swap.json", json.dumps({
        "schema": "apr.swap/1", "figure": str(out_dir / "swap.png"),
        "checkpoints": {e["name"]: str(e["path"]) for e in entries},
        "pairs": [[int(i), int(j)] for i, j in zip(a, b)], "num_images": int(images.shape[0]),
        "amplitude_follow": follow}, indent=1))
    print(f"[swap] wrote {out_dir / 'swap.png'} and {out_dir / 'swap.json'}", file=sys.stderr)
    return 0


def _add_common(p: argparse.ArgumentParser, max_images: int) -> None:
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="one or more checkpoints written by training (several: compared side by side)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="test images in ImageNet layout DIR/<class>/<image>, e.g. ROOT/val")
    src.add_argument("--cifar", metavar="ROOT", help="CIFAR-10/100 python folder; the test split is used "
                     "(which one follows the checkpoint's config)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--max-images", type=int, default=max_images, metavar="N",
                   help=f"use at most N test images, spread evenly over the classes (default {max_images}; 0: all)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast or full float32 (default: bf16 on a GPU, float32 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for image choice, random signs and pairing")
    p.add_argument("--backend", choices=("torchvision", "dali"), default="torchvision",
                   help="image decoding for --data (default torchvision; DALI needs its package)")
    p.add_argument("--workers", type=int, default=4, help="decoding workers for --data (default 4)")
    p.add_argument("--resize", type=int, default=None,
                   help="resize the shorter side to this before the centre crop (default: the checkpoint's "
                        "data.val_resize)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (default on)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apr.analysis",
        description="Frequency analysis of trained checkpoints: Fourier heat maps and amplitude/phase swaps.")
    sub = parser.add_subparsers(dest="command", required=True)
    hm = sub.add_parser(
        "heatmap", help="Fourier heat map: error under a perturbation along each Fourier basis image",
        description="For each frequency (i, j), add eps * (random sign per channel) * U_ij to every test image "
                    "(before normalisation), clamp to [0, 1] and measure the top-1 error. Writes per checkpoint "
                    "OUT/<name>/heatmap.png, heatmap.json, heatmap_half.npy, heatmap_map.npy and progress.npz "
                    "(rerun the same command to resume), plus OUT/heatmaps_side_by_side.png for several "
                    "checkpoints and OUT/heatmaps.json.")
    _add_common(hm, 1000)
    hm.add_argument("--eps", type=float, default=None,
                    help="L2 norm of the perturbation (default 4.0 for images up to 64 px, 15.7 above)")
    hm.add_argument("--max-frequency", type=int, default=None, metavar="M",
                    help="evaluate only frequencies with |i|, |j| <= M; cost grows as M^2 (default: all for "
                         "images up to 64 px, 31 -- the central 63x63 region -- above)")
    hm.set_defaults(func=_cmd_heatmap)
    sw = sub.add_parser(
        "swap", help="amplitude/phase swap figure and the fraction of predictions that follow the amplitude",
        description="Writes OUT/swap.png: pairs of test images A, B (different classes) and their recombinations "
                    "amplitude(B)+phase(A), amplitude(A)+phase(B) with every model's top prediction; and "
                    "OUT/swap.json with how often each model follows the amplitude vs the phase over the images.")
    _add_common(sw, 500)
    sw.add_argument("--pairs", type=int, default=4, help="image pairs shown in the figure (default 4)")
    sw.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the amplitude-follow fraction over all --max-images images (default on)")
    sw.set_defaults(func=_cmd_swap)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_images < 0:
        parser.error("--max-images must be >= 0")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    from apr.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
