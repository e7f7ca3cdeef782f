"""Frequency analysis of trained models: Fourier heat maps and amplitude/phase swaps.

Two questions from the APR paper, answered for any checkpoint:

* **Fourier heat map** (:mod:`.heatmap`): how sensitive is the model to a perturbation along each
  single Fourier basis direction? Plain training is hurt far from the centre (high frequencies);
  APR pushes the error towards the low frequencies.
* **Amplitude/phase swap** (:mod:`.swap`): give image A the amplitude spectrum of image B; does the
  model follow the amplitude (predicts B) or the phase (predicts A)? Humans follow the phase.

Figures are in :mod:`.plots`, the command line in :mod:`.cli`; every model runs through
:class:`apr.inference.ImageClassifier` (one normalisation/precision path, ``bf16 | fp32``).

Library use (e.g. from a notebook)::

    result = fourier_heatmap(model, images, labels, mean=cfg.data.mean, std=cfg.data.std)
    plot_heatmap(result, "heatmap.png")

Command line: ``python -m apr.analysis heatmap ...`` and ``python -m apr.analysis swap ...``
(``--help`` on each).
"""

from .cli import _stratified_subset, build_parser, main  # noqa: F401  (_stratified_subset: tested directly)
from .heatmap import (HEATMAP_SCHEMA, HeatmapResult, default_eps, fourier_heatmap, heatmap_frequencies,
                      perturbation_signs)
from .plots import plot_heatmap, plot_heatmaps_side_by_side, swap_figure
from .swap import SWAP_COLUMNS, amplitude_follow_fraction, class_derangement, swap_predictions

__all__ = [
    "HEATMAP_SCHEMA",
    "HeatmapResult",
    "default_eps",
    "heatmap_frequencies",
    "perturbation_signs",
    "fourier_heatmap",
    "plot_heatmap",
    "plot_heatmaps_side_by_side",
    "SWAP_COLUMNS",
    "swap_predictions",
    "swap_figure",
    "class_derangement",
    "amplitude_follow_fraction",
    "build_parser",
    "main",
]
