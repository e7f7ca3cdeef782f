"""``python -m apr.adversarial``: FGSM / PGD / AutoAttack robust accuracy of checkpoints -> JSON.

    python -m apr.adversarial --checkpoint A.pt B.pt --cifar /data/cifar-10-batches-py \\
        --attack fgsm pgd autoattack --eps 8/255 --norm Linf --max-images 10000 --out report/
    torchrun --nproc_per_node=8 -m apr.adversarial ...      # the n images split over the GPUs
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from apr.adversarial.attacks import BF16_ATTACK_WARNING, AdversarialError, NORMS, check_autoattack_classes, parse_eps
from apr.adversarial.run import ATTACKS, EPS_SWEEP_FACTORS, build_attacks, evaluate_attacks, pgd_spec
from apr.adversarial.data import load_eval_subset
from apr.cli import DefaultsHelpFormatter, add_common, add_flag, run_main
from apr.data import BACKENDS
from apr.distributed import join_world, resolve_device
from apr.inference import ImageClassifier, resolve_precision
from apr.results import check_output_folder

# data -> (Linf eps, images attacked): RobustBench's ImageNet Linf protocol (4/255 on a fixed 5,000-image subset
# of val) and its CIFAR one (8/255 on the 10,000 test images)
DATA_DEFAULTS = {"imagenet": ("4/255", 5000), "cifar": ("8/255", 10000)}
_DEFAULTS_HELP = "ImageNet folders 4/255, CIFAR 8/255"
# standard AutoAttack, per image at most: APGD-CE 100 + APGD-T 9 x 100 + FAB-T 9 x 100 + Square 5,000 queries
AUTOATTACK_STANDARD_PASSES = 100 + 900 + 900 + 5000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apr.adversarial",
                                description="FGSM / PGD / AutoAttack robust accuracy of checkpoints, one "
                                            "resumable JSON each (<out>/<run_name>.adv.json). Defaults follow the "
                                            "data, as RobustBench reports: an ImageNet folder (--val) is attacked "
                                            "at Linf 4/255 on a fixed class-balanced 5,000-image subset, CIFAR "
                                            "at 8/255 on its 10,000 test images; the plan and its estimated cost "
                                            "are printed before the run.",
                                formatter_class=DefaultsHelpFormatter)
    add_flag(p, "checkpoint", required=True)
    data = p.add_mutually_exclusive_group(required=True)
    add_flag(data, "cifar")
    add_flag(data, "val")
    p.add_argument("--attack", nargs="+", default=["fgsm", "pgd", "autoattack"], choices=ATTACKS,
                   help="fgsm: one signed step of eps from the image; pgd: Linf PGD; autoattack: the standard "
                        "AutoAttack ensemble (APGD-CE, APGD-T, FAB-T, Square) of pyautoattack")
    p.add_argument("--eps", default=None,
                   help="perturbation size in pixel units of [0, 1] images (8/255 or 0.031; default: follows the "
                        f"data as RobustBench reports: {_DEFAULTS_HELP})")
    p.add_argument("--norm", default="Linf", choices=NORMS, help="threat model (L2 only with --attack autoattack)")
    p.add_argument("--seed", type=int, default=0, help="picks the subset and seeds the attacks' random starts")
    # fp32 by default here: bf16 / fp16 gradients can mask robustness (the attacks look weaker than they are)
    add_common(p, "max_images", "out", "batch_size", "precision", "device", required=["out"],
               defaults={"batch_size": 250, "precision": "fp32"}, old=["--n"])
    p.add_argument("--pgd-steps", type=int, default=50, help="PGD iterations")
    p.add_argument("--pgd-alpha", default=None, help="PGD step size (default eps/4)")
    p.add_argument("--pgd-restarts", type=int, default=1, help="PGD random restarts (per image the worst is kept)")
    p.add_argument("--eps-sweep", action="store_true", help="also run a short PGD at eps x "
                   f"{{{', '.join(str(f) for f in EPS_SWEEP_FACTORS)}}} on a small subset: robust accuracy "
                   "must fall as eps grows, or gradients are masked")
    p.add_argument("--sweep-n", type=int, default=500, help="images for --eps-sweep (the first of the --max-images subset)")
    p.add_argument("--sweep-steps", type=int, default=10, help="PGD iterations for --eps-sweep")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="image decoding for --val (default: the checkpoint's data.backend)")
    add_common(p, "workers", defaults={"workers": 4})
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="--val images are centre-cropped to this size (default: the checkpoint's data.image_size)")
    p.add_argument("--resize", type=int, default=None, metavar="PX",
                   help="shorter side of --val images before the crop (default: a CIFAR checkpoint's image size, "
                        "an ImageNet-layout checkpoint's data.val_resize)")
    return p


def apply_data_defaults(args) -> None:
    """Fill in --eps and --max-images from the data (ImageNet folder or CIFAR); ``args.plan`` says which."""
    eps, n = DATA_DEFAULTS["cifar" if args.cifar else "imagenet"]
    given = [flag for flag, value in (("--eps", args.eps), ("--max-images", args.max_images)) if value is not None]
    args.max_images_default = args.max_images is None
    args.eps = eps if args.eps is None else args.eps
    args.max_images = n if args.max_images is None else args.max_images
    data = "CIFAR" if args.cifar else "ImageNet (image folder)"
    args.plan = f"{data} " + (f"with {' and '.join(given)} as given" if len(given) == 2 else
                              "defaults, as RobustBench reports" + (f" ({given[0]} as given)" if given else ""))


def attack_passes(spec) -> int:
    """Forward/backward passes per image of one attack, at most (AutoAttack attacks only the still-robust images)."""
    settings = spec.settings
    if settings["name"] == "autoattack" and settings.get("version") == "standard":
        return AUTOATTACK_STANDARD_PASSES
    if settings["name"] == "autoattack":
        return int(settings.get("apgd_iters", 100)) * max(1, len(settings.get("attacks") or [1]))
    return int(settings["steps"]) * int(settings.get("restarts", 1))


def cost_line(attacks, images: int) -> str:
    per = {spec.name: attack_passes(spec) for spec in attacks}
    total = images * sum(per.values())
    return (f"estimated cost: {images} images x up to {sum(per.values())} forward/backward passes "
            f"({', '.join(f'{k} {v}' for k, v in per.items())}) = {total:,} passes per checkpoint")


def sweep_attacks(eps: float, steps: int) -> list:
    """Short PGD (alpha = 2.5 eps / steps, Madry et al.) at each eps of the sweep; eps stays <= 1."""
    specs = []
    for factor in EPS_SWEEP_FACTORS:
        e = min(eps * factor, 1.0)
        specs.append(pgd_spec(f"pgd@{factor}eps", e, min(2.5 * e / steps, 1.0), steps=steps))
    return specs


def evaluate_checkpoint(path: str, run_name: str, args, attacks, world, device) -> dict:
    """One checkpoint: model behind its normalisation, the subset, the attacks -> the JSON."""
    from apr.checkpoint import load_model_for_eval
    from apr.config import config_to_dict
    from apr.results import collect_versions, file_sha256

    model, cfg, classes, info = load_model_for_eval(path, map_location="cpu")
    classifier = ImageClassifier(model, cfg.data.mean, cfg.data.std, precision=args.precision,
                                 channels_last=bool(cfg.model.channels_last)).to(device).eval()
    subset = load_eval_subset(args, cfg, classes, world, device)
    if world.is_main:
        print(f"{run_name}: {args.norm} eps {args.eps} on a fixed class-balanced subset of {subset.n} of "
              f"{subset.info['total']} images ({getattr(args, 'plan', 'as given')}); "
              f"{cost_line(attacks, subset.n)}", file=sys.stderr)
    identity = {"run_name": run_name, "checkpoint_sha256": file_sha256(path), "dataset": subset.info,
                "precision": args.precision}
    extra = {"checkpoint": str(path), "model_name": info.get("model_name"), "config": config_to_dict(cfg),
             "versions": collect_versions()}
    sweep = sweep_attacks(parse_eps(args.eps), args.sweep_steps) if args.eps_sweep else None
    return evaluate_attacks(classifier, subset.batches, attacks=attacks, out_path=Path(args.out) / f"{run_name}.adv.json",
                            identity=identity, extra=extra, n=subset.n, seed=args.seed, device=device, world=world,
                            sweep=sweep, make_sweep_batches=subset.sweep_batches, progress_factory=subset.progress)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    apply_data_defaults(args)
    eps = parse_eps(args.eps)
    pgd_alpha = parse_eps(args.pgd_alpha) if args.pgd_alpha is not None else None
    if args.batch_size < 1:
        raise AdversarialError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.eps_sweep and (args.norm != "Linf" or args.sweep_n < 1 or args.sweep_steps < 1):
        raise AdversarialError("--eps-sweep is a Linf PGD check: use --norm Linf, --sweep-n >= 1, --sweep-steps >= 1")
    if args.max_images < 1:
        raise AdversarialError(f"--max-images must be at least 1, got {args.max_images}")
    if args.workers < 0:
        raise AdversarialError(f"--workers must be >= 0, got {args.workers}")
    attacks = build_attacks(args.attack, eps=eps, norm=args.norm, pgd_steps=args.pgd_steps, pgd_alpha=pgd_alpha,
                            pgd_restarts=args.pgd_restarts, seed=args.seed)
    missing = [c for c in args.checkpoint if not Path(c).is_file()]
    if missing:
        raise AdversarialError(f"checkpoint(s) not found: {', '.join(missing)}")
    if "autoattack" in args.attack:  # every checkpoint checked before the first clean pass
        from apr.checkpoint import load_checkpoint

        for path in args.checkpoint:
            check_autoattack_classes(load_checkpoint(path)["num_classes"], f"checkpoint {path}")
    world = join_world(args.device)
    if world.is_main:
        check_output_folder(args.out)
    device = resolve_device(args.device, world)
    args.precision = resolve_precision(args.precision, device)
    if args.precision in ("bf16", "fp16"):
        warnings.warn(BF16_ATTACK_WARNING, stacklevel=1)
    from apr.evaluation import plan_run_names

    for path, run_name in zip(args.checkpoint, plan_run_names(args.checkpoint)):
        result = evaluate_checkpoint(path, run_name, args, attacks, world, device)
        if world.is_main:
            line = ", ".join(f"{k} {v['robust_accuracy']:.4f}" for k, v in result["attacks"].items())
            print(f"{run_name}: clean {result['clean']['accuracy']:.4f}, {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
