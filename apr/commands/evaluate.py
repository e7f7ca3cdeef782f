"""Evaluate trained checkpoints and third-party weights on ImageNet-C (or CIFAR-10-C / CIFAR-100-C) and on
distribution-shift suites (ImageNet-R/-A/-Sketch/-V2, ImageNet-C-bar, CIFAR-10.1), then write a report.

One results JSON per model and benchmark family (<out>/<run_name>.json for corruptions,
<out>/<run_name>.shift.json for the shift suites; resumable: rerun the same command after a
preemption and finished cells are skipped), then <out>/report.md with tables and plots.

  apr-eval --checkpoint runs/apr_sp/best.pt runs/baseline/best.pt \\
      --imagenet-c /data/ImageNet-C --val /data/imagenet/val --out eval/ --baseline baseline
  apr-eval --checkpoint runs/apr_sp/best.pt --model resnet50 --weights augmix.pth.tar \\
      --val /data/imagenet/val --suite imagenet-r=/data/imagenet-r imagenet-a=/data/imagenet-a --out eval/

Under torchrun each cell is split across the GPUs: torchrun --nproc_per_node 8 -m apr.commands.evaluate ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apr.cli import add_common, add_flag
from apr.metrics import ALL_CORRUPTIONS  # numbers only: cheap to import before --help

SUITE_HELP = ("imagenet-r, imagenet-a (200-class wnid folders, scored on those 200 logits), imagenet-sketch "
              "(1000 wnid folders), imagenet-v2 (folders 0..999 = class indices), imagenet-c-bar "
              "(<corruption>/<severity>/<wnid>/), cifar10.1 (cifar10.1_v6_data.npy + cifar10.1_v6_labels.npy)")


def _add_model_and_suite_args(p: argparse.ArgumentParser) -> None:
    """Third-party weights and the distribution-shift suites."""
    third = p.add_argument_group("third-party weights (e.g. a released APR / AugMix ResNet-50)")
    third.add_argument("--weights", nargs="+", default=[], metavar="FILE",
                       help="weights files of the --model architecture: .safetensors, or .pth / .pth.tar / .pt state "
                            "dicts (also nested under 'state_dict' and with DataParallel's 'module.' prefix); loaded "
                            "safely (no code runs), a tensor that does not fit the model is named")
    third.add_argument("--model", metavar="NAME",
                       help="architecture of --weights: any timm model name (resnet50, ...) or a local one (wrn40_2)")
    third.add_argument("--mean", nargs=3, type=float, metavar="M",
                       help="per-channel mean the weights expect on [0, 1] images (default: timm's pretrained "
                            "config of --model, else ImageNet's 0.485 0.456 0.406)")
    third.add_argument("--std", nargs=3, type=float, metavar="S", help="per-channel std (with --mean)")
    third.add_argument("--classes", metavar="FILE",
                       help="the weights' classes in output order, one per line (default: the sorted class folders "
                            "of --val, i.e. the 1000 ImageNet wnids; or CIFAR's label names with --cifar)")
    third.add_argument("--image-size", type=int, default=None, metavar="PX",
                       help="input size: full-size photos are resized (--resize) and centre-cropped to it. Default: "
                            "a checkpoint's own (data.image_size), 224 for --weights")
    third.add_argument("--resize", type=int, default=None, metavar="PX",
                       help="shorter side before the crop. Default: a CIFAR checkpoint's image size (the whole "
                            "image), an ImageNet-layout checkpoint's data.val_resize; for --weights image size / "
                            "0.875 (256 for 224)")
    shift = p.add_argument_group("distribution-shift suites")
    shift.add_argument("--suite", nargs="+", default=[], metavar="NAME=FOLDER",
                       help=f"suites to evaluate, each a folder in its published layout: {SUITE_HELP}. With --val "
                            "(or --cifar) and no corruption tree, the clean error is measured too")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Errors in the results JSON are fractions; CE and mCE are percent (AlexNet = 100 on ImageNet-C). "
               "Add --debug (or set APR_DEBUG=1) to see the traceback of an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flag(p, "checkpoint", default=[])
    _add_model_and_suite_args(p)
    data = p.add_argument_group("ImageNet-C (or any tree made with python -m apr.corrupt)")
    data.add_argument("--imagenet-c", metavar="ROOT",
                      help="corrupted images laid out as ROOT/<corruption>/<severity 1-5>/<class>/*.JPEG")
    add_flag(data, "val")
    data.add_argument("--dataset", choices=("auto", "imagenet-c", "folder-c"), default="auto",
                      help="which benchmark the tree is: imagenet-c is normalised by AlexNet's errors; folder-c "
                           "(a tree generated from another dataset) reports raw errors unless --baseline is given; "
                           "auto (default) = imagenet-c for 1000-class checkpoints, else folder-c")
    cifar = p.add_argument_group("CIFAR-10-C / CIFAR-100-C")
    cifar.add_argument("--cifar-c", metavar="ROOT",
                       help="folder with <corruption>.npy and labels.npy (the CIFAR-10-C or CIFAR-100-C download)")
    add_flag(cifar, "cifar")
    add_flag(p, "out", required=True)
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
                   metavar="S", help="severity levels to evaluate, also of ImageNet-C-bar (default: all five)")
    p.add_argument("--allow-partial", action="store_true",
                   help="if some corruption/severity folders (or cells of a --suite) are missing, evaluate the rest and mark "
                        "the mCE (C-bar mean) partial instead of stopping with the list of what is missing")
    add_common(p, "max_images", "batch_size", defaults={"batch_size": 256})
    p.add_argument("--backend", choices=("auto", "dali", "gpu", "torchvision"), default="auto",
                   help="JPEG decoding: auto (default) = dali where installed, else gpu (torchvision.io decoding on "
                        "the GPU) on a GPU, else torchvision (PIL in worker processes)")
    add_common(p, "workers", "precision", "device", "progress", "debug", defaults={"workers": 4}, old=["--quiet"])
    p.add_argument("--no-report", action="store_true", help="write the results JSON files only, skip report.md and the plots")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.weights:
        p.error("give --checkpoint CKPT ... and/or --model NAME --weights FILE ...")
    if args.weights and not args.model:
        p.error("--weights needs --model NAME (the architecture, e.g. resnet50)")
    if (args.mean is None) != (args.std is None):
        p.error("give both --mean and --std, or neither")
    if args.imagenet_c is not None and args.cifar_c is not None:
        p.error("give --imagenet-c ROOT --val ROOT, or --cifar-c ROOT --cifar ROOT, not both")
    if args.imagenet_c is None and args.cifar_c is None and not args.suite and not (args.val or args.cifar):
        p.error("nothing to evaluate: give --imagenet-c ROOT --val DIR, --cifar-c ROOT --cifar DIR, "
                "--suite NAME=FOLDER ..., or --val DIR / --cifar DIR alone for the clean error")
    if args.val and args.cifar and args.imagenet_c is None and args.cifar_c is None:
        p.error("give one clean set: --val DIR or --cifar DIR")
    if args.imagenet_c is not None and args.val is None:
        p.error("ImageNet-C needs both --imagenet-c and --val")
    if args.cifar_c is not None and args.cifar is None:
        p.error("CIFAR-C needs both --cifar-c and --cifar")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_images is not None and args.max_images < 1:
        p.error("--max-images must be >= 1")
    if (args.image_size is not None and args.image_size < 1) or (args.resize is not None and args.resize < 1):
        p.error("--image-size and --resize must be >= 1 pixel")
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
    from apr.report import load_result, metrics_for

    base_name = baseline.get("run_name") if baseline else None
    for result in results:
        result.update(_update(out / f"{result['run_name']}.json", load_result,
                              lambda on_disk: {**on_disk, "metrics": metrics_for(on_disk, baseline)}))
        if result["metrics"]["normalisation"] == "none":
            print(f"{result['run_name']}: raw errors, no CE/mCE (a folder-c tree; --baseline RUN normalises by a run)")
        elif baseline is None:
            print(f"{result['run_name']}: CE/mCE normalised by AlexNet's ImageNet-C errors")
        elif result["run_name"] == base_name:
            print(f"{result['run_name']}: this is the baseline run, evaluated once; its CE is 100 by definition")
        else:
            print(f"{result['run_name']}: CE/mCE normalised by the baseline run {base_name!r}")


def _update(path: Path, read, change) -> dict:
    """``change`` applied to the results file as it is now (other runs may have added cells), under its lock."""
    from apr.results import update_results

    return update_results(path, read, change)


def _check_out(out: str) -> None:
    """--out is a writable folder, found out before any model is loaded (rank 0, where the files are written)."""
    import os

    from apr.results import check_output_folder

    if int(os.environ.get("RANK", "0")) == 0:
        check_output_folder(out)


def _models(args, names: list[str]):
    """(run name, model loader) per checkpoint, then per weights file: each model is loaded when its turn comes."""
    from apr.data.suites import read_class_list
    from apr.evaluation import load_eval_model

    sources = [lambda path=path: load_eval_model(path, image_size=args.image_size, val_resize=args.resize)
               for path in args.checkpoint]
    if args.weights:
        classes = read_class_list(classes_file=args.classes, val=args.val, cifar=args.cifar)
        sources += [lambda path=path: load_eval_model(model=args.model, weights=path, classes=classes, mean=args.mean,
                                                      std=args.std, image_size=args.image_size, val_resize=args.resize)
                    for path in args.weights]
    return list(zip(names, sources))


def _evaluate_model(args, name: str, model, options) -> tuple[dict | None, dict | None]:
    """The corruption results and the shift results of one model (None where not asked)."""
    from apr.data.suites import parse_suite_args
    from apr.evaluation import evaluate_suites

    return evaluate_suites(model, args.out, options, run_name=name, imagenet_c=args.imagenet_c, val=args.val,
                           cifar_c=args.cifar_c, cifar=args.cifar, suites=parse_suite_args(args.suite),
                           dataset=None if args.dataset == "auto" else args.dataset)


def _link_corruption(shift: dict, corruption: dict, out: Path) -> None:
    """Give the shift results the clean error and mCE of the same model's corruption results (normalised
    by apr.report, stored as the corruption JSON stores them), for the shift table's first columns."""
    metrics = corruption.get("metrics") or {}
    link = {"source": f"{corruption['run_name']}.json", "dataset": corruption.get("dataset"),
                           "clean_error": corruption["clean"]["error"], "normalisation": metrics.get("normalisation"),
                           "mce": metrics.get("mce"), "mean_corruption_error": metrics.get("mean_corruption_error"),
                           "partial": metrics.get("partial"), "units": "clean_error: fraction; mce: percent"}
    from apr.evaluation import load_shift_result

    shift.update(_update(out / f"{shift['run_name']}.shift.json", load_shift_result,
                         lambda on_disk: {**on_disk, "corruption": link}))


