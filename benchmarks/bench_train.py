"""Training-step throughput: synthetic on-device data vs the real loader vs loader + APR-SP.

    python benchmarks/bench_train.py                         # CPU defaults (small model, 64 px)
    python benchmarks/bench_train.py --model resnet50 --image-size 224 --batch 256 --precision bf16  # GPU
    python benchmarks/bench_train.py --adversarial fgsm --model preact_resnet18 --image-size 32 --batch 128
        # FGSM adversarial training step vs standard step (synthetic data, no loader), ratio printed

All variants run side by side in one process on the same JPEG folder (written once from
scikit-image's photos), so the printed ratios compare like with like on a noisy machine.
Also compares the DALI loader with the torchvision DataLoader backend alone (no model).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from photos import write_photo_jpegs  # benchmarks/photos.py


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from apr.augment import APRPolicy
    from apr.config import load_config
    from apr.data import build_train_loader
    from apr.inference import ImageClassifier
    from apr.models import create_model
    from apr.train import train_step

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--images", type=int, default=640, help="JPEGs in the generated train folder")
    p.add_argument("--jpeg-size", type=int, default=None, help="stored JPEG side (default: 8/7 of image size)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--folder", type=Path, help="use this ImageNet-layout folder instead of generating one")
    p.add_argument("--adversarial", choices=["fgsm"],
                   help="only compare an FGSM adversarial-training step with a standard one (synthetic data)")
    p.add_argument("--rounds", type=int, default=3, help="--adversarial: alternating timing rounds (median kept)")
    args = p.parse_args()
    if args.adversarial:
        adversarial_comparison(args)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.TemporaryDirectory()
    root = args.folder
    if root is None:
        root, side = Path(tmp.name), args.jpeg_size or args.image_size * 8 // 7
        write_photo_jpegs(root / "train", args.images, side)
        write_photo_jpegs(root / "val", max(10, args.images // 4), side, seed=1)
    base = [f"data.root={root}", f"data.image_size={args.image_size}", f"data.val_resize={args.image_size}",
            f"train.batch_size={args.batch}", f"data.num_workers={args.workers}", f"model.name={args.model}"]

    model = create_model(args.model, 10)
    classifier = ImageClassifier(model, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], precision=args.precision,
                                 channels_last=True).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator()
    generator.manual_seed(0)
    plain = APRPolicy(name="none")

    def step(images, labels, policy=plain):
        """The training loop's own step (apr.train.train_step): APR, one forward, CE + CE, SGD."""
        train_step(classifier, optimizer, images, labels, policy=policy, generator=generator)

    def batches(backend: str):
        cfg = load_config(overrides=base + [f"data.backend={backend}"])
        loader = build_train_loader(cfg, device=device, seed=0)
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    def timed(name: str, source, fn, images_per_step: int) -> float:
        for _ in range(2):
            fn(*next(source))
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn(*next(source))
        sync(device)
        rate = args.steps * images_per_step / (time.perf_counter() - t0)
        print(f"{name:<44} {rate:9.1f} img/s", flush=True)
        return rate

    synthetic = (torch.rand(args.batch, 3, args.image_size, args.image_size, device=device),
                 torch.randint(0, 10, (args.batch,), device=device))

    def forever(item):
        while True:
            yield item

    print(f"device {device}, torch {torch.__version__}, model {args.model}, {args.image_size}px, batch {args.batch}, "
          f"precision {args.precision}, {torch.get_num_threads()} threads")
    sp = APRPolicy(name="apr_sp")
    r_syn = timed("train step, synthetic on-device data", forever(synthetic), step, args.batch)
    r_syn_sp = timed("train step + APR-SP, synthetic data", forever(synthetic), lambda x, y: step(x, y, sp), args.batch)
    # the lent GPU machine has no DALI (FIELD-NOTES): measure the rest instead of stopping there
    has_dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    if has_dali:
        r_dali = timed("train step, DALI loader", batches("dali"), step, args.batch)
        r_dali_sp = timed("train step + APR-SP, DALI loader", batches("dali"), lambda x, y: step(x, y, sp), args.batch)
    else:
        print("DALI is not installed here: DALI rows skipped", flush=True)
    r_tv = timed("train step, torchvision DataLoader", batches("torchvision"), step, args.batch)

    def drain(backend: str, n: int) -> float:
        source = batches(backend)
        next(source)
        t0 = time.perf_counter()
        for _ in range(n):
            next(source)
        return n * args.batch / (time.perf_counter() - t0)

    n = max(10, args.steps * 2)
    l_dali = drain("dali", n) if has_dali else None
    l_tv = drain("torchvision", n)
    if has_dali:
        print(f"{'loader alone, DALI':<44} {l_dali:9.1f} img/s")
    print(f"{'loader alone, torchvision DataLoader':<44} {l_tv:9.1f} img/s")
    print("ratios:")
    if has_dali:
        print(f"  DALI loader / synthetic                 {r_dali / r_syn:6.3f}")
        print(f"  DALI loader + APR-SP / synthetic        {r_dali_sp / r_syn:6.3f}   (APR-SP doubles the forward batch)")
        print(f"  DALI loader + APR-SP / synthetic + APR-SP {r_dali_sp / r_syn_sp:6.3f}   (loader cost with APR-SP on)")
    print(f"  APR-SP / no APR (synthetic)             {r_syn_sp / r_syn:6.3f}")
    print(f"  torchvision loader / synthetic          {r_tv / r_syn:6.3f}")
    if has_dali:
        print(f"  DALI / torchvision (loader alone)       {l_dali / l_tv:6.3f}")


