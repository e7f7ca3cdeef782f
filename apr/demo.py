"""The embedded demo: the whole mission on a real dataset that ships inside a package, as a study.

    python -m apr.demo                 # baseline vs APR-SP, one seed, about 3-4 min on 2 CPU cores
    python -m apr.demo --seeds 0 1 2 --augs none apr_p apr_s apr_sp

1. scikit-learn's 1,797 real handwritten digits -> 32x32 RGB JPEGs in ImageNet layout (cached);
2. an ImageNet-C-style tree of its val split: 15 corruptions x 5 severities (apr.corrupt), and two
   out-of-distribution sets made from pictures that ship with scikit-learn / scikit-image (cached);
3. the demo's study (``<out>/study.yaml``), run by apr.study's local launcher like any study: each aug x
   seed trained from apr/configs/demo.yaml (DALI on CPU + accelerate), each checkpoint evaluated on clean
   + corrupted images (CE normalised by the baseline run of the same seed, since AlexNet's ImageNet
   numbers mean nothing on digits), OOD detection (digits val = in, photos / textures = out) and PGD robust
   accuracy, then the report; a rerun skips what is done and resumes what was interrupted;
4. Fourier heat maps of the runs side by side (apr.analysis);
5. summary.md over seeds: corruption, OOD and adversarial tables.

The steps are the commands a user runs (apr-train, apr-eval, apr-ood, apr-attack, apr-report), each a
subprocess with its log under ``<out>/logs``; an installed ``apr-demo`` works from any folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

from apr.cli import add_flag
from apr.errors import UserError
from apr.report.common import AUG_LABELS

RECIPE = "configs/demo.yaml"  # inside the apr package (package data)
OOD_PER_SET = 300  # images per OOD set
ADV_EPS_255 = (2, 4)  # PGD eps in pixel units of 1/255: small, for 32x32 digits
ADV_STEPS = 10  # PGD iterations, step eps/4 (the apr.adversarial default rule)
OOD_SCORES = (("max_logit", "max logit"), ("msp", "MSP"), ("energy", "energy"))


class DemoError(UserError, RuntimeError):
    """A demo step that failed; its log says why."""


@contextlib.contextmanager
def packaged_recipe() -> Iterator[Path]:
    """The demo recipe shipped in the package, as a file path for as long as the block runs."""
    with importlib.resources.as_file(importlib.resources.files("apr").joinpath(RECIPE)) as path:
        yield path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m apr.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(p, "out", default="demo_output")  # data, runs and report
    p.add_argument("--augs", nargs="+", default=["none", "apr_sp"], choices=list(AUG_LABELS),
                   help="augmentations to train; the first one is the baseline CE is normalised by")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (one run per aug per seed)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--config", default=None, help="the demo recipe (default: the one shipped in the package)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra recipe overrides for training")
    p.add_argument("--corrupt-per-class", type=int, default=None,
                   help="corrupt only this many val images per class (default: all)")
    p.add_argument("--heatmap-images", type=int, default=200,
                   help="val images per Fourier heat map (0 skips the heat maps)")
    p.add_argument("--adv-images", type=int, default=200,
                   help=f"val images attacked with PGD at eps {', '.join(f'{e}/255' for e in ADV_EPS_255)} "
                        "(0 skips the adversarial step)")
    p.add_argument("--no-ood", action="store_true", help="skip the OOD detection step")
    add_flag(p, "workers", default=2)  # processes for corruption generation
    p.add_argument("--quick", action="store_true",
                   help="the reduced demo CI runs: 1 epoch, 4 corrupted images per class, small heat map, "
                        "100 OOD images per set, 50 attacked images")
    p.add_argument("--verbose", action="store_true",
                   help="show each step's output as it runs (it also goes to its log under <out>/logs)")
    add_flag(p, "debug")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the study


def demo_study(args, out: Path, recipe: Path, data_root: Path, c_root: Path,
               ood_folders: dict[str, Path] | None) -> dict:
    """The demo as a study (apr.study): every aug x seed trained from the recipe, each checkpoint evaluated
    on clean + corrupted digits (CE normalised by the first aug of the same seed), OOD sets and PGD at each
    of ADV_EPS_255 on a fixed class-balanced subset, then one report."""
    baseline = f"demo_{args.augs[0]}"
    common = [f"data.root={data_root}", *([f"train.epochs={args.epochs}"] if args.epochs is not None else []),
              *args.overrides]
    study = {"name": "demo", "out": str(out), "set": common,
             "trainings": [{"name": f"demo_{aug}", "recipe": str(recipe), "seeds": list(args.seeds),
                            "set": [f"aug.name={aug}"]} for aug in args.augs],
             "data": {"val": str(data_root / "val")},
             "corruption": {"root": str(c_root), "baseline": baseline, "options": ["--batch-size", "256"]},
             "report": {"baseline": baseline}}
    if ood_folders:
        study["ood"] = {"sets": {name: str(folder) for name, folder in ood_folders.items()}}
    if args.adv_images:
        n = str(args.adv_images)  # one batch: the subset and its random starts as the attack seeds them
        study["attacks"] = {"attack": ["pgd"], "eps": [f"{e}/255" for e in ADV_EPS_255],
                            "options": ["--pgd-steps", str(ADV_STEPS), "--max-images", n, "--batch-size", n,
                                        "--workers", "2", "--seed", "0"]}
    return study


def write_study(study: dict, path: Path) -> Path:
    """The study file of this demo run (``apr-study status/run`` read it too); rewritten only when it changed."""
    import yaml

    from apr.io import atomic_write_text

    text = ("# written by python -m apr.demo: the demo as a study; `apr-study status` shows its steps\n"
            + yaml.safe_dump(study, sort_keys=False))
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def run_study(path: Path, verbose: bool):
    """Run every step of the demo's study not done yet with the local launcher, as ``apr-study run`` does."""
    from apr.study import load_study, plan
    from apr.study.local import run_local
    from apr.study.plan import step_log, step_state

    study = load_study(path)
    steps = plan(study)
    print(f"3/5 study {path}: {len(steps)} steps (trainings, evaluations, report), each step's output in "
          f"{study.out / 'logs'}", flush=True)
    if run_local(study, steps, echo=lambda line, **_: print(f"    {line}", flush=True), tee=verbose) != 0:
        for step in steps:
            if step_state(study, step).status == "failed":
                sys.stderr.write(step_log(study, step.id).read_text(errors="replace")[-6000:])
        raise DemoError(f"a step of the demo failed (above); `apr-study status {path}` lists each step, and "
                        "rerunning the demo continues from where it stopped")
    return study


