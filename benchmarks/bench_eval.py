#!/usr/bin/env python
"""Evaluation throughput: the real JPEG decode path vs the model alone, side by side.

ImageNet-C is 3.75 M JPEGs per checkpoint, so the question is whether evaluation is bound by
decoding or by the network. Three numbers through the same loop apr.evaluation uses per cell
(``evaluate_loader``: normalise, channels_last, autocast, softmax, counts, ECE bins):

- model only: synthetic [0,1] batches already on the device (the ceiling);
- decode + model: ``build_folder_eval_loader`` over a folder of real-photo JPEGs (quality 85,
  like ImageNet-C) with each backend, loader construction included (paid once per cell);
- decode only: the same loader without the model.

The ratio decode+model / model-only says how much of the model's speed the data path keeps.
Defaults: resnet50 at 224 px on a GPU; on a CPU a smaller net and size so it ends in ~2 minutes
(say so when quoting the figures).

  python benchmarks/bench_eval.py                        # picks GPU or CPU defaults
  python benchmarks/bench_eval.py --model resnet18 --image-size 112 --images 256 --machine "my laptop"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apr.data import build_folder_eval_loader  # noqa: E402
from apr.data.dali import dali_available  # noqa: E402
from apr.evaluation import evaluate_loader  # noqa: E402
from apr.results import collect_versions  # noqa: E402
from apr.inference import ImageClassifier  # noqa: E402
from apr.models import create_model  # noqa: E402
from photos import write_photo_jpegs  # benchmarks/photos.py

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_batches(n: int, batch: int, size: int, device: torch.device, classes: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return [(x, y)] * (n // batch)


def timed(fn) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    count = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, count


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet50" if cuda else "resnet18", help="model name (apr.models.create_model)")
    p.add_argument("--image-size", type=int, default=224 if cuda else 112, help="JPEG and input size in pixels")
    p.add_argument("--images", type=int, default=4096 if cuda else 768, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=256 if cuda else 32)
    p.add_argument("--backends", nargs="+", default=["dali", "gpu", "torchvision"], choices=["dali", "gpu", "torchvision"],
                   help="decode paths to measure: dali, gpu (torchvision.io decoding on the device), torchvision "
                        "(DALI is skipped with a note where it is not installed)")
    p.add_argument("--workers", type=int, default=8 if cuda else 2, help="DALI threads / DataLoader workers")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32",
                   help="bf16 autocast (GPU default) or float32 (CPU default: bf16 is slower than fp32 on most CPUs)")
    p.add_argument("--machine", default=None, help="machine description written next to the figures")
    p.add_argument("--out", default=None, help="also write the table to this text file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    machine = args.machine or (torch.cuda.get_device_name(0) if cuda else "CPU")
    classes = [f"n{k:08d}" for k in range(4)]
    model = create_model(args.model, 1000)  # labels 0..3 of a 1000-way head: enough for timing
    runner = ImageClassifier(model.to(device), IMAGENET_MEAN, IMAGENET_STD, args.precision, channels_last=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_photo_jpegs(Path(tmp) / "cell", args.images, args.image_size, len(classes), quality=85)
        # warm-up: kernels, cudnn autotune, allocator
        evaluate_loader(runner, synthetic_batches(2 * args.batch_size, args.batch_size, args.image_size, device, 4))

        seconds, n = timed(lambda: evaluate_loader(runner, synthetic_batches(
            args.images, args.batch_size, args.image_size, device, 4)).count)
        model_rate = n / seconds
        rows.append(("model only (synthetic on-device input)", model_rate, 1.0))

        for backend in args.backends:
            if backend == "dali" and not dali_available():
                rows.append(("dali: not installed on this machine", float("nan"), float("nan")))
                continue

            def make_loader():
                return build_folder_eval_loader(folder, classes, batch_size=args.batch_size,
                                                image_size=args.image_size, resize=None, backend=backend,
                                                num_workers=args.workers, device=device)

            def decode_only():
                return sum(int(labels.numel()) for _, labels in make_loader())

            decode_only()  # warm-up: page cache, DALI/worker start-up code paths
            seconds, n = timed(decode_only)
            rows.append((f"{backend}: decode only", n / seconds, (n / seconds) / model_rate))
            seconds, n = timed(lambda: evaluate_loader(runner, make_loader()).count)
            rows.append((f"{backend}: decode + model", n / seconds, (n / seconds) / model_rate))

    header = (f"bench_eval: {args.model} at {args.image_size}px, batch {args.batch_size}, {args.images} images, "
              f"precision {args.precision}, {args.workers} decode workers, device {device}\n"
              f"machine: {machine}\n"
              f"versions: {collect_versions()}\n")
    lines = [header, f"{'path':44s} {'images/s':>10s} {'vs model only':>14s}"]
    for name, rate, ratio in rows:
        lines.append(f"{name:44s} {rate:10.1f} {ratio:14.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
