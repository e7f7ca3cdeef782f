"""Benchmark: batched APR-P / APR-S / APR-SP (apr.augment) vs the reference code paths.

Reference paths, re-implemented here from the APR paper's code description:

* APR-S: per image, PIL ops (AugMix definitions) + NumPy ``fftn``/``fftshift`` recombination,
  PIL image in -> PIL image out, as ``APRecombination`` runs inside a DataLoader worker;
* APR-P: ``mix_data``'s batched torch formulation (fftn over C,H,W, abs, angle,
  exp(1j*angle), ifftn, real part);
* APR-SP: the reference APR-S per image, then the reference APR-P on the stacked batch.

Prints images/s for both and the speed-up, times fused APR-SP (``apply_apr_sp``: one forward
FFT of each op output serves APR-S and APR-P) against today's separate passes (APR-S, then
``recombine(s[perm], s)`` with its two forward FFTs) on the same random draws, compares ``recombine`` with the naive
formulation (speed and max abs difference) and, on a GPU, reports ms per batch and the
fraction of one ResNet-50 bf16 forward+backward+SGD step at the same batch size.
Usage: ``python benchmarks/bench_apr.py [--batch 64] [--size 224] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apr.augment import (  # noqa: E402
    apply_apr_p,
    apply_apr_s,
    apply_apr_sp,
    apr_p,
    apr_s,
    apr_sp,
    sample_apr_p_params,
    sample_apr_s_params,
)
from apr.fourier import recombine  # noqa: E402
from timing import time_fn  # noqa: E402  benchmarks/timing.py

# ---------------------------------------------------------------------------------------
# reference path: AugMix op definitions on PIL images, NumPy FFT recombination, per image


def _int_param(level, maxval):
    return int(level * maxval / 10)


def _float_param(level, maxval):
    return float(level) * maxval / 10.0


def _ref_ops(size: int):
    def autocontrast(img, sev, rng):
        return ImageOps.autocontrast(img)

    def equalize(img, sev, rng):
        return ImageOps.equalize(img)

    def posterize(img, sev, rng):
        return ImageOps.posterize(img, 4 - _int_param(rng.uniform(0.1, sev), 4))

    def rotate(img, sev, rng):
        deg = _int_param(rng.uniform(0.1, sev), 30)
        return img.rotate(-deg if rng.uniform() > 0.5 else deg, resample=Image.BILINEAR)

    def solarize(img, sev, rng):
        return ImageOps.solarize(img, 256 - _int_param(rng.uniform(0.1, sev), 256))

    def _affine(img, m):
        return img.transform((size, size), Image.AFFINE, m, resample=Image.BILINEAR)

    def shear_x(img, sev, rng):
        s = _float_param(rng.uniform(0.1, sev), 0.3)
        return _affine(img, (1, -s if rng.uniform() > 0.5 else s, 0, 0, 1, 0))

    def shear_y(img, sev, rng):
        s = _float_param(rng.uniform(0.1, sev), 0.3)
        return _affine(img, (1, 0, 0, -s if rng.uniform() > 0.5 else s, 1, 0))

    def translate_x(img, sev, rng):
        t = _int_param(rng.uniform(0.1, sev), size / 3)
        return _affine(img, (1, 0, -t if rng.uniform() > 0.5 else t, 0, 1, 0))

    def translate_y(img, sev, rng):
        t = _int_param(rng.uniform(0.1, sev), size / 3)
        return _affine(img, (1, 0, 0, 0, 1, -t if rng.uniform() > 0.5 else t))

    return [autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y, translate_x, translate_y]


def reference_apr_s(img: Image.Image, ops, rng: np.random.RandomState, severity: float = 3.0) -> Image.Image:
    first = ops[rng.randint(len(ops))](img, severity, rng)
    if rng.uniform() > 0.5:
        return first
    second = ops[rng.randint(len(ops))](first.copy(), severity, rng)
    a = np.asarray(first, dtype=np.uint8)
    b = np.asarray(second, dtype=np.uint8)
    spec_a = np.fft.fftshift(np.fft.fftn(a))
    spec_b = np.fft.fftshift(np.fft.fftn(b))
    if rng.uniform() > 0.5:
        mixed = np.abs(spec_a) * np.exp(1j * np.angle(spec_b))
    else:
        mixed = np.abs(spec_b) * np.exp(1j * np.angle(spec_a))
    out = np.fft.ifftn(np.fft.ifftshift(mixed)).real.astype(np.uint8)  # no clipping, as the reference
    return Image.fromarray(out)


def reference_apr_p(x: torch.Tensor) -> torch.Tensor:
    """``mix_data`` with the coin forced to 'apply' (what it costs when it runs)."""
    perm = torch.randperm(x.shape[0]).to(x.device)
    f1 = torch.fft.fftn(x, dim=(1, 2, 3))
    f2 = torch.fft.fftn(x[perm], dim=(1, 2, 3))
    mixed = torch.abs(f2) * torch.exp(1j * torch.angle(f1))
    return torch.fft.ifftn(mixed, dim=(1, 2, 3)).real.float()


def naive_recombine(a: torch.Tensor, p: torch.Tensor, dim=(-3, -2, -1)) -> torch.Tensor:
    fa, fp = torch.fft.fftn(a, dim=dim), torch.fft.fftn(p, dim=dim)
    return torch.fft.ifftn(fa.abs() * torch.exp(1j * fp.angle()), dim=dim).real


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float().div_(255)


# ---------------------------------------------------------------------------------------
# timing


def make_images(batch: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Real photos (scikit-learn's china/flower), random crops resized to size x size, random flips."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(im) for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(batch):
        ph = photos[k % len(photos)]
        w, h = ph.size
        side = int(rng.integers(min(w, h) // 2, min(w, h)))
        x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        crop = ph.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def warm_fft_plans(x: torch.Tensor) -> None:
    """Build the cuFFT plans of every batch count 1..N once (CUDA only).

    cuFFT plans are made per shape on first use and cached. APR-S recombines a random number
    of images per call (about N/2, varying), so with a short warm-up most timed calls would
    pay for new plans, which a training run stops paying after its first steps.
    """
    if x.device.type != "cuda":
        return
    for n in range(1, x.shape[0] + 1):
        recombine(x[:n], x[:n])
    torch.cuda.synchronize(x.device)


def resnet50_step_seconds(batch: int, size: int, device: torch.device, repeats: int) -> float:
    import torchvision

    model = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return statistics.median(time_fn(step, device, repeats, warmup=3))


def fused_vs_separate(x: torch.Tensor, device: torch.device, args, say) -> None:
    """Fused APR-SP / one-FFT APR-P against today's separate passes, same draws, side by side."""
    n = x.shape[0]
    s_params = sample_apr_s_params(n, torch.Generator().manual_seed(2))
    p_params = sample_apr_p_params(n, 1.0, torch.Generator().manual_seed(3))
    perm = p_params.perm.to(device)

    def sp_separate():
        s = apply_apr_s(x, s_params)
        return recombine(s[perm], s)

    pairs = {
        "apr_p": (lambda: apply_apr_p(x, p_params), lambda: recombine(x[perm], x)),
        "apr_sp": (lambda: apply_apr_sp(x, s_params, p_params)[1], sp_separate),
    }
    say(f"{'op':<8}{'fused ms':>10}{'separate ms':>13}{'ratio':>8}{'max |diff|':>12}  (same draws; separate = today's passes)")
    for name, (fused, separate) in pairs.items():
        t_fused = statistics.median(time_fn(fused, device, args.repeats, args.warmup))
        t_sep = statistics.median(time_fn(separate, device, args.repeats, args.warmup))
        diff = (fused() - separate()).abs().max().item()
        say(f"{name:<8}{t_fused * 1e3:>10.1f}{t_sep * 1e3:>13.1f}{t_sep / t_fused:>7.2f}x{diff:>12.1e}")


