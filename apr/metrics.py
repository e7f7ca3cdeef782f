"""Robustness and calibration metrics: pure functions of error rates and confidences.

Everything here works on plain numbers (floats, dicts, NumPy arrays), so a report can be
rebuilt from saved results JSON without a model, a GPU or torch.

Conventions (shared with ``apr.evaluation`` and ``apr.report``):

- error rates given to these functions are fractions in [0, 1];
- CE, mCE, relative mCE and the unnormalised mean corruption error come back in percent;
- ECE comes back as a fraction (like an error rate);
- severities may be int (``1``) or JSON string (``"1"``) keys;
- a cell is either a bare error or a results-JSON cell ``{"error": ..., "count": ..., "ece": ...}``.

Formulas (Hendrycks & Dietterich, ICLR 2019):
``CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}``, ``mCE = mean_c CE_c`` over the 15 corruptions;
``RelCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)``. The published
AlexNet numbers are means over severities, so ``sum_s E^AlexNet_{s,c} = n_s * mean``.
"""

from __future__ import annotations

from apr.errors import UserError
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "CORRUPTION_FAMILIES",
    "SEVERITIES",
    "ALEXNET_ERRORS",
    "ALEXNET_CLEAN_ERROR",
    "MetricsError",
    "normalize_errors",
    "missing_cells",
    "corruption_error",
    "relative_corruption_error",
    "mce",
    "relative_mce",
    "mean_corruption_error",
    "expected_calibration_error",
    "rms_calibration_error",
    "CalibrationBins",
    "compute_metrics",
]

#: The 15 ImageNet-C corruptions that enter mCE, in the benchmark's order.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The 4 held-out ("validation") corruptions: reported separately, never part of mCE.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
CORRUPTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

#: AlexNet top-1 error on ImageNet-C, mean over the 5 severities (the mCE normaliser).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
#: AlexNet top-1 error on clean ImageNet val (the relative-mCE normaliser). Source: hendrycks/robustness
#: (ImageNet-C relative mCE, AlexNet clean error 43.45 %), the constant the published relative mCEs use.
#: torchvision's AlexNet weights score 56.522 % top-1 accuracy, i.e. 0.43478: not the one used here.
ALEXNET_CLEAN_ERROR: float = 0.4345
ALEXNET_CLEAN_ERROR_SOURCE = "AlexNet clean error 43.45 % (hendrycks/robustness; torchvision's AlexNet: 43.478 %)"


class MetricsError(UserError, ValueError):
    """Results that cannot give the requested metric (missing cells, impossible values)."""


# --------------------------------------------------------------------------- cell handling

def _error_value(value: Any, where: str) -> float:
    """A cell is a bare error or a results-JSON cell dict; return its error as a checked float."""
    if isinstance(value, Mapping):
        if "error" not in value:
            raise MetricsError(f"{where}: cell has no 'error' field (keys: {sorted(value)})")
        value = value["error"]
    if value is None:
        raise MetricsError(f"{where}: error is null")
    try:
        err = float(value)
    except (TypeError, ValueError):
        raise MetricsError(f"{where}: error must be a number, got {value!r}") from None
    if not math.isfinite(err) or not 0.0 <= err <= 1.0:
        raise MetricsError(f"{where}: error must be a fraction in [0, 1], got {err!r}")
    return err


def _severity(key: Any, where: str) -> int:
    try:
        sev = int(key)
    except (TypeError, ValueError):
        raise MetricsError(f"{where}: severity key {key!r} is not an integer") from None
    if sev not in SEVERITIES or str(sev) != str(key).strip():
        raise MetricsError(f"{where}: severity must be one of 1..5, got {key!r}")
    return sev


def _per_severity(cells: Any, where: str) -> dict[int, float]:
    """{severity: cell} (int or str keys) or a sequence of 5 errors -> {int severity: error}."""
    if isinstance(cells, Mapping):
        out: dict[int, float] = {}
        for key, value in cells.items():
            sev = _severity(key, where)
            if sev in out:
                raise MetricsError(f"{where}: severity {sev} given twice (as int and str keys?)")
            out[sev] = _error_value(value, f"{where}/{sev}")
        return out
    if isinstance(cells, (str, bytes)) or not isinstance(cells, Iterable):
        raise MetricsError(f"{where}: expected {{severity: error}} or a list of 5 errors, got {cells!r}")
    values = list(cells)
    if len(values) != len(SEVERITIES):
        raise MetricsError(f"{where}: a list of errors must have one value per severity 1..5, got {len(values)}")
    return {s: _error_value(v, f"{where}/{s}") for s, v in zip(SEVERITIES, values)}


