"""apr.metrics against hand-computed values and a plain-Python per-bin ECE reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from apr import metrics as M
from apr.metrics import (ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, CORRUPTIONS, EXTRA_CORRUPTIONS, CalibrationBins,
                         MetricsError, compute_metrics, corruption_error, expected_calibration_error, mce,
                         mean_corruption_error, relative_corruption_error, relative_mce)


def cells(errors_by_corruption: dict, str_keys: bool = True, as_cells: bool = True) -> dict:
    """{c: [e1..e5]} -> results-JSON style {c: {"1": {"error": e1, ...}, ...}}."""
    out = {}
    for c, errs in errors_by_corruption.items():
        out[c] = {}
        for s, e in enumerate(errs, start=1):
            key = str(s) if str_keys else s
            out[c][key] = {"error": e, "count": 100, "ece": 0.05} if as_cells else e
    return out


def result(run_name: str, clean: float, errors_by_corruption: dict) -> dict:
    return {"schema": "apr.eval/1", "run_name": run_name, "dataset": "imagenet-c",
            "clean": {"error": clean, "top5_error": clean / 2, "count": 100, "ece": 0.03},
            "corruptions": cells(errors_by_corruption)}


def ramp(c_index: int) -> list[float]:
    """Distinct, severity-increasing errors per corruption, so mistakes in indexing show up."""
    return [round(0.20 + 0.01 * c_index + 0.1 * k, 4) for k in range(5)]


def test_constants():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    assert set(ALEXNET_ERRORS) == set(CORRUPTIONS)
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert not set(EXTRA_CORRUPTIONS) & set(CORRUPTIONS)
    assert ALEXNET_ERRORS["gaussian_noise"] == 0.886428 and ALEXNET_ERRORS["jpeg_compression"] == 0.6065
    assert ALEXNET_CLEAN_ERROR == 0.4345
    assert sum(len(v) for v in M.CORRUPTION_FAMILIES.values()) == 15


def test_alexnet_errors_give_mce_100():
    errors = {c: [ALEXNET_ERRORS[c]] * 5 for c in CORRUPTIONS}
    assert mce(cells(errors)) == pytest.approx(100.0, abs=1e-9)
    assert relative_mce(cells(errors), ALEXNET_CLEAN_ERROR) == pytest.approx(100.0, abs=1e-9)
    # severities need not be equal, only their sum matters
    skewed = {c: [ALEXNET_ERRORS[c] + d for d in (-0.06, -0.03, 0.0, 0.03, 0.06)] for c in CORRUPTIONS}
    assert mce(cells(skewed)) == pytest.approx(100.0, abs=1e-9)


def test_mce_hand_computed():
    errors = {c: ramp(i) for i, c in enumerate(CORRUPTIONS)}
    ref_ces = []
    for c in CORRUPTIONS:  # written out: CE_c = sum_s E_s / (5 * AlexNet mean)
        total = 0.0
        for e in errors[c]:
            total += e
        ref_ces.append(100.0 * total / (5 * ALEXNET_ERRORS[c]))
    ref = sum(ref_ces) / 15
    assert mce(cells(errors)) == pytest.approx(ref, rel=1e-12)
    # one corruption by hand: gaussian_noise errors 0.2..0.6 sum to 2.0
    assert corruption_error([0.2, 0.3, 0.4, 0.5, 0.6], ALEXNET_ERRORS["gaussian_noise"]) == pytest.approx(
        100 * 2.0 / 4.43214)
    # every accepted input form gives the same number
    assert mce(cells(errors, str_keys=False)) == pytest.approx(ref, rel=1e-12)
    assert mce(cells(errors, as_cells=False)) == pytest.approx(ref, rel=1e-12)
    assert mce(errors) == pytest.approx(ref, rel=1e-12)  # lists of 5
    assert mean_corruption_error(cells(errors)) == pytest.approx(100 * np.mean([np.mean(v) for v in errors.values()]))


def test_relative_mce_hand_computed():
    # errors 0.3..0.7, clean 0.2: losses 0.1..0.5 sum to 1.5; baseline losses 0.2 each -> 1.0
    assert relative_corruption_error([0.3, 0.4, 0.5, 0.6, 0.7], 0.2, [0.5] * 5, 0.3) == pytest.approx(150.0)
    # against AlexNet (a mean): 1.5 / (5 * (0.886428 - 0.4345)) = 1.5 / 2.25964
    assert relative_corruption_error([0.3, 0.4, 0.5, 0.6, 0.7], 0.2, ALEXNET_ERRORS["gaussian_noise"],
                                     ALEXNET_CLEAN_ERROR) == pytest.approx(100 * 1.5 / 2.25964)
    # a model that loses exactly k times AlexNet's loss everywhere has relative mCE 100 k
    clean, k = 0.25, 0.4
    errors = {c: [clean + k * (ALEXNET_ERRORS[c] - ALEXNET_CLEAN_ERROR)] * 5 for c in CORRUPTIONS}
    assert relative_mce(cells(errors), clean) == pytest.approx(40.0)
    # and its mCE is the plain ratio of sums, which differs
    assert mce(cells(errors)) == pytest.approx(
        np.mean([100 * errors[c][0] / ALEXNET_ERRORS[c] for c in CORRUPTIONS]))


def test_baseline_normalisation_run_against_itself_is_100():
    base = result("base", 0.2, {c: ramp(i) for i, c in enumerate(CORRUPTIONS)})
    m = compute_metrics(base, baseline_result=base)
    assert m["normalisation"] == "baseline:base"
    assert m["mce"] == pytest.approx(100.0) and m["relative_mce"] == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in m["ce"].values())
    # a run with half the baseline's errors on every cell -> 50
    half = result("half", 0.1, {c: [e / 2 for e in ramp(i)] for i, c in enumerate(CORRUPTIONS)})
    m = compute_metrics(half, baseline_result=base)
    assert m["mce"] == pytest.approx(50.0) and m["relative_mce"] == pytest.approx(50.0)
    # baseline normalisation is per severity, not via the mean: check one CE by hand
    base_gn = ramp(0)
    run_gn = [0.9, 0.1, 0.1, 0.1, 0.1]
    assert corruption_error(run_gn, {str(s): e for s, e in enumerate(base_gn, 1)}) == pytest.approx(
        100 * 1.3 / sum(base_gn))


def test_compute_metrics_block():
    errors = {c: ramp(i) for i, c in enumerate(CORRUPTIONS)}
    errors.update({c: [0.5, 0.6, 0.7, 0.8, 0.9] for c in EXTRA_CORRUPTIONS})
    r = result("run", 0.2, errors)
    m = compute_metrics(r)
    assert m["normalisation"] == "alexnet" and m["partial"] is False and m["missing"] == []
    assert set(m["ce"]) == set(CORRUPTIONS) and set(m["relative_ce"]) == set(CORRUPTIONS)
    assert m["mce"] == pytest.approx(mce(cells({c: errors[c] for c in CORRUPTIONS})))
    assert m["relative_mce"] == pytest.approx(relative_mce(r["corruptions"], 0.2))
    assert m["extra_mean_error"] == pytest.approx(70.0)
    # the extra corruptions never move mCE or the mean corruption error
    without_extra = result("run", 0.2, {c: errors[c] for c in CORRUPTIONS})
    m2 = compute_metrics(without_extra)
    assert m2["mce"] == m["mce"] and m2["mean_corruption_error"] == m["mean_corruption_error"]
    assert m2["extra_mean_error"] is None
    json.dumps(m)  # JSON-serialisable as it is
    none = compute_metrics(r, normalisation="none")
    assert none["ce"] == {} and none["mce"] is None and none["relative_mce"] is None
    assert none["mean_corruption_error"] == pytest.approx(m["mean_corruption_error"])


def test_missing_cells_raise_naming_them():
    errors = {c: ramp(i) for i, c in enumerate(CORRUPTIONS) if c != "glass_blur"}
    r = result("unfinished", 0.2, errors)
    del r["corruptions"]["fog"]["3"]
    with pytest.raises(MetricsError, match=r"6 of 75 .*glass_blur/1, glass_blur/2.*fog/3.*allow_partial=True"):
        compute_metrics(r)
    with pytest.raises(MetricsError, match="fog/3"):
        mce(r["corruptions"])
    with pytest.raises(MetricsError, match="glass_blur/5"):
        relative_mce(r["corruptions"], 0.2)
    with pytest.raises(MetricsError, match="glass_blur/4"):
        mean_corruption_error(r["corruptions"])


def test_allow_partial_marks_partial_and_uses_present_cells():
    errors = {c: ramp(i) for i, c in enumerate(CORRUPTIONS) if c != "glass_blur"}
    r = result("unfinished", 0.2, errors)
    del r["corruptions"]["fog"]["3"]
    m = compute_metrics(r, allow_partial=True)
    assert m["partial"] is True
    assert m["missing"] == [f"glass_blur/{s}" for s in range(1, 6)] + ["fog/3"]
    assert "glass_blur" not in m["ce"]
    fog = [e for s, e in enumerate(errors["fog"], 1) if s != 3]
    assert m["ce"]["fog"] == pytest.approx(100 * sum(fog) / (4 * ALEXNET_ERRORS["fog"]))
    assert m["mce"] == pytest.approx(np.mean(list(m["ce"].values())))
    assert len(m["ce"]) == 14
    assert mce(r["corruptions"], allow_partial=True) == pytest.approx(m["mce"])


def test_baseline_missing_cells():
    full = result("full", 0.2, {c: ramp(i) for i, c in enumerate(CORRUPTIONS)})
    base = result("base", 0.3, {c: ramp(i) for i, c in enumerate(CORRUPTIONS)})
    del base["corruptions"]["snow"]["2"]
    with pytest.raises(MetricsError, match="baseline run 'base' lacks cells this run has: snow/2"):
        compute_metrics(full, baseline_result=base)
    m = compute_metrics(full, baseline_result=base, allow_partial=True)
    assert m["partial"] and m["missing"] == ["snow/2"]
    assert m["ce"]["snow"] == pytest.approx(100.0)


def test_bad_values_are_reported():
    errors = {c: ramp(i) for i, c in enumerate(CORRUPTIONS)}
    bad = cells(errors)
    bad["fog"]["2"]["error"] = 12.5  # a percentage where a fraction belongs
    with pytest.raises(MetricsError, match=r"fog/2: error must be a fraction in \[0, 1\], got 12.5"):
        mce(bad)
    bad = cells(errors)
    bad["fog"]["7"] = {"error": 0.5}
    with pytest.raises(MetricsError, match="fog: severity must be one of 1..5, got '7'"):
        mce(bad)
    with pytest.raises(MetricsError, match="relative CE undefined"):
        relative_corruption_error([0.3] * 5, 0.1, [0.3] * 5, 0.3)


def ece_reference(conf, correct, n_bins=15):
    """Guo et al.'s loop: bins (lo, hi], sum_b (n_b / N) |acc_b - conf_b|; 0 joins the first bin."""
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    n = len(conf)
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        in_bin = [(c > lo or (b == 0 and c == 0)) and c <= hi for c in conf]
        nb = sum(in_bin)
        if nb:
            acc = sum(k for k, m in zip(correct, in_bin) if m) / nb
            avg = sum(c for c, m in zip(conf, in_bin) if m) / nb
            total += nb / n * abs(acc - avg)
    return total