def reference_differences(size: int, n: int, say) -> None:
    """Measured size of each reference-reproduction switch on real photo crops (mean |diff| per pixel, [0, 1] units)."""
    x = pil_to_tensor(make_images(n, size, seed=1))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    p_params = sample_apr_p_params(n, 1.0, torch.Generator().manual_seed(0))
    unit = apply_apr_p(x, p_params, clamp=False)
    normalized = apply_apr_p(x, p_params, clamp=False, mean=mean, std=std)
    say(f"reference switches on {n} photo crops at {size} px (mean |diff| per pixel, [0, 1] units):")
    say(f"  aug.p_space normalized vs unit (APR-P, both unclipped): {(normalized - unit).abs().mean():.4f} "
        f"(mean signed {(normalized - unit).mean():+.4f}; per image {(normalized - unit).mean(dim=(1, 2, 3)).abs().mean():.4f})")
    for name, y in (("unit", unit), ("normalized", normalized)):
        outside = (y < 0) | (y > 1)
        say(f"  aug.p_clamp false vs true (APR-P {name}): {outside.float().mean():.2%} of pixels outside [0, 1], "
            f"mean |diff| {(y - y.clamp(0, 1)).abs().mean():.4f}")
    s_params = sample_apr_s_params(n, torch.Generator().manual_seed(0))
    s_params.recombined[:] = True  # measure on recombined images (the other half is identical in both modes)
    clamp = apply_apr_s(x, s_params, overflow="clamp")
    wrap = apply_apr_s(x, s_params, overflow="wrap")
    raw = apply_apr_s(x, s_params, overflow="none")
    outside = (raw < 0) | (raw >= 256 / 255)
    say(f"  aug.s_overflow wrap vs clamp (APR-S, recombined images): {outside.float().mean():.2%} of pixels wrap, "
        f"mean |diff| {(wrap - clamp).abs().mean():.4f} ({(wrap - clamp).abs().mean() * 255:.1f}/255), "
        f"on wrapped pixels {(wrap - clamp).abs()[outside].mean():.3f}; over an APR-S batch (half recombined) "
        f"about {outside.float().mean() / 2:.2%} and {(wrap - clamp).abs().mean() * 255 / 2:.1f}/255")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for the batched path (default: cuda if available)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 64 on CPU, 256 on GPU)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--machine", default=None, help="machine description printed with the figures")
    parser.add_argument("--out", type=Path, default=None, help="also append the printed figures to this file")
    parser.add_argument("--reference-diffs", action="store_true",
                        help="only measure the reference-reproduction switches on photo crops (aug.p_space, p_clamp, s_overflow)")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 step timing on a GPU")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    machine = args.machine or (torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu")
    lines: list[str] = []

    def say(text: str = ""):
        print(text, flush=True)
        lines.append(text)

    say(f"# bench_apr: batch {batch} x 3 x {args.size} x {args.size}, device {device}, machine: {machine}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, median of {args.repeats}")

    if args.reference_diffs:
        reference_differences(args.size, min(batch, 32), say)
        return 0
    pil_images = make_images(batch, args.size)
    x = pil_to_tensor(pil_images).to(device)
    ops = _ref_ops(args.size)
    rng = np.random.RandomState(0)
    gen = torch.Generator().manual_seed(0)

    ours = {
        "apr_p": lambda: apr_p(x, prob=1.0, generator=gen),
        "apr_s": lambda: apr_s(x, generator=gen),
        "apr_sp": lambda: apr_sp(x, prob=1.0, generator=gen),
    }
    ref = {
        "apr_p": lambda: reference_apr_p(x),
        "apr_s": lambda: [reference_apr_s(im, ops, rng) for im in pil_images],
        "apr_sp": lambda: reference_apr_p(pil_to_tensor([reference_apr_s(im, ops, rng) for im in pil_images]).to(device)),
    }
    ref_label = {"apr_p": f"mix_data torch on {device.type}", "apr_s": "PIL+NumPy per image, 1 process",
                 "apr_sp": "PIL+NumPy per image, then mix_data"}
    warm_fft_plans(x)  # steady state, as in training: no cuFFT plan creation inside the timings
    say(f"{'op':<8}{'ours ms/batch':>15}{'ours img/s':>12}{'ref ms/batch':>14}{'ref img/s':>11}{'speed-up':>10}  reference path")
    results = {}
    for name in ("apr_p", "apr_s", "apr_sp"):
        t_ours = statistics.median(time_fn(ours[name], device, args.repeats, args.warmup))
        ref_repeats = max(1, min(args.repeats, 3)) if name != "apr_p" else args.repeats
        t_ref = statistics.median(time_fn(ref[name], device, ref_repeats, 0 if name != "apr_p" else args.warmup))
        results[name] = t_ours
        say(f"{name:<8}{t_ours * 1e3:>15.1f}{batch / t_ours:>12.0f}{t_ref * 1e3:>14.1f}{batch / t_ref:>11.0f}"
            f"{t_ref / t_ours:>9.1f}x  {ref_label[name]}")

    fused_vs_separate(x, device, args, say)

    # recombine vs the naive formulation on the same pairs
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(1)).to(device)
    xp = x[perm]
    for dim in ((-3, -2, -1), (-2, -1)):
        t_fast = statistics.median(time_fn(lambda: recombine(xp, x, dim=dim, clamp=False), device, args.repeats, args.warmup))
        t_naive = statistics.median(time_fn(lambda: naive_recombine(xp, x, dim=dim), device, args.repeats, args.warmup))
        diff = (recombine(xp, x, dim=dim, clamp=False) - naive_recombine(xp, x, dim=dim)).abs().max().item()
        say(f"recombine dim={dim}: {t_fast * 1e3:.1f} ms vs naive fftn/abs/exp(1j*angle)/ifftn {t_naive * 1e3:.1f} ms "
            f"({t_naive / t_fast:.2f}x), max |diff| {diff:.2e}")

    if device.type == "cuda" and not args.no_resnet:
        step = resnet50_step_seconds(batch, args.size, device, args.repeats)
        say(f"ResNet-50 bf16 fwd+bwd+SGD step, batch {batch}: {step * 1e3:.1f} ms")
        for name, t in results.items():
            say(f"  {name}: {t * 1e3:.1f} ms = {t / step:.1%} of one step")
    if args.out:
        with args.out.open("a") as fh:
            fh.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
