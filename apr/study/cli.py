"""``apr-study run|status STUDY.yaml``: reproduce a paper table with one command.

    apr-study run apr/configs/studies/imagenet_resnet50.yaml --set paths.imagenet=/data/imagenet
    apr-study run STUDY.yaml --launcher slurm          # job array + afterok dependencies
    apr-study run STUDY.yaml --dry-run                 # print the commands only
    apr-study status STUDY.yaml                        # one line per step

Rerunning skips what is done, resumes what was interrupted and re-runs the steps whose inputs changed.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="apr-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "status"), help="run the steps not done yet, or show each step's state")
    p.add_argument("study", help="the study file (YAML), e.g. apr/configs/studies/cifar10_wrn40_2.yaml")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: one step after the other on this machine (torchrun with gpus > 1); slurm: sbatch "
                        "through slurm/*.sh (default: %(default)s)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="paths.NAME=VALUE",
                   help="set a path variable of the study, e.g. --set paths.imagenet=/data/imagenet; repeat as needed")
    p.add_argument("--out", default=None, help="the study folder (default: the study's out:, else studies/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    p.add_argument("--verbose", action="store_true",
                   help="local launcher: show each step's output as it runs (it also goes to the step's log)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p.parse_args(argv)


def _status(study, steps) -> int:
    from apr.study.plan import step_log, step_state
    from apr.study.slurm import job_alive

    for step in steps:
        state = step_state(study, step, job_alive)
        detail = f" - {state.detail}" if state.detail else ""
        print(f"{step.id:<40} {state.status:<8} {step_log(study, step.id)}{detail}")
    return 0


def _dry_run_local(study, steps) -> int:
    from apr.study.commands import local_argv
    from apr.study.plan import step_state

    for step in steps:
        state = step_state(study, step)
        if state.status == "done":
            print(f"# {step.id}: done")
        else:
            print(shlex.join(local_argv(sys.executable, step.module, step.args, study.gpus)))
    return 0


def _main(argv=None) -> int:
    from apr.study.plan import plan
    from apr.study.spec import StudyError, load_study, missing_paths

    args = parse_args(argv)
    study = load_study(args.study, args.sets, out=args.out)
    steps = plan(study)
    if args.action == "status":
        return _status(study, steps)
    if args.launcher == "slurm":
        from apr.study.slurm import submit

        return submit(study, steps, dry_run=args.dry_run)
    if args.dry_run:
        return _dry_run_local(study, steps)
    missing = missing_paths(study)
    if missing:
        raise StudyError(f"data not found: {', '.join(missing)}; set the study's paths, e.g. --set "
                         f"paths.NAME=/data/... (see paths: in {args.study})")
    from apr.study.local import run_local

    return run_local(study, steps, tee=args.verbose)


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2."""
    from apr.cli import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
