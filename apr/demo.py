"""The embedded demo: the whole mission on a real dataset that ships inside a package.

    python -m apr.demo                 # baseline vs APR-SP, one seed, ~5-10 min on 2 CPU cores
    python -m apr.demo --seeds 0 1 2 --augs none apr_p apr_s apr_sp

1. scikit-learn's 1,797 real handwritten digits -> 32x32 RGB JPEGs in ImageNet layout (cached);
2. an ImageNet-C-style tree of its val split: 15 corruptions x 5 severities (apr.corrupt);
3. trains each augmentation with the real ``train_imagenet.py`` (DALI on CPU + accelerate);
4. evaluates every checkpoint with the real ``eval_imagenet_c.py``, CE normalised by the
   baseline run (AlexNet's ImageNet numbers mean nothing on digits), and writes the report;
5. Fourier heat maps of the runs side by side (``python -m apr.analysis``);
6. prints where the report is and a short summary.

The entry scripts do the work, run as subprocesses exactly as a user would run them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUG_LABELS = {"none": "baseline", "apr_p": "APR-P", "apr_s": "APR-S", "apr_sp": "APR-SP"}


def _run(cmd: list[str], log: Path | None = None, quiet: bool = False) -> None:
    """Run one step; on failure show its output and stop with the step's command line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    if quiet:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if log is not None:
            log.write_text(proc.stdout + proc.stderr)
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        if quiet:
            sys.stderr.write((proc.stdout or "")[-4000:] + (proc.stderr or "")[-8000:])
        raise SystemExit(f"demo step failed (exit {proc.returncode}): {' '.join(cmd)}")
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def _script(name: str) -> str:
    path = REPO / name
    if not path.is_file():
        raise SystemExit(f"{name} not found next to the apr package ({REPO}); run the demo from a source "
                         "checkout installed with pip install -e .")
    return str(path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m apr.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="folder for data, runs and report (default: demo_output)")
    p.add_argument("--augs", nargs="+", default=["none", "apr_sp"], choices=list(AUG_LABELS),
                   help="augmentations to train; the first one is the baseline CE is normalised by")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (one run per aug per seed)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="the demo recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra recipe overrides passed to train_imagenet.py")
    p.add_argument("--corrupt-per-class", type=int, default=None,
                   help="corrupt only this many val images per class (default: all)")
    p.add_argument("--heatmap-images", type=int, default=200,
                   help="val images per Fourier heat map (0 skips the heat maps)")
    p.add_argument("--workers", type=int, default=2, help="processes for corruption generation")
    p.add_argument("--quick", action="store_true",
                   help="the reduced demo CI runs: 1 epoch, 4 corrupted images per class, small heat map")
    p.add_argument("--verbose", action="store_true", help="show each step's full output")
    return p.parse_args(argv)


def summarise(results: list[dict], baseline_name: str) -> list[dict]:
    """One row per run: clean error and mean corruption error (percent), mCE vs the baseline."""
    rows = []
    for res in results:
        m = res["metrics"]
        rows.append({"run": res["run_name"], "aug": res.get("aug", "?"),
                     "clean_error": 100 * res["clean"]["error"],
                     "mean_corruption_error": m["mean_corruption_error"],
                     "mce_vs_baseline": m.get("mce"), "baseline": baseline_name})
    return rows


