"""Train an image classifier with Amplitude-Phase Recombination (APR-P / APR-S / APR-SP).

    apr-train --config configs/imagenet/resnet50_apr_sp.yaml --set data.root=/data/imagenet
    torchrun --nproc_per_node=8 -m apr.commands.train --config configs/imagenet/resnet50_apr_sp.yaml
    accelerate launch --multi_gpu --num_processes 8 -m apr.commands.train --config ...
    sbatch slurm/train.sh configs/imagenet/resnet50_apr_sp.yaml

The script only parses, composes and runs: the loop lives in apr/train.py.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from apr.cli import add_common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/); without it the built-in defaults are used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe value, e.g. --set train.epochs=5 --set data.root=/data/imagenet "
                             "(values are read as YAML: 5, 0.1, true, [60, 120]); repeat as needed")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue a run: 'auto' picks the newest checkpoint in the run folder "
                             "(starts fresh if there is none), or give a checkpoint file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit without training")
    add_common(parser, "progress", "debug")
    return parser.parse_args(argv)


def _train(argv=None) -> int:
    from apr.config import config_to_dict, load_config

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        from apr.train import resolve_num_threads

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
        if cfg.train.num_threads == 0:
            print(f"# train.num_threads 0 (auto) resolves to {resolve_num_threads(cfg)} here")
        return 0

    from apr.train import train

    result = train(cfg, resume=args.resume, progress=args.progress)
    if result.status == "preempted":
        return 0  # saved cleanly; slurm requeues and --resume auto continues
    if result.val_top1_error is not None:
        print(f"finished: val top-1 error {100 * result.val_top1_error:.2f}% -> {result.run_dir}")
    return 0


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2 (``--debug`` or APR_DEBUG=1 keeps the traceback)."""
    from apr.cli import run_main

    return run_main(_train, argv)


if __name__ == "__main__":
    sys.exit(main())
