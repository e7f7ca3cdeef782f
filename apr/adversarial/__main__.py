"""``python -m apr.adversarial``: FGSM / PGD / AutoAttack robust accuracy of checkpoints -> JSON.

    python -m apr.adversarial --checkpoint A.pt B.pt --cifar /data/cifar-10-batches-py \\
        --attack fgsm pgd autoattack --eps 8/255 --norm Linf --n 10000 --out report/
    torchrun --nproc_per_node=8 -m apr.adversarial ...      # the n images split over the GPUs
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from apr.adversarial.attacks import BF16_ATTACK_WARNING, AdversarialError, NORMS, parse_eps
from apr.adversarial.run import ATTACKS, EPS_SWEEP_FACTORS, build_attacks, evaluate_attacks, pgd_spec
from apr.adversarial.data import load_eval_subset
from apr.cli import run_main
from apr.data import BACKENDS
from apr.distributed import join_world, resolve_device
from apr.inference import ImageClassifier
from apr.results import check_output_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apr.adversarial",
                                description="FGSM / PGD / AutoAttack robust accuracy of checkpoints, one "
                                            "resumable JSON each (<out>/<run_name>.adv.json).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoints (.pt) written by the training loop")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--cifar", help="CIFAR python folder (cifar-10-batches-py or cifar-100-python); its test set")
    data.add_argument("--val", help="ImageFolder tree <val>/<class>/* (e.g. /data/imagenet/val)")
    p.add_argument("--attack", nargs="+", default=["fgsm", "pgd", "autoattack"], choices=ATTACKS,
                   help="fgsm: one signed step of eps from the image; pgd: Linf PGD; autoattack: the standard "
                        "AutoAttack ensemble (APGD-CE, APGD-T, FAB-T, Square) of pyautoattack")
    p.add_argument("--eps", default="8/255", help="perturbation size in pixel units of [0, 1] images (8/255 or 0.031)")
    p.add_argument("--norm", default="Linf", choices=NORMS, help="threat model (L2 only with --attack autoattack)")
    p.add_argument("--n", type=int, default=None, help="attack this many images: a fixed class-balanced subset "
                                                       "(default: the whole set)")
    p.add_argument("--seed", type=int, default=0, help="picks the subset and seeds the attacks' random starts")
    p.add_argument("--out", required=True, help="folder for <run_name>.adv.json")
    p.add_argument("--batch-size", type=int, default=250, help="images per attack batch")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 is the honest choice: bf16 gradients can mask robustness")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: this rank's GPU, else the CPU)")
    p.add_argument("--pgd-steps", type=int, default=50, help="PGD iterations")
    p.add_argument("--pgd-alpha", default=None, help="PGD step size (default eps/4)")
    p.add_argument("--pgd-restarts", type=int, default=1, help="PGD random restarts (per image the worst is kept)")
    p.add_argument("--eps-sweep", action="store_true", help="also run a short PGD at eps x "
                   f"{{{', '.join(str(f) for f in EPS_SWEEP_FACTORS)}}} on a small subset: robust accuracy "
                   "must fall as eps grows, or gradients are masked")
    p.add_argument("--sweep-n", type=int, default=500, help="images for --eps-sweep (the first of the --n subset)")
    p.add_argument("--sweep-steps", type=int, default=10, help="PGD iterations for --eps-sweep")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="image decoding for --val (default: the checkpoint's data.backend)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads for --val")
    return p


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
    eps = parse_eps(args.eps)
    pgd_alpha = parse_eps(args.pgd_alpha) if args.pgd_alpha is not None else None
    if args.batch_size < 1:
        raise AdversarialError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.eps_sweep and (args.norm != "Linf" or args.sweep_n < 1 or args.sweep_steps < 1):
        raise AdversarialError("--eps-sweep is a Linf PGD check: use --norm Linf, --sweep-n >= 1, --sweep-steps >= 1")
    if args.n is not None and args.n < 1:
        raise AdversarialError(f"--n must be at least 1, got {args.n}")
    if args.workers < 0:
        raise AdversarialError(f"--workers must be >= 0, got {args.workers}")
    attacks = build_attacks(args.attack, eps=eps, norm=args.norm, pgd_steps=args.pgd_steps, pgd_alpha=pgd_alpha,
                            pgd_restarts=args.pgd_restarts, seed=args.seed)
    missing = [c for c in args.checkpoint if not Path(c).is_file()]
    if missing:
        raise AdversarialError(f"checkpoint(s) not found: {', '.join(missing)}")
    if args.precision == "bf16":
        warnings.warn(BF16_ATTACK_WARNING, stacklevel=1)
    world = join_world(args.device)
    if world.is_main:
        check_output_folder(args.out)
    device = resolve_device(args.device, world)
    from apr.evaluation import plan_run_names

    for path, run_name in zip(args.checkpoint, plan_run_names(args.checkpoint)):
        result = evaluate_checkpoint(path, run_name, args, attacks, world, device)
        if world.is_main:
            line = ", ".join(f"{k} {v['robust_accuracy']:.4f}" for k, v in result["attacks"].items())
            print(f"{run_name}: clean {result['clean']['accuracy']:.4f}, {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
