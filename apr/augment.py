"""APR-P, APR-S and APR-SP as batched tensor operations on the training device.

The reference (iCGY96/APR) runs APR-S per image with PIL and NumPy inside DataLoader
workers, which starves a GPU on ImageNet. Here every op works on a whole batch with
per-sample parameters: colour ops as per-sample lookup tables on the 0..255 grid (where
PIL works on uint8), geometric ops as ONE ``grid_sample`` with per-sample affine matrices
that follow PIL's pixel-centre convention. Python loops run over the 9 ops, never over
images.

Random numbers (op choice, levels, signs, coins, permutations) are drawn from
``generator`` (default: torch's global CPU generator) *before* touching the images and
kept on the CPU, so grouping the batch by op needs no GPU->CPU synchronisation and a
fixed generator gives the same result on CPU and CUDA. What the device needs of them
(row indices, affine matrices, masks) goes over with :func:`_to_device`: a pinned,
non-blocking copy, because a plain ``.to("cuda")`` of pageable memory makes the host wait
until the GPU has finished all queued work (a full stream synchronisation per copy).

Deliberate differences from the reference, all documented where they happen:

* results are float and clamped to [0, 1] (the reference casts APR-S to uint8 without
  clipping, so out-of-range values wrap around, and leaves APR-P unclipped; switches
  ``s_overflow="wrap"`` and ``p_clamp=False`` reproduce it); geometric ops are not
  re-quantised to uint8;
* APR-P mixes [0, 1] images (the reference's CIFAR code); its ImageNet script mixes
  normalised tensors: ``p_space="normalized"`` with the data's mean/std;
* the recombination uses the float op outputs (the reference first truncates them to uint8);
* translations use the image width as PIL's ``IMAGE_SIZE`` and all ops keep the input size.

APR-SP is fused (:func:`apply_apr_sp`): the spectrum of each op output is computed once and
serves APR-S's recombination and APR-P (whose amplitude and phase come from ONE forward
transform per image); only images that APR-S recombined and clamped/wrapped are transformed
again, because the clamp sits between the two recombinations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from apr.fourier import (
    CHANNEL_SPATIAL,
    OVERFLOW_MODES,
    SPATIAL,
    fit_range,
    image_from_spectrum,
    real_spectrum,
    swap_amplitude,
)

__all__ = [
    "OP_NAMES",
    "GEOMETRIC_OPS",
    "OPS",
    "int_parameter",
    "float_parameter",
    "autocontrast",
    "equalize",
    "posterize",
    "solarize",
    "affine",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "APRSParams",
    "sample_apr_s_params",
    "apply_apr_s",
    "APRPParams",
    "sample_apr_p_params",
    "apply_apr_p",
    "apply_apr_sp",
    "apr_p",
    "apr_s",
    "apr_sp",
    "APRPolicy",
    "POLICY_NAMES",
    "DIMS",
    "P_SPACES",
]

# AugMix's op list without the ops that overlap ImageNet-C (colour, contrast, brightness,
# sharpness), in the reference's order; the order fixes which op an index draws.
OP_NAMES: tuple[str, ...] = (
    "autocontrast",
    "equalize",
    "posterize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
GEOMETRIC_OPS: tuple[str, ...] = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
POLICY_NAMES: tuple[str, ...] = ("none", "apr_p", "apr_s", "apr_sp")
DIMS: dict[str, tuple[int, ...]] = {"chw": CHANNEL_SPATIAL, "hw": SPATIAL}
P_SPACES: tuple[str, ...] = ("unit", "normalized")


# ---------------------------------------------------------------------------------------
# input checks and helpers


def _check_images(images: torch.Tensor, fn: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{fn} expects a torch.Tensor of images, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{fn} expects a batch N x C x H x W, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{fn} expects float images in [0, 1], got dtype {images.dtype}")


def _check_dim(dim: Sequence[int], fn: str) -> tuple[int, ...]:
    dim = tuple(int(d) for d in dim)
    if dim not in (CHANNEL_SPATIAL, SPATIAL):
        raise ValueError(f"{fn}: dim must be (-3, -2, -1) (channels+space) or (-2, -1) (per channel), got {dim}")
    return dim


def _per_sample(values, n: int, name: str) -> torch.Tensor:
    """A per-sample parameter as a float64 CPU tensor of length n (scalars broadcast)."""
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} needs one value per image ({n}), got {t.numel()}")
    return t


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (indices, parameters) on ``device`` without blocking the host.

    ``t.to("cuda")`` from pageable memory is ``cudaMemcpyAsync`` + ``cudaStreamSynchronize``:
    the host stalls until the GPU has drained its queue (the previous training step
    included). A copy from pinned memory with ``non_blocking=True`` is only enqueued on the
    current stream, so the kernels that use it still see it in order.
    """
    device = torch.device(device)
    if t.device.type != "cpu" or device.type == "cpu":
        return t.to(device)  # already on a device (a caller's own tensor), or no transfer at all
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _rand(shape, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Uniform [0, 1) float64 numbers from ``generator`` (its own device), returned on the CPU."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device).cpu()


def _randperm(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=device).cpu()


def int_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    """AugMix's ``int(level * maxval / 10)`` elementwise (float64, same operation order)."""
    return torch.trunc(torch.as_tensor(level, dtype=torch.float64) * maxval / 10)


def float_parameter(level: torch.Tensor, maxval: float) -> torch.Tensor:
    """AugMix's ``float(level) * maxval / 10`` elementwise."""
    return torch.as_tensor(level, dtype=torch.float64) * maxval / 10


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    # PIL's colour ops see uint8 pixels; images that came from uint8 / 255 round-trip exactly.
    return (images.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _from_uint8(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() / 255.0).to(dtype)


def _apply_lut(q: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-(image, channel) lookup: q is N x C x H x W uint8, lut N x C x 256."""
    flat = q.flatten(-2).long()
    return lut.to(torch.uint8).gather(-1, flat).view_as(q)


# ---------------------------------------------------------------------------------------
# colour ops (0..255 grid, exact PIL arithmetic)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` per channel: darkest value -> 0, brightest -> 255.

    Same float64 lookup table as PIL (``int(ix * scale + offset)``, truncating), so the
    result equals PIL's pixel for pixel; constant channels are left unchanged.
    """
    _check_images(images, "autocontrast")
    q = _to_uint8(images)
    lo = q.amin(dim=(-2, -1)).double()[..., None]
    hi = q.amax(dim=(-2, -1)).double()[..., None]
    ix = torch.arange(256, dtype=torch.float64, device=q.device)
    # tensor / tensor (``255.0 / t`` would be 255 * (1/t), not bit-identical to Python's division)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1.0)
    offset = -lo * scale
    lut = torch.floor(ix * scale + offset).clamp_(0, 255)
    lut = torch.where(hi > lo, lut, ix)
    return _from_uint8(_apply_lut(q, lut), images.dtype)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel (PIL's integer lookup table, exactly).

    ``step = (pixels - count of the brightest present value) // 255``;
    ``lut[i] = (step // 2 + #pixels below i) // step``; channels with ``step == 0`` unchanged.
    """
    _check_images(images, "equalize")
    q = _to_uint8(images)
    flat = q.flatten(-2).long()
    hist = torch.zeros(q.shape[:-2] + (256,), dtype=torch.long, device=q.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat))
    below = hist.cumsum(-1) - hist  # pixels with a value strictly below i
    brightest = q.amax(dim=(-2, -1)).long()[..., None]
    step = (flat.shape[-1] - hist.gather(-1, brightest)) // 255
    lut = torch.div(step // 2 + below, step.clamp_min(1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=q.device))
    return _from_uint8(_apply_lut(q, lut), images.dtype)


def posterize(images: torch.Tensor, bits) -> torch.Tensor:
    """PIL ``ImageOps.posterize``: keep the ``bits`` most significant bits (per image)."""
    _check_images(images, "posterize")
    bits = _per_sample(bits, images.shape[0], "posterize bits").long()
    if ((bits < 0) | (bits > 8)).any():
        raise ValueError(f"posterize bits must lie in [0, 8], got {bits.tolist()}")
    q = _to_uint8(images)
    mask = _to_device((255 - (2 ** (8 - bits) - 1)).to(torch.uint8), q.device)  # ~(2**(8-bits)-1) & 0xFF
    return _from_uint8(q & mask[:, None, None, None], images.dtype)


def solarize(images: torch.Tensor, threshold) -> torch.Tensor:
    """PIL ``ImageOps.solarize``: invert (255 - v) every value ``v >= threshold`` (per image)."""
    _check_images(images, "solarize")
    threshold = _per_sample(threshold, images.shape[0], "solarize threshold").to(torch.int16)
    q = _to_uint8(images).to(torch.int16)
    thr = _to_device(threshold, q.device)[:, None, None, None]
    out = torch.where(q >= thr, 255 - q, q)
    return _from_uint8(out, images.dtype)


# ---------------------------------------------------------------------------------------
# geometric ops: PIL's Image.transform(AFFINE, BILINEAR) semantics in one grid_sample


def affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Per-image affine warp with PIL's ``Image.transform(size, AFFINE, m, BILINEAR)`` semantics.

    ``matrices`` is N x 2 x 3 (or N x 6) ``(a, b, c, d, e, f)`` mapping OUTPUT to INPUT
    coordinates, as PIL takes them: output pixel (x, y) samples the input at
    ``(a X + b Y + c, d X + e Y + f)`` with ``X = x + 0.5, Y = y + 0.5`` (pixel centres).
    Like PIL, points outside ``[0, W) x [0, H)`` become 0 (black) and points inside use
    bilinear interpolation with edge clamping, which is ``grid_sample(padding_mode="border",
    align_corners=False)`` times an inside mask.
    """
    _check_images(images, "affine")
    n, _, h, w = images.shape
    m = torch.as_tensor(matrices, dtype=torch.float64).reshape(-1, 6)
    if m.shape[0] != n:
        raise ValueError(f"affine needs one matrix per image ({n}), got {m.shape[0]}")
    if n == 0:
        return images.clone()
    m = _to_device(m.to(torch.float32), images.device)[:, :, None, None]
    ys = (torch.arange(h, device=images.device, dtype=torch.float32) + 0.5)[:, None]
    xs = (torch.arange(w, device=images.device, dtype=torch.float32) + 0.5)[None, :]
    u = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # N x H x W input x (continuous, pixel edges)
    v = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    grid = torch.stack((u * (2.0 / w) - 1.0, v * (2.0 / h) - 1.0), dim=-1)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out * inside[:, None].to(out.dtype)
    return out.to(images.dtype)


def _rotate_matrices(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # PIL Image.rotate: counter-clockwise by `degrees` about (w/2, h/2); output->input matrix
    # [cos a, sin a, ., -sin a, cos a, .] with a = -radians(degrees), centre kept fixed.
    a = -torch.deg2rad(degrees)
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return torch.stack((cos, sin, c, -sin, cos, f), dim=-1)


def _shear_x_matrices(s: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return torch.stack((one, s, zero, zero, one, zero), dim=-1)


def _shear_y_matrices(s: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return torch.stack((one, zero, zero, s, one, zero), dim=-1)


def _translate_x_matrices(t: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return torch.stack((one, zero, t, zero, one, zero), dim=-1)


def _translate_y_matrices(t: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return torch.stack((one, zero, zero, zero, one, t), dim=-1)


def rotate(images: torch.Tensor, degrees) -> torch.Tensor:
    """PIL ``img.rotate(degrees, resample=BILINEAR)``: counter-clockwise about the centre, black fill."""
    _check_images(images, "rotate")
    deg = _per_sample(degrees, images.shape[0], "rotate degrees")
    return affine(images, _rotate_matrices(deg, images.shape[-2], images.shape[-1]))


def shear_x(images: torch.Tensor, s) -> torch.Tensor:
    """PIL affine ``(1, s, 0, 0, 1, 0)``: output(x, y) = input(x + s*y, y) (about the top-left corner)."""
    _check_images(images, "shear_x")
    return affine(images, _shear_x_matrices(_per_sample(s, images.shape[0], "shear_x s")))


def shear_y(images: torch.Tensor, s) -> torch.Tensor:
    """PIL affine ``(1, 0, 0, s, 1, 0)``: output(x, y) = input(x, y + s*x)."""
    _check_images(images, "shear_y")
    return affine(images, _shear_y_matrices(_per_sample(s, images.shape[0], "shear_y s")))


def translate_x(images: torch.Tensor, t) -> torch.Tensor:
    """PIL affine ``(1, 0, t, 0, 1, 0)``: output(x, y) = input(x + t, y), black where nothing comes in."""
    _check_images(images, "translate_x")
    return affine(images, _translate_x_matrices(_per_sample(t, images.shape[0], "translate_x t")))


def translate_y(images: torch.Tensor, t) -> torch.Tensor:
    """PIL affine ``(1, 0, 0, 0, 1, t)``: output(x, y) = input(x, y + t)."""
    _check_images(images, "translate_y")
    return affine(images, _translate_y_matrices(_per_sample(t, images.shape[0], "translate_y t")))


# ---------------------------------------------------------------------------------------
# level -> parameter, as in AugMix's augmentations.py (levels are U(0.1, severity))


def _param_rotate(levels, signs, h, w):
    return signs * int_parameter(levels, 30)


def _param_shear(levels, signs, h, w):
    return signs * float_parameter(levels, 0.3)


def _param_translate(levels, signs, h, w):
    # AugMix: int_parameter(level, IMAGE_SIZE / 3) with IMAGE_SIZE the (square) image size.
    return signs * int_parameter(levels, w / 3)


def _param_posterize(levels, signs, h, w):
    return 4 - int_parameter(levels, 4)


def _param_solarize(levels, signs, h, w):
    return 256 - int_parameter(levels, 256)


_GEOMETRIC_MATRIX: dict[str, Callable] = {
    "rotate": lambda p, h, w: _rotate_matrices(p, h, w),
    "shear_x": lambda p, h, w: _shear_x_matrices(p),
    "shear_y": lambda p, h, w: _shear_y_matrices(p),
    "translate_x": lambda p, h, w: _translate_x_matrices(p),
    "translate_y": lambda p, h, w: _translate_y_matrices(p),
}
_PARAM: dict[str, Callable] = {
    "rotate": _param_rotate,
    "shear_x": _param_shear,
    "shear_y": _param_shear,
    "translate_x": _param_translate,
    "translate_y": _param_translate,
    "posterize": _param_posterize,
    "solarize": _param_solarize,
}


def _make_op(name: str) -> Callable:
    def op(images: torch.Tensor, levels=None, signs=None) -> torch.Tensor:
        _check_images(images, name)
        n, _, h, w = images.shape
        if name == "autocontrast":
            return autocontrast(images)
        if name == "equalize":
            return equalize(images)
        if levels is None:
            raise ValueError(f"op {name!r} needs per-image levels")
        levels = _per_sample(levels, n, f"{name} levels")
        signs = torch.ones(n, dtype=torch.float64) if signs is None else _per_sample(signs, n, f"{name} signs")
        param = _PARAM[name](levels, signs, h, w)
        if name == "posterize":
            return posterize(images, param)
        if name == "solarize":
            return solarize(images, param)
        return affine(images, _GEOMETRIC_MATRIX[name](param, h, w))

    op.__name__ = name
    op.__doc__ = f"APR-S op {name!r} on a batch: ``op(images, levels, signs)`` (levels as AugMix's, signs +-1)."
    return op


#: name -> batched op ``fn(images N x C x H x W, levels (N,) or scalar, signs (N,) of +-1)``.
#: Levels map to parameters exactly as AugMix's ``augmentations.py``; autocontrast and
#: equalize ignore levels/signs, posterize and solarize ignore signs.
OPS: dict[str, Callable] = {name: _make_op(name) for name in OP_NAMES}


def _apply_ops(x: torch.Tensor, op_index: torch.Tensor, levels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Image k gets op ``OP_NAMES[op_index[k]]``; one call per colour op, one grid_sample for all geometric ones."""
    out = torch.empty_like(x)  # every image gets exactly one op, so every row is written below
    n, _, h, w = x.shape
    geo_rows, geo_mats = [], []
    for k, name in enumerate(OP_NAMES):
        rows = (op_index == k).nonzero().reshape(-1)  # CPU: no device sync
        if rows.numel() == 0:
            continue
        if name in _GEOMETRIC_MATRIX:
            geo_rows.append(rows)
            geo_mats.append(_GEOMETRIC_MATRIX[name](_PARAM[name](levels[rows], signs[rows], h, w), h, w))
            continue
        rows_d = _to_device(rows, x.device)
        out[rows_d] = OPS[name](x[rows_d], levels[rows], signs[rows])
    if geo_rows:
        rows_d = _to_device(torch.cat(geo_rows), x.device)
        out[rows_d] = affine(x[rows_d], torch.cat(geo_mats))
    return out


# ---------------------------------------------------------------------------------------
# APR-S


@dataclass
class APRSParams:
    """Every random choice of one APR-S call (CPU tensors of length N), drawn before the images are touched.

    ``recombined[k]``: False -> image k is ``op1(x)``; True -> ``x2 = op2(op1(x))`` and the
    result is amplitude(x1)+phase(x2) if ``amplitude_from_first[k]`` else amplitude(x2)+phase(x1).
    """

    op1: torch.Tensor
    level1: torch.Tensor
    sign1: torch.Tensor
    recombined: torch.Tensor
    op2: torch.Tensor
    level2: torch.Tensor
    sign2: torch.Tensor
    amplitude_from_first: torch.Tensor


def sample_apr_s_params(batch: int, generator: Optional[torch.Generator] = None, severity: float = 3.0) -> APRSParams:
    """Draw APR-S's choices for ``batch`` images from ``generator`` (one call, fixed order)."""
    if severity < 0.1:
        raise ValueError(f"APR-S severity must be >= 0.1 (levels are U(0.1, severity)), got {severity}")
    u = _rand((batch, 8), generator)
    n_ops = len(OP_NAMES)

    def sign(col):  # AugMix: `if np.random.uniform() > 0.5: value = -value`
        return torch.where(col > 0.5, -1.0, 1.0).to(torch.float64)

    return APRSParams(
        op1=(u[:, 0] * n_ops).long().clamp_max(n_ops - 1),
        level1=0.1 + (severity - 0.1) * u[:, 1],
        sign1=sign(u[:, 2]),
        recombined=u[:, 3] <= 0.5,  # reference: `if p > 0.5: return x1`
        op2=(u[:, 4] * n_ops).long().clamp_max(n_ops - 1),
        level2=0.1 + (severity - 0.1) * u[:, 5],
        sign2=sign(u[:, 6]),
        amplitude_from_first=u[:, 7] > 0.5,  # reference: p > 0.5 -> abs_1 * exp(i angle_2)
    )


def _check_overflow(overflow: str, fn: str) -> None:
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"{fn}: overflow must be one of {', '.join(OVERFLOW_MODES)}; got {overflow!r}")


def _apr_s_float(
    x: torch.Tensor, params: APRSParams, dim: tuple[int, ...], overflow: str, want_spectrum: bool, compile: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """APR-S on float images ``x``; also the half spectrum of the result when ``want_spectrum``.

    The spectrum of every ``x1 = op1(x)`` is computed once and serves both as APR-S's
    amplitude/phase source and, for the images APR-S leaves as ``x1``, as APR-P's input
    spectrum. A recombined image is transformed once more only when ``overflow`` changes it
    (clamp, wrap); with ``none`` its spectrum is the closed form ``|A| * P / |P|`` itself.
    """
    sizes = [x.shape[d] for d in dim]
    x1 = _apply_ops(x, params.op1, params.level1, params.sign1)
    spectrum = real_spectrum(x1, dim) if want_spectrum else None
    rows = params.recombined.nonzero().reshape(-1)
    if rows.numel() == 0:
        return x1, spectrum
    rows_d = _to_device(rows, x.device)
    first = x1[rows_d]
    first_spec = spectrum[rows_d] if spectrum is not None else real_spectrum(first, dim)
    second_spec = real_spectrum(_apply_ops(first, params.op2[rows], params.level2[rows], params.sign2[rows]), dim)
    keep_first = _to_device(params.amplitude_from_first[rows], x.device)[:, None, None, None]
    amplitude = torch.where(keep_first, first_spec, second_spec).abs()
    mixed = swap_amplitude(torch.where(keep_first, second_spec, first_spec), amplitude, inplace=True, compile=compile)
    recombined = fit_range(image_from_spectrum(mixed, sizes, dim), overflow)
    x1[rows_d] = recombined.to(x1.dtype)
    if spectrum is not None:
        spectrum[rows_d] = mixed if overflow == "none" else real_spectrum(recombined, dim)
    return x1, spectrum


def apply_apr_s(
    images: torch.Tensor, params: APRSParams, dim: Sequence[int] = CHANNEL_SPATIAL, overflow: str = "clamp"
) -> torch.Tensor:
    """Apply APR-S with the given choices (see :class:`APRSParams`); same dtype/device/shape out.

    ``overflow`` (``apr.fourier.fit_range``): ``clamp`` (default), ``wrap`` (the reference's
    uint8 cast), ``none`` (unclipped).
    """
    _check_images(images, "apr_s")
    dim = _check_dim(dim, "apr_s")
    _check_overflow(overflow, "apr_s")
    if params.op1.numel() != images.shape[0]:
        raise ValueError(f"APR-S params are for {params.op1.numel()} images, the batch has {images.shape[0]}")
    out, _ = _apr_s_float(images.float(), params, dim, overflow, want_spectrum=False, compile=False)
    return out.to(images.dtype)


def apr_s(
    images: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    severity: float = 3.0,
    dim: Sequence[int] = CHANNEL_SPATIAL,
    overflow: str = "clamp",
) -> torch.Tensor:
    """APR-S (the reference's ``APRecombination``) on a batch, every image with its own random ops.

    x1 = op1(x); half the images keep x1; the others get x2 = op2(x1) and, with equal
    chance, amplitude(x1)+phase(x2) or amplitude(x2)+phase(x1). Ops and levels as AugMix
    (levels U(0.1, severity)). Float images in [0, 1] (float32/bfloat16/float16, any
    device) in; same dtype, device and shape out, clamped to [0, 1] (see ``overflow``).
    """
    _check_images(images, "apr_s")
    return apply_apr_s(images, sample_apr_s_params(images.shape[0], generator, severity), dim=dim, overflow=overflow)


# ---------------------------------------------------------------------------------------
# APR-P


@dataclass
class APRPParams:
    """APR-P's random choices (CPU tensors): ``rows`` recombined, image k takes the amplitude of ``perm[k]``."""

    rows: torch.Tensor
    perm: torch.Tensor


def sample_apr_p_params(
    batch: int, prob: float = 0.6, generator: Optional[torch.Generator] = None, per_sample: bool = False
) -> APRPParams:
    """Draw APR-P's coin(s) then its permutation (always both, so the generator advances the same)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"apr_p prob must lie in [0, 1], got {prob}")
    coins = _rand(batch if per_sample else 1, generator)
    perm = _randperm(batch, generator)
    apply = coins < prob if per_sample else (coins < prob).expand(batch)
    return APRPParams(rows=apply.nonzero().reshape(-1), perm=perm)


def _space_stats(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    if mean is None or std is None:
        raise ValueError("APR-P in normalized space needs the data's mean and std (3 values each)")
    to = lambda v: _to_device(torch.as_tensor(v, dtype=torch.float64).reshape(1, -1, 1, 1), device)  # noqa: E731
    return to(mean), to(std)


def apply_apr_p(
    images: torch.Tensor,
    params: APRPParams,
    dim: Sequence[int] = CHANNEL_SPATIAL,
    clamp: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    spectrum: Optional[torch.Tensor] = None,
    compile: bool = False,
) -> torch.Tensor:
    """Apply APR-P with the given choices; ONE forward transform per image serves amplitude and phase.

    ``mean``/``std`` given: recombine the normalised images ``(x - mean) / std`` (the
    reference's ImageNet script) and map the result back with ``y * std + mean`` (no clamp
    before, so the model's own normalisation sees exactly the reference's tensor).
    ``clamp=False`` leaves the result unclipped (the reference). ``spectrum``: the images'
    half spectrum when the caller has it (fused APR-SP, [0, 1] space only); it is overwritten.
    """
    _check_images(images, "apr_p")
    dim = _check_dim(dim, "apr_p")
    rows = params.rows
    if rows.numel() == 0:
        return images
    device = images.device
    x = images.to(torch.float64 if images.dtype == torch.float64 else torch.float32)
    normalized = mean is not None or std is not None
    if normalized:
        mean_d, std_d = (t.to(x.dtype) for t in _space_stats(mean, std, device))
        x = (x - mean_d) / std_d
    if spectrum is None or normalized:
        spectrum = real_spectrum(x, dim)
    magnitude = spectrum.abs()
    everyone = rows.numel() == images.shape[0]
    perm_d = _to_device(params.perm if everyone else params.perm[rows], device)
    rows_d = None if everyone else _to_device(rows, device)
    phase = spectrum if everyone else spectrum[rows_d]
    # the spectrum is ours (or handed over by apply_apr_sp) and the amplitudes are gathered: overwrite it
    mixed = swap_amplitude(phase, magnitude[perm_d], inplace=True, compile=compile)
    out = image_from_spectrum(mixed, [x.shape[d] for d in dim], dim)
    if normalized:
        out = out.mul_(std_d).add_(mean_d)
    if clamp:
        out = out.clamp_(0.0, 1.0)
    if everyone:  # the usual case (batch coin): no copy of the untouched images needed
        return out.to(images.dtype)
    result = images.clone()
    result[rows_d] = out.to(images.dtype)
    return result


def apr_p(
    images: torch.Tensor,
    prob: float = 0.6,
    generator: Optional[torch.Generator] = None,
    per_sample: bool = False,
    dim: Sequence[int] = CHANNEL_SPATIAL,
    clamp: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """APR-P (the reference's ``mix_data``): each image keeps its phase and takes the amplitude of ``images[perm]``.

    ``perm = torch.randperm(N)``. With probability ``prob`` the whole batch is recombined
    (one coin per batch, as the reference); ``per_sample=True`` flips one coin per image.
    Both the coin(s) and the permutation are always drawn, so ``generator`` advances by the
    same amount every call. When nothing is recombined the input tensor itself is returned.
    Labels are untouched: the training loop pairs the result with the original labels.
    ``clamp``/``mean``/``std``: see :func:`apply_apr_p`.
    """
    _check_images(images, "apr_p")
    params = sample_apr_p_params(images.shape[0], prob, generator, per_sample)
    return apply_apr_p(images, params, dim, clamp=clamp, mean=mean, std=std)


def apply_apr_sp(
    images: torch.Tensor,
    s_params: APRSParams,
    p_params: APRPParams,
    dim: Sequence[int] = CHANNEL_SPATIAL,
    s_overflow: str = "clamp",
    p_clamp: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused APR-SP: ``(s, apr_p(s))`` with ``s = apr_s(images)``, sharing the forward transforms.

    Equal (to float rounding) to :func:`apply_apr_s` then :func:`apply_apr_p`, at 2 forward
    transforms per N images instead of 3 (1.5 with ``s_overflow="none"``, where no clamp sits
    between the two recombinations; in normalized space APR-P transforms its input anew).
    ``s`` stays float32 between the two steps (the unfused chain rounds it to the input dtype).
    """
    _check_images(images, "apr_sp")
    dim = _check_dim(dim, "apr_sp")
    _check_overflow(s_overflow, "apr_sp")
    normalized = mean is not None or std is not None
    s, spectrum = _apr_s_float(images.float(), s_params, dim, s_overflow, not normalized, compile)
    sp = apply_apr_p(s, p_params, dim, clamp=p_clamp, mean=mean, std=std, spectrum=spectrum, compile=compile)
    return s.to(images.dtype), sp.to(images.dtype)


def apr_sp(
    images: torch.Tensor,
    prob: float = 0.6,
    generator: Optional[torch.Generator] = None,
    severity: float = 3.0,
    per_sample: bool = False,
    dim: Sequence[int] = CHANNEL_SPATIAL,
) -> torch.Tensor:
    """APR-SP: ``apr_p(apr_s(images))`` (both drawing from the same generator, S first), fused."""
    _check_images(images, "apr_sp")
    s_params = sample_apr_s_params(images.shape[0], generator, severity)
    p_params = sample_apr_p_params(images.shape[0], prob, generator, per_sample)
    return apply_apr_sp(images, s_params, p_params, dim)[1]


# ---------------------------------------------------------------------------------------
# training-loop policy


@dataclass(frozen=True)
class APRPolicy:
    """What the training loop does with each batch: returns ``(first, second_or_None)``.

    The loop computes the cross-entropy on ``cat([first, second])`` with the labels
    repeated, as the reference's ``train`` does (loss = CE(x) + CE(x_apr)). The pairs mirror
    the reference, where APR-S runs in the data pipeline and ``mix_data`` (APR-P) in the loop:

    * ``none``   -> ``(x, None)``: plain training, one forward of N images;
    * ``apr_p``  -> ``(x, apr_p(x))``;
    * ``apr_s``  -> ``(x, apr_s(x))``;
    * ``apr_sp`` -> ``(s, apr_p(s))`` with ``s = apr_s(x)`` (the clean image is never seen, as
      in the reference where APR-S replaced it in the loader); with ``sp_clean_first=True``
      ``(x, apr_p(s))`` instead: the first half stays clean (not the reference; an option).
      Computed by the fused :func:`apply_apr_sp`.

    Reference-reproduction switches (defaults are ours): ``p_space="normalized"`` with the
    data's ``mean``/``std`` (the reference's ImageNet APR-P), ``s_overflow="wrap"`` (its uint8
    cast of APR-S), ``p_clamp=False`` (its unclipped APR-P).
    """

    name: str = "none"
    p_prob: float = 0.6
    p_per_sample: bool = False
    s_severity: float = 3.0
    dims: str = "chw"
    sp_clean_first: bool = False
    p_space: str = "unit"  # unit: APR-P on [0, 1] images | normalized: on (x - mean) / std (reference ImageNet)
    mean: Optional[tuple[float, ...]] = None  # the data's normalisation, needed by p_space="normalized"
    std: Optional[tuple[float, ...]] = None
    s_overflow: str = "clamp"  # clamp | wrap (the reference's uint8 cast) | none
    p_clamp: bool = True  # False: APR-P's result unclipped (the reference)
    compile: bool = False  # torch.compile the Fourier elementwise kernel (falls back to eager)
    s_prob: float = 1.0  # apr_s / apr_sp: chance that APR-S replaces each image (reference FGSM-AT's prob_s)

    def __post_init__(self):
        if self.name not in POLICY_NAMES:
            raise ValueError(f"APRPolicy name must be one of {', '.join(POLICY_NAMES)}; got {self.name!r}")
        if self.dims not in DIMS:
            raise ValueError(f"APRPolicy dims must be 'chw' or 'hw'; got {self.dims!r}")
        if not 0.0 <= self.p_prob <= 1.0:
            raise ValueError(f"APRPolicy p_prob must lie in [0, 1], got {self.p_prob}")
        if self.s_severity < 0.1:
            raise ValueError(f"APRPolicy s_severity must be >= 0.1, got {self.s_severity}")
        if self.p_space not in P_SPACES:
            raise ValueError(f"APRPolicy p_space must be one of {', '.join(P_SPACES)}; got {self.p_space!r}")
        if self.p_space == "normalized" and (self.mean is None or self.std is None or len(self.mean) != 3
                                             or len(self.std) != 3 or min(self.std) <= 0):
            raise ValueError("APRPolicy p_space='normalized' needs mean and std (3 values each, std > 0): "
                             "pass the data's, e.g. APRPolicy.from_config(cfg.aug, cfg.data.mean, cfg.data.std)")
        _check_overflow(self.s_overflow, "APRPolicy s_overflow")
        if not 0.0 <= self.s_prob <= 1.0:
            raise ValueError(f"APRPolicy s_prob must lie in [0, 1], got {self.s_prob}")

    @classmethod
    def from_config(cls, aug, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> "APRPolicy":
        """From ``apr.config.AugConfig``; ``mean``/``std`` (``cfg.data``'s) are needed by ``p_space: normalized``."""
        return cls(
            name=aug.name,
            p_prob=float(aug.p_prob),
            p_per_sample=bool(aug.p_per_sample),
            s_severity=float(aug.s_severity),
            dims=aug.fourier_dims,
            sp_clean_first=bool(getattr(aug, "sp_clean_first", False)),
            p_space=getattr(aug, "p_space", "unit"),
            mean=None if mean is None else tuple(float(v) for v in mean),
            std=None if std is None else tuple(float(v) for v in std),
            s_overflow=getattr(aug, "s_overflow", "clamp"),
            p_clamp=bool(getattr(aug, "p_clamp", True)),
            compile=bool(getattr(aug, "compile", False)),
            s_prob=float(getattr(aug, "s_prob", 1.0)),
        )

    @property
    def dim(self) -> tuple[int, ...]:
        return DIMS[self.dims]

    @property
    def doubles_batch(self) -> bool:
        """Whether the loop forwards 2N images per batch."""
        return self.name != "none"

    @property
    def p_stats(self) -> tuple[Optional[tuple[float, ...]], Optional[tuple[float, ...]]]:
        """(mean, std) for APR-P in normalized space, (None, None) in [0, 1] space."""
        return (self.mean, self.std) if self.p_space == "normalized" else (None, None)

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None):
        if self.name == "none":
            return images, None
        mean, std = self.p_stats
        n = images.shape[0]
        if self.name == "apr_p":
            params = sample_apr_p_params(n, self.p_prob, generator, self.p_per_sample)
            return images, apply_apr_p(images, params, self.dim, self.p_clamp, mean, std, compile=self.compile)
        if self.name == "apr_s":
            s_params, keep = sample_apr_s_params(n, generator, self.s_severity), self._s_coins(n, generator)
            return images, self._partial_s(images, s_params, keep)
        s_params, keep = sample_apr_s_params(n, generator, self.s_severity), self._s_coins(n, generator)
        p_params = sample_apr_p_params(n, self.p_prob, generator, self.p_per_sample)
        if keep is None:
            s, sp = apply_apr_sp(images, s_params, p_params, self.dim, self.s_overflow, self.p_clamp, mean, std,
                                 compile=self.compile)
        else:
            s = self._partial_s(images, s_params, keep)
            sp = apply_apr_p(s, p_params, self.dim, self.p_clamp, mean, std, compile=self.compile)
        return (images if self.sp_clean_first else s), sp

    def _s_coins(self, n: int, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """Which images APR-S replaces (``s_prob < 1``); None: all of them, and no number drawn, so
        ``s_prob: 1`` keeps the generator's sequence of the runs before the option existed."""
        return None if self.s_prob >= 1.0 else _rand(n, generator) < self.s_prob

    def _partial_s(self, images: torch.Tensor, s_params: "APRSParams", keep: Optional[torch.Tensor]) -> torch.Tensor:
        """APR-S of ``images``, kept only where ``keep`` (as the reference's loader ``RandomApply``)."""
        s = apply_apr_s(images, s_params, self.dim, self.s_overflow)
        if keep is None:
            return s
        return torch.where(keep.to(images.device).view(-1, 1, 1, 1), s, images)

# ---------------------------------------------------------------------------------------
# reference CIFAR pipeline: APR-S in the loader, before the crop (data.apr_s_before_crop)


def split_apr_s_for_loader(policy: APRPolicy) -> tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], APRPolicy]:
    """Split APR-SP into ``(pre_crop, loop_policy)``: APR-S as a loader's pre-crop transform of the
    uncropped [0, 1] images, and the APR-P-only policy the loop applies to the loader's (APR-S, cropped,
    flipped) batch. The loop's pair is then ``(s, apr_p(s))``, the reference CIFAR pipeline
    (``APRecombination`` -> ``RandomCrop`` -> flip in the dataset, ``mix_data`` on the batch)."""
    if policy.name != "apr_sp" or policy.sp_clean_first:
        raise ValueError("only APR-SP with sp_clean_first=False splits into loader APR-S + loop APR-P (the "
                         f"reference's --aug aprs); got name={policy.name!r}, sp_clean_first={policy.sp_clean_first}")

    def pre_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return apr_s(images, generator, policy.s_severity, policy.dim, policy.s_overflow)

    from dataclasses import replace

    return pre_crop, replace(policy, name="apr_p")


def training_policy(cfg) -> APRPolicy:
    """The policy the training loop applies for a run config: ``APRPolicy.from_config(cfg.aug, data mean,
    std)``, less its APR-S half when ``data.apr_s_before_crop`` moves APR-S into the loader."""
    policy = APRPolicy.from_config(cfg.aug, cfg.data.mean, cfg.data.std)
    return split_apr_s_for_loader(policy)[1] if getattr(cfg.data, "apr_s_before_crop", False) else policy


def loader_apr_s(cfg) -> Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]]:
    """The CIFAR loader's pre-crop transform for a run config: APR-S when ``data.apr_s_before_crop``, else None."""
    if not getattr(cfg.data, "apr_s_before_crop", False):
        return None
    return split_apr_s_for_loader(APRPolicy.from_config(cfg.aug, cfg.data.mean, cfg.data.std))[0]