def _seed_table(per_seed: dict[int, list[dict]], augs: list[str]) -> str:
    """Markdown table: mean +- std over seeds of clean error, mean corruption error and mCE."""
    lines = ["| aug | seeds | clean error % | mean corruption error % | mCE vs baseline % |", "|---|---|---|---|---|"]
    for aug in augs:
        rows = [r for rows in per_seed.values() for r in rows if r["aug"] == aug]

        def stat(key):
            vals = [r[key] for r in rows if r[key] is not None]
            if not vals:
                return "n/a"
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.2f} ± {spread:.2f}"

        lines.append(f"| {AUG_LABELS[aug]} | {len(rows)} | {stat('clean_error')} | "
                     f"{stat('mean_corruption_error')} | {stat('mce_vs_baseline')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from apr.corrupt import make_corrupted_tree
    from apr.data.demo import build_demo_dataset

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    epochs = 1 if args.quick and args.epochs is None else args.epochs
    per_class = 4 if args.quick and args.corrupt_per_class is None else args.corrupt_per_class
    heatmap_images = min(args.heatmap_images, 16) if args.quick else args.heatmap_images
    quiet = not args.verbose

    print("1/5 real dataset: scikit-learn digits as 32x32 RGB JPEGs (cached)", flush=True)
    data_root = Path(build_demo_dataset(out / "data", image_size=32, seed=0))

    c_root = out / ("digits-c" if per_class is None else f"digits-c-{per_class}")
    print(f"2/5 corruption tree: 15 corruptions x 5 severities -> {c_root}", flush=True)
    make_corrupted_tree(data_root / "val", c_root, resize=None, crop=None, workers=args.workers,
                        limit_per_class=per_class, progress=True)

    per_seed: dict[int, list[dict]] = {}
    for seed in args.seeds:
        checkpoints = []
        for aug in args.augs:
            run_name = f"demo_{aug}_s{seed}"
            print(f"3/5 train {AUG_LABELS[aug]} (seed {seed}) -> {out / 'runs' / run_name}", flush=True)
            cmd = [sys.executable, _script("train_imagenet.py"), "--config", args.config, "--resume", "auto",
                   "--set", f"data.root={data_root}", "--set", f"aug.name={aug}", "--set", f"train.seed={seed}",
                   "--set", f"train.output_dir={out / 'runs'}", "--set", f"train.run_name={run_name}"]
            if epochs is not None:
                cmd += ["--set", f"train.epochs={epochs}"]
            for item in args.overrides:
                cmd += ["--set", item]
            _run(cmd, out / "runs" / f"{run_name}.log", quiet)
            from apr.checkpoint import find_latest_checkpoint

            checkpoints.append(find_latest_checkpoint(out / "runs" / run_name))

        report_dir = out / "report" / f"seed{seed}"
        print(f"4/5 evaluate {len(checkpoints)} checkpoints on clean + 75 corruption cells -> {report_dir}",
              flush=True)
        baseline_name = f"demo_{args.augs[0]}_s{seed}"
        _run([sys.executable, _script("eval_imagenet_c.py"), "--checkpoint", *map(str, checkpoints),
              "--imagenet-c", str(c_root), "--val", str(data_root / "val"), "--out", str(report_dir),
              "--baseline", baseline_name, "--batch-size", "256"], report_dir.with_suffix(".log"), quiet)
        results = [json.loads((report_dir / f"demo_{aug}_s{seed}.json").read_text()) for aug in args.augs]
        per_seed[seed] = summarise(results, baseline_name)

        if heatmap_images > 0:
            print(f"5/5 Fourier heat maps ({heatmap_images} val images) -> {report_dir / 'heatmap'}", flush=True)
            cmd = [sys.executable, "-m", "apr.analysis", "heatmap", "--checkpoint", *map(str, checkpoints),
                   "--data", str(data_root / "val"), "--out", str(report_dir / "heatmap"),
                   "--max-images", str(heatmap_images)]
            if args.quick:
                cmd += ["--max-frequency", "4"]
            _run(cmd, report_dir.with_name(f"heatmap_seed{seed}.log"), quiet)

    table = _seed_table(per_seed, args.augs)
    links = "\n".join(
        f"- seed {seed}: [report](seed{seed}/report.md)"
        + (f", ![Fourier heat maps, seed {seed}](seed{seed}/heatmap/heatmaps_side_by_side.png)"
           if (out / "report" / f"seed{seed}" / "heatmap" / "heatmaps_side_by_side.png").is_file() else "")
        for seed in per_seed)
    (out / "report" / "summary.md").write_text(
        "# Demo summary (scikit-learn digits, 32x32; CE normalised by the baseline run of each seed)\n\n"
        "Mean ± standard deviation over seeds; percentages.\n\n" + table + "\n\n" + links + "\n")
    (out / "report" / "summary.json").write_text(json.dumps(per_seed, indent=2))
    print(f"\nreport: {out / 'report'}  (report.md per seed, summary.md over seeds)")
    for seed, rows in per_seed.items():
        for r in rows:
            mce = "n/a" if r["mce_vs_baseline"] is None else f"{r['mce_vs_baseline']:.1f}"
            print(f"  seed {seed} {AUG_LABELS[r['aug']]:>8}: clean error {r['clean_error']:5.2f}%, "
                  f"mean corruption error {r['mean_corruption_error']:5.2f}%, mCE vs baseline {mce}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
