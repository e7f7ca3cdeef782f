"""The images an adversarial evaluation attacks: a fixed class-balanced subset of CIFAR or an ImageFolder.

File layouts stay in ``apr.data``; this module only picks the subset, shards it over the ranks and
fingerprints it (so a resumed result is known to be about the same images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from apr.adversarial.attacks import AdversarialError
from apr.adversarial.run import fingerprint, stratified_subset
from apr.distributed import World
from apr.results import files_fingerprint
from apr.data.base import eval_shard

__all__ = ["EvalSubset", "load_eval_subset", "cifar_subset", "folder_subset"]


@dataclass
class EvalSubset:
    n: int
    info: dict  # dataset identity written in the JSON and compared on resume
    batches: Callable[[], Iterable]  # this rank's share of the n images, in batches
    sweep_batches: Callable[[], Iterable]  # this rank's share of the first sweep_n images
    shard_size: int

    def progress(self, label: str):
        from tqdm.auto import tqdm

        return tqdm(total=self.shard_size, desc=label, unit="img", dynamic_ncols=True)


def _check_n(n: int | None, total: int, clamp: bool = False) -> int:
    """``n`` images of ``total``; ``clamp``: a default larger than the set means the whole set."""
    n = total if n is None else min(int(n), total) if clamp else int(n)
    if not 0 < n <= total:
        raise AdversarialError(f"--max-images {n} is not in 1..{total} (the number of images in the set); "
                               "lower --max-images")
    return n


def cifar_subset(images_uint8: np.ndarray, labels: np.ndarray, *, name: str, n: int | None, seed: int, clamp: bool = False,
                 batch_size: int, sweep_n: int, world: World, device) -> EvalSubset:
    """The first n of the seeded balanced order of an in-memory set (N x H x W x 3 uint8)."""
    from apr.data import TensorBatchLoader

    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n = _check_n(n, len(labels_t), clamp)
    order = stratified_subset(labels_t, n, seed)
    images = np.ascontiguousarray(np.asarray(images_uint8)[order.numpy()])
    chosen = labels_t[order]
    info = {"kind": name, "total": len(labels_t), "n": n, "seed": seed,
            "fingerprint": fingerprint(name, images.tobytes(), chosen.numpy().tobytes())}

    def loader(count: int):
        return lambda: TensorBatchLoader(images[:count], chosen[:count].numpy(), batch_size, train=False,
                                         rank=world.rank, world_size=world.world_size, device=device)

    return EvalSubset(n, info, loader(n), loader(min(sweep_n, n)), len(eval_shard(n, world.rank, world.world_size)))


def folder_subset(root: str, classes, *, n: int | None, seed: int, clamp: bool = False, batch_size: int, sweep_n: int, world: World,
                  device, image_size: int, resize: int | None, backend: str, workers: int,
                  verify: bool = True) -> EvalSubset:
    """The first n of the seeded balanced order of an ImageFolder tree, decoded by the chosen backend."""
    from apr.data import build_image_loader
    from apr.data.layout import scan_image_folder

    from apr.data.layout import warn_missing_classes

    index = scan_image_folder(root, classes=classes, verify=verify, allow_missing_classes=True, decode=verify)
    missing = warn_missing_classes(root, [c for c, k in zip(index.classes, index.class_counts()) if k == 0])
    labels_t = torch.as_tensor(list(index.labels), dtype=torch.int64)
    n = _check_n(n, len(labels_t), clamp)
    order = stratified_subset(labels_t, n, seed).tolist()
    files = [index.files[i] for i in order]
    labels = [int(labels_t[i]) for i in order]
    info = {"kind": "imagefolder", "root": str(root), "total": len(labels_t), "n": n, "seed": seed,
            "image_size": image_size, "resize": resize,
            "preprocessing": f"resize shorter side to {resize}, centre crop {image_size}",
            "skipped_count": len(index.skipped), "skipped": index.skipped[:1000], "missing_classes": missing,
            "fingerprint": files_fingerprint(root, files, labels=fingerprint(" ".join(map(str, labels))))}

    def loader(count: int):
        return lambda: build_image_loader(files[:count], labels[:count], index.classes, backend=backend,
                                          batch_size=batch_size, train=False, image_size=image_size, resize=resize,
                                          num_workers=workers, rank=world.rank, world_size=world.world_size,
                                          local_rank=world.local_rank, device=device, roots=[str(root)])

    return EvalSubset(n, info, loader(n), loader(min(sweep_n, n)), len(eval_shard(n, world.rank, world.world_size)))


def load_eval_subset(args, cfg, classes, world: World, device) -> EvalSubset:
    """The subset named by the CLI options (``--cifar`` or ``--val``) for a checkpoint's config and classes."""
    common = dict(n=args.max_images, clamp=getattr(args, "max_images_default", False), seed=args.seed, batch_size=args.batch_size, sweep_n=args.sweep_n, world=world,
                  device=device)
    if args.cifar:
        from apr.data import load_cifar

        name = cfg.data.dataset if str(cfg.data.dataset).startswith("cifar") else (
            "cifar100" if len(classes) == 100 else "cifar10")
        images, labels, cifar_classes = load_cifar(args.cifar, name, train=False)
        if len(cifar_classes) != len(classes):
            raise AdversarialError(f"{args.cifar} has {len(cifar_classes)} classes, the checkpoint "
                                   f"{len(classes)}: give the CIFAR folder the model was trained on")
        return cifar_subset(images, labels, name=name, **common)
    from apr.data import eval_preprocessing

    pre = eval_preprocessing(cfg.data, image_size=getattr(args, "image_size", None), resize=getattr(args, "resize", None))
    return folder_subset(args.val, classes, image_size=pre.image_size, resize=pre.resize,
                         backend=args.backend or cfg.data.backend, workers=args.workers,
                         verify=cfg.data.verify_images, **common)
