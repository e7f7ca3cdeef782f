"""apr.augment against per-image references written here: PIL ops (AugMix's definitions) and NumPy FFTs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from apr import augment as A
from apr.augment import OP_NAMES, OPS, APRPolicy, apr_p, apr_s, apr_sp, apply_apr_s, sample_apr_s_params
from apr.config import AugConfig
from apr.fourier import recombine
from conftest import assert_images_close, image_errors, sample_photos


# ---------------------------------------------------------------------------------------
# independent per-image reference: AugMix's op definitions on PIL images, NumPy FFT recombination


def ref_int_parameter(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def ref_float_parameter(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0


def pil_op(name: str, img: Image.Image, level: float, sign: float) -> Image.Image:
    """AugMix's op with an explicit level and sign (sign -1 where AugMix's coin said 'negate')."""
    w, h = img.size
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "posterize":
        return ImageOps.posterize(img, 4 - ref_int_parameter(level, 4))
    if name == "solarize":
        return ImageOps.solarize(img, 256 - ref_int_parameter(level, 256))
    if name == "rotate":
        return img.rotate(sign * ref_int_parameter(level, 30), resample=Image.BILINEAR)
    if name in ("shear_x", "shear_y"):
        s = sign * ref_float_parameter(level, 0.3)
        m = (1, s, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, s, 1, 0)
        return img.transform((w, h), Image.AFFINE, m, resample=Image.BILINEAR)
    t = sign * ref_int_parameter(level, w / 3)
    m = (1, 0, t, 0, 1, 0) if name == "translate_x" else (1, 0, 0, 0, 1, t)
    return img.transform((w, h), Image.AFFINE, m, resample=Image.BILINEAR)


def np_recombine(amplitude_img: np.ndarray, phase_img: np.ndarray) -> np.ndarray:
    fa, fp = np.fft.fftn(amplitude_img), np.fft.fftn(phase_img)
    return np.real(np.fft.ifftn(np.abs(fa) * np.exp(1j * np.angle(fp))))


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """The two scikit-learn sample photos, downscaled to 48 x 64 (float32 2 x 3 x 48 x 64, uint8 grid)."""
    return torch.from_numpy(sample_photos(48, 64).astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def digits(digits_images) -> torch.Tensor:
    images, _ = digits_images
    return torch.from_numpy(images[:16].astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()



# ---------------------------------------------------------------------------------------
# each op vs PIL


@pytest.mark.parametrize("name", ["autocontrast", "equalize", "posterize", "solarize"])
def test_colour_ops_equal_pil(photos, digits, name):
    for images in (photos, digits[:4], photos * 0.5 + 0.2):  # also a low-contrast version
        images = (images * 255).round() / 255
        for level in (0.1, 1.3, 2.95, 7.0):
            out = OPS[name](images, torch.full((images.shape[0],), level), torch.ones(images.shape[0]))
            assert out.shape == images.shape and out.dtype == images.dtype
            for k in range(images.shape[0]):
                ref = from_pil(pil_op(name, to_pil(images[k]), level, 1.0))
                torch.testing.assert_close(out[k], ref, atol=1e-6, rtol=0, msg=f"{name} level {level} image {k}")  # < 1/255


def test_colour_ops_do_something(photos):
    low = (photos * 0.5 + 0.2).mul(255).round().div(255)
    ac = A.autocontrast(low)
    assert torch.equal(ac.amin(dim=(-2, -1)), torch.zeros(2, 3))
    # PIL's truncating LUT can map the brightest value to 254 (255/(hi-lo) rounding), as here
    assert (ac.amax(dim=(-2, -1)) >= 254 / 255).all() and (low.amax(dim=(-2, -1)) < 0.8).all()
    assert torch.equal((A.posterize(photos, 3) * 255).round() % 32, torch.zeros_like(photos))
    thr = 180
    q = (photos * 255).round()
    sol = A.solarize(photos, thr) * 255
    assert torch.equal(sol.round(), torch.where(q >= thr, 255 - q, q))
    flat = torch.full((1, 3, 8, 8), 128 / 255)  # constant channel, on the 0..255 grid
    torch.testing.assert_close(A.autocontrast(flat), flat, atol=1e-6, rtol=0)
    torch.testing.assert_close(A.equalize(flat), flat, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_geometric_ops_match_pil_transform(photos, digits, name, sign):
    """PIL truncates its bilinear result to uint8; ours stays float: equal within one grey level."""
    for images in (photos, digits[:3]):
        for level in (1.3, 2.95, 9.0):
            n = images.shape[0]
            out = OPS[name](images, torch.full((n,), level), torch.full((n,), sign))
            for k in range(n):
                ref = from_pil(pil_op(name, to_pil(images[k]), level, sign))
                diff = (out[k] - ref) * 255
                assert diff.abs().max() <= 1.0 + 1e-3, (name, level, sign, k, diff.abs().max())
                assert -0.05 < diff.mean() < 1.0  # truncation bias only, no shift
                black = ref == 0  # same black (filled) area as PIL, up to dark pixels
                assert (out[k][black] <= 1.0 / 255 + 1e-4).all()


def test_translate_shifts_by_exact_pixels_and_fills_black(digits):
    x = digits[:4]
    w = x.shape[-1]
    for level, sign in ((2.95, 1.0), (2.95, -1.0), (1.3, 1.0)):
        t = int(sign * ref_int_parameter(level, w / 3))
        assert t != 0
        ox = OPS["translate_x"](x, level, sign)
        oy = OPS["translate_y"](x, level, sign)
        if t > 0:
            assert torch.allclose(ox[..., :, : w - t], x[..., :, t:], atol=1e-5)
            torch.testing.assert_close(ox[..., :, w - t :], torch.zeros_like(ox[..., :, w - t :]), atol=1e-5, rtol=0)
            assert torch.allclose(oy[..., : w - t, :], x[..., t:, :], atol=1e-5)
        else:
            assert torch.allclose(ox[..., :, -t:], x[..., :, : w + t], atol=1e-5)
            torch.testing.assert_close(ox[..., :, :-t], torch.zeros_like(ox[..., :, :-t]), atol=1e-5, rtol=0)
            assert torch.allclose(oy[..., -t:, :], x[..., : w + t, :], atol=1e-5)


def test_rotate_is_counter_clockwise_about_the_centre():
    img = torch.zeros(1, 1, 21, 21)
    img[0, 0, 10, 17] = 1.0  # right of the centre pixel (10, 10)
    out = A.rotate(img, 90.0)
    # counter-clockwise by 90 degrees (y down): the dot moves above the centre
    assert out[0, 0].argmax().item() == 3 * 21 + 10
    assert math.isclose(out.sum().item(), 1.0, abs_tol=1e-4)
    assert torch.allclose(A.rotate(img, 0.0), img)


def test_ops_per_sample_parameters(photos):
    """One call with different parameters per image equals separate calls."""
    x = torch.cat([photos, photos])
    levels = torch.tensor([0.5, 1.5, 2.5, 2.9])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0])
    for name in OP_NAMES:
        batched = OPS[name](x, levels, signs)
        for k in range(4):
            single = OPS[name](x[k : k + 1], levels[k : k + 1], signs[k : k + 1])
            assert torch.allclose(batched[k], single[0], atol=1e-6), name


def test_op_errors():
    with pytest.raises(ValueError, match="N x C x H x W"):
        A.autocontrast(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="float images"):
        A.equalize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one value per image"):
        A.rotate(torch.rand(2, 3, 8, 8), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="bits"):
        A.posterize(torch.rand(1, 3, 8, 8), 9)
    with pytest.raises(ValueError, match="levels"):
        OPS["rotate"](torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------
# APR-S


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apr_s_keeps_shape_dtype_device_and_range(digits, dtype):
    x = digits.to(dtype)
    out = apr_s(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert (out.float() - x.float()).abs().amax(dim=(1, 2, 3)).gt(0.01).float().mean() > 0.5


def test_apr_s_reproducible_with_generator(digits):
    a = apr_s(digits, torch.Generator().manual_seed(3))
    b = apr_s(digits, torch.Generator().manual_seed(3))
    c = apr_s(digits, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = apr_s(digits)
    torch.manual_seed(5)
    assert torch.equal(d, apr_s(digits))


@pytest.mark.parametrize("dim", [(-3, -2, -1), (-2, -1)])
def test_apr_s_equals_per_image_composition(digits, photos, dim):
    """The batched path (grouped by op, one grid_sample) equals image-by-image op1/op2/recombine."""
    x = torch.cat([digits, photos[:, :, :32, :32]])
    n = x.shape[0]
    params = sample_apr_s_params(n, torch.Generator().manual_seed(11))
    out = apply_apr_s(x, params, dim=dim)
    axes = tuple(d + 3 for d in dim)
    for k in range(n):
        xk = x[k : k + 1]
        x1 = OPS[OP_NAMES[params.op1[k]]](xk, params.level1[k : k + 1], params.sign1[k : k + 1])
        if not params.recombined[k]:
            expected = x1[0].numpy()
        else:
            x2 = OPS[OP_NAMES[params.op2[k]]](x1, params.level2[k : k + 1], params.sign2[k : k + 1])
            a, p = (x1, x2) if params.amplitude_from_first[k] else (x2, x1)
            fa = np.fft.fftn(a[0].double().numpy(), axes=axes)
            fp = np.fft.fftn(p[0].double().numpy(), axes=axes)
            expected = np.clip(np.real(np.fft.ifftn(np.abs(fa) * np.exp(1j * np.angle(fp)), axes=axes)), 0, 1)
        np.testing.assert_allclose(out[k].numpy(), expected, atol=2e-5, err_msg=f"image {k}")


def test_apr_s_close_to_the_pil_numpy_reference_pipeline(photos, digits):
    """The whole APR-S path vs APRecombination's per-image PIL + NumPy code path at the same draws."""
    x = torch.cat([digits, photos[:, :, :32, :32]])
    params = sample_apr_s_params(x.shape[0], torch.Generator().manual_seed(2))
    out = apply_apr_s(x, params)
    single_errors, recombined_errors = [], []
    for k in range(x.shape[0]):
        img = pil_op(OP_NAMES[params.op1[k]], to_pil(x[k]), params.level1[k].item(), params.sign1[k].item())
        if not params.recombined[k]:
            single_errors.append((out[k] - from_pil(img)).abs().max().item())
            continue
        img2 = pil_op(OP_NAMES[params.op2[k]], img.copy(), params.level2[k].item(), params.sign2[k].item())
        x1, x2 = np.asarray(img).astype(np.float64), np.asarray(img2).astype(np.float64)
        ref = np_recombine(x1, x2) if params.amplitude_from_first[k] else np_recombine(x2, x1)
        ref = torch.from_numpy(np.clip(ref / 255.0, 0, 1)).permute(2, 0, 1).float()
        recombined_errors.append((out[k] - ref).abs().mean().item())
    assert single_errors and recombined_errors
    assert max(single_errors) <= 1.0 / 255 + 1e-4  # PIL's uint8 truncation only
    # quantisation differences (PIL truncates geometric results) feed through op2 and the FFT
    assert np.median(recombined_errors) < 2.0 / 255 and max(recombined_errors) < 8.0 / 255


