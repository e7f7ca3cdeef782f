"""One command that proves the GPU path: CUDA tests, APR op timings, training step, evaluation.

Run first on any GPU machine (about 5-8 minutes on one H100)::

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check/

and on a CPU, tiny sizes, well under a minute (what CI runs)::

    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check

It writes ``gpu_check.md`` (a Markdown table, also printed) and ``gpu_check.json`` under
``--out``. Sections: ``pytest -m cuda`` counts; the APR ops at 256x3x224x224 (ms per batch,
median of CUDA-event timings after warm-up, peak memory over the input batch, with and
without ``torch.compile`` of the Fourier elementwise kernel, a run under
``torch.cuda.set_sync_debug_mode("error")``); a ResNet-50 bf16 channels_last training step
(img/s without APR and with APR-SP, eager and compiled, APR-SP's share of the step);
the GPU-decode loader (``data.backend: gpu``) feeding that step, as a fraction of the synthetic step;
evaluation throughput through ``apr.inference.ImageClassifier``; one Fourier heat map at 224 px.
Each section is isolated: a failure is recorded in its row and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # photos.py, timing.py (also when loaded by path)

from apr.augment import (  # noqa: E402
    APRPolicy,
    apply_apr_p,
    apply_apr_s,
    apply_apr_sp,
    sample_apr_p_params,
    sample_apr_s_params,
)
from apr.fourier import recombine  # noqa: E402
from apr.inference import ImageClassifier  # noqa: E402
from apr.io import atomic_write_json, atomic_write_text  # noqa: E402
from photos import write_photo_jpegs  # noqa: E402
from timing import median_seconds, sync  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def precision_for(device: torch.device) -> str:
    """bf16 on a GPU (what training uses); fp32 on a CPU, where bf16 matmuls are emulated and slow."""
    return "bf16" if device.type == "cuda" else "fp32"


class Table:
    """Rows of (section, item, value, note) for the Markdown table and the JSON."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, section: str, item: str, value, note: str = "") -> None:
        self.rows.append({"section": section, "item": item, "value": value, "note": note})

    def markdown(self, header: str) -> str:
        lines = [header, "", "| section | item | value | note |", "|---|---|---|---|"]
        for r in self.rows:
            value = f"{r['value']:.3g}" if isinstance(r["value"], float) else str(r["value"])
            lines.append(f"| {r['section']} | {r['item']} | {value} | {r['note']} |")
        return "\n".join(lines) + "\n"


