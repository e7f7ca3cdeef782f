"""Fourier heat maps and amplitude/phase swaps (apr.analysis), checked end to end on real digits.

The models here are constructed, not trained, so their frequency behaviour is known in advance:
a low-pass filter + nearest-class-mean classifier must be hurt by low-frequency perturbations
only; a classifier of |FFT| must follow the amplitude, one of the phase-only image the phase.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apr.analysis import (
    HeatmapResult,
    amplitude_follow_fraction,
    class_derangement,
    default_eps,
    fourier_heatmap,
    heatmap_frequencies,
    perturbation_signs,
    plot_heatmap,
    plot_heatmaps_side_by_side,
    swap_figure,
    swap_predictions,
)
from apr.fourier import fourier_basis, fourier_basis_batch, mirror_half_spectrum_map
from conftest import digits_rgb

MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.2, 0.3)


# ---------------------------------------------------------------------------------------
# constructed models


class Pool(nn.Module):
    """Low-pass filter: box average over k x k blocks."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return F.avg_pool2d(x, self.k)


class Amplitude(nn.Module):
    def forward(self, x):
        return torch.log1p(torch.fft.fftn(x, dim=(-3, -2, -1)).abs())


class PhaseOnly(nn.Module):
    def forward(self, x):
        spectrum = torch.fft.fftn(x, dim=(-3, -2, -1))
        return torch.fft.ifftn(torch.exp(1j * spectrum.angle()), dim=(-3, -2, -1)).real


class NearestMean(nn.Module):
    """Nearest class mean of ``features(x)``; logits = minus squared distances."""

    def __init__(self, features: nn.Module, x, y, num_classes: int):
        super().__init__()
        self.features = features
        with torch.no_grad():
            f = features(x).flatten(1)
        self.register_buffer("means", torch.stack([f[y == c].mean(0) for c in range(num_classes)]))

    def forward(self, x):
        f = self.features(x).flatten(1).to(self.means.dtype)
        return -((f[:, None] - self.means[None]) ** 2).sum(-1)


def _normalise(x, mean=MEAN, std=STD):
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(std, dtype=x.dtype).view(shape)


@pytest.fixture(scope="module")
def digits16():
    images, labels = digits_rgb(16)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    y = torch.from_numpy(labels)
    keep = y < 4
    return x[keep], y[keep]


def _correct_subset(model, x, y, n, normalise=True):
    """Held-out images (after the 200 used for the class means) the model classifies correctly."""
    with torch.no_grad():
        pred = model(_normalise(x) if normalise else x).argmax(1)
    ok = (pred == y).clone()
    ok[:200] = False
    idx = torch.nonzero(ok).flatten()[:n]
    assert len(idx) == n
    return x[idx], y[idx]


@pytest.fixture(scope="module")
def low_pass(digits16):
    """Low-contrast digits (0.4..0.6, so eps=4 never clips) and a box-filter template classifier."""
    x, y = digits16
    x = 0.4 + 0.2 * x
    model = NearestMean(Pool(2), _normalise(x[:200]), y[:200], 4)
    return model, x, y


# ---------------------------------------------------------------------------------------
# basis and mirroring


