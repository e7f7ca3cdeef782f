"""Measure the size of each CIFAR / model reference-reproduction switch (docs/reference-differences.md).

    python benchmarks/reference_diffs.py [--n 512] [--no-resnet]

The APR switches (aug.p_space, p_clamp, s_overflow) are measured by ``bench_apr.py --reference-diffs``.
Images: random crops of scikit-learn's two sample photos resized to 32 x 32 (CIFAR-like scenes); every
figure is a mean over ``--n`` images, in [0, 1] pixel units unless said otherwise.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench_apr import make_images, pil_to_tensor

from apr.augment import apply_apr_s, sample_apr_s_params
from apr.data.cifar import TensorBatchLoader, random_crop_flip

OURS_STD, REF_STD = (0.2470, 0.2435, 0.2616), (0.2023, 0.1994, 0.2010)
MEAN = (0.4914, 0.4822, 0.4465)


def std_difference(x: torch.Tensor, say) -> None:
    """data.std: the model's input (x - mean) / std under the two stds."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    ours = (x - mean) / torch.tensor(OURS_STD).view(1, 3, 1, 1)
    ref = (x - mean) / torch.tensor(REF_STD).view(1, 3, 1, 1)
    ratio = [round(o / r, 3) for o, r in zip(OURS_STD, REF_STD)]
    say(f"data.std reference vs ours: the reference's normalised inputs are ours x {ratio} (R, G, B), mean |diff| "
        f"{(ref - ours).abs().mean():.3f} normalised units (input std {ours.std():.3f} ours, {ref.std():.3f} reference)")


def pad_fill_difference(images_u8: np.ndarray, say) -> None:
    """data.pad_fill 128 vs 0: same seed, same crops; only the padding differs."""
    labels = np.zeros(len(images_u8), dtype=np.int64)
    zero = TensorBatchLoader(images_u8, labels, 64, train=True, seed=0)
    grey = TensorBatchLoader(images_u8, labels, 64, train=True, seed=0, pad_fill=128)
    diff = torch.cat([(a - b).abs() for (a, _), (b, _) in zip(zero, grey)])
    changed = diff.amax(dim=1) > 0
    say(f"data.pad_fill 128 vs 0: {changed.float().mean():.2%} of pixels are padding, mean |diff| "
        f"{diff.mean():.4f} per pixel ({diff.mean() * 255:.1f}/255); {changed.flatten(1).any(1).float().mean():.1%} "
        "of images have some padding")


def crop_order_difference(x: torch.Tensor, say) -> None:
    """data.apr_s_before_crop: APR-S then crop vs crop then APR-S with the SAME APR-S draws and crops
    (both zero padding, clamp), so only the order differs."""
    n = len(x)
    params = sample_apr_s_params(n, torch.Generator().manual_seed(0))
    before = random_crop_flip(apply_apr_s(x, params), 4, torch.Generator().manual_seed(1), flip=False)
    cropped = random_crop_flip(x, 4, torch.Generator().manual_seed(1), flip=False)
    after = apply_apr_s(cropped, params)
    pad = random_crop_flip(torch.ones(n, 1, 32, 32), 4, torch.Generator().manual_seed(1), flip=False) == 0
    diff = (before - after).abs()
    rec = params.recombined
    say(f"data.apr_s_before_crop true vs false (same draws): mean |diff| {diff.mean():.4f} per pixel "
        f"({diff.mean() * 255:.1f}/255); recombined images {diff[rec].mean():.4f}, op-only images {diff[~rec].mean():.4f}; "
        f"inside the image (not padding) {diff.mean(dim=1, keepdim=True)[~pad].mean():.4f}; padding pixels after "
        f"APR-S-after-crop hold mean {after.mean(dim=1, keepdim=True)[pad].mean():.4f} instead of the fill 0")


def zero_init_difference(say) -> None:
    """model.zero_init_last on timm's ResNet-50: weights zeroed and the pooled features at init."""
    import timm

    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224)
    feats, zeroed = {}, {}
    for flag in (True, False):
        torch.manual_seed(0)
        model = timm.create_model("resnet50", num_classes=1000, zero_init_last=flag).train()
        zeroed[flag] = sum(int((m.weight == 0).all()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        with torch.no_grad():
            feats[flag] = model.forward_head(model.forward_features(x), pre_logits=True)
    say(f"model.zero_init_last true vs false (timm resnet50, train-mode BN, 8 random inputs): {zeroed[True]} of 53 "
        f"BatchNorm weight vectors start at 0 (false: {zeroed[False]}); pooled-feature std at init "
        f"{feats[True].std():.3f} vs {feats[False].std():.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="images (default 512)")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 zero_init_last measurement")
    args = parser.parse_args(argv)
    x = pil_to_tensor(make_images(args.n, 32, seed=3))
    images_u8 = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    say = print
    say(f"# reference_diffs: {args.n} photo crops at 32 px, torch {torch.__version__}")
    std_difference(x, say)
    pad_fill_difference(images_u8, say)
    crop_order_difference(x, say)
    if not args.no_resnet:
        zero_init_difference(say)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
