"""apr.fourier against per-image NumPy references written here (numpy.fft, the reference's formulas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apr.fourier import (
    amplitude_phase,
    fourier_basis,
    fourier_basis_batch,
    mirror_half_spectrum_map,
    recombine,
)
from conftest import sample_photos

DIMS = [(-3, -2, -1), (-2, -1)]


def numpy_recombine(amplitude_img: np.ndarray, phase_img: np.ndarray, axes) -> np.ndarray:
    """The reference's formula, one C x H x W image at a time, in float64."""
    fa = np.fft.fftn(amplitude_img.astype(np.float64), axes=axes)
    fp = np.fft.fftn(phase_img.astype(np.float64), axes=axes)
    return np.real(np.fft.ifftn(np.abs(fa) * np.exp(1j * np.angle(fp)), axes=axes))


def numpy_recombine_apr_py(amplitude_img_hwc: np.ndarray, phase_img_hwc: np.ndarray) -> np.ndarray:
    """APRecombination's exact sequence on H x W x C arrays: fftshift, abs/angle, ifftshift, ifftn."""
    f1 = np.fft.fftshift(np.fft.fftn(amplitude_img_hwc.astype(np.float64)))
    f2 = np.fft.fftshift(np.fft.fftn(phase_img_hwc.astype(np.float64)))
    mixed = np.abs(f1) * np.exp(1j * np.angle(f2))
    return np.real(np.fft.ifftn(np.fft.ifftshift(mixed)))


def _axes(dim):
    # dims of a C x H x W image
    return tuple(d + 3 for d in dim)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-learn's two sample photos (china, flower), downscaled to 40 x 56, float64 2 x 3 x H x W."""
    return torch.from_numpy(sample_photos(40, 56).astype(np.float64) / 255.0).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def digits(digits_images) -> torch.Tensor:
    images, _ = digits_images
    return torch.from_numpy(images[:8].astype(np.float64) / 255.0).permute(0, 3, 1, 2).contiguous()


def _check_against_numpy(a: torch.Tensor, p: torch.Tensor, dim, atol: float):
    out = recombine(a, p, dim=dim, clamp=False)
    assert out.shape == p.shape and out.dtype == p.dtype
    for k in range(a.shape[0]):
        ref = numpy_recombine(a[k].double().numpy(), p[k].double().numpy(), _axes(dim))
        np.testing.assert_allclose(out[k].double().numpy(), ref, atol=atol, rtol=0)
        clamped = recombine(a[k : k + 1], p[k : k + 1], dim=dim)
        np.testing.assert_allclose(clamped[0].double().numpy(), np.clip(ref, 0, 1), atol=atol, rtol=0)


@pytest.mark.parametrize("dim", DIMS)
def test_recombine_matches_numpy_on_random_images(dim):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 17, 24, generator=g, dtype=torch.float64)  # odd and even sizes
    p = torch.rand(4, 3, 17, 24, generator=g, dtype=torch.float64)
    _check_against_numpy(a, p, dim, atol=1e-10)
    _check_against_numpy(a.float(), p.float(), dim, atol=2e-5)


@pytest.mark.parametrize("dim", DIMS)
def test_recombine_matches_numpy_on_photos_and_digits(photos, digits, dim):
    _check_against_numpy(photos, photos.flip(0), dim, atol=1e-10)
    _check_against_numpy(photos.float(), photos.flip(0).float(), dim, atol=2e-5)
    _check_against_numpy(digits, digits.roll(1, 0), dim, atol=1e-10)
    if dim == (-3, -2, -1):
        # Per channel, some digit channels have spectrum bins that are exactly 0 up to rounding
        # (|P| ~ 1e-18 |P|max): their phase (angle of rounding noise) is undefined in the
        # reference formula itself, so float32 and float64 legitimately differ there.
        _check_against_numpy(digits.float(), digits.roll(1, 0).float(), dim, atol=2e-5)


def test_recombine_matches_the_apr_py_fftshift_form(photos):
    """The reference's APR-S path (fftshift/ifftshift on H x W x C) is the same map as dim=(-3,-2,-1)."""
    a, p = photos[0], photos[1]
    ref = numpy_recombine_apr_py(a.permute(1, 2, 0).numpy(), p.permute(1, 2, 0).numpy())
    out = recombine(a, p, dim=(-3, -2, -1), clamp=False).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-10, rtol=0)