def test_apr_s_branch_and_op_frequencies():
    n = 20000
    params = sample_apr_s_params(n, torch.Generator().manual_seed(0), severity=3.0)
    sigma = math.sqrt(0.25 / n)
    assert abs(params.recombined.double().mean().item() - 0.5) < 4 * sigma
    rec = params.recombined
    sigma_r = math.sqrt(0.25 / rec.sum().item())
    assert abs(params.amplitude_from_first[rec].double().mean().item() - 0.5) < 4 * sigma_r
    for ops in (params.op1, params.op2):
        counts = torch.bincount(ops, minlength=9).double()
        assert counts.numel() == 9
        p = 1 / 9
        assert ((counts / n - p).abs() < 4 * math.sqrt(p * (1 - p) / n)).all()
    for levels in (params.level1, params.level2):
        assert levels.min() >= 0.1 and levels.max() < 3.0
        assert abs(levels.mean().item() - 1.55) < 4 * (2.9 / math.sqrt(12)) / math.sqrt(n)
    for signs in (params.sign1, params.sign2):
        assert set(signs.unique().tolist()) == {-1.0, 1.0}
        assert abs(signs.mean().item()) < 4 / math.sqrt(n)


def test_apr_s_output_branches_with_fixed_generator(digits):
    """Images that took the single-op branch equal op1(x); about half took the recombined branch."""
    x = digits.repeat(4, 1, 1, 1)  # 64 images
    gen_seed = 7
    out = apr_s(x, torch.Generator().manual_seed(gen_seed))
    params = sample_apr_s_params(x.shape[0], torch.Generator().manual_seed(gen_seed))
    single = 0
    for k in range(x.shape[0]):
        x1 = OPS[OP_NAMES[params.op1[k]]](x[k : k + 1], params.level1[k : k + 1], params.sign1[k : k + 1])[0]
        if torch.allclose(out[k], x1, atol=1e-6):
            single += 1
        else:
            assert params.recombined[k]
    assert single >= (~params.recombined).sum().item()
    assert 20 <= single <= 44  # Binomial(64, 0.5), ~3 sigma


