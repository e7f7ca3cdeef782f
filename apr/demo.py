"""The embedded demo: the whole mission on a real dataset that ships inside a package.

    python -m apr.demo                 # baseline vs APR-SP, one seed, about 3-4 min on 2 CPU cores
    python -m apr.demo --seeds 0 1 2 --augs none apr_p apr_s apr_sp

1. scikit-learn's 1,797 real handwritten digits -> 32x32 RGB JPEGs in ImageNet layout (cached);
2. an ImageNet-C-style tree of its val split: 15 corruptions x 5 severities (apr.corrupt), and two
   out-of-distribution sets made from pictures that ship with scikit-learn / scikit-image (cached);
3. trains each augmentation with apr.train (DALI on CPU + accelerate), recipe apr/configs/demo.yaml;
4. evaluates every checkpoint on clean + corrupted images (apr.evaluation; CE normalised by the
   baseline run, since AlexNet's ImageNet numbers mean nothing on digits), OOD detection
   (apr.ood: digits val = in, photos / textures = out) and PGD robust accuracy (apr.adversarial),
   and writes the report (apr.report);
5. Fourier heat maps of the runs side by side (apr.analysis);
6. summary.md over seeds: corruption, OOD and adversarial tables.

Everything runs in this process through the library: an installed ``apr-demo`` works from any folder.
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
from apr.report.common import AUG_LABELS

RECIPE = "configs/demo.yaml"  # inside the apr package (package data)
OOD_PER_SET = 300  # images per OOD set
ADV_EPS_255 = (2, 4)  # PGD eps in pixel units of 1/255: small, for 32x32 digits
ADV_STEPS = 10  # PGD iterations, step eps/4 (the apr.adversarial default rule)
OOD_SCORES = (("max_logit", "max logit"), ("msp", "MSP"), ("energy", "energy"))


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
    p.add_argument("--verbose", action="store_true", help="show each step's full output (else it goes to a log)")
    add_flag(p, "debug")
    return p.parse_args(argv)


@contextlib.contextmanager
def step(title: str, log: Path, verbose: bool) -> Iterator[None]:
    """Announce a step and time it; unless ``verbose``, its output goes to ``log`` (shown when it fails)."""
    print(title, flush=True)
    start = time.perf_counter()
    if verbose:
        yield
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as stream:
            try:
                with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                    yield
            except BaseException:
                stream.flush()
                sys.stderr.write(log.read_text()[-6000:])
                sys.stderr.write(f"\n(the step's full output: {log})\n")
                raise
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- the steps


def train_one(recipe: Path, data_root: Path, runs: Path, aug: str, seed: int, epochs: int | None,
              overrides: list[str], progress: bool) -> Path:
    """Train (or resume / reuse) one run of the recipe; return its newest checkpoint."""
    from apr.checkpoint import find_latest_checkpoint
    from apr.config import load_config
    from apr.train import train

    run_name = f"demo_{aug}_s{seed}"
    sets = [f"data.root={data_root}", f"aug.name={aug}", f"train.seed={seed}", f"train.output_dir={runs}",
            f"train.run_name={run_name}"]
    sets += [f"train.epochs={epochs}"] if epochs is not None else []
    train(load_config(recipe, sets + list(overrides)), resume="auto", progress=progress)
    return find_latest_checkpoint(runs / run_name)


def evaluate_corruptions(checkpoints: dict[str, Path], c_root: Path, val_root: Path, report_dir: Path,
                         progress: bool) -> list[dict]:
    """Clean + corruption cells per checkpoint (baseline = the first), CE normalised by the baseline."""
    from apr.data.suites import make_suite
    from apr.evaluation import EvalOptions, evaluate_checkpoint
    from apr.io import atomic_write_json
    from apr.report import metrics_for

    options = EvalOptions(batch_size=256, progress=progress)  # eval_imagenet_c.py's defaults
    results = [evaluate_checkpoint(path, make_suite(imagenet_c=str(c_root), val=str(val_root)), report_dir,
                                   options, run_name=name) for name, path in checkpoints.items()]
    for result in results:
        result["metrics"] = metrics_for(result, results[0])
        atomic_write_json(report_dir / f"{result['run_name']}.json", result, indent=1)
    return results


def evaluate_ood_sets(checkpoints: dict[str, Path], val_root: Path, ood_folders: dict[str, Path],
                      report_dir: Path, progress: bool) -> list[dict]:
    """OOD detection per checkpoint: digits val in, every demo OOD set out (``<run>.ood.json``)."""
    from apr.ood import evaluate_ood

    ood = {name: str(folder) for name, folder in ood_folders.items()}
    return [evaluate_ood(path, ood=ood, out_dir=report_dir, in_folder=val_root, run_name=name, progress=progress)
            for name, path in checkpoints.items()]


def evaluate_pgd(checkpoints: dict[str, Path], val_root: Path, report_dir: Path, n: int) -> list[dict]:
    """PGD robust accuracy at each of ADV_EPS_255 on a fixed class-balanced subset (``<run>.adv.json``)."""
    from apr.adversarial.__main__ import build_parser, evaluate_checkpoint
    from apr.adversarial.run import pgd_spec
    from apr.distributed import join_world, resolve_device

    attacks = [pgd_spec(f"pgd_{e}/255", e / 255, e / 255 / 4, steps=ADV_STEPS) for e in ADV_EPS_255]
    world = join_world(None)
    device = resolve_device(None, world)
    results = []
    for name, path in checkpoints.items():
        args = build_parser().parse_args(["--checkpoint", str(path), "--val", str(val_root), "--out", str(report_dir),
                                          "--max-images", str(n), "--batch-size", str(n), "--workers", "2", "--seed", "0"])
        results.append(evaluate_checkpoint(str(path), name, args, attacks, world, device))
    return results


def heat_maps(checkpoints: dict[str, Path], val_root: Path, out: Path, images: int, quick: bool) -> None:
    """Fourier heat maps of the runs, side by side (apr.analysis)."""
    from apr.analysis import main as analysis_main

    argv = ["heatmap", "--checkpoint", *map(str, checkpoints.values()), "--val", str(val_root), "--out", str(out),
            "--max-images", str(images)] + (["--max-frequency", "4"] if quick else [])
    if analysis_main(argv) != 0:
        raise RuntimeError("the Fourier heat map step failed")


def write_seed_report(report_dir: Path, corruption: list[dict], extra: list[dict]) -> Path:
    """report.md of one seed: the corruption section, plus the OOD / adversarial sections the report knows."""
    from apr.report import write_report
    from apr.report.sections import registered

    # apr.report's OOD / adversarial sections register their schemas at import (apr/report/ood.py,
    # adversarial.py); a results file whose section is not there stays beside report.md, in summary.md only.
    known = [r for r in extra if r.get("schema") in registered()]
    return write_report(corruption + known, report_dir, baseline=corruption[0])


# ----------------------------------------------------------------------------- summary over seeds


def summarise(results: list[dict], baseline_name: str, ood: list[dict] = (), adversarial: list[dict] = ()) -> list[dict]:
    """One row per run (percentages): clean error, mean corruption error, mCE vs the baseline, and when
    measured the OOD AUROC / FPR95 per set and score and the PGD robust accuracy per eps."""
    ood_by_run = {r["run_name"]: r for r in ood}
    adv_by_run = {r["run_name"]: r for r in adversarial}
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
        if res["run_name"] in adv_by_run:
            adv = adv_by_run[res["run_name"]]
            row["adversarial"] = {"n": adv["clean"]["n"], "clean_accuracy": 100 * adv["clean"]["accuracy"],
                                  **{f"pgd_{e}/255": 100 * adv["attacks"][f"pgd_{e}/255"]["robust_accuracy"]
                                     for e in ADV_EPS_255}}
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
    """summary.md: the three tables over seeds and links to each seed's report and heat maps."""
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
    links = []
    for seed in per_seed:
        heatmap = report_root / f"seed{seed}" / "heatmap" / "heatmaps_side_by_side.png"
        links.append(f"- seed {seed}: [report](seed{seed}/report.md)" + (
            f", ![Fourier heat maps, seed {seed}](seed{seed}/heatmap/heatmaps_side_by_side.png)"
            if heatmap.is_file() else ""))
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


