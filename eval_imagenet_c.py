#!/usr/bin/env python
"""Evaluate trained checkpoints on ImageNet-C (or CIFAR-10-C / CIFAR-100-C) and write a report.

One results JSON per checkpoint (<out>/<run_name>.json, resumable: rerun the same command after a
preemption and finished cells are skipped), then <out>/report.md with tables and plots.

  python eval_imagenet_c.py --checkpoint runs/apr_sp/best.pt runs/baseline/best.pt \\
      --imagenet-c /data/ImageNet-C --val /data/imagenet/val --out eval/ --baseline baseline

Under torchrun each corruption cell is split across the GPUs: torchrun --nproc_per_node 8 eval_imagenet_c.py ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apr.metrics import ALL_CORRUPTIONS  # numbers only: cheap to import before --help


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Errors in the results JSON are fractions; CE and mCE are percent (AlexNet = 100 on ImageNet-C). "
               "Add --debug (or set APR_DEBUG=1) to see the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="one or more checkpoints written by train_imagenet.py (.pt); each gets its own results JSON")
    data = p.add_argument_group("ImageNet-C (or any tree made with python -m apr.corrupt)")
    data.add_argument("--imagenet-c", metavar="ROOT",
                      help="corrupted images laid out as ROOT/<corruption>/<severity 1-5>/<class>/*.JPEG")
    data.add_argument("--val", metavar="ROOT",
                      help="the clean validation folder ROOT/<class>/*.JPEG, for the clean error")
    data.add_argument("--dataset", choices=("auto", "imagenet-c", "folder-c"), default="auto",
                      help="which benchmark the tree is: imagenet-c is normalised by AlexNet's errors; folder-c "
                           "(a tree generated from another dataset) reports raw errors unless --baseline is given; "
                           "auto (default) = imagenet-c for 1000-class checkpoints, else folder-c")
    cifar = p.add_argument_group("CIFAR-10-C / CIFAR-100-C")
    cifar.add_argument("--cifar-c", metavar="ROOT",
                       help="folder with <corruption>.npy and labels.npy (the CIFAR-10-C or CIFAR-100-C download)")
    cifar.add_argument("--cifar", metavar="ROOT",
                       help="folder with the CIFAR python batches (cifar-10-batches-py / cifar-100-python), "
                            "for the clean error on the test set")
    p.add_argument("--out", required=True, metavar="DIR", help="where the results JSON files and the report go")
    p.add_argument("--baseline", metavar="RUN_NAME|results.json",
                   help="normalise CE/mCE by this run instead of AlexNet: a run name (one of the checkpoints given "
                        "here, or an earlier results JSON in --out) or a path to a results JSON")
    p.add_argument("--corruptions", nargs="+", choices=ALL_CORRUPTIONS, metavar="NAME",
                   help="evaluate only these corruptions (default: the 15 that make up mCE); the mCE of a subset "
                        "is marked partial")
    p.add_argument("--extra", action="store_true",
                   help="also evaluate the 4 extra corruptions (speckle_noise, gaussian_blur, spatter, saturate); "
                        "they are reported separately and never enter mCE")
    p.add_argument("--severities", nargs="+", type=int, choices=(1, 2, 3, 4, 5), default=[1, 2, 3, 4, 5],
                   metavar="S", help="severity levels to evaluate (default: all five)")
    p.add_argument("--allow-partial", action="store_true",
                   help="if some corruption/severity folders are missing, evaluate the rest and mark the mCE partial "
                        "instead of stopping with the list of what is missing")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass on each GPU (default: %(default)s)")
    p.add_argument("--backend", choices=("dali", "torchvision"), default="dali",
                   help="JPEG decoding: dali (fast, GPU decode when a GPU is there) or torchvision (PIL in worker processes); default: %(default)s")
    p.add_argument("--workers", type=int, default=4, help="decoding threads (DALI) or worker processes (torchvision, 0 = decode in the main process) per GPU "
                        "(default: %(default)s)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 runs the model under bfloat16 autocast (faster on GPU); fp32 = full float32 (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="cuda, cpu or cuda:N (default: the GPU of this rank when there is one, else the CPU)")
    p.add_argument("--no-report", action="store_true", help="write the results JSON files only, skip report.md and the plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    imagenet = args.imagenet_c is not None or args.val is not None
    cifar = args.cifar_c is not None or args.cifar is not None
    if imagenet == cifar:
        p.error("give --imagenet-c ROOT --val ROOT, or --cifar-c ROOT --cifar ROOT")
    if imagenet and (args.imagenet_c is None or args.val is None):
        p.error("ImageNet-C needs both --imagenet-c and --val")
    if cifar and (args.cifar_c is None or args.cifar is None):
        p.error("CIFAR-C needs both --cifar-c and --cifar")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def _baseline_source(args, names: list[str]):
    """(index of the baseline among the checkpoints, or None; its results dict otherwise, or None)."""
    from apr.report import ReportError, resolve_baseline

    if not args.baseline:
        return None, None
    if args.baseline in names:
        return names.index(args.baseline), None
    if Path(args.baseline).is_file() or (Path(args.out) / f"{args.baseline}.json").is_file():
        return None, resolve_baseline(args.baseline, results_dir=args.out)
    raise ReportError(f"--baseline {args.baseline!r} is neither a results JSON, nor {Path(args.out)}/"
                      f"{args.baseline}.json, nor one of the run names given here ({', '.join(names)})")


def _add_metrics(results: list[dict], baseline: dict | None, out: Path) -> None:
    """Store the normalised metrics (computed by apr.report, the one place) next to the raw cells."""
    from apr.io import atomic_write_json
    from apr.report import metrics_for

    base_name = baseline.get("run_name") if baseline else None
    for result in results:
        result["metrics"] = metrics_for(result, baseline)
        if baseline is None:
            print(f"{result['run_name']}: CE/mCE normalised by AlexNet's ImageNet-C errors")
        elif result["run_name"] == base_name:
            print(f"{result['run_name']}: this is the baseline run, evaluated once; its CE is 100 by definition")
        else:
            print(f"{result['run_name']}: CE/mCE normalised by the baseline run {base_name!r}")
        atomic_write_json(out / f"{result['run_name']}.json", result, indent=1)


def _evaluate_all(argv) -> int:
    args = parse_args(argv)
    from apr.data.suites import make_suite
    from apr.distributed import join_world
    from apr.evaluate import EvalOptions, evaluate_checkpoint, plan_run_names
    from apr.report import write_report

    names = plan_run_names(args.checkpoint)
    baseline_index, baseline = _baseline_source(args, names)
    options = EvalOptions(corruptions=args.corruptions, extra=args.extra, severities=args.severities,
                          allow_partial=args.allow_partial, batch_size=args.batch_size, backend=args.backend,
                          num_workers=args.workers, precision=args.precision, device=args.device,
                          progress=not args.quiet)
    order = sorted(range(len(names)), key=lambda i: i != baseline_index)  # the baseline first
    results = [None] * len(names)
    for i in order:
        suite = make_suite(imagenet_c=args.imagenet_c, val=args.val, cifar_c=args.cifar_c, cifar=args.cifar,
                           dataset=None if args.dataset == "auto" else args.dataset)
        results[i] = evaluate_checkpoint(args.checkpoint[i], suite, args.out, options, run_name=names[i])
    if baseline_index is not None:
        baseline = results[baseline_index]
    if join_world(args.device).is_main:
        _add_metrics(results, baseline, Path(args.out))
        if not args.no_report:
            print(f"report: {write_report(results, args.out, baseline=baseline)}")
    return 0


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2 (``--debug`` or APR_DEBUG=1 keeps the traceback)."""
    import torch.distributed as dist

    from apr.cli import run_main

    try:
        return run_main(_evaluate_all, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