def test_ece_constructed_case():
    # bin (14/15, 1]: 4 samples, conf 0.95, acc 0.75 -> 0.2 * 4/6; bin (8/15, 9/15]: conf 0.55, acc 0.5
    conf = [0.95, 0.95, 0.95, 0.95, 0.55, 0.55]
    correct = [1, 1, 1, 0, 1, 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.2 * 4 / 6 + 0.05 * 2 / 6)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([0.0, 1.0], [1, 0]) == pytest.approx(1.0)


def test_ece_matches_reference_and_batches():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.05, 1.0, size=997)
    conf[:30] = np.linspace(0, 1, 16).repeat(2)[:30]  # exact bin edges
    correct = rng.uniform(size=997) < conf ** 0.7
    one_shot = expected_calibration_error(conf, correct)
    assert one_shot == pytest.approx(ece_reference(conf.tolist(), correct.astype(int).tolist()), abs=1e-12)
    bins = CalibrationBins(15)
    for start in range(0, 997, 128):
        sl = slice(start, start + 128)
        bins.add(torch.from_numpy(conf[sl]).to(torch.float64), torch.from_numpy(correct[sl]))
    assert bins.total == 997
    assert bins.ece() == pytest.approx(one_shot, abs=1e-12)
    assert bins.accuracy() == pytest.approx(correct.mean())
    # save mid-way, restore, continue: same as uninterrupted
    first = CalibrationBins().add(conf[:500], correct[:500])
    restored = CalibrationBins.from_dict(json.loads(json.dumps(first.to_dict())))
    restored.add(conf[500:], correct[500:])
    assert restored.ece() == pytest.approx(one_shot, abs=1e-12)
    merged = CalibrationBins().add(conf[:300], correct[:300]).merge(CalibrationBins().add(conf[300:], correct[300:]))
    assert merged.ece() == pytest.approx(one_shot, abs=1e-12)
    rel = bins.reliability()
    assert sum(rel["count"]) == 997 and len(rel["accuracy"]) == 15
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(
        ece_reference(conf.tolist(), correct.astype(int).tolist(), 10), abs=1e-12)