def run_section(table: Table, section: str, fn, *args) -> None:
    """Run one section (its wall time is a row); an exception becomes an ``error`` row, the next section runs."""
    t0 = time.perf_counter()
    try:
        fn(table, *args)
        table.add(section, "section wall time s", time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - isolate every section
        table.add(section, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                  traceback.format_exc(limit=3).splitlines()[-1][:200].replace("|", "/"))


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory allocated during ``fn`` over what was allocated before (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def host_syncs(fn, device: torch.device) -> str:
    """``none`` when ``fn`` runs under ``set_sync_debug_mode("error")``, else the error."""
    if device.type != "cuda":
        return "n/a (cpu)"
    fn()  # warm: plans, pinned pool, compilation
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as exc:
        return f"SYNC: {str(exc).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------
# sections


def section_pytest(table: Table, args) -> None:
    """Every CUDA test (``pytest -m cuda``): passed / failed / skipped counts."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *args.pytest_target]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.pytest_timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", proc.stdout)}
    summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or proc.stdout.strip().splitlines()[-1:]
    table.add("pytest -m cuda", "counts", str(summary), f"exit {proc.returncode}, {time.perf_counter() - t0:.0f} s")
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    for name in failed[:10]:
        table.add("pytest -m cuda", "failed", name.replace("|", "/"))


def apr_op_calls(x: torch.Tensor) -> dict:
    """name -> zero-argument call; fresh random draws per call (as in training)."""
    g = torch.Generator().manual_seed(0)
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(x.device)
    xp = x[perm]

    def sp_unfused():  # today's separate passes: APR-S, then APR-P with two forward transforms
        s = apply_apr_s(x, sample_apr_s_params(n, g))
        p = sample_apr_p_params(n, 1.0, g)
        return recombine(s[p.perm.to(x.device, non_blocking=True)], s)

    def sp_fused(compile=False):
        return apply_apr_sp(x, sample_apr_s_params(n, g), sample_apr_p_params(n, 1.0, g), compile=compile)

    return {
        "recombine": lambda: recombine(xp, x),
        "apr_p": lambda: apply_apr_p(x, sample_apr_p_params(n, 1.0, g)),
        "apr_p (compile)": lambda: apply_apr_p(x, sample_apr_p_params(n, 1.0, g), compile=True),
        "apr_s": lambda: apply_apr_s(x, sample_apr_s_params(n, g)),
        "apr_sp unfused (S then P)": sp_unfused,
        "apr_sp fused": sp_fused,
        "apr_sp fused (compile)": lambda: sp_fused(compile=True),
    }


def section_apr_ops(table: Table, args, device: torch.device) -> None:
    n, size = (8, 32) if args.quick else (args.batch, 224)
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    table.add("APR ops", "input", f"{n}x3x{size}x{size} float32", f"{x.numel() * 4 / 2**20:.0f} MiB")
    for name, fn in apr_op_calls(x).items():
        if "compile" in name and (args.no_compile or args.quick):
            table.add("APR ops", f"{name} ms/batch", "skipped", "--no-compile" if args.no_compile else "--quick")
            continue
        try:
            ms = median_seconds(fn, device, args.repeats, args.warmup) * 1e3
            mem = peak_extra_mib(fn, device)
            note = f"peak +{mem:.0f} MiB over the input, " if mem is not None else ""
            table.add("APR ops", f"{name} ms/batch", ms, note + f"host syncs: {host_syncs(fn, device)}")
        except Exception as exc:  # noqa: BLE001 - one op failing leaves the others
            table.add("APR ops", f"{name} ms/batch", "error", f"{type(exc).__name__}: {str(exc)[:150]}")


def section_train_step(table: Table, args, device: torch.device) -> None:
    import torchvision

    from apr.train import train_step as step_fn

    n, size = (2, 32) if args.quick else (args.batch, 224)
    table.add("train step", "step function", "apr.train.train_step",
              f"ResNet-50, {precision_for(device)}, channels_last, batch {n}, {size} px")
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0)).to(device)
    times = {}
    for compiled in (False, True):
        if compiled and (args.no_compile or args.quick):
            table.add("train step", "compiled", "skipped", "--no-compile" if args.no_compile else "--quick")
            continue
        net = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
        net = torch.compile(net) if compiled else net
        model = ImageClassifier(net, MEAN, STD, precision=precision_for(device), channels_last=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for name in ("none", "apr_sp"):
            policy, g = APRPolicy(name, p_prob=1.0, compile=compiled), torch.Generator().manual_seed(0)
            step = lambda: step_fn(model, opt, x, y, policy=policy, generator=g)  # noqa: E731
            t = median_seconds(step, device, max(2, args.repeats // 2), args.warmup + (2 if compiled else 0))
            times[(name, compiled)] = t
            tag = f"{name}{' compiled' if compiled else ''}"
            table.add("train step", f"{tag} img/s", n / t, f"{t * 1e3:.1f} ms/step, forward batch {n * (1 + (name != 'none'))}")
        g = torch.Generator().manual_seed(0)
        t_aug = median_seconds(lambda: APRPolicy("apr_sp", p_prob=1.0, compile=compiled)(x, g), device, args.repeats, 1)
        table.add("train step", f"APR-SP share{' compiled' if compiled else ''}", t_aug / times[("apr_sp", compiled)],
                  f"APR-SP {t_aug * 1e3:.2f} ms of a {times[('apr_sp', compiled)] * 1e3:.1f} ms step")


def jpeg_folder(root: Path, n: int, size: int) -> Path:
    """``n`` real-photo JPEGs of ``size`` x ``size`` in ImageFolder layout (``benchmarks/photos.py``)."""
    return write_photo_jpegs(root, n, size)


def section_data_step(table: Table, args, device: torch.device) -> None:
    """The GPU-decode backend (``data.backend: gpu``: torchvision.io ``decode_jpeg`` batched on the device,
    crops/flips there) feeding ``apr.train.train_step``, as a fraction of the same step on synthetic data."""
    import tempfile

    import torchvision

    from apr.data import build_image_loader, scan_image_folder
    from apr.train import train_step as step_fn

    n, size, side, batches = (4, 32, 48, 4) if args.quick else (args.batch, 224, 375, 6)
    workers = min(8, os.cpu_count() or 1)
    net = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
    model = ImageClassifier(net, MEAN, STD, precision=precision_for(device), channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    policy, g = APRPolicy("none"), torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0)).to(device)
    t_synth = median_seconds(lambda: step_fn(model, opt, x, y, policy=policy, generator=g), device,
                             max(2, args.repeats // 2), args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = scan_image_folder(jpeg_folder(Path(tmp), n * (batches + 1), side))
        table.add("data -> step", "JPEG folder", f"{len(index.files)} photos {side}x{side} q90",
                  f"written in {time.perf_counter() - t0:.1f} s; train crops to {size} px, batch {n}, "
                  f"{workers} reader threads")
        loader = build_image_loader(index.files, index.labels, index.classes, backend="gpu", batch_size=n, train=True,
                                    image_size=size, num_workers=workers, device=device, seed=0)
        decode_rate = _loader_rate(loader, device, lambda xb, yb: None)
        step_rate = _loader_rate(loader, device, lambda xb, yb: step_fn(model, opt, xb, yb, policy=policy, generator=g))
    table.add("data -> step", "GPU-decode loader alone img/s", decode_rate,
              f"decode_jpeg(device={device.type!r}) + RandomResizedCrop + flip on the device")
    table.add("data -> step", "synthetic step img/s", n / t_synth, f"{t_synth * 1e3:.1f} ms/step, ResNet-50, no APR")
    table.add("data -> step", "GPU decode feeding the step img/s", step_rate, "apr.train.train_step, no APR")
    table.add("data -> step", "fraction of the synthetic step", step_rate * t_synth / n,
              "1.0: the data path costs nothing; below: the step waits for data")


def _loader_rate(loader, device: torch.device, consume) -> float:
    """Images per second through one epoch of ``loader`` after its first batch (threads and plans warm)."""
    loader.set_epoch(loader.epoch + 1)
    count, start = 0, None
    for xb, yb in loader:
        consume(xb, yb)
        if start is None:
            sync(device)
            start = time.perf_counter()
            continue
        count += len(xb)
    sync(device)
    return count / (time.perf_counter() - start)


def section_eval(table: Table, args, device: torch.device) -> None:
    import torchvision

    n, size, batches = (4, 32, 2) if args.quick else (args.batch, 224, 10)
    net = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last).eval()
    model = ImageClassifier(net, MEAN, STD, precision=precision_for(device), channels_last=True)
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        with torch.inference_mode():
            for _ in range(batches):
                model(x)

    t = median_seconds(run, device, max(1, args.repeats // 2), 1)
    table.add("evaluation", "ImageClassifier img/s", n * batches / t, f"ResNet-50, {precision_for(device)}, batch {n}, {size} px")
    _heatmap_row(table, args, device, net)


def _heatmap_row(table: Table, args, device: torch.device, net) -> None:
    try:
        from apr.analysis import fourier_heatmap
    except ImportError:
        from apr.fourier import fourier_heatmap  # type: ignore[attr-defined]
    n, size, m = (4, 32, 2) if args.quick else (64, 224, 4)
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(n, dtype=torch.long)
    t0 = time.perf_counter()
    result = fourier_heatmap(net, images, labels, mean=MEAN, std=STD, max_frequency=m, batch_size=min(256, 8 * n),
                             device=device, precision=precision_for(device), channels_last=True, progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    freqs = (2 * m + 1) * (m + 1)
    table.add("evaluation", "Fourier heat map s", seconds,
              f"{n} images, {size} px, max_frequency {m} (~{freqs} frequencies), {type(result).__name__}")


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU check that the command still runs)")
    p.add_argument("--batch", type=int, default=256, help="batch size of the full run (default 256)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--skip", nargs="*", default=[], choices=("pytest", "ops", "train", "data", "eval"),
                   help="sections to leave out")
    p.add_argument("--pytest-target", nargs="*", default=["tests"], help="what pytest -m cuda collects (default tests)")
    p.add_argument("--pytest-timeout", type=float, default=300, help="seconds before the CUDA tests are stopped")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), min(args.warmup, 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    header = (f"# gpu_check: {name}, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
              f"{', --quick' if args.quick else ''}")
    table = Table()
    sections = [("pytest", "pytest -m cuda", section_pytest, (args,)),
                ("ops", "APR ops", section_apr_ops, (args, device)),
                ("train", "train step", section_train_step, (args, device)),
                ("data", "data -> step", section_data_step, (args, device)),
                ("eval", "evaluation", section_eval, (args, device))]
    for key, title, fn, fn_args in sections:
        if key not in args.skip:
            run_section(table, title, fn, *fn_args)
    markdown = table.markdown(header)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "gpu_check.md", markdown)
    meta = {"device": name, "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "quick": args.quick, "rows": table.rows}
    atomic_write_json(args.out / "gpu_check.json", meta)
    print(markdown, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