def test_recombine_batched_equals_per_image_and_per_channel_is_separable(photos):
    a, p = photos.float(), photos.flip(0).float()
    batched = recombine(a, p, dim=(-2, -1), clamp=False)
    for c in range(3):  # per-channel mode = each channel recombined on its own as a 1-channel image
        single = recombine(a[:, c : c + 1], p[:, c : c + 1], dim=(-3, -2, -1), clamp=False)
        assert torch.allclose(batched[:, c : c + 1], single, atol=1e-5)
    # extra leading dims behave like the batch
    stacked = recombine(torch.stack([a, p]), torch.stack([p, a]), clamp=False)
    assert torch.allclose(stacked[0], recombine(a, p, clamp=False), atol=1e-6)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_recombine_low_precision_in_same_dtype_out(photos, dtype, atol):
    a, p = photos.to(dtype), photos.flip(0).to(dtype)
    out = recombine(a, p)
    assert out.dtype == dtype and out.shape == p.shape
    ref = recombine(a.float(), p.float())
    assert (out.float() - ref).abs().max().item() <= atol


def test_recombine_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        recombine(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9))
    with pytest.raises(TypeError, match="float images"):
        recombine(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("dim", DIMS)
def test_recombine_with_itself_is_identity(photos, digits, dim):
    for x in (photos.float(), digits.float(), torch.rand(3, 3, 9, 10)):
        assert torch.allclose(recombine(x, x, dim=dim), x, atol=1e-5)


@pytest.mark.parametrize("dim", DIMS)
def test_output_spectrum_has_amplitude_of_one_and_phase_of_the_other(photos, dim):
    a, p = photos[0:1], photos[1:2]  # float64
    out = recombine(a, p, dim=dim, clamp=False)
    fo = np.fft.fftn(out[0].numpy(), axes=_axes(dim))
    fa = np.fft.fftn(a[0].numpy(), axes=_axes(dim))
    fp = np.fft.fftn(p[0].numpy(), axes=_axes(dim))
    np.testing.assert_allclose(np.abs(fo), np.abs(fa), atol=1e-9 * np.abs(fa).max(), rtol=0)
    solid = (np.abs(fa) > 1e-6 * np.abs(fa).max()) & (np.abs(fp) > 1e-6 * np.abs(fp).max())
    assert solid.mean() > 0.99
    # compare unit phasors: no 2*pi wrap-around issues
    phasor_o = fo[solid] / np.abs(fo[solid])
    phasor_p = fp[solid] / np.abs(fp[solid])
    assert np.abs(phasor_o - phasor_p).max() < 1e-6
    # and the output is not simply one of the inputs
    assert (out - p).abs().max() > 0.05 and (out - a).abs().max() > 0.05


def test_amplitude_phase_matches_numpy(photos):
    amp, ph = amplitude_phase(photos[:1], dim=(-3, -2, -1))
    f = np.fft.fftn(photos[0].numpy(), axes=(0, 1, 2))
    np.testing.assert_allclose(amp[0].numpy(), np.abs(f), atol=1e-9)
    solid = np.abs(f) > 1e-6
    np.testing.assert_allclose(np.exp(1j * ph[0].numpy()[solid]), np.exp(1j * np.angle(f[solid])), atol=1e-9)


# ---------------------------------------------------------------------------------------
# Fourier basis helpers


@pytest.mark.parametrize("height, width", [(32, 32), (31, 33), (16, 20)])
def test_fourier_basis_unit_norm_real_and_two_frequencies(height, width):
    picks = [(0, 0), (1, 0), (0, 1), (3, 5), (height - 2, width // 2), (height // 2, width // 2), (height - 1, 1)]
    for i, j in picks:
        u = fourier_basis(height, width, i, j)
        assert u.shape == (height, width) and u.dtype == torch.float32 and not u.is_complex()
        assert abs(u.double().norm().item() - 1.0) < 1e-5
        spectrum = np.abs(np.fft.fft2(u.double().numpy()))
        support = set(zip(*np.nonzero(spectrum > 1e-6 * spectrum.max())))
        assert support == {(i, j), ((-i) % height, (-j) % width)}, (i, j, support)


def test_fourier_basis_batch_equals_single_and_rejects_bad_indices():
    idx = torch.tensor([[0, 0], [2, 3], [7, 4]])
    batch = fourier_basis_batch(8, 8, idx)
    assert batch.shape == (3, 8, 8)
    for k, (i, j) in enumerate(idx.tolist()):
        assert torch.allclose(batch[k], fourier_basis(8, 8, i, j), atol=1e-7)
    with pytest.raises(ValueError, match="frequency indices"):
        fourier_basis_batch(8, 8, torch.tensor([[0, 5]]))  # 8 // 2 + 1 = 5 columns
    with pytest.raises(ValueError, match="frequency indices"):
        fourier_basis(8, 8, -1, 0)


@pytest.mark.parametrize("height, width", [(8, 8), (9, 7), (6, 11), (32, 32)])
def test_mirror_half_spectrum_map_is_centred_and_symmetric(height, width):
    rng = np.random.default_rng(height * 100 + width)
    img = rng.random((height, width))
    half = torch.from_numpy(np.abs(np.fft.rfft2(img)))
    full = mirror_half_spectrum_map(half, width).numpy()
    # independent reference: the full |FFT|, zero frequency moved to the middle
    np.testing.assert_allclose(full, np.fft.fftshift(np.abs(np.fft.fft2(img))), atol=1e-10)
    # zero frequency lands at (H//2, W//2)
    marker = torch.zeros(height, width // 2 + 1)
    marker[0, 0] = 1.0
    centred = mirror_half_spectrum_map(marker, width)
    assert torch.nonzero(centred).tolist() == [[height // 2, width // 2]]
    # point symmetry: an entry (i, j) appears at +-(i, j) around the centre
    marker = torch.zeros(height, width // 2 + 1)
    marker[1, 2] = 1.0
    where = sorted(map(tuple, torch.nonzero(mirror_half_spectrum_map(marker, width)).tolist()))
    expected = sorted({((height // 2 + 1) % height, (width // 2 + 2) % width),
                       ((height // 2 - 1) % height, (width // 2 - 2) % width)})
    assert where == expected


def test_mirror_half_spectrum_map_rejects_wrong_width():
    with pytest.raises(ValueError, match="columns"):
        mirror_half_spectrum_map(torch.zeros(8, 5), 10)


@pytest.mark.cuda
@pytest.mark.parametrize("dim", DIMS)
def test_recombine_cuda_matches_cpu(photos, dim):
    a, p = photos.float(), photos.flip(0).float()
    cpu = recombine(a, p, dim=dim)
    gpu = recombine(a.cuda(), p.cuda(), dim=dim)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)
    bf = recombine(a.cuda().bfloat16(), p.cuda().bfloat16(), dim=dim)
    assert bf.dtype == torch.bfloat16 and (bf.float().cpu() - cpu).abs().max() < 2e-2


def test_recombine_overflow_modes_against_numpy():
    """wrap = the reference's ``ifftn(...).real.astype(np.uint8)`` of the 0..255 values; none = unclipped; clamp."""
    from apr.fourier import fit_range

    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (3, 12, 10)).astype(np.uint8)
    p8 = (np.linspace(0, 255, 120).reshape(1, 12, 10).repeat(3, 0)).astype(np.uint8)  # smooth: overflows after the swap
    raw = np.real(np.fft.ifftn(np.abs(np.fft.fftn(a8)) * np.exp(1j * np.angle(np.fft.fftn(p8)))))
    a, p = (torch.from_numpy(v.astype(np.float64) / 255) for v in (a8, p8))
    assert (raw < 0).any() or (raw >= 256).any()
    np.testing.assert_allclose(recombine(a, p, overflow="none").numpy() * 255, raw, atol=1e-9)
    np.testing.assert_allclose(recombine(a, p).numpy() * 255, raw.clip(0, 255), atol=1e-9)
    wrapped = recombine(a, p, overflow="wrap").numpy() * 255
    exact = np.abs(raw - np.rint(raw)) > 1e-6  # away from integer levels, where float noise could truncate either way
    np.testing.assert_allclose(wrapped[exact], raw[exact].astype(np.uint8), atol=1e-9)
    with pytest.raises(ValueError, match="overflow"):
        fit_range(torch.zeros(2), "saturate")


def test_swap_amplitude_in_place_and_zero_bins():
    from apr.fourier import swap_amplitude

    spectrum = torch.tensor([3 + 4j, 0j, -2j], dtype=torch.complex64)
    amplitude = torch.tensor([10.0, 7.0, 0.5])
    expected = torch.tensor([6 + 8j, 7 + 0j, -0.5j], dtype=torch.complex64)  # phasor 1 where |P| == 0
    torch.testing.assert_close(swap_amplitude(spectrum, amplitude), expected)
    assert spectrum[0] == 3 + 4j  # not in place by default
    out = swap_amplitude(spectrum, amplitude, inplace=True)
    assert out.data_ptr() == spectrum.data_ptr()
    torch.testing.assert_close(out, expected)
