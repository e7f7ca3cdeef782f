"""Images/s of the DALI pipeline, the GPU-decode backend and the torchvision DataLoader on the same JPEGs.

All backends run the same train (RandomResizedCrop 224 + flip) and val (resize 256, center crop 224)
work on real photos (crops of scikit-image's sample photographs, 256x256 JPEG q90), side by side in one
run; the ratios to torchvision are printed. On a CPU this measures each backend's CPU twin (DALI
``device_id=None``; ``gpu`` = torchvision.io ``decode_jpeg(device="cpu")`` with reader threads), i.e. the
per-core decode+augment cost; ``--device cuda`` measures DALI's "mixed" decoder and nvJPEG instead.
A backend that is not installed (DALI on the lent GPU box) is reported as such.

    python benchmarks/bench_loader.py --images 1000 --workers 2 --out /work/notes/bench_loader.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from photos import write_photo_jpegs  # benchmarks/photos.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


BACKENDS = ("dali", "gpu", "torchvision")


def run(backend: str, train: bool, index, batch: int, workers: int, epochs: int, device: str = "cpu") -> float | None:
    """Images/s of ``backend`` over ``epochs`` epochs after a warm-up; None where the backend is not installed."""
    from apr.data import build_image_loader
    from apr.data.dali import DaliMissingError

    try:
        loader = build_image_loader(index.files, index.labels, index.classes, backend=backend, batch_size=batch,
                                    train=train, image_size=224, resize=None if train else 256, num_workers=workers,
                                    device=device)
    except DaliMissingError:
        return None
    for i, _ in enumerate(loader):  # warm-up: workers/threads start, first batches
        if i == 2:
            break
    count, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch + 1)
        for images, _ in loader:
            count += len(images)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def describe(name: str, rates: dict) -> str:
    """One line: each backend's img/s and its ratio to torchvision."""
    base = rates["torchvision"]
    cells = [f"{b} {'not installed':>14s}" if r is None else f"{b} {r:8.1f} img/s ({r / base:.2f}x)"
             for b, r in rates.items()]
    return f"{name:38s} " + "   ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="number of 256x256 JPEGs to generate")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="DALI threads / GPU-decode reader threads / DataLoader worker processes")
    parser.add_argument("--device", default="cpu", help="cpu (default; the CPU twins) or cuda")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per measurement")
    parser.add_argument("--machine", default=f"this {os.cpu_count()}-core CPU box", help="machine name for the report")
    parser.add_argument("--out", default="", help="also write the figures to this text file")
    args = parser.parse_args()

    from apr.data import scan_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = write_photo_jpegs(Path(tmp) / "jpegs", args.images, 256)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s")
        index = scan_image_folder(root)
        rows = []
        for train in (True, False):
            rates = {b: run(b, train, index, args.batch, args.workers, args.epochs, args.device) for b in BACKENDS}
            name = "train (RandomResizedCrop 224 + flip)" if train else "val (resize 256 + center crop 224)"
            rows.append(describe(name, rates))
            print(rows[-1], flush=True)
    import torch
    import torchvision

    try:
        import nvidia.dali

        dali = f"DALI {nvidia.dali.__version__} ({'mixed decoder' if args.device.startswith('cuda') else 'CPU pipeline, device_id=None'})"
    except ImportError:
        dali = "DALI not installed"
    header = (f"bench_loader: {args.images} JPEGs 256x256 q90 (crops of real photos), batch {args.batch}, "
              f"{args.workers} DALI threads / GPU-decode reader threads / DataLoader workers, {args.epochs} timed "
              f"epoch(s) after warm-up, device {args.device}\n"
              f"machine: {args.machine} ({platform.processor() or platform.machine()}); {dali}, "
              f"torch {torch.__version__}, torchvision {torchvision.__version__}\n")
    if args.out:
        Path(args.out).write_text(header + "\n".join(rows) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