def read_results(study) -> dict[int, list[dict]]:
    """Per seed, one summary row per run, from the results files the study's steps wrote."""
    import json

    from apr.study.plan import attack_folder

    def load(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    eval_dir, per_seed = study.out / "eval", {}
    for seed in study.trainings[0].seeds:
        runs = [f"{training.name}_s{seed}" for training in study.trainings]
        corruption = [load(eval_dir / f"{run}.json") for run in runs]
        ood = [r for r in (load(eval_dir / f"{run}.ood.json") for run in runs) if r]
        adversarial = {eps: [r for r in (load(attack_folder(study, eps) / f"{run}.adv.json") for run in runs) if r]
                       for eps in (study.attacks or {}).get("eps", [])}
        per_seed[seed] = summarise(corruption, runs[0], ood, adversarial)
    return per_seed


def heat_maps(checkpoints: list[Path], val_root: Path, out: Path, images: int, quick: bool) -> None:
    """Fourier heat maps of the runs, side by side (apr.analysis)."""
    from apr.analysis import main as analysis_main

    argv = ["heatmap", "--checkpoint", *map(str, checkpoints), "--val", str(val_root), "--out", str(out),
            "--max-images", str(images)] + (["--max-frequency", "4"] if quick else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = analysis_main(argv)
    if status != 0:
        raise DemoError(f"the Fourier heat map step failed: see {out.with_suffix('.log')}")


# ----------------------------------------------------------------------------- summary over seeds


def summarise(results: list[dict], baseline_name: str, ood: list[dict] = (),
              adversarial: dict[str, list[dict]] | None = None) -> list[dict]:
    """One row per run (percentages): clean error, mean corruption error, mCE vs the baseline, and when
    measured the OOD AUROC / FPR95 per set and score and the PGD robust accuracy per eps (``pgd_<eps>``)."""
    ood_by_run = {r["run_name"]: r for r in ood}
    rows = []
    for res in results:
        m = res["metrics"]
        row = {"run": res["run_name"], "aug": res.get("aug", "?"), "clean_error": 100 * res["clean"]["error"],
               "mean_corruption_error": m["mean_corruption_error"], "mce_vs_baseline": m.get("mce"),
               "baseline": baseline_name}
        if res["run_name"] in ood_by_run:
            sets = ood_by_run[res["run_name"]]["ood_sets"]
            row["ood"] = {name: {score: {k: 100 * record["metrics"][score][k] for k in ("auroc", "fpr95")}
                                 for score, _ in OOD_SCORES} for name, record in sets.items()}
        attacked = {eps: adv for eps, files in (adversarial or {}).items()
                    for adv in files if adv["run_name"] == res["run_name"]}
        if attacked:
            first = next(iter(attacked.values()))
            row["adversarial"] = {"n": first["clean"]["n"], "clean_accuracy": 100 * first["clean"]["accuracy"],
                                  **{f"pgd_{eps}": 100 * adv["attacks"]["pgd"]["robust_accuracy"]
                                     for eps, adv in attacked.items()}}
        rows.append(row)
    return rows


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds; one seed has no spread to show (a ``± 0.00`` would claim one), or n/a."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _rows_of(per_seed: dict[int, list[dict]], aug: str) -> list[dict]:
    return [r for rows in per_seed.values() for r in rows if r["aug"] == aug]


def corruption_table(per_seed: dict[int, list[dict]], augs: list[str]) -> str:
    """Markdown table: mean ± std over seeds of clean error, mean corruption error and mCE."""
    lines = ["| aug | seeds | clean error % | mean corruption error % | mCE vs baseline % |", "|---|---|---|---|---|"]
    for aug in augs:
        rows = _rows_of(per_seed, aug)
        lines.append(f"| {AUG_LABELS[aug]} | {len(rows)} | {mean_std([r['clean_error'] for r in rows])} | "
                     f"{mean_std([r['mean_corruption_error'] for r in rows])} | "
                     f"{mean_std([r['mce_vs_baseline'] for r in rows])} |")
    return "\n".join(lines)


def ood_table(per_seed: dict[int, list[dict]], augs: list[str]) -> str | None:
    """Markdown table: AUROC and FPR95 per OOD set and score, mean ± std over seeds (None if not measured)."""
    runs = [r for rows in per_seed.values() for r in rows if "ood" in r]
    if not runs:
        return None
    sets = list(runs[0]["ood"])
    header = ["aug", "score", "seeds"] + [f"{s} {k} %" for k in ("AUROC", "FPR95") for s in sets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for aug in augs:
        rows = [r for r in _rows_of(per_seed, aug) if "ood" in r]
        for score, label in OOD_SCORES:
            cells = [mean_std([r["ood"][s][score][k] for r in rows]) for k in ("auroc", "fpr95") for s in sets]
            lines.append(f"| {AUG_LABELS[aug]} | {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adversarial_table(per_seed: dict[int, list[dict]], augs: list[str]) -> str | None:
    """Markdown table: clean and PGD robust accuracy on the attacked subset, mean ± std over seeds."""
    runs = [r for rows in per_seed.values() for r in rows if "adversarial" in r]
    if not runs:
        return None
    keys = [f"pgd_{e}/255" for e in ADV_EPS_255]
    header = ["aug", "seeds", "images", "clean accuracy %"] + [f"PGD-{ADV_STEPS} eps {e}/255 %" for e in ADV_EPS_255]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for aug in augs:
        rows = [r for r in _rows_of(per_seed, aug) if "adversarial" in r]
        cells = [mean_std([r["adversarial"][k] for r in rows]) for k in ["clean_accuracy", *keys]]
        images = rows[0]["adversarial"]["n"] if rows else 0
        lines.append(f"| {AUG_LABELS[aug]} | {len(rows)} | {images} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(per_seed: dict[int, list[dict]], augs: list[str], report_root: Path) -> str:
    """summary.md: the three tables over seeds and links to the report and each seed's heat maps."""
    parts = ["# Demo summary (scikit-learn digits, 32x32)\n",
             ("Mean ± standard deviation over seeds; percentages.\n" if len(per_seed) > 1
              else "One seed (no spread to show); percentages.\n"),
             "## Corruptions (CE normalised by the baseline run of each seed)\n", corruption_table(per_seed, augs)]
    ood = ood_table(per_seed, augs)
    if ood is not None:
        parts += ["\n## Out-of-distribution detection (in: digits val; out: crops of scikit-learn / scikit-image "
                  "photos and textures)\n",
                  "AUROC: higher is better; FPR95 (false-positive rate at 95 % true-positive rate): lower is "
                  "better.\n", ood]
    adv = adversarial_table(per_seed, augs)
    if adv is not None:
        parts += [f"\n## Adversarial robustness (Linf PGD, {ADV_STEPS} steps of eps/4, random start; "
                  "a fixed class-balanced subset of digits val)\n", adv]
    links = ["- every run: [report](report.md)"]
    for seed in per_seed:
        heatmap = report_root / "heatmaps" / f"seed{seed}" / "heatmaps_side_by_side.png"
        if heatmap.is_file():
            links.append(f"- seed {seed}: ![Fourier heat maps, seed {seed}]"
                         f"(heatmaps/seed{seed}/heatmaps_side_by_side.png)")
    return "\n".join(parts) + "\n\n" + "\n".join(links) + "\n"


def print_summary(per_seed: dict[int, list[dict]]) -> None:
    """The short per-run summary printed at the end."""
    for seed, rows in per_seed.items():
        for r in rows:
            mce = "n/a" if r["mce_vs_baseline"] is None else f"{r['mce_vs_baseline']:.1f}"
            print(f"  seed {seed} {AUG_LABELS[r['aug']]:>8}: clean error {r['clean_error']:5.2f}%, "
                  f"mean corruption error {r['mean_corruption_error']:5.2f}%, mCE vs baseline {mce}")
            for name, scores in r.get("ood", {}).items():
                print(f"{'':>20}OOD {name}: max-logit AUROC {scores['max_logit']['auroc']:5.2f}%, "
                      f"FPR95 {scores['max_logit']['fpr95']:5.2f}%")
            if "adversarial" in r:
                adv = r["adversarial"]
                pgd = ", ".join(f"eps {e}/255 {adv[f'pgd_{e}/255']:5.2f}%" for e in ADV_EPS_255)
                print(f"{'':>20}PGD robust accuracy ({adv['n']} images, clean {adv['clean_accuracy']:5.2f}%): {pgd}")


# ----------------------------------------------------------------------------- the driver


def _apply_quick(args) -> argparse.Namespace:
    """--quick: the reduced demo (values the user gave explicitly win)."""
    if args.quick:
        args.epochs = 1 if args.epochs is None else args.epochs
        args.corrupt_per_class = 4 if args.corrupt_per_class is None else args.corrupt_per_class
        args.heatmap_images = min(args.heatmap_images, 16)
        args.adv_images = min(args.adv_images, 50)
    return args


def _stamp(marker: Path) -> tuple[int, int] | None:
    try:
        st = marker.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def built_once(label: str, marker: Path, build):
    """Run a cached build and print ``label`` with "(cached)" only where nothing was written.

    The build writes its completion ``marker`` last (apr.data.demo.build_cached); an unchanged marker
    means the files on disk were reused."""
    before = _stamp(marker)
    result = build()
    print(f"{label}{' (cached)' if before is not None and _stamp(marker) == before else ''}", flush=True)
    return result


def _demo(argv=None) -> int:
    from apr.checkpoint import find_latest_checkpoint
    from apr.corrupt import make_corrupted_tree
    from apr.data.demo import MARKER as DATA_MARKER, build_demo_dataset
    from apr.data.demo_ood import MARKER as OOD_MARKER, build_demo_ood_sets
    from apr.io import atomic_write_json, atomic_write_text

    args = _apply_quick(parse_args(argv))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_root = built_once("1/5 real dataset: scikit-learn digits as 32x32 RGB JPEGs", out / "data" / DATA_MARKER,
                           lambda: Path(build_demo_dataset(out / "data", image_size=32, seed=0)))
    c_root = out / ("digits-c" if args.corrupt_per_class is None else f"digits-c-{args.corrupt_per_class}")
    print(f"2/5 corruption tree: 15 corruptions x 5 severities -> {c_root}", flush=True)
    make_corrupted_tree(data_root / "val", c_root, resize=None, crop=None, workers=args.workers,
                        limit_per_class=args.corrupt_per_class, progress=True)
    ood_folders = None
    if not args.no_ood:
        per_set = 100 if args.quick else OOD_PER_SET
        ood_root = out / f"ood-{per_set}"
        ood_folders = built_once(f"    OOD sets: {per_set} crops each of sklearn/skimage photos and textures",
                                 ood_root / OOD_MARKER,
                                 lambda: build_demo_ood_sets(ood_root, image_size=32, per_set=per_set, seed=0))
    with contextlib.ExitStack() as stack:
        recipe = Path(args.config).resolve() if args.config else stack.enter_context(packaged_recipe())
        print(f"recipe: {recipe}", flush=True)
        study_file = write_study(demo_study(args, out, recipe, data_root, c_root, ood_folders), out / "study.yaml")
        study = run_study(study_file, args.verbose)
    report_root = out / "report"
    if args.heatmap_images > 0:
        print(f"4/5 Fourier heat maps ({args.heatmap_images} val images) -> {report_root / 'heatmaps'}", flush=True)
        for seed in args.seeds:
            checkpoints = [find_latest_checkpoint(out / "runs" / f"demo_{aug}_s{seed}") for aug in args.augs]
            heat_maps(checkpoints, data_root / "val", report_root / "heatmaps" / f"seed{seed}",
                      args.heatmap_images, args.quick)
    per_seed = read_results(study)
    print("5/5 summary over seeds", flush=True)
    atomic_write_text(report_root / "summary.md", summary_markdown(per_seed, args.augs, report_root))
    atomic_write_json(report_root / "summary.json", per_seed, indent=2)
    print(f"\nreport: {report_root}  (report.md over every run, summary.md over seeds)")
    print_summary(per_seed)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv=None) -> int:
    """``python -m apr.demo`` / ``apr-demo``: user errors print one ``error:`` line (``--debug`` keeps the traceback)."""
    from apr.cli import run_main

    return run_main(_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
