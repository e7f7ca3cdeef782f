"""Train an image classifier with Amplitude-Phase Recombination (APR-P / APR-S / APR-SP).

    apr-train --config resnet50_apr_sp --set data.root=/data/imagenet      # a shipped recipe, by name
    apr-train --config my_recipe.yaml                                      # or any recipe file
    apr-train --list-configs                                               # the shipped recipes
    torchrun --nproc_per_node=8 -m apr.commands.train --config resnet50_apr_sp
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
    parser.add_argument("--config", help="a YAML recipe file, or the name of a shipped recipe (see --list-configs); "
                                         "without it the built-in defaults are used")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped recipes by name and exit")
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


def _recipe_list() -> str:
    """One line per shipped recipe: its name, its file under apr/configs, and its first comment line."""
    from apr.config import recipes_root, shipped_recipes

    recipes = {name: (path, path.relative_to(recipes_root()).as_posix()) for name, path in shipped_recipes().items()}
    name_w = max(map(len, recipes))
    file_w = max(len(rel) for _, rel in recipes.values())
    lines = []
    for name, (path, rel) in recipes.items():
        first = (path.read_text().splitlines() or [""])[0]
        about = first.lstrip("# ").strip() if first.startswith("#") else ""
        lines.append(f"{name:<{name_w}}  {rel:<{file_w}}  {about}".rstrip())
    return "\n".join(lines)


def _train(argv=None) -> int:
    from apr.config import config_to_dict, load_config

    args = parse_args(argv)
    if args.list_configs:
        print(_recipe_list())
        return 0
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