def normalize_errors(errors: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """``{corruption: {severity: error or cell}}`` with int/str keys -> ``{corruption: {int: float}}``.

    Accepts the ``"corruptions"`` block of a results JSON as it is. Corruptions with no
    severities at all are dropped (they count as missing).
    """
    if not isinstance(errors, Mapping):
        raise MetricsError(f"errors must be a mapping corruption -> {{severity: error}}, got {type(errors).__name__}")
    out = {}
    for name, cells in errors.items():
        per = _per_severity(cells, str(name))
        if per:
            out[str(name)] = per
    return out


def missing_cells(errors: Mapping[str, Any], corruptions: Iterable[str] = CORRUPTIONS,
                  severities: Iterable[int] = SEVERITIES) -> list[str]:
    """The ``"corruption/severity"`` cells among ``corruptions x severities`` that ``errors`` lacks."""
    have = normalize_errors(errors)
    return [f"{c}/{s}" for c in corruptions for s in severities if s not in have.get(c, {})]


def _check_complete(errors: dict[str, dict[int, float]], corruptions: Iterable[str], what: str) -> None:
    missing = [f"{c}/{s}" for c in corruptions for s in SEVERITIES if s not in errors.get(c, {})]
    if missing:
        raise MetricsError(
            f"{what}: {len(missing)} of {len(list(corruptions)) * len(SEVERITIES)} (corruption/severity) "
            f"cells missing: {', '.join(missing)}. Evaluate them, or pass allow_partial=True to compute "
            f"over the cells that are there (the result is then marked partial)."
        )


def _baseline_sum(baseline_c: Any, severities: Iterable[int], where: str) -> float:
    """Sum of baseline errors over ``severities``; a bare number is a mean over severities."""
    severities = list(severities)
    if isinstance(baseline_c, (int, float, np.floating, np.integer)) and not isinstance(baseline_c, bool):
        return len(severities) * _error_value(baseline_c, f"baseline {where}")
    per = _per_severity(baseline_c, f"baseline {where}")
    absent = [s for s in severities if s not in per]
    if absent:
        raise MetricsError(f"baseline {where}: no error for severities {absent}, so CE cannot be normalised")
    return float(sum(per[s] for s in severities))


# --------------------------------------------------------------------------- corruption errors

def corruption_error(errors_c: Any, baseline_c: Any) -> float:
    """CE of one corruption in percent: ``100 * sum_s E_s / sum_s E^base_s``.

    ``errors_c``: ``{severity: error}`` (or a list of 5 errors); only the severities present
    are summed. ``baseline_c``: a mean over severities (AlexNet style) or ``{severity: error}``
    of a baseline run, summed over the same severities.
    """
    per = _per_severity(errors_c, "errors")
    if not per:
        raise MetricsError("corruption_error: no severities given")
    denom = _baseline_sum(baseline_c, per, "")
    if denom <= 0.0:
        raise MetricsError("corruption_error: the baseline error is 0 on these severities; CE is undefined")
    return 100.0 * sum(per.values()) / denom


def relative_corruption_error(errors_c: Any, clean_error: float, baseline_c: Any, baseline_clean: float) -> float:
    """Relative CE of one corruption in percent: ``100 * sum_s (E_s - E_clean) / sum_s (B_s - B_clean)``."""
    per = _per_severity(errors_c, "errors")
    if not per:
        raise MetricsError("relative_corruption_error: no severities given")
    clean = _error_value(clean_error, "clean error")
    base_clean = _error_value(baseline_clean, "baseline clean error")
    denom = _baseline_sum(baseline_c, per, "") - len(per) * base_clean
    if denom <= 0.0:
        raise MetricsError(
            f"relative CE undefined: the baseline's corrupted error is not above its clean error "
            f"(sum over severities {sorted(per)} of (E_base - E_base_clean) = {denom:.6g})"
        )
    return 100.0 * (sum(per.values()) - len(per) * clean) / denom


def _select(errors: Mapping[str, Any], allow_partial: bool, what: str) -> dict[str, dict[int, float]]:
    norm = normalize_errors(errors)
    if not allow_partial:
        _check_complete(norm, CORRUPTIONS, what)
    return {c: norm[c] for c in CORRUPTIONS if c in norm}


def _baseline_for(baseline: Mapping[str, Any], corruption: str) -> Any:
    if corruption not in baseline:
        raise MetricsError(f"baseline has no errors for {corruption}; cannot normalise its CE")
    return baseline[corruption]


def mce(errors: Mapping[str, Any], baseline: Mapping[str, Any] = ALEXNET_ERRORS, *,
        allow_partial: bool = False) -> float:
    """Mean CE over the 15 ImageNet-C corruptions, in percent (AlexNet = 100).

    ``baseline`` maps corruption -> mean error (AlexNet style) or -> ``{severity: error}``.
    Missing cells raise ``MetricsError`` naming them unless ``allow_partial``; then the mean runs
    over the corruptions present (and each CE over the severities present).
    """
    selected = _select(errors, allow_partial, "mce")
    if not selected:
        raise MetricsError("mce: none of the 15 ImageNet-C corruptions has any result")
    ces = [corruption_error(cells, _baseline_for(baseline, c)) for c, cells in selected.items()]
    return float(np.mean(ces))


def relative_mce(errors: Mapping[str, Any], clean_error: float, baseline: Mapping[str, Any] = ALEXNET_ERRORS,
                 baseline_clean: float = ALEXNET_CLEAN_ERROR, *, allow_partial: bool = False) -> float:
    """Mean relative CE over the 15 corruptions, in percent: how much accuracy is *lost* under
    corruption compared with how much the baseline loses (AlexNet = 100)."""
    selected = _select(errors, allow_partial, "relative_mce")
    if not selected:
        raise MetricsError("relative_mce: none of the 15 ImageNet-C corruptions has any result")
    rel = [relative_corruption_error(cells, clean_error, _baseline_for(baseline, c), baseline_clean)
           for c, cells in selected.items()]
    return float(np.mean(rel))


def mean_corruption_error(errors: Mapping[str, Any], *, allow_partial: bool = False,
                          corruptions: Iterable[str] = CORRUPTIONS) -> float:
    """Unnormalised mean top-1 error over the corruptions (mean over severities, then over
    corruptions), in percent: the number APR's CIFAR-C evaluation reports."""
    corruptions = tuple(corruptions)
    norm = normalize_errors(errors)
    if not allow_partial:
        _check_complete(norm, corruptions, "mean_corruption_error")
    means = [float(np.mean(list(norm[c].values()))) for c in corruptions if c in norm]
    if not means:
        raise MetricsError(f"mean_corruption_error: no results for any of {', '.join(corruptions)}")
    return 100.0 * float(np.mean(means))


# --------------------------------------------------------------------------- calibration

def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on a GPU or in bf16/fp16 (NumPy has no bf16)
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


class CalibrationBins:
    """Equal-width confidence histogram for ECE, filled batch by batch.

    Per bin it keeps the count, the sum of confidences and the number correct, which is all
    ECE needs: ``ECE = sum_b |correct_b - conf_sum_b| / N``. Bin ``b`` holds confidences in
    ``(b/n, (b+1)/n]``; a confidence of exactly 0 goes into the first bin. The state is a
    plain dict (``to_dict``/``from_dict``), so a partial evaluation can be saved and resumed,
    and bins from several ranks or cells can be merged with ``merge``.
    """

    def __init__(self, n_bins: int = 15):
        if int(n_bins) != n_bins or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        self.n_bins = int(n_bins)
        self.edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        self.count = np.zeros(self.n_bins, dtype=np.int64)
        self.confidence_sum = np.zeros(self.n_bins, dtype=np.float64)
        self.correct_sum = np.zeros(self.n_bins, dtype=np.int64)

    def add(self, confidences: Any, correct: Any) -> "CalibrationBins":
        """Add a batch: ``confidences`` = max softmax probability per sample, ``correct`` = 0/1 or bool."""
        conf = _as_numpy(confidences).astype(np.float64)
        corr = _as_numpy(correct)
        if conf.shape != corr.shape:
            raise ValueError(f"confidences and correct must have the same length, got {conf.size} and {corr.size}")
        if conf.size == 0:
            return self
        if not np.all(np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
            raise ValueError("confidences must be probabilities in [0, 1] (softmax outputs), "
                             f"got values in [{np.nanmin(conf):.4g}, {np.nanmax(conf):.4g}]")
        if corr.dtype != np.bool_:
            if not np.all((corr == 0) | (corr == 1)):
                raise ValueError("correct must be booleans or 0/1 values")
        corr = corr.astype(np.int64)
        # searchsorted over the inner edges: index b such that edges[b] < conf <= edges[b+1]
        idx = np.searchsorted(self.edges[1:-1], conf, side="left")
        self.count += np.bincount(idx, minlength=self.n_bins)
        self.confidence_sum += np.bincount(idx, weights=conf, minlength=self.n_bins)
        self.correct_sum += np.bincount(idx, weights=corr, minlength=self.n_bins).round().astype(np.int64)
        return self

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def accuracy(self) -> float:
        return float(self.correct_sum.sum() / self.total) if self.total else float("nan")

    def ece(self) -> float:
        """Expected calibration error as a fraction: ``sum_b (n_b / N) |acc_b - conf_b|``."""
        if self.total == 0:
            raise ValueError("ECE of an empty set: add() some predictions first")
        return float(np.abs(self.correct_sum - self.confidence_sum).sum() / self.total)

    def rms_calibration_error(self) -> float:
        """RMS calibration error as a fraction: ``sqrt(sum_b (n_b / N) (acc_b - conf_b)^2)`` over these
        equal-width bins (AugMix's ``calib_err(p='2')`` uses adaptive bins of 100 sorted samples instead,
        which needs every confidence; the fixed bins need only this histogram, so they merge over ranks)."""
        if self.total == 0:
            raise ValueError("RMS calibration error of an empty set: add() some predictions first")
        filled = self.count > 0
        gap = (self.correct_sum[filled] - self.confidence_sum[filled]) / self.count[filled]
        return float(np.sqrt(np.sum(self.count[filled] / self.total * gap ** 2)))

    def reliability(self) -> dict[str, list]:
        """Per-bin accuracy and mean confidence (NaN for empty bins), for reliability diagrams."""
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(self.count > 0, self.correct_sum / np.maximum(self.count, 1), np.nan)
            conf = np.where(self.count > 0, self.confidence_sum / np.maximum(self.count, 1), np.nan)
        return {"edges": self.edges.tolist(), "count": self.count.tolist(),
                "accuracy": acc.tolist(), "confidence": conf.tolist()}

    def merge(self, other: "CalibrationBins") -> "CalibrationBins":
        """Add another histogram's counts (another rank, another batch range) into this one."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge {other.n_bins} bins into {self.n_bins} bins")
        self.count += other.count
        self.confidence_sum += other.confidence_sum
        self.correct_sum += other.correct_sum
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "count": self.count.tolist(),
                "confidence_sum": self.confidence_sum.tolist(), "correct_sum": self.correct_sum.tolist()}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "CalibrationBins":
        try:
            bins = cls(int(state["n_bins"]))
            count = np.asarray(state["count"], dtype=np.int64)
            conf = np.asarray(state["confidence_sum"], dtype=np.float64)
            corr = np.asarray(state["correct_sum"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a CalibrationBins state dict: {exc}") from None
        if not (count.shape == conf.shape == corr.shape == (bins.n_bins,)):
            raise ValueError(f"CalibrationBins state: count/confidence_sum/correct_sum need {bins.n_bins} entries")
        if (count < 0).any() or (corr < 0).any() or (corr > count).any():
            raise ValueError("CalibrationBins state: counts are inconsistent (negative, or more correct than seen)")
        bins.count[:] = count
        bins.confidence_sum[:] = conf
        bins.correct_sum[:] = corr
        return bins

    def __repr__(self) -> str:
        return f"CalibrationBins(n_bins={self.n_bins}, total={self.total})"


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE (fraction) with ``n_bins`` equal-width confidence bins (Guo et al., 2017)."""
    return CalibrationBins(n_bins).add(confidences, correct).ece()


def rms_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """RMS calibration error (fraction) over ``n_bins`` equal-width confidence bins."""
    return CalibrationBins(n_bins).add(confidences, correct).rms_calibration_error()


# --------------------------------------------------------------------------- results JSON

def _result_errors(result: Mapping[str, Any], what: str) -> tuple[dict[str, dict[int, float]], float]:
    if not isinstance(result, Mapping):
        raise MetricsError(f"{what} must be a results dict (apr.eval/1), got {type(result).__name__}")
    if "corruptions" not in result or "clean" not in result:
        raise MetricsError(f"{what} lacks the 'clean' and/or 'corruptions' block of a results JSON")
    clean = result["clean"]
    clean_error = _error_value(clean, f"{what} clean")
    return normalize_errors(result["corruptions"]), clean_error


def _normalised(present: dict, clean_error: float, base_for: Mapping, base_clean: float, wanted: bool,
                warnings: list[str]) -> tuple[dict, dict, float | None, float | None, str | None]:
    """CE and relative CE per corruption, mCE and relative mCE (through ``mce`` / ``relative_mce``),
    and why the relative mCE is missing when it is."""
    if not wanted or not present:
        return {}, {}, None, None, ("not normalised" if not wanted else "no corruption cell")
    ce = {c: corruption_error(cells, base_for[c]) for c, cells in present.items()}
    rel: dict[str, float | None] = {}
    for c, cells in present.items():
        try:
            rel[c] = relative_corruption_error(cells, clean_error, base_for[c], base_clean)
        except MetricsError as exc:
            rel[c] = None
            warnings.append(f"{c}: {exc}")
    undefined = [c for c, v in rel.items() if v is None]
    reason = None
    rel_mce = None
    if undefined:
        reason = f"undefined for {', '.join(undefined)}: the reference is not worse there than on clean images"
    else:
        rel_mce = relative_mce(present, clean_error, base_for, base_clean, allow_partial=True)
    return ce, rel, mce(present, base_for, allow_partial=True), rel_mce, reason


def compute_metrics(result: Mapping[str, Any], baseline_result: Mapping[str, Any] | None = None,
                    allow_partial: bool = False, normalisation: str | None = None) -> dict[str, Any]:
    """Fill the ``"metrics"`` block of a results JSON (schema apr.eval/1) from its cells.

    Normalisation: against ``baseline_result`` (a results dict of another run, cell by cell)
    when given, else against AlexNet (the ImageNet-C convention; meaningful only for
    ImageNet-C). ``normalisation="none"`` skips CE/mCE and keeps the unnormalised mean
    error, which is what CIFAR-C papers report. Missing cells among the 15 x 5 raise a
    ``MetricsError`` naming them unless ``allow_partial``; then every metric runs over the
    cells present and ``partial``/``missing`` say so. The 4 extra corruptions only feed
    ``extra_mean_error``.
    """
    errors, clean_error = _result_errors(result, "result")
    if normalisation is None:
        normalisation = "baseline" if baseline_result is not None else "alexnet"
    if normalisation not in ("alexnet", "baseline", "none"):
        raise MetricsError(f"normalisation must be 'alexnet', 'baseline' or 'none', got {normalisation!r}")
    if normalisation == "baseline" and baseline_result is None:
        raise MetricsError("normalisation='baseline' needs a baseline_result")

    missing = [f"{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES if s not in errors.get(c, {})]
    if missing and not allow_partial:
        raise MetricsError(
            f"result {result.get('run_name', '?')!r}: {len(missing)} of {len(CORRUPTIONS) * len(SEVERITIES)} "
            f"(corruption/severity) cells missing: {', '.join(missing)}. Finish the evaluation, or pass "
            f"allow_partial=True to compute over the cells that are there (marked partial)."
        )
    present = {c: errors[c] for c in CORRUPTIONS if c in errors}

    warnings: list[str] = []
    if normalisation == "baseline":
        base_errors, base_clean = _result_errors(baseline_result, "baseline_result")
        label = f"baseline:{baseline_result.get('run_name') or 'unnamed'}"
        base_missing = [f"{c}/{s}" for c, cells in present.items() for s in cells if s not in base_errors.get(c, {})]
        if base_missing:
            if not allow_partial:
                raise MetricsError(
                    f"baseline run {baseline_result.get('run_name', '?')!r} lacks cells this run has: "
                    f"{', '.join(base_missing)}; cannot normalise (or pass allow_partial=True to leave them out)"
                )
            for cell in base_missing:
                c, s = cell.split("/")
                present[c] = {k: v for k, v in present[c].items() if k != int(s)}
            present = {c: cells for c, cells in present.items() if cells}
            missing = missing + base_missing
        base_for = {c: base_errors[c] for c in present}
    else:
        label = normalisation
        base_for, base_clean = ALEXNET_ERRORS, ALEXNET_CLEAN_ERROR

    ce, rel, mce_value, rel_mce, rel_reason = _normalised(present, clean_error, base_for, base_clean,
                                                          normalisation != "none", warnings)
    extra = {c: errors[c] for c in EXTRA_CORRUPTIONS if c in errors}
    return {
        "normalisation": label,
        "ce": ce,
        "mce": mce_value,
        "relative_ce": rel,
        "relative_mce": rel_mce,
        "relative_mce_reason": rel_reason,
        "mean_corruption_error": (mean_corruption_error(present, allow_partial=True) if present else None),
        "extra_mean_error": (mean_corruption_error(extra, allow_partial=True, corruptions=EXTRA_CORRUPTIONS)
                             if extra else None),
        "partial": bool(missing),
        "missing": missing,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- OOD detection and RMS calibration

__all__ += ["ood_metrics", "OOD_METRICS", "adaptive_rms_calibration_error"]

#: The keys of :func:`ood_metrics`, every one a fraction in [0, 1].
OOD_METRICS: tuple[str, ...] = ("auroc", "fpr95", "aupr_in", "aupr_out", "detection_accuracy")


def _finite_scores(values: Any, what: str) -> np.ndarray:
    arr = _as_numpy(values).astype(np.float64)
    if arr.size == 0:
        raise MetricsError(f"ood_metrics: {what} scores are empty; score at least one image of each set")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise MetricsError(f"ood_metrics: {bad} of {arr.size} {what} scores are NaN or infinite "
                           "(check the model's logits, e.g. run in fp32)")
    return arr


def ood_metrics(in_scores: Any, out_scores: Any) -> dict[str, float]:
    """OOD detection metrics; in-distribution is the positive class and a higher score means more ID.

    Curves come from scikit-learn (``roc_curve`` without dropping points, ``roc_auc_score``,
    ``average_precision_score``), so tied scores are handled as the library does: one threshold
    per distinct score value. ``fpr95`` is the smallest false-positive rate (OOD accepted as ID)
    among the thresholds whose true-positive rate is >= 0.95; its complement is the reference's
    "TNR at 95 % TPR". ``detection_accuracy`` is ``max_t ½(TPR(t) + TNR(t))``. ``aupr_in`` is the
    average precision with ID positive, ``aupr_out`` with OOD positive and the score negated.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    ins, outs = _finite_scores(in_scores, "in-distribution"), _finite_scores(out_scores, "out-of-distribution")
    y_true = np.concatenate([np.ones(ins.size, dtype=np.int64), np.zeros(outs.size, dtype=np.int64)])
    score = np.concatenate([ins, outs])
    fpr, tpr, _ = roc_curve(y_true, score, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(y_true, score)),
        "fpr95": float(fpr[tpr >= 0.95].min()),
        "aupr_in": float(average_precision_score(y_true, score)),
        "aupr_out": float(average_precision_score(1 - y_true, -score)),
        "detection_accuracy": float(np.max(0.5 * (tpr + 1.0 - fpr))),
    }


def adaptive_rms_calibration_error(confidences: Any, correct: Any, bin_size: int = 100) -> float:
    """RMS calibration error (fraction) with adaptive bins, AugMix's ``calib_err(p='2', beta=100)``.

    Samples sorted by confidence are cut into consecutive bins of ``bin_size`` (the last bin takes
    the remainder; fewer than ``bin_size`` samples make one bin), then
    ``sqrt(sum_b n_b / N * (mean conf_b - accuracy_b) ** 2)``. AugMix's published code leaves its
    last bin out of the sum; here every sample counts. Unlike ECE (equal-width bins, absolute
    gaps) it weighs large gaps more and never has empty bins. It needs every confidence, so the
    evaluator, which keeps only histograms, reports :func:`rms_calibration_error` (fixed bins) instead.
    """
    conf = _as_numpy(confidences).astype(np.float64)
    corr = _as_numpy(correct).astype(np.float64)
    if conf.shape != corr.shape:
        raise MetricsError(f"confidences and correct must have the same length, got {conf.size} and {corr.size}")
    if conf.size == 0:
        raise MetricsError("RMS calibration error of an empty set: give at least one prediction")
    if int(bin_size) != bin_size or bin_size < 1:
        raise MetricsError(f"bin_size must be a positive integer, got {bin_size!r}")
    if not np.all(np.isfinite(conf)) or conf.min() < 0.0 or conf.max() > 1.0:
        raise MetricsError("confidences must be probabilities in [0, 1] (softmax outputs)")
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], corr[order]
    n_bins = max(1, conf.size // int(bin_size))
    starts = np.arange(n_bins) * int(bin_size)
    counts = np.diff(np.append(starts, conf.size))
    gaps = np.add.reduceat(conf, starts) / counts - np.add.reduceat(corr, starts) / counts
    return float(np.sqrt(np.sum(counts / conf.size * gaps ** 2)))