def test_apr_s_errors(digits):
    with pytest.raises(ValueError, match="severity"):
        apr_s(digits, severity=0.0)
    with pytest.raises(ValueError, match="dim"):
        apr_s(digits, dim=(-1,))
    with pytest.raises(ValueError, match="N x C x H x W"):
        apr_s(digits[0])


# ---------------------------------------------------------------------------------------
# APR-P


def _partner_of(out_k: torch.Tensor, x: torch.Tensor, k: int, dim) -> int:
    """Which image's amplitude did out_k get (with x[k]'s phase)?"""
    errors = [(recombine(x[j : j + 1], x[k : k + 1], dim=dim)[0] - out_k).abs().max().item() for j in range(len(x))]
    j = int(np.argmin(errors))
    assert errors[j] < 1e-5
    return j


@pytest.mark.parametrize("dim", [(-3, -2, -1), (-2, -1)])
def test_apr_p_takes_amplitude_of_a_permutation(photos, digits, dim):
    x = torch.cat([digits[:6], photos[:, :, :32, :32]])
    out = apr_p(x, prob=1.0, generator=torch.Generator().manual_seed(0), dim=dim)
    partners = [_partner_of(out[k], x, k, dim) for k in range(len(x))]
    assert sorted(partners) == list(range(len(x)))  # a permutation
    assert partners != list(range(len(x)))