def adversarial_comparison(args) -> None:
    """Standard vs FGSM-AT training steps (apr.train.train_step with and without ``perturb``), aug none
    and APR-SP, timed in alternating rounds on the same synthetic batch; medians and their ratios."""
    import statistics

    from apr.adversarial import FGSMPerturbation
    from apr.augment import APRPolicy
    from apr.inference import ImageClassifier
    from apr.models import create_model
    from apr.train import train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(args.model, 10)
    classifier = ImageClassifier(model, [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616],
                                 precision=args.precision, channels_last=True).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    fgsm = FGSMPerturbation(eps=8 / 255, alpha=10 / 255)
    variants = {(aug, perturb is not None): (APRPolicy(name=aug), perturb)
                for aug in ("none", "apr_sp") for perturb in (None, fgsm)}

    def seconds_per_step(policy, perturb) -> float:
        for _ in range(2):  # warm-up
            train_step(classifier, optimizer, images, labels, policy=policy, generator=generator, perturb=perturb)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(classifier, optimizer, images, labels, policy=policy, generator=generator, perturb=perturb)
        sync(device)
        return (time.perf_counter() - t0) / args.steps

    print(f"device {device}, torch {torch.__version__}, model {args.model}, {args.image_size}px, batch {args.batch}, "
          f"precision {args.precision}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps",
          flush=True)
    times = {key: [] for key in variants}
    for round_index in range(args.rounds):
        for key, (policy, perturb) in variants.items():
            times[key].append(seconds_per_step(policy, perturb))
        print(f"round {round_index + 1}: " + ", ".join(f"{'FGSM-AT' if adv else 'standard'}/{aug} "
                                                      f"{1000 * times[(aug, adv)][-1]:.0f} ms" for aug, adv in times),
              flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    for (aug, adversarial), value in median.items():
        name = f"{'FGSM-AT' if adversarial else 'standard'} step, aug {aug}"
        print(f"{name:<32} {1000 * value:9.1f} ms/step {args.batch / value:9.1f} img/s")
    for aug in ("none", "apr_sp"):
        print(f"ratio FGSM-AT / standard, aug {aug:<7} {median[(aug, True)] / median[(aug, False)]:6.3f}"
              "   (one extra forward + backward to the input)")


if __name__ == "__main__":
    main()