def _evaluate_all(argv) -> int:
    args = parse_args(argv)
    from apr.distributed import join_world
    from apr.evaluation import EvalOptions, plan_run_names
    from apr.report import write_report

    _check_out(args.out)
    names = plan_run_names(args.checkpoint, args.weights)
    baseline_index, baseline = _baseline_source(args, names)
    options = EvalOptions(corruptions=args.corruptions, extra=args.extra, severities=args.severities,
                          allow_partial=args.allow_partial, batch_size=args.batch_size, backend=args.backend,
                          num_workers=args.workers, precision=args.precision, device=args.device,
                          progress=args.progress, max_images=args.max_images)
    models = _models(args, names)
    order = sorted(range(len(names)), key=lambda i: i != baseline_index)  # the baseline first
    results, shifts = [None] * len(names), [None] * len(names)
    for i in order:
        results[i], shifts[i] = _evaluate_model(args, names[i], models[i][1](), options)
    if baseline_index is not None:
        baseline = results[baseline_index]
    if join_world(args.device).is_main:
        corruption = [r for r in results if r is not None]
        if corruption:
            _add_metrics(corruption, baseline, Path(args.out))
        for result, shift in zip(results, shifts):
            if result is not None and shift is not None:
                _link_corruption(shift, result, Path(args.out))
        if not args.no_report:
            print(f"report: {write_report(corruption + [s for s in shifts if s is not None], args.out, baseline=baseline)}")
    return 0


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2 (``--debug`` or APR_DEBUG=1 keeps the traceback)."""
    from apr.cli import run_main

    return run_main(_evaluate_all, argv)


if __name__ == "__main__":
    sys.exit(main())