@pytest.mark.parametrize("height, width", [(8, 8), (7, 9), (6, 5)])
def test_basis_images_are_real_unit_norm_and_hit_only_plus_minus_ij(height, width):
    for i in range(height):
        for j in range(width // 2 + 1):
            u = fourier_basis(height, width, i, j, dtype=torch.float64)
            assert u.shape == (height, width) and not u.is_complex()
            assert float(u.norm()) == pytest.approx(1.0, abs=1e-12)
            spectrum = np.abs(np.fft.fft2(u.numpy()))
            expected = np.zeros((height, width), dtype=bool)
            expected[i, j] = expected[-i % height, -j % width] = True
            assert spectrum[expected].min() > 1e-3, (i, j)
            assert spectrum[~expected].max() < 1e-10, (i, j)
    batch = fourier_basis_batch(height, width, torch.tensor([[1, 1], [0, 0]]), dtype=torch.float64)
    # batched and single basis images come from different code paths: equal up to rounding
    torch.testing.assert_close(batch[0], fourier_basis(height, width, 1, 1, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(batch[1], fourier_basis(height, width, 0, 0, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("height, width", [(8, 8), (7, 9), (6, 5), (9, 6)])
def test_mirrored_map_is_centred_and_point_symmetric(height, width):
    rng = np.random.default_rng(height * 100 + width)
    g = rng.random((height, width))

    def f(a, b):  # any function with f(a, b) == f(-a, -b), like an error per real basis image
        return g[a % height, b % width] + g[-a % height, -b % width]

    half = np.array([[f(i, j) for j in range(width // 2 + 1)] for i in range(height)])
    half[0, 0] = -1.0  # zero frequency marked
    full = mirror_half_spectrum_map(torch.from_numpy(half), width).numpy()
    assert full.shape == (height, width)
    assert np.unravel_index(full.argmin(), full.shape) == (height // 2, width // 2)
    for p in range(height):
        for q in range(width):
            a, b = p - height // 2, q - width // 2
            if (a, b) != (0, 0):
                assert full[p, q] == pytest.approx(f(a, b)), (p, q)
    # point symmetry about the centre on the region where both (a, b) and (-a, -b) exist
    ra, rb = (height - 1) // 2, (width - 1) // 2
    core = full[height // 2 - ra: height // 2 + ra + 1, width // 2 - rb: width // 2 + rb + 1]
    assert np.array_equal(core, core[::-1, ::-1])
    with pytest.raises(ValueError, match="columns, expected"):
        mirror_half_spectrum_map(torch.zeros(height, width), width)


def test_heatmap_frequencies_cover_each_distinct_basis_image_once():
    for height, width in [(8, 8), (7, 9), (6, 5)]:
        freqs = heatmap_frequencies(height, width)
        images = fourier_basis_batch(height, width, torch.tensor(freqs), dtype=torch.float64)
        # no two evaluated frequencies give the same (or negated) basis image ...
        gram = (images.flatten(1) @ images.flatten(1).T).abs() - torch.eye(len(freqs), dtype=torch.float64)
        assert gram.max() < 1e-9
        # ... and every half-spectrum basis image is one of them
        every = fourier_basis_batch(height, width, torch.tensor(
            [(i, j) for i in range(height) for j in range(width // 2 + 1)]), dtype=torch.float64)
        assert ((every.flatten(1) @ images.flatten(1).T).abs().max(dim=1).values > 1 - 1e-9).all()
    limited = heatmap_frequencies(16, 16, max_frequency=2)
    assert all(abs(i if i <= 8 else i - 16) <= 2 and j <= 2 for i, j in limited)
    assert len(limited) == 5 * 3 - 2  # rows -1, -2 of column 0 repeat rows 1, 2
    with pytest.raises(ValueError, match="max_frequency must be >= 0"):
        heatmap_frequencies(8, 8, max_frequency=-1)


# ---------------------------------------------------------------------------------------
# heat map


def _reference_heatmap(model, x, y, eps, max_frequency, seed):
    """Per image and per frequency, in NumPy: basis from np.fft.irfft2, perturb, clip, normalise."""
    n, c, height, width = x.shape
    out = np.full((height, width // 2 + 1), np.nan)
    for i in range(height):
        for j in range(width // 2 + 1):
            if abs(i if i <= height // 2 else i - height) > max_frequency or j > max_frequency:
                continue
            spectrum = np.zeros((height, width // 2 + 1), dtype=complex)
            spectrum[i, j] = 1.0
            u = np.fft.irfft2(spectrum, s=(height, width))
            u /= np.linalg.norm(u)
            # (i, j) and (H-i, j) are the same image in columns 0 and W/2: one sign draw for both
            mirrored = (j == 0 or (width % 2 == 0 and j == width // 2)) and i > height // 2
            signs = perturbation_signs(seed, height - i if mirrored else i, j, n, c)
            batch = []
            for k in range(n):
                pert = np.clip(x[k].numpy() + eps * signs[k][:, None, None] * u[None], 0.0, 1.0)
                batch.append((pert - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None])
            with torch.no_grad():  # the model is per-sample; one call per frequency keeps this fast
                pred = model(torch.from_numpy(np.stack(batch))).argmax(1)
            out[i, j] = (pred != y).double().mean().item()
    return out


@pytest.mark.parametrize("batch_size, max_frequency", [(5, 2), (13, 3)])
def test_heatmap_matches_per_image_numpy_reference(low_pass, batch_size, max_frequency):
    model, x, y = low_pass
    tx, ty = x[200:206], y[200:206]  # some of these are misclassified: clean error > 0 is fine here
    got = fourier_heatmap(model, tx, ty, mean=MEAN, std=STD, eps=6.0, max_frequency=max_frequency,
                          batch_size=batch_size, seed=3, progress=False)
    want = _reference_heatmap(model, tx, ty, eps=6.0, max_frequency=max_frequency, seed=3)
    assert np.array_equal(np.isnan(got.half_errors), np.isnan(want))
    diff = np.abs(got.half_errors - want)[~np.isnan(want)]  # batched float32 vs per-image path: a near-tie
    assert diff.max() <= 1 / 6 + 1e-9 and (diff > 1e-9).sum() <= 1  # argmax may flip for one image in one cell
    assert got.complete and got.eps == 6.0 and got.num_images == 6
    with torch.no_grad():
        clean = (model(_normalise(tx)).argmax(1) != ty).double().mean().item()
    assert got.clean_error == pytest.approx(clean)
    assert got.display_map().shape == (2 * max_frequency + 1,) * 2


def test_low_pass_model_errs_at_low_frequencies_only(low_pass):
    model, x, y = low_pass
    tx, ty = _correct_subset(model, x, y, 24)
    result = fourier_heatmap(model, tx, ty, mean=MEAN, std=STD, batch_size=512, progress=False)
    assert result.eps == default_eps(16) == 4.0 and result.clean_error == 0.0 and result.complete
    full = result.full_map
    assert full.shape == (16, 16)
    assert full[8, 8] == result.half_errors[0, 0]  # zero frequency in the middle
    shown = result.display_map()
    assert shown.shape == (15, 15) and np.array_equal(shown, shown[::-1, ::-1])
    a, b = np.meshgrid(np.arange(16) - 8, np.arange(16) - 8, indexing="ij")
    radius = np.maximum(abs(a), abs(b))
    low, high = full[radius <= 2].mean(), full[radius >= 5].mean()
    assert low > 0.25 and high < 0.05 and low > 8 * high, (low, high)


def test_bf16_autocast_gives_nearly_the_same_map(low_pass):
    model, x, y = low_pass
    tx, ty = _correct_subset(model, x, y, 12)
    tx, model = tx.float(), NearestMean(Pool(2), _normalise(x[:200]).float(), y[:200], 4)
    kwargs = dict(mean=MEAN, std=STD, max_frequency=2, batch_size=64, progress=False)
    fp32 = fourier_heatmap(model, tx, ty, precision="fp32", **kwargs)
    bf16 = fourier_heatmap(model, tx, ty, precision="bf16", **kwargs)
    assert np.nanmax(np.abs(fp32.half_errors - bf16.half_errors)) <= 0.25
    assert np.nanmean(fp32.half_errors) > 0.1  # the region probed is one the model is sensitive to


class Borderline(nn.Module):
    """A NearestMean's logits plus a fifth that wins exactly where another rounding could swap its top two: a
    heat map against label 4 then counts, per frequency, the images that may flip. A relative error ``rel`` on
    the features f moves the gap ||f - m2||^2 - ||f - m1||^2 = 2 f.(m1 - m2) + const by <= 2 rel |f| |m1 - m2|."""

    def __init__(self, model: nn.Module, rel: float):
        super().__init__()
        self.model, self.rel = model, rel

    def forward(self, x):
        logits = self.model(x)
        top2 = logits.topk(2, dim=1)
        f = self.model.features(x).flatten(1)
        m1, m2 = (self.model.means[top2.indices[:, k]] for k in (0, 1))
        near = top2.values[:, 0] - top2.values[:, 1] <= 2 * self.rel * f.norm(dim=1) * (m1 - m2).norm(dim=1)
        flag = torch.where(near, top2.values[:, 0] + 1, logits.min(1).values - 1)
        return torch.cat([logits, flag[:, None]], 1)


@pytest.mark.parametrize("device, precision, rel", [
    ("cpu", "bf16", 2**-8),  # bf16 keeps 8 significant bits: 2**-9 per rounding, two roundings
    ("cpu", "fp32", 1e-5),  # channels_last: another CPU kernel path
    pytest.param("cuda", "fp32", 1e-5, marks=pytest.mark.cuda),  # float32 kernels: ~1e-7 per op, taken 100x
    pytest.param("cuda", "bf16", 2**-8, marks=pytest.mark.cuda),
])
def test_heatmap_elsewhere_flips_only_borderline_images(low_pass, device, precision, rel):
    """Per frequency, the error may move from the fp32 CPU map only by the images whose top-2 gap (under that
    frequency's perturbation) the other rounding could close: counted, not a fixed one image in 16."""
    model, x, y = low_pass
    tx, ty = _correct_subset(model, x, y, 16)
    tx, model = tx.float(), NearestMean(Pool(2), _normalise(x[:200]).float(), y[:200], 4)
    kwargs = dict(mean=MEAN, std=STD, max_frequency=4, batch_size=128, progress=False)
    cpu = fourier_heatmap(model, tx, ty, device="cpu", **kwargs)
    other = fourier_heatmap(model, tx, ty, device=device, precision=precision, channels_last=True, **kwargs)
    flags = fourier_heatmap(Borderline(model, rel), tx, torch.full_like(ty, 4), device="cpu", **kwargs)
    done = np.isfinite(cpu.half_errors)
    borderline = 1 - flags.half_errors[done]
    assert np.array_equal(np.isfinite(other.half_errors), done)
    assert np.all(np.abs(cpu.half_errors[done] - other.half_errors[done]) <= borderline + 1e-9)
    assert borderline.mean() < 0.1, borderline.mean()  # the bound is not vacuous (1.8 % for bf16 on the CPU)


class Crashing(nn.Module):
    """Wraps a model and raises after ``limit`` forward passes (a preempted job)."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.calls = model, limit, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt("simulated preemption")
        return self.model(x)


def test_interrupted_runs_resume_to_the_identical_matrix(low_pass, tmp_path):
    model, x, y = low_pass
    tx, ty = x[200:210], y[200:210]
    kwargs = dict(mean=MEAN, std=STD, eps=5.0, max_frequency=4, batch_size=30, seed=1, progress=False)
    full = fourier_heatmap(model, tx, ty, **kwargs)
    total = len(heatmap_frequencies(16, 16, 4))
    path = tmp_path / "progress.npz"

    reports = []
    partial = fourier_heatmap(model, tx, ty, resume_path=path, max_chunks=2,
                              on_chunk=lambda done, of: reports.append((done, of)), **kwargs)
    assert not partial.complete and path.exists() and reports == [(3, total), (6, total)]
    assert int(np.isfinite(partial.half_errors).sum()) >= 6  # 2 chunks x 3 frequencies, + mirrored copies

    crashing = Crashing(model, limit=3)  # resumed: no clean pass, so 3 more chunks, then the crash
    with pytest.raises(KeyboardInterrupt):
        fourier_heatmap(crashing, tx, ty, resume_path=path, **kwargs)
    with np.load(path) as saved:
        assert int(saved["done"].sum()) == 5 * 3

    counter = Crashing(model, limit=10 ** 6)
    resumed = fourier_heatmap(counter, tx, ty, resume_path=path, **kwargs)
    assert counter.calls == -(-(total - 15) // 3)  # only the remaining chunks ran
    assert resumed.complete
    np.testing.assert_array_equal(resumed.half_errors, full.half_errors)
    assert resumed.clean_error == full.clean_error

    again = Crashing(model, limit=0)  # everything done: reloads without a forward pass
    np.testing.assert_array_equal(fourier_heatmap(again, tx, ty, resume_path=path, **kwargs).half_errors,
                                  full.half_errors)
    with pytest.raises(ValueError, match=r"different parameters \(differing: eps\)"):
        fourier_heatmap(model, tx, ty, resume_path=path, **{**kwargs, "eps": 6.0})
    path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="cannot read heat-map progress file"):
        fourier_heatmap(model, tx, ty, resume_path=path, **kwargs)


def test_heatmap_rejects_bad_input(low_pass):
    model, x, y = low_pass
    tx, ty = x[:4], y[:4]
    cases = [
        (dict(images=tx[0]), "4-D tensor"),
        (dict(labels=ty[:3]), "got 4 images but 3 labels"),
        (dict(eps=0.0), "eps must be positive"),
        (dict(max_frequency=-2), "max_frequency must be >= 0"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(precision="no"), "precision must be one of bf16 \\| fp16 \\| fp32"),  # one vocabulary: no "no"
        (dict(std=None), "give both mean and std"),
        (dict(mean=(0.5, 0.5)), "mean and std need 3 values"),
        (dict(batch_size=0), "batch_size must be >= 1"),
    ]
    for override, message in cases:
        kwargs = dict(images=tx, labels=ty, mean=MEAN, std=STD, max_frequency=1, progress=False)
        kwargs.update(override)
        with pytest.raises(ValueError, match=message):
            fourier_heatmap(model, kwargs.pop("images"), kwargs.pop("labels"), **kwargs)
    assert default_eps(32) == 4.0 and default_eps(64) == 4.0 and default_eps(224) == 15.7


def test_results_save_load_and_plot_on_a_fixed_scale(low_pass, tmp_path):
    model, x, y = low_pass
    kwargs = dict(mean=MEAN, std=STD, max_frequency=3, batch_size=64, progress=False)
    first = fourier_heatmap(model, x[200:208], y[200:208], **kwargs)
    second = fourier_heatmap(model, x[210:218], y[210:218], eps=8.0, **kwargs)
    paths = first.save(tmp_path, "first")
    assert np.array_equal(np.load(paths["half"]), first.half_errors, equal_nan=True)
    assert np.array_equal(np.load(paths["map"]), first.full_map, equal_nan=True)
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == "apr.heatmap/1" and data["map_center"] == [8, 8]
    assert data["display_frequencies"]["vertical"] == list(range(-3, 4))
    assert data["map"][0][0] is None  # outside max_frequency: not evaluated
    loaded = HeatmapResult.load(paths["json"])
    assert np.array_equal(loaded.half_errors, first.half_errors, equal_nan=True) and loaded.eps == first.eps

    fig = plot_heatmap(first, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 5000
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    fig = plot_heatmaps_side_by_side([first, second], tmp_path / "two.png", titles=["baseline", "APR-SP"])
    assert (tmp_path / "two.png").stat().st_size > 5000
    assert [ax.images[0].get_clim() for ax in fig.axes if ax.images] == [(0.0, 1.0)] * 2
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["baseline", "APR-SP"]
    with pytest.raises(ValueError, match="2 heat maps but 1 titles"):
        plot_heatmaps_side_by_side([first, second], titles=["x"])


# ---------------------------------------------------------------------------------------
# amplitude / phase swap


@pytest.fixture(scope="module")
def spectral_models(digits16):
    """Mid-contrast digits (0.25..0.75: recombinations rarely clip) and the two spectral classifiers."""
    x, y = digits16
    x = (0.25 + 0.5 * x).float()
    amplitude = NearestMean(Amplitude(), x[:200], y[:200], 4)
    phase = NearestMean(PhaseOnly(), x[:200], y[:200], 4)
    return x, y, amplitude, phase


def _both_correct(models, x, y, n):
    with torch.no_grad():
        ok = torch.stack([m(x).argmax(1) == y for m in models]).all(0)
    ok[:200] = False
    idx = torch.nonzero(ok).flatten()[:n]
    return x[idx], y[idx]


def test_class_derangement_pairs_every_image_with_another_class():
    labels = np.repeat(np.arange(5), [7, 3, 9, 4, 6])
    perm = class_derangement(labels, seed=4)
    assert sorted(perm.tolist()) == list(range(labels.size))
    assert (labels[perm] != labels).all()
    assert not np.array_equal(perm, class_derangement(labels, seed=5))
    with pytest.raises(ValueError, match="largest class has 6 of 10"):
        class_derangement(np.array([0] * 6 + [1] * 4))


def test_amplitude_follow_fraction_separates_amplitude_and_phase_classifiers(spectral_models):
    x, y, amplitude, phase = spectral_models
    tx, ty = _both_correct([amplitude, phase], x, y, 40)
    amp = amplitude_follow_fraction(amplitude, tx, ty, batch_size=16, seed=2)
    pha = amplitude_follow_fraction(phase, tx, ty, batch_size=16, seed=2)
    assert amp["pairs"] == pha["pairs"] == 40 and amp["clean_accuracy"] == 1.0
    assert amp["amplitude_fraction"] >= 0.95 and amp["phase_fraction"] <= 0.05
    assert pha["phase_fraction"] >= 0.95 and pha["amplitude_fraction"] <= 0.05
    assert amp["both_correct"]["pairs"] == 40

    # independent count: NumPy recombination per pair, model per image
    perm = class_derangement(ty, seed=2)
    counts = [0, 0, 0]
    for i, j in enumerate(perm):
        fa, fb = np.fft.fftn(tx[i].double().numpy()), np.fft.fftn(tx[j].double().numpy())
        mixed = np.clip(np.real(np.fft.ifftn(np.abs(fb) * np.exp(1j * np.angle(fa)))), 0, 1)
        with torch.no_grad():
            pred = int(amplitude(torch.from_numpy(mixed).float()[None]).argmax())
        counts[0 if pred == ty[j] else 1 if pred == ty[i] else 2] += 1
    assert [amp["amplitude_count"], amp["phase_count"], amp["neither_count"]] == counts


@pytest.mark.cuda
def test_amplitude_follow_fraction_takes_cuda_images_and_labels(spectral_models):
    """Images and labels already on the GPU (as a caller's batch is) give the CPU counts."""
    x, y, amplitude, phase = spectral_models
    tx, ty = _both_correct([amplitude, phase], x, y, 40)
    cpu = amplitude_follow_fraction(amplitude, tx, ty, batch_size=16, seed=2)
    gpu = amplitude_follow_fraction(amplitude, tx.cuda(), torch.as_tensor(ty).cuda(), batch_size=16, seed=2,
                                    device="cuda")
    assert gpu["pairs"] == cpu["pairs"] == 40
    assert abs(gpu["amplitude_count"] - cpu["amplitude_count"]) <= 1


def test_swap_predictions_and_figure(spectral_models, tmp_path):
    x, y, amplitude, phase = spectral_models
    tx, ty = _both_correct([amplitude, phase], x, y, 40)
    perm = torch.from_numpy(class_derangement(ty, seed=0))[:3]
    a, b, la, lb = tx[:3], tx[perm], ty[:3], ty[perm]
    models = {"amplitude": amplitude, "phase": phase}
    out = swap_predictions(models, a, b)
    assert out["images"].shape == (4, 3, 3, 16, 16)
    assert torch.equal(out["predictions"]["amplitude"][2], lb) and torch.equal(out["predictions"]["amplitude"][3], la)
    assert torch.equal(out["predictions"]["phase"][2], la) and torch.equal(out["predictions"]["phase"][3], lb)
    assert ((out["confidences"]["phase"] > 0) & (out["confidences"]["phase"] <= 1)).all()
    fig = swap_figure(models, a, b, tmp_path / "swap.png", classes=["zero", "one", "two", "three"],
                      labels_a=la, labels_b=lb)
    assert (tmp_path / "swap.png").stat().st_size > 10000
    texts = [ax.get_xlabel() for ax in fig.axes]
    assert len(texts) == 12 and all("amplitude: " in t and "phase: " in t for t in texts)
    with pytest.raises(ValueError, match="same shape"):
        swap_predictions(models, a, b[:2])
    with pytest.raises(ValueError, match="no entry for model"):
        swap_predictions(models, a, b, mean={"amplitude": MEAN}, std={"amplitude": STD})


# ---------------------------------------------------------------------------------------
# command line (needs apr.models, apr.checkpoint, apr.data)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from apr.checkpoint import save_checkpoint
    from apr.config import config_to_dict, load_config
    from apr.models import create_model

    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for k, aug in enumerate(["none", "apr_sp"]):
        torch.manual_seed(k)
        model = create_model("cnn_tiny", 4)
        cfg = load_config(overrides=["model.name=cnn_tiny", "data.image_size=32", "data.val_resize=32",
                                     f"aug.name={aug}", f"train.run_name=run_{aug}"])
        paths.append(save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": 4,
                                      "classes": [f"n{c:08d}" for c in range(4)], "config": config_to_dict(cfg),
                                      "epoch": 1, "step": 0}, root / f"{aug}.pt"))
    return paths


def test_cli_heatmap_writes_maps_and_resumes(tiny_checkpoints, imagenet_tree, tmp_path, capsys):
    from apr.analysis import main

    out = tmp_path / "out"
    argv = ["heatmap", "--checkpoint", *map(str, tiny_checkpoints), "--data", str(imagenet_tree / "val"),
            "--out", str(out), "--max-images", "8", "--max-frequency", "2", "--device", "cpu", "--no-progress",
            "--workers", "0"]
    assert main(argv) == 0
    for name in ("run_none", "run_apr_sp"):
        data = json.loads((out / name / "heatmap.json").read_text())
        assert data["num_images"] == 8 and data["eps"] == 4.0 and data["complete"]
        assert np.array(data["display_map"], dtype=float).shape == (5, 5)
        assert (out / name / "heatmap.png").stat().st_size > 5000
        assert np.load(out / name / "heatmap_half.npy").shape == (32, 17)
    assert (out / "heatmaps_side_by_side.png").stat().st_size > 5000
    summary = json.loads((out / "heatmaps.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["run_none", "run_apr_sp"]
    before = (out / "run_none" / "heatmap_half.npy").read_bytes()
    assert main(argv) == 0  # rerun: everything reloaded from progress.npz
    assert (out / "run_none" / "heatmap_half.npy").read_bytes() == before

    assert main(["heatmap", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(imagenet_tree / "val"),
                 "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["heatmap", "--help"])
    assert exit_info.value.code == 0 and "--max-frequency" in capsys.readouterr().out


def test_cli_swap_writes_figure_and_follow_fractions(tiny_checkpoints, imagenet_tree, tmp_path):
    from apr.analysis import main

    out = tmp_path / "swap"
    assert main(["swap", "--checkpoint", *map(str, tiny_checkpoints), "--data", str(imagenet_tree / "val"),
                 "--out", str(out), "--pairs", "3", "--max-images", "12", "--device", "cpu", "--no-progress",
                 "--workers", "0"]) == 0
    assert (out / "swap.png").stat().st_size > 10000
    data = json.loads((out / "swap.json").read_text())
    assert len(data["pairs"]) == 3 and data["num_images"] == 12
    for name in ("run_none", "run_apr_sp"):
        follow = data["amplitude_follow"][name]
        assert follow["pairs"] == 12
        assert follow["amplitude_count"] + follow["phase_count"] + follow["neither_count"] == 12


def test_cli_heatmap_on_cifar_folder(tmp_path, digits_images):
    """--cifar reads the official python-pickle layout (here: 100 digits as a 10-class test_batch)."""
    import pickle

    from apr.analysis import _stratified_subset, main
    from apr.checkpoint import save_checkpoint
    from apr.config import config_to_dict, load_config
    from apr.models import create_model

    images, labels = digits_images
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": images[:100].transpose(0, 3, 1, 2).reshape(100, -1), b"labels": labels[:100].tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [str(k).encode() for k in range(10)]}, f)
    cfg = load_config(overrides=["model.name=cnn_tiny", "data.dataset=cifar10", "data.image_size=32"])
    ckpt = save_checkpoint({"model": create_model("cnn_tiny", 10).state_dict(), "model_name": "cnn_tiny",
                            "num_classes": 10, "classes": [str(k) for k in range(10)], "config": config_to_dict(cfg),
                            "epoch": 0, "step": 0}, tmp_path / "cifar.pt")
    out = tmp_path / "out"
    assert main(["heatmap", "--checkpoint", str(ckpt), "--cifar", str(tmp_path / "cifar"), "--out", str(out),
                 "--max-images", "20", "--max-frequency", "1", "--eps", "2.5", "--device", "cpu",
                 "--no-progress"]) == 0
    data = json.loads((out / "cifar" / "heatmap.json").read_text())
    assert data["num_images"] == 20 and data["eps"] == 2.5 and len(data["display_map"]) == 3
    assert not (out / "heatmaps_side_by_side.png").exists()  # one model: no comparison figure

    chosen = _stratified_subset(labels[:100], 20, seed=0)
    assert len(set(chosen.tolist())) == 20 and np.bincount(labels[:100][chosen], minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("side_by_side", [False, True])
def test_heatmap_colour_bar_is_in_percent_like_the_rest_of_the_report(side_by_side):
    maps = [np.linspace(0.0, 1.0, 25).reshape(5, 5)] * 2
    fig = plot_heatmaps_side_by_side(maps) if side_by_side else plot_heatmap(maps[0])
    fig.canvas.draw()
    bar = fig.axes[-1]
    assert not bar.images and bar.get_ylabel() == "top-1 error (%)"
    ticks = [float(t.get_text()) for t in bar.get_yticklabels() if t.get_text()]
    assert min(ticks) == 0 and max(ticks) == 100  # not 0..1
