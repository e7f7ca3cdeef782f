"""Figures: heat maps (one, or several side by side on one colour scale) and the swap grid.

Object-oriented matplotlib (no pyplot state): works headless and in notebooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .heatmap import HeatmapResult
from .swap import SWAP_COLUMNS, swap_predictions

__all__ = ["plot_heatmap", "plot_heatmaps_side_by_side", "swap_figure"]


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


def _percent_colorbar(fig, image, ax):
    """The colour bar in percent, as every other error of the report (the map itself holds fractions)."""
    from matplotlib.ticker import FuncFormatter

    return fig.colorbar(image, ax=ax, label="top-1 error (%)", format=FuncFormatter(lambda v, _: f"{100 * v:g}"))


def plot_heatmap(result, path: str | Path | None = None, *, title: str | None = None, cmap: str = "viridis",
                 vmin: float = 0.0, vmax: float = 1.0):
    """One heat map with a colour bar on a fixed error scale (``vmin``/``vmax`` as fractions, shown in percent); saved as PNG when ``path`` is given.

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
    _percent_colorbar(fig, image, ax)
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
    _percent_colorbar(fig, image, list(axes))
    if path is not None:
        fig.savefig(path)
    return fig


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
