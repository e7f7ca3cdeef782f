"""Every Fourier transform of the project: amplitude/phase recombination and Fourier basis images.

APR rests on one operation: keep the *phase* spectrum of one image and give it the
*amplitude* spectrum of another. The reference code (iCGY96/APR) writes it as

    ifftn(|F(a)| * exp(1j * angle(F(p)))).real,   F = fftn over (C, H, W)

We compute the same numbers faster (FIELD-NOTES, "Measured here"):

* The inputs are real, so the spectra are Hermitian and ``rfftn``/``irfftn`` give exactly
  the real part of the full inverse transform at about half the work.
* ``exp(1j * angle(P))`` is the unit phasor ``P / |P|``; dividing avoids the transcendental
  functions that dominate the naive version. Where ``|P| == 0``, ``angle`` is 0, so the
  phasor is 1 there, exactly as in the reference.

Deliberate difference: the reference casts the result to uint8 without clipping, so values
outside [0, 255] wrap around (a bright 256 becomes a black 0). We clamp to [0, 1] by default;
:func:`fit_range` also offers the reference's ``wrap`` and an unclipped ``none``.

The pieces (:func:`real_spectrum`, :func:`swap_amplitude`, :func:`image_from_spectrum`) are
public so that fused APR-SP (``apr.augment.apply_apr_sp``) can reuse one forward transform
per image for both of its recombinations.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "amplitude_phase",
    "recombine",
    "real_spectrum",
    "image_from_spectrum",
    "swap_amplitude",
    "fit_range",
    "OVERFLOW_MODES",
    "fourier_basis",
    "fourier_basis_batch",
    "mirror_half_spectrum_map",
]

Dims = Sequence[int]
CHANNEL_SPATIAL: tuple[int, int, int] = (-3, -2, -1)
SPATIAL: tuple[int, int] = (-2, -1)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # torch.fft has no bfloat16 kernels and half only for powers of two on CUDA:
    # compute in float32 (float64 stays float64) and cast back at the end.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def amplitude_phase(x: torch.Tensor, dim: Dims = CHANNEL_SPATIAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Amplitude and phase of the full ``fftn`` of ``x`` over ``dim`` (for analysis and tests)."""
    spectrum = torch.fft.fftn(x.to(_compute_dtype(x)), dim=tuple(dim))
    return spectrum.abs(), spectrum.angle()


OVERFLOW_MODES: tuple[str, ...] = ("clamp", "wrap", "none")


def real_spectrum(x: torch.Tensor, dim: Dims = CHANNEL_SPATIAL) -> torch.Tensor:
    """Half spectrum ``rfftn(x)`` over ``dim`` in float32 (float64 stays float64): inputs are real."""
    return torch.fft.rfftn(x.to(_compute_dtype(x)), dim=tuple(dim))


def image_from_spectrum(spectrum: torch.Tensor, sizes: Sequence[int], dim: Dims = CHANNEL_SPATIAL) -> torch.Tensor:
    """Inverse of :func:`real_spectrum`: the real image of a half spectrum (``sizes`` = lengths along ``dim``)."""
    return torch.fft.irfftn(spectrum, s=list(sizes), dim=tuple(dim))


def swap_amplitude(
    phase_spectrum: torch.Tensor, amplitude: torch.Tensor, inplace: bool = False, compile: bool = False
) -> torch.Tensor:
    """Spectrum with ``phase_spectrum``'s phase and the magnitude ``amplitude``: ``P / |P| * A``.

    ``P / |P|`` is ``exp(1j * angle(P))`` without transcendental functions; where ``|P| == 0``
    the phasor is 1 (``angle(0) == 0``), as in the reference. ``inplace=True`` overwrites
    ``phase_spectrum`` (callers that own it save one spectrum-sized buffer).
    ``compile=True`` runs the elementwise work as one ``torch.compile``d kernel on the real
    view and falls back to the eager expression (with a warning, once) where compiling fails.
    """
    if compile:
        fused = _compiled_swap()
        if fused is not None:
            try:
                return torch.view_as_complex(fused(torch.view_as_real(phase_spectrum), amplitude))
            except Exception as exc:  # noqa: BLE001 - any compiler failure: keep training, eagerly
                _disable_compile(exc)
    spectrum = phase_spectrum if inplace else phase_spectrum.clone()
    magnitude = spectrum.abs()
    zero = magnitude == 0
    spectrum.masked_fill_(zero, 1.0)
    magnitude.masked_fill_(zero, 1.0)
    return spectrum.mul_(torch.div(amplitude, magnitude, out=magnitude))


def _swap_real(spectrum_ri: torch.Tensor, amplitude: torch.Tensor) -> torch.Tensor:
    """:func:`swap_amplitude` on ``view_as_real`` tensors, written for one fused compiled kernel."""
    re, im = spectrum_ri.unbind(-1)
    magnitude = torch.sqrt(re * re + im * im)
    nonzero = magnitude > 0
    scale = torch.where(nonzero, amplitude / torch.where(nonzero, magnitude, 1.0), 0.0)
    return torch.stack((torch.where(nonzero, re * scale, amplitude), im * scale), dim=-1)


_COMPILED: dict[str, object] = {}


def _compiled_swap():
    if "fn" not in _COMPILED:
        try:
            _COMPILED["fn"] = torch.compile(_swap_real, dynamic=True)
        except Exception as exc:  # noqa: BLE001
            _disable_compile(exc)
    return _COMPILED["fn"]