def test_apr_p_keeps_each_images_phase():
    g = torch.Generator().manual_seed(1)
    x = 0.45 + 0.1 * torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)  # no clipping possible
    out = apr_p(x, prob=1.0, generator=g)
    assert out.min() > 0 and out.max() < 1
    fo, fx = np.fft.fftn(out.numpy(), axes=(1, 2, 3)), np.fft.fftn(x.numpy(), axes=(1, 2, 3))
    solid = (np.abs(fx) > 1e-6 * np.abs(fx).max()) & (np.abs(fo) > 1e-6 * np.abs(fo).max())
    phasor_o, phasor_x = fo[solid] / np.abs(fo[solid]), fx[solid] / np.abs(fx[solid])
    assert np.abs(phasor_o - phasor_x).max() < 1e-6
    # amplitudes are a permutation of the batch's amplitudes
    ax, ao = np.abs(fx).reshape(6, -1), np.abs(fo).reshape(6, -1)
    match = [int(np.argmin(np.abs(ax - ao[k]).max(axis=1))) for k in range(6)]
    assert sorted(match) == list(range(6))
    assert all(np.abs(ax[match[k]] - ao[k]).max() < 1e-9 * ax.max() for k in range(6))


def test_apr_p_reproducible_and_dtypes(digits):
    a = apr_p(digits, prob=1.0, generator=torch.Generator().manual_seed(4))
    b = apr_p(digits, prob=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    bf = apr_p(digits.bfloat16(), prob=1.0, generator=torch.Generator().manual_seed(4))
    assert bf.dtype == torch.bfloat16 and (bf.float() - a).abs().max() < 3e-2
    assert apr_p(digits, prob=0.0) is digits


def test_apr_p_batch_coin_rate():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    calls, prob = 600, 0.6
    applied = []
    for _ in range(calls):
        out = apr_p(x, prob=prob, generator=g)
        changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-6
        applied.append(changed.any().item())
        # one coin per batch: either none changed or all images not paired with themselves
        assert (not changed.any()) or changed.sum() >= 2
    rate = np.mean(applied)
    # P(applied and perm is the identity) = prob / 720: negligible
    assert abs(rate - prob) < 4 * math.sqrt(prob * (1 - prob) / calls)


def test_apr_p_per_sample_rate():
    n, prob = 4000, 0.3
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = apr_p(x, prob=prob, generator=torch.Generator().manual_seed(2), per_sample=True)
    changed = ((out - x).abs().amax(dim=(1, 2, 3)) > 1e-6).double().mean().item()
    assert abs(changed - prob) < 4 * math.sqrt(prob * (1 - prob) / n)


def test_apr_p_errors(digits):
    with pytest.raises(ValueError, match="prob"):
        apr_p(digits, prob=1.5)
    with pytest.raises(ValueError, match="dim"):
        apr_p(digits, dim=(-2,))
    with pytest.raises(TypeError, match="float images"):
        apr_p(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_apr_sp_is_apr_p_after_apr_s(digits):
    out = apr_sp(digits, prob=1.0, generator=torch.Generator().manual_seed(9), severity=2.0)
    g = torch.Generator().manual_seed(9)
    expected = apr_p(apr_s(digits, g, severity=2.0), prob=1.0, generator=g)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)  # fused vs two passes: different FFT batches
    assert out.shape == digits.shape and out.dtype == digits.dtype


# ---------------------------------------------------------------------------------------
# APRPolicy


def test_policy_from_config_and_validation():
    pol = APRPolicy.from_config(AugConfig(name="apr_sp", p_prob=0.5, p_per_sample=True, s_severity=2.0, fourier_dims="hw"))
    assert (pol.name, pol.p_prob, pol.p_per_sample, pol.s_severity, pol.dims) == ("apr_sp", 0.5, True, 2.0, "hw")
    assert pol.dim == (-2, -1) and pol.doubles_batch
    assert APRPolicy.from_config(AugConfig()).name == "none" and APRPolicy().dim == (-3, -2, -1)
    with pytest.raises(ValueError, match="name must be one of"):
        APRPolicy(name="augmix")
    with pytest.raises(ValueError, match="dims"):
        APRPolicy(name="apr_p", dims="c")
    with pytest.raises(ValueError, match="p_prob"):
        APRPolicy(name="apr_p", p_prob=2.0)


def test_policy_outputs_mirror_the_reference(digits):
    x = digits
    first, second = APRPolicy("none")(x)
    assert first is x and second is None
    seed = 12

    def gen():
        return torch.Generator().manual_seed(seed)

    first, second = APRPolicy("apr_p", p_prob=1.0)(x, gen())
    assert first is x and torch.equal(second, apr_p(x, 1.0, gen()))
    first, second = APRPolicy("apr_s", s_severity=3.0, dims="hw")(x, gen())
    assert first is x and torch.equal(second, apr_s(x, gen(), 3.0, dim=(-2, -1)))
    first, second = APRPolicy("apr_sp", p_prob=1.0)(x, gen())
    g = gen()
    s = apr_s(x, g)
    torch.testing.assert_close(first, s, atol=2e-5, rtol=0)  # fused APR-SP vs the two functions: another path
    torch.testing.assert_close(second, apr_p(s, 1.0, g), atol=2e-5, rtol=0)
    assert not torch.equal(first, x) and not torch.equal(second, first)
    # the option that keeps the first half clean: same APR-SP second half, clean first half
    first, second = APRPolicy("apr_sp", p_prob=1.0, sp_clean_first=True)(x, gen())
    g = gen()
    assert first is x
    torch.testing.assert_close(second, apr_p(apr_s(x, g), 1.0, g), atol=2e-5, rtol=0)
    assert APRPolicy.from_config(AugConfig(name="apr_sp", sp_clean_first=True)).sp_clean_first


# ---------------------------------------------------------------------------------------
# host<->device traffic: APR runs every training step, so it must never block the host


def test_parameters_reach_the_device_without_blocking_copies(monkeypatch, digits):
    """Every CPU -> device copy inside APR (indices, matrices, masks) is non-blocking.

    A plain ``.to("cuda")`` of pageable memory synchronises the whole stream; with the
    training loop's CPU generator APR-SP made ~19 such copies per step. The "meta" device
    stands in for a GPU here (shapes only, no data): the spy sees every explicit transfer.
    """
    copies = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            copies.append(bool(kwargs.get("non_blocking", False)))
        return out

    x = digits[:12].to("meta")
    monkeypatch.setattr(torch.Tensor, "to", spy)
    g = torch.Generator().manual_seed(0)
    first, second = APRPolicy("apr_sp", p_prob=1.0)(x, g)
    apr_p(x, 1.0, g, per_sample=True)
    for name in OP_NAMES:
        OPS[name](x, torch.full((12,), 2.0), torch.ones(12))
    monkeypatch.undo()
    assert first.device.type == "meta" and second.device.type == "meta"
    assert len(copies) > 10, copies  # the ops really moved their parameters to the device
    assert all(copies), f"{copies.count(False)} of {len(copies)} CPU->device copies block the host"


# ---------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.parametrize("wrong, caught", [
    ("same result", False),
    ("one value one level off", False),
    ("float32 noise", False),
    ("two images swapped", True),
    ("width axis flipped", True),
    ("no clamp", True),
    ("bf16 all the way", True),
])
def test_the_cuda_bound_catches_a_wrong_gpu_path(digits, photos, wrong, caught):
    """What assert_images_close (the CUDA tests' bound) lets through and what it stops, shown on the CPU."""
    x = torch.cat([digits, photos[:, :, :32, :32]])
    s, want = APRPolicy("apr_sp", p_prob=1.0)(x, torch.Generator().manual_seed(0))
    redo = lambda policy, images: policy(images, torch.Generator().manual_seed(0))[1]  # noqa: E731
    got = {"same result": lambda: want.clone(),
           "one value one level off": lambda: want.clone().index_put_((torch.tensor([3]), torch.tensor([1]),
                                                                       torch.tensor([3]), torch.tensor([3])),
                                                                      torch.tensor(1 / 255), accumulate=True),
           "float32 noise": lambda: want * (1 + 1e-6 * torch.randn(want.shape, generator=torch.Generator().manual_seed(1))),
           "two images swapped": lambda: want[torch.tensor([1, 0, *range(2, len(want))])],
           "width axis flipped": lambda: want.flip(-1),
           "no clamp": lambda: redo(APRPolicy("apr_sp", p_prob=1.0, p_clamp=False), x),
           "bf16 all the way": lambda: redo(APRPolicy("apr_sp", p_prob=1.0), x.bfloat16())}[wrong]()
    if caught:
        with pytest.raises(AssertionError):
            assert_images_close(got.float(), want)
    else:
        assert_images_close(got, want)