def test_calibration_bad_input():
    with pytest.raises(ValueError, match="probabilities in"):
        CalibrationBins().add([1.2], [1])
    with pytest.raises(ValueError, match="same length"):
        CalibrationBins().add([0.5, 0.5], [1])
    with pytest.raises(ValueError, match="0/1"):
        CalibrationBins().add([0.5], [2])
    with pytest.raises(ValueError, match="empty"):
        CalibrationBins().ece()
    with pytest.raises(ValueError, match="not a CalibrationBins state"):
        CalibrationBins.from_dict({"n_bins": 15})
    with pytest.raises(ValueError, match="merge 10 bins into 15"):
        CalibrationBins(15).merge(CalibrationBins(10))
    assert math.isnan(CalibrationBins().accuracy())


def test_rms_calibration_error_hand_computed():
    # 15 bins of width 1/15: 0.95 and 0.97 share the last bin, 0.5 is in bin 7, 0.2 in bin 2
    conf = [0.95, 0.97, 0.5, 0.2]
    correct = [1, 0, 1, 0]
    # bins: last (n=2, acc 0.5, conf 0.96), bin 7 (n=1, acc 1, conf 0.5), bin 2 (n=1, acc 0, conf 0.2)
    expected = math.sqrt(0.5 * 0.46 ** 2 + 0.25 * 0.5 ** 2 + 0.25 * 0.2 ** 2)
    assert M.rms_calibration_error(conf, correct) == pytest.approx(expected, abs=1e-12)
    assert M.expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.46 + 0.25 * 0.5 + 0.25 * 0.2)
    # from the stored histogram, after a JSON round trip and a merge of two shards
    a = CalibrationBins().add(conf[:1], correct[:1])
    b = CalibrationBins.from_dict(json.loads(json.dumps(CalibrationBins().add(conf[1:], correct[1:]).to_dict())))
    assert a.merge(b).rms_calibration_error() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="empty"):
        CalibrationBins().rms_calibration_error()


def test_relative_mce_reason_is_given():
    errors = {c: {s: 0.5 for s in M.SEVERITIES} for c in CORRUPTIONS}
    result = {"clean": {"error": 0.1}, "corruptions": errors}
    base = {"run_name": "b", "clean": {"error": 0.6}, "corruptions": errors}  # not worse than its clean error
    m = compute_metrics(result, base)
    assert m["relative_mce"] is None and m["mce"] == pytest.approx(100.0)
    assert m["relative_mce_reason"].startswith("undefined for gaussian_noise, shot_noise")
    ok = compute_metrics(result)
    assert ok["relative_mce_reason"] is None
    assert ok["relative_mce"] == pytest.approx(M.relative_mce(errors, 0.1))