def _disable_compile(exc: Exception) -> None:
    import warnings

    warnings.warn(f"torch.compile of the Fourier elementwise kernel failed ({type(exc).__name__}: {exc}); "
                  "using the eager expression", RuntimeWarning, stacklevel=3)
    _COMPILED["fn"] = None


def fit_range(x: torch.Tensor, overflow: str = "clamp") -> torch.Tensor:
    """Bring a recombined image (float, [0, 1] units) back to an image, in place where it can.

    ``clamp``: clip to [0, 1] (ours). ``wrap``: the reference's ``ndarray.astype(np.uint8)`` of
    the 0..255 values: truncation toward zero, then modulo 256 (a 256.3 becomes 0, a -2.5
    becomes 254), so values come back on the 1/255 grid. ``none``: unclipped floats.
    """
    if overflow == "clamp":
        return x.clamp_(0.0, 1.0)
    if overflow == "wrap":
        return torch.remainder(torch.trunc(x * 255.0), 256.0).div_(255.0)
    if overflow == "none":
        return x
    raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}; got {overflow!r}")


def recombine(
    amplitude_source: torch.Tensor,
    phase_source: torch.Tensor,
    dim: Dims = CHANNEL_SPATIAL,
    clamp: bool = True,
    overflow: str | None = None,
) -> torch.Tensor:
    """Image whose Fourier amplitude is ``amplitude_source``'s and whose phase is ``phase_source``'s.

    ``dim=(-3, -2, -1)`` (default) transforms channels, height and width together as the
    reference does; ``dim=(-2, -1)`` recombines each channel on its own. Inputs of any
    leading shape, dtype float32/float64/bfloat16/float16, any device; the output has the
    phase source's dtype, device and shape. ``clamp=False`` returns the unclipped result
    (used to check the spectra exactly); ``overflow`` (see :func:`fit_range`) overrides it.
    """
    if amplitude_source.shape != phase_source.shape:
        raise ValueError(
            f"recombine needs inputs of the same shape, got {tuple(amplitude_source.shape)} "
            f"(amplitude) and {tuple(phase_source.shape)} (phase)"
        )
    if not phase_source.is_floating_point():
        raise TypeError(f"recombine expects float images in [0, 1], got dtype {phase_source.dtype}")
    dim = tuple(dim)
    sizes = [phase_source.shape[d] for d in dim]
    amplitude = real_spectrum(amplitude_source.to(phase_source.dtype), dim).abs()
    spectrum = swap_amplitude(real_spectrum(phase_source, dim), amplitude, inplace=True)
    out = fit_range(image_from_spectrum(spectrum, sizes, dim), overflow or ("clamp" if clamp else "none"))
    return out.to(phase_source.dtype)


def fourier_basis(height: int, width: int, i: int, j: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real Fourier basis image U_{i,j} (H x W) with unit L2 norm.

    ``(i, j)`` indexes the half spectrum of ``rfft2``: ``0 <= i < H``, ``0 <= j <= W // 2``.
    The image is ``irfft2`` of a one-hot half spectrum; Hermitian symmetry makes it the real
    sinusoid with energy at ``+-(i, j)`` only (FourierHeatmap, Yin et al. 2019).
    """
    return fourier_basis_batch(height, width, torch.tensor([[i, j]]), device=device, dtype=dtype)[0]


def fourier_basis_batch(
    height: int, width: int, indices: torch.Tensor, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Basis images for many ``(i, j)`` at once: ``indices`` is K x 2, the result K x H x W."""
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1, 2)
    half_w = width // 2 + 1
    if ((indices[:, 0] < 0) | (indices[:, 0] >= height) | (indices[:, 1] < 0) | (indices[:, 1] >= half_w)).any():
        raise ValueError(f"frequency indices must lie in [0, {height}) x [0, {half_w}) for a {height}x{width} image")
    k = indices.shape[0]
    # float64 callers (exact references) get a float64-accurate basis, everyone else complex64
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    spectrum = torch.zeros(k, height, half_w, dtype=complex_dtype, device=device)
    spectrum[torch.arange(k, device=device), indices[:, 0].to(device), indices[:, 1].to(device)] = 1.0
    basis = torch.fft.irfft2(spectrum, s=(height, width))
    basis = basis / basis.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    return basis.to(dtype)


def mirror_half_spectrum_map(half_map: torch.Tensor, width: int) -> torch.Tensor:
    """Turn an (H, W//2+1) map over rfft2 frequencies into a centred H x W map.

    Entry (i, j) of the half map holds frequency (i, j) and, by Hermitian symmetry, also
    (-i, -j). The result places the zero frequency in the middle (``fftshift`` convention)
    and is point-symmetric around it.
    """
    height, half_w = half_map.shape[-2:]
    if half_w != width // 2 + 1:
        raise ValueError(f"half map has {half_w} columns, expected {width // 2 + 1} for width {width}")
    full = half_map.new_zeros(half_map.shape[:-2] + (height, width))
    rows = torch.arange(height, device=half_map.device)
    cols = torch.arange(width, device=half_map.device)
    # column c of the full spectrum is stored directly when c <= W//2, else as its mirror -(i, c)
    for c in cols.tolist():
        if c < half_w:
            full[..., :, c] = half_map[..., :, c]
        else:
            full[..., :, c] = half_map[..., (-rows) % height, width - c]
    return torch.fft.fftshift(full, dim=(-2, -1))