@pytest.mark.cuda
def test_apr_s_and_apr_p_cuda_match_cpu(digits, photos):
    x = torch.cat([digits, photos[:, :, :32, :32]])
    cpu = apr_s(x, torch.Generator().manual_seed(0))
    gpu = apr_s(x.cuda(), torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda" and gpu.dtype == x.dtype
    assert_images_close(gpu, cpu)  # rounding to the 0..255 grid may flip a level: see assert_images_close
    cpu_p = apr_p(x, 1.0, torch.Generator().manual_seed(1), per_sample=True)
    gpu_p = apr_p(x.cuda(), 1.0, torch.Generator().manual_seed(1), per_sample=True)
    torch.testing.assert_close(gpu_p.cpu(), cpu_p, atol=2e-5, rtol=0)  # no grid: float noise only
    bf = apr_s(x.cuda().bfloat16(), torch.Generator().manual_seed(0))
    assert bf.dtype == torch.bfloat16 and bf.device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_cuda_matches_cpu(photos, name):
    levels, signs = torch.tensor([1.3, 2.9]), torch.tensor([1.0, -1.0])
    cpu = OPS[name](photos, levels, signs)
    gpu = OPS[name](photos.cuda(), levels, signs)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


@pytest.mark.cuda
def test_apr_sp_on_cuda_never_synchronises(digits, photos):
    """With a CPU generator (what the training loop passes) APR-SP and its policy call make no host sync."""
    x = torch.cat([digits, photos[:, :, :32, :32]]).cuda()
    g = torch.Generator().manual_seed(0)
    APRPolicy("apr_sp", p_prob=1.0)(x, g)  # warm-up: cuFFT plans, pinned-memory pool
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first, second = APRPolicy("apr_sp", p_prob=1.0)(x, g)
        apr_p(x, 0.5, g, per_sample=True)  # the partial path: clone + indexed write
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first.device.type == "cuda" and second.device.type == "cuda"


# ---------------------------------------------------------------------------------------
# fused APR-SP against today's two separate passes, and the reference-reproduction switches

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def unfused_apr_sp(x, s_params, p_params, dim, overflow="clamp", p_clamp=True):
    """Today's APR-SP: APR-S, then APR-P with two forward transforms (``recombine(s[perm], s)``)."""
    s = apply_apr_s(x, s_params, dim, overflow=overflow)
    rows = p_params.rows
    out = s.clone()
    out[rows] = recombine(s[p_params.perm[rows]], s[rows], dim=dim, clamp=p_clamp)
    return s, out


@pytest.mark.parametrize("dim", [(-3, -2, -1), (-2, -1)])
@pytest.mark.parametrize("overflow", ["clamp", "none"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_fused_apr_sp_equals_separate_passes(photos, digits, dim, overflow, per_sample):
    x = torch.cat([digits[:6], photos[:, :, :32, :32]])
    g = torch.Generator().manual_seed(3)
    s_params = sample_apr_s_params(len(x), g)
    p_params = A.sample_apr_p_params(len(x), 0.7, g, per_sample)
    assert 0 < int(s_params.recombined.sum()) < len(x)
    s, sp = A.apply_apr_sp(x, s_params, p_params, dim, s_overflow=overflow, p_clamp=overflow == "clamp")
    ref_s, ref_sp = unfused_apr_sp(x, s_params, p_params, dim, overflow, p_clamp=overflow == "clamp")
    torch.testing.assert_close(s, ref_s, atol=2e-5, rtol=0)
    torch.testing.assert_close(sp, ref_sp, atol=2e-5, rtol=0)
    if overflow == "none":  # the closed-form spectrum really was used: APR-S left values outside [0, 1]
        assert s.min() < 0 or s.max() > 1


def test_fused_apr_sp_wrap_equals_separate_passes(photos, digits):
    """wrap quantises to the 1/255 grid: two float paths may truncate a value on either side of a level."""
    x = torch.cat([digits[:6], photos[:, :, :32, :32]]).double()
    g = torch.Generator().manual_seed(4)
    s_params, p_params = sample_apr_s_params(len(x), g), A.sample_apr_p_params(len(x), 1.0, g)
    s, sp = A.apply_apr_sp(x, s_params, p_params, s_overflow="wrap", p_clamp=False)
    ref_s, ref_sp = unfused_apr_sp(x, s_params, p_params, (-3, -2, -1), "wrap", p_clamp=False)
    off = (s - ref_s).abs() > 1e-6
    assert off.float().mean() < 1e-3, off.float().mean()
    if not off.any():
        torch.testing.assert_close(sp, ref_sp, atol=1e-5, rtol=0)


def test_policy_apr_sp_is_apr_p_of_apr_s_with_the_same_draws(photos, digits):
    x = torch.cat([digits[:6], photos[:, :, :32, :32]])
    first, second = APRPolicy("apr_sp", p_prob=1.0)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    s = apr_s(x, g)
    torch.testing.assert_close(first, s, atol=2e-5, rtol=0)
    torch.testing.assert_close(second, apr_p(s, 1.0, g), atol=2e-5, rtol=0)
    torch.testing.assert_close(apr_sp(x, 1.0, torch.Generator().manual_seed(5)), second, atol=0, rtol=0)


def test_swap_amplitude_compiled_expression_and_fallback(monkeypatch):
    from apr import fourier

    g = torch.Generator().manual_seed(0)
    spec = torch.fft.rfftn(torch.rand(3, 3, 8, 8, generator=g), dim=(-3, -2, -1))
    spec[0, 0, 1, 1] = 0  # a zero bin: phasor 1 there
    amp = torch.rand(spec.shape, generator=g)
    eager = fourier.swap_amplitude(spec, amp)
    assert eager[0, 0, 1, 1] == amp[0, 0, 1, 1]
    # the expression torch.compile fuses, run eagerly
    torch.testing.assert_close(torch.view_as_complex(fourier._swap_real(torch.view_as_real(spec), amp)), eager)
    # a compiler that fails: one warning, then the eager result
    monkeypatch.setattr(fourier, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with pytest.warns(RuntimeWarning, match="no compiler"):
        out = fourier.swap_amplitude(spec, amp, compile=True)
    torch.testing.assert_close(out, eager)


def np_mix_data(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The reference's ``mix_data`` body: fftn over (C, H, W), abs, angle, exp(1j*angle), real part."""
    f1, f2 = np.fft.fftn(x, axes=(1, 2, 3)), np.fft.fftn(x[perm], axes=(1, 2, 3))
    return np.real(np.fft.ifftn(np.abs(f2) * np.exp(1j * np.angle(f1)), axes=(1, 2, 3)))


def test_apr_p_normalized_space_is_the_references_mix_of_normalised_tensors(photos, digits):
    x = torch.cat([digits[:4], photos[:, :, :32, :32]]).double()
    params = A.sample_apr_p_params(len(x), 1.0, torch.Generator().manual_seed(6))
    out = A.apply_apr_p(x, params, clamp=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    ref = np_mix_data((x.numpy() - mean) / std, params.perm.numpy())  # what the reference's model sees
    np.testing.assert_allclose((out.numpy() - mean) / std, ref, atol=1e-9)
    unit = A.apply_apr_p(x, params, clamp=False)
    assert (out - unit).abs().mean() > 1e-3  # the switch changes the images


def test_apr_p_unclipped_is_the_references_mix(photos, digits):
    x = torch.cat([digits[:4], photos[:, :, :32, :32]])
    params = A.sample_apr_p_params(len(x), 1.0, torch.Generator().manual_seed(7))
    out = A.apply_apr_p(x, params, clamp=False)
    ref = np_mix_data(x.double().numpy(), params.perm.numpy())
    assert ref.min() < 0 or ref.max() > 1
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(A.apply_apr_p(x, params).numpy(), ref.clip(0, 1), atol=2e-5)


def test_wrap_is_numpys_uint8_cast():
    from apr.fourier import fit_range

    values = np.array([-256.5, -3.7, -0.5, 0.2, 127.0, 254.9, 255.99, 256.0, 300.5, 511.7, 600.2])
    expected = np.array([0, 253, 0, 0, 127, 254, 255, 0, 44, 255, 88])  # trunc toward 0, then mod 256
    np.testing.assert_array_equal(np.trunc(values).astype(np.int64) % 256, expected)
    got = fit_range(torch.tensor(values / 255.0, dtype=torch.float64), "wrap") * 255.0
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-9)


def test_apr_s_wrap_is_the_references_recombination(photos):
    """APRecombination's tail on uint8 op outputs: fftn over (H, W, C), abs, exp(1j*angle), .astype(uint8)."""
    x = photos.double()
    n = len(x)
    params = A.APRSParams(
        op1=torch.zeros(n, dtype=torch.long), level1=torch.ones(n, dtype=torch.float64), sign1=torch.ones(n, dtype=torch.float64),
        recombined=torch.ones(n, dtype=torch.bool), op2=torch.full((n,), 2), level2=torch.full((n,), 2.5, dtype=torch.float64),
        sign2=torch.ones(n, dtype=torch.float64), amplitude_from_first=torch.tensor([True, False]),
    )  # autocontrast then posterize: outputs on the uint8 grid, as the reference's PIL images
    out = apply_apr_s(x, params, overflow="wrap")
    x1 = OPS["autocontrast"](x)
    x2 = OPS["posterize"](x1, params.level2)
    wrapped = 0
    for k in range(n):
        a, b = (x1[k], x2[k]) if params.amplitude_from_first[k] else (x2[k], x1[k])
        a8, b8 = (np.rint(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for t in (a, b))
        raw = np.fft.ifftn(np.abs(np.fft.fftn(a8)) * np.exp(1j * np.angle(np.fft.fftn(b8)))).real
        ref = raw.astype(np.uint8)
        ours = np.rint(out[k].permute(1, 2, 0).numpy() * 255).astype(np.int64)
        near_level = np.abs(raw - np.rint(raw)) < 2e-3  # float32 noise may truncate either side there
        assert np.array_equal(ours[~near_level], ref[~near_level].astype(np.int64))
        wrapped += int(((raw < 0) | (raw >= 256)).sum())
    assert wrapped > 0  # the test images really overflow


@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True])
def test_fused_apr_sp_cuda_matches_cpu_without_host_syncs(digits, photos, compile):
    """Fused APR-SP in every reference mode: CUDA equals CPU, and no call synchronises the host."""
    x = torch.cat([digits, photos[:, :, :32, :32]])
    modes = [dict(), dict(p_space="normalized", mean=IMAGENET_MEAN, std=IMAGENET_STD, s_overflow="wrap", p_clamp=False),
             dict(s_overflow="none")]
    for mode in modes:
        policy = APRPolicy("apr_sp", p_prob=1.0, compile=compile, **mode)
        cpu = policy(x, torch.Generator().manual_seed(0))
        policy(x.cuda(), torch.Generator().manual_seed(0))  # warm-up: cuFFT plans, compilation, pinned pool
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu = policy(x.cuda(), torch.Generator().manual_seed(0))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if mode.get("s_overflow") != "wrap":
            for c, d in zip(cpu, gpu):
                assert_images_close(d, c)
            continue
        keep = wrapped_s_agrees(gpu[0], cpu[0])
        assert_images_close(gpu[1][keep.cuda()], cpu[1][keep])


def wrapped_s_agrees(gpu: torch.Tensor, cpu: torch.Tensor) -> torch.Tensor:
    """wrap truncates like ``astype(np.uint8)``: a value within float noise of a level (an identity op recombined
    with itself gives the whole image on the grid) lands one level lower on one device; one within noise of 256
    wraps to 0. So each value agrees, is one level off, or (under 1e-3 of them) 255 levels off. Returns the
    images whose APR-S agrees within noise everywhere: only there is APR-P (the phase of a quantised image,
    ill-conditioned near empty frequency bins) expected to agree, and that is most images."""
    diff = (gpu.cpu() - cpu).abs()
    noise, level = diff <= 2e-5, (diff - 1 / 255).abs() <= 2e-5
    wrapped = (diff - 255 / 255).abs() <= 2e-5
    assert (noise | level | wrapped).all(), float(diff[~(noise | level | wrapped)].max())
    assert wrapped.float().mean() < 1e-3, float(wrapped.float().mean())
    keep = noise.flatten(1).all(1)
    assert int(keep.sum()) >= len(keep) // 2, int(keep.sum())
    return keep


def test_reference_switches_from_config_and_validation():
    from apr.config import ConfigError, load_config

    cfg = load_config(None, ["aug.name=apr_sp", "aug.p_space=normalized", "aug.s_overflow=wrap", "aug.p_clamp=false"])
    pol = APRPolicy.from_config(cfg.aug, cfg.data.mean, cfg.data.std)
    assert (pol.p_space, pol.s_overflow, pol.p_clamp) == ("normalized", "wrap", False)
    assert pol.p_stats == (tuple(cfg.data.mean), tuple(cfg.data.std))
    assert APRPolicy.from_config(AugConfig()).p_stats == (None, None)  # defaults unchanged: [0, 1] space, clamp
    with pytest.raises(ValueError, match=r"from_config\(cfg.aug, cfg.data.mean, cfg.data.std\)"):
        APRPolicy.from_config(cfg.aug)
    for override, key in (("aug.p_space=lab", "aug.p_space"), ("aug.s_overflow=saturate", "aug.s_overflow")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])
    with pytest.raises(ValueError, match="s_overflow"):
        APRPolicy("apr_s", s_overflow="saturate")


def test_policy_reference_mode_runs_each_switch(digits):
    x = digits[:8]
    ours = APRPolicy("apr_sp", p_prob=1.0)(x, torch.Generator().manual_seed(0))
    ref = APRPolicy("apr_sp", p_prob=1.0, p_space="normalized", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    s_overflow="wrap", p_clamp=False)(x, torch.Generator().manual_seed(0))
    assert ref[1].min() < 0 or ref[1].max() > 1  # unclipped APR-P
    assert (ref[1] - ours[1]).abs().mean() > 1e-3
    recombined = sample_apr_s_params(len(x), torch.Generator().manual_seed(0)).recombined
    assert recombined.any()
    grid = ref[0][recombined] * 255  # wrap puts recombined APR-S images on the uint8 grid
    torch.testing.assert_close(grid, grid.round(), atol=1e-3, rtol=0)
