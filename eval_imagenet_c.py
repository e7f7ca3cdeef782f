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
        epilog="Errors in the results JSON are fractions; CE and mCE are percent (AlexNet = 100 on ImageNet-C).",
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


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist

    from apr.checkpoint import CheckpointError
    from apr.evaluate import EvalError, evaluate_checkpoint, load_result, plan_run_names
    from apr.data import DatasetLayoutError
    from apr.metrics import MetricsError
    from apr.report import ReportError, write_report
    try:
        names = plan_run_names(args.checkpoint)
        order = list(range(len(args.checkpoint)))
        baseline_result, baseline_index = None, None
        if args.baseline:
            if args.baseline in names:  # evaluate the baseline first, then normalise the others by it
                baseline_index = names.index(args.baseline)
                order.remove(baseline_index)
                order.insert(0, baseline_index)
            elif Path(args.baseline).is_file():
                baseline_result = load_result(args.baseline)
            elif (Path(args.out) / f"{args.baseline}.json").is_file():
                baseline_result = load_result(Path(args.out) / f"{args.baseline}.json")
            else:
                raise EvalError(f"--baseline {args.baseline!r} is neither a results JSON, nor {Path(args.out)}/"
                                f"{args.baseline}.json, nor one of the run names given here ({', '.join(names)})")
        results = [None] * len(order)

        def run(i: int, baseline: dict | None) -> dict:
            return evaluate_checkpoint(
                args.checkpoint[i], imagenet_c_root=args.imagenet_c, val_root=args.val,
                cifar_c_root=args.cifar_c, cifar_root=args.cifar, out_dir=args.out,
                corruptions=args.corruptions, extra=args.extra, severities=args.severities,
                allow_partial=args.allow_partial, batch_size=args.batch_size, backend=args.backend,
                num_workers=args.workers, precision=args.precision, device=args.device,
                baseline_result=baseline, dataset=None if args.dataset == "auto" else args.dataset,
                run_name=names[i], progress=not args.quiet,
            )

        for i in order:
            results[i] = run(i, baseline_result)
            if i == baseline_index:
                # normalised by itself (CE 100 by definition), so its JSON reads like the others';
                # every cell is already in its JSON, so this only recomputes the metrics
                baseline_result = results[i] = run(i, results[i])
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        if is_main and not args.no_report:
            report = write_report(results, args.out, baseline=baseline_result)
            print(f"report: {report}")
    except (EvalError, CheckpointError, DatasetLayoutError, MetricsError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