def run_seed(args, seed: int, recipe: Path, data_root: Path, c_root: Path, ood_folders: dict[str, Path] | None,
             out: Path) -> list[dict]:
    """Train every aug of one seed, evaluate corruptions / OOD / PGD, write the seed's report and heat maps."""
    verbose = args.verbose
    checkpoints = {}
    for aug in args.augs:
        name = f"demo_{aug}_s{seed}"
        with step(f"3/5 train {AUG_LABELS[aug]} (seed {seed}) -> {out / 'runs' / name}",
                  out / "runs" / f"{name}.log", verbose):
            checkpoints[name] = train_one(recipe, data_root, out / "runs", aug, seed, args.epochs, args.overrides,
                                          verbose)
    report_dir = out / "report" / f"seed{seed}"
    val_root = data_root / "val"
    with step(f"4/5 evaluate {len(checkpoints)} checkpoints: clean + 75 corruption cells"
              + (", OOD detection" if ood_folders else "") + (", PGD" if args.adv_images else "")
              + f" -> {report_dir}", report_dir.with_suffix(".log"), verbose):
        results = evaluate_corruptions(checkpoints, c_root, val_root, report_dir, verbose)
        ood = evaluate_ood_sets(checkpoints, val_root, ood_folders, report_dir, verbose) if ood_folders else []
        adv = evaluate_pgd(checkpoints, val_root, report_dir, args.adv_images) if args.adv_images else []
        write_seed_report(report_dir, results, ood + adv)
    if args.heatmap_images > 0:
        with step(f"5/5 Fourier heat maps ({args.heatmap_images} val images) -> {report_dir / 'heatmap'}",
                  report_dir.with_name(f"heatmap_seed{seed}.log"), verbose):
            heat_maps(checkpoints, val_root, report_dir / "heatmap", args.heatmap_images, args.quick)
    return summarise(results, next(iter(checkpoints)), ood, adv)


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
        recipe = Path(args.config) if args.config else stack.enter_context(packaged_recipe())
        print(f"recipe: {recipe}", flush=True)
        per_seed = {seed: run_seed(args, seed, recipe, data_root, c_root, ood_folders, out) for seed in args.seeds}
    report_root = out / "report"
    atomic_write_text(report_root / "summary.md", summary_markdown(per_seed, args.augs, report_root))
    atomic_write_json(report_root / "summary.json", per_seed, indent=2)
    print(f"\nreport: {report_root}  (report.md per seed, summary.md over seeds)")
    print_summary(per_seed)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


def main(argv=None) -> int:
    """``python -m apr.demo`` / ``apr-demo``: user errors print one ``error:`` line (``--debug`` keeps the traceback)."""
    from apr.cli import run_main

    return run_main(_demo, argv)


if __name__ == "__main__":
    sys.exit(main())
