"""apr: Amplitude-Phase Recombination training and robustness evaluation (corruptions, OOD, adversarial).

The public API, imported lazily so that ``import apr`` stays cheap (no DALI, no timm):

- ``apr.recombine``: amplitude of one image, phase of another (``apr.fourier``)
- ``apr.apr_p``, ``apr.apr_s``, ``apr.apr_sp``, ``apr.APRPolicy``: the augmentations (``apr.augment``)
- ``apr.metrics``: CE, mCE, relative mCE, ECE / RMS calibration, OOD metrics (pure functions of numbers)
- ``apr.inference``: the one inference path (``ImageClassifier``, ``predict_batches``)
- ``apr.ood``, ``apr.adversarial``: OOD detection and adversarial attacks / training hook
- ``apr.load_config``: typed run configuration (``apr.config``)
- ``apr.fourier_heatmap``, ``apr.amplitude_follow_fraction``: frequency analysis (``apr.analysis``)
- ``apr.make_corrupted_tree``: ImageNet-C-style corruptions of any ImageFolder (``apr.corrupt``)
- ``apr.evaluate``: evaluate an ``nn.Module`` or a checkpoint as ``apr-eval`` does, numbers as its JSON
  (``apr.evaluation``)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "recombine": "apr.fourier",
    "amplitude_phase": "apr.fourier",
    "fourier_basis": "apr.fourier",
    "apr_p": "apr.augment",
    "apr_s": "apr.augment",
    "apr_sp": "apr.augment",
    "APRPolicy": "apr.augment",
    "load_config": "apr.config",
    "Config": "apr.config",
    "create_model": "apr.models",
    "fourier_heatmap": "apr.analysis",
    "amplitude_follow_fraction": "apr.analysis",
    "make_corrupted_tree": "apr.corrupt",
    "evaluate": "apr.evaluation",
}
_SUBMODULES = ("metrics", "report", "fourier", "augment", "config", "models", "checkpoint", "data",
               "train", "optim", "inference", "evaluation", "ood", "adversarial", "corrupt", "analysis", "demo",
               "results", "distributed")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"apr.{name}")
    raise AttributeError(f"module 'apr' has no attribute {name!r}")
