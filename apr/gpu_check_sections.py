"""The sections of ``apr.gpu_check``: each ``section_x(check, args, device, until)`` adds rows to ``check``
(``until``: its ``time.monotonic()`` deadline, for sections that can shorten their own work)."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import torch

from apr.augment import APRPolicy, apply_apr_p, apply_apr_s, apply_apr_sp, sample_apr_p_params, sample_apr_s_params
from apr.fourier import recombine
from apr.gpu_check import ABSENT_ON_GPU_BOX, MEAN, ROOT, STD, run_child
from apr.inference import ImageClassifier

sys.path.insert(0, str(ROOT / "benchmarks"))  # the one timer and the photo writer of the checkout
from photos import write_photo_jpegs  # noqa: E402
from timing import median_seconds, sync  # noqa: E402


def precision_for(device: torch.device) -> str:
    """bf16 on a GPU (what training uses); fp32 on a CPU, where bf16 matmuls are emulated and slow."""
    return "bf16" if device.type == "cuda" else "fp32"


def sizes(args) -> tuple[int, int]:
    """(batch, pixels): the goals' 256 x 224 on a full run, 2 x 32 on --quick."""
    return (2, 32) if args.quick else (args.batch, 224)


def resnet50_classifier(device: torch.device, compiled: bool = False) -> ImageClassifier:
    import torchvision

    net = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last)
    net = torch.compile(net) if compiled else net
    return ImageClassifier(net, MEAN, STD, precision=precision_for(device), channels_last=True)


def batch(n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return x, torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0)).to(device)


# ---------------------------------------------------------------------------------------


def section_env(check, args, device, until) -> None:
    """What the figures depend on, and which packages the GPU box lacks (the tests that need them skip)."""
    add = lambda item, value, note="": check.add("environment", item, value, note)  # noqa: E731
    add("python", platform.python_version(), sys.executable)
    add("torch", torch.__version__, f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    add("cudnn.benchmark", str(torch.backends.cudnn.benchmark), "on, as apr.train sets it")
    add("CPU cores", os.cpu_count() or 0, platform.processor() or platform.machine())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        add("GPU", p.name, f"capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                           f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} visible")
    for name in ("torchvision", "timm", "accelerate", "sklearn", *ABSENT_ON_GPU_BOX):
        try:
            present = find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or blocked (sys.modules[name] = None)
            present = False
        add(f"package {name}", "present" if present else "absent")
    head = ROOT / ".git"
    add("checkout", _git_head(head) if head.exists() else "not a git checkout", str(ROOT))


def _git_head(git: Path) -> str:
    import subprocess

    proc = subprocess.run(["git", "-C", str(git.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


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


def apr_op_calls(x: torch.Tensor, compile: bool = False) -> dict:
    """name -> zero-argument call; fresh random draws per call (as in training)."""
    g = torch.Generator().manual_seed(0)
    n = x.shape[0]
    xp = x[torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(x.device)]

    def sp_unfused():  # separate passes: APR-S, then APR-P with two forward transforms
        s = apply_apr_s(x, sample_apr_s_params(n, g))
        p = sample_apr_p_params(n, 1.0, g)
        return recombine(s[p.perm.to(x.device, non_blocking=True)], s)

    if compile:
        return {"apr_p (compile)": lambda: apply_apr_p(x, sample_apr_p_params(n, 1.0, g), compile=True),
                "apr_sp fused (compile)": lambda: apply_apr_sp(x, sample_apr_s_params(n, g),
                                                               sample_apr_p_params(n, 1.0, g), compile=True)}
    return {"recombine": lambda: recombine(xp, x),
            "apr_p": lambda: apply_apr_p(x, sample_apr_p_params(n, 1.0, g)),
            "apr_s": lambda: apply_apr_s(x, sample_apr_s_params(n, g)),
            "apr_sp unfused (S then P)": sp_unfused,
            "apr_sp fused": lambda: apply_apr_sp(x, sample_apr_s_params(n, g), sample_apr_p_params(n, 1.0, g))}


def section_apr_ops(check, args, device, until) -> None:
    """Eager APR ops at the goal's 256x3x224x224: ms per batch, peak memory, host syncs."""
    n, size = (8, 32) if args.quick else (args.batch, 224)
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    check.add("APR ops", "input", f"{n}x3x{size}x{size} float32", f"{x.numel() * 4 / 2**20:.0f} MiB")
    _time_ops(check, "APR ops", apr_op_calls(x), args, device)


def _time_ops(check, section: str, calls: dict, args, device, status=None) -> None:
    for name, fn in calls.items():
        try:
            ms = median_seconds(fn, device, args.repeats, args.warmup) * 1e3
            mem = peak_extra_mib(fn, device)
            note = (f"peak +{mem:.0f} MiB over the input, " if mem is not None else "") + \
                f"host syncs: {host_syncs(fn, device)}" + (f"; {status()}" if status else "")
            check.add(section, f"{name} ms/batch", ms, note)
        except Exception as exc:  # noqa: BLE001 - one op failing leaves the others
            check.add(section, f"{name} ms/batch", "error", f"{type(exc).__name__}: {str(exc)[:150]}")


def section_train_step(check, args, device, until) -> None:
    """apr.train.train_step on ResNet-50 (bf16, channels_last), without and with APR-SP, eager."""
    _train_rows(check, "train step", args, device, compiled=False)


def _train_rows(check, section: str, args, device, compiled: bool, status=None) -> None:
    from apr.train import train_step

    n, size = sizes(args)
    # compiled: both variants forward 2n images, so ResNet-50 compiles once (a batch change recompiles)
    x, y = batch(2 * n if compiled else n, size, device)
    tag = " compiled" if compiled else ""
    model = resnet50_classifier(device, compiled)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    check.add(section, f"step{tag}", "apr.train.train_step",
              f"ResNet-50, {precision_for(device)}, channels_last, {size} px")
    times = {}
    for name, images in (("apr_sp", x[:n]), ("none", x)) if compiled else (("none", x), ("apr_sp", x)):
        policy, g = APRPolicy(name, p_prob=1.0, compile=compiled), torch.Generator().manual_seed(0)
        labels = y[:len(images)]
        step = lambda: train_step(model, opt, images, labels, policy=policy, generator=g)  # noqa: E731
        t = times[name] = median_seconds(step, device, max(2, args.repeats // 2), args.warmup + (2 if compiled else 0))
        forward = len(images) * (1 + (name != "none"))
        check.add(section, f"{name}{tag} img/s", forward / t,
                  f"{t * 1e3:.1f} ms/step, forward batch {forward} (clean + APR counted)"
                  + (f"; {status()}" if status else ""))
    g = torch.Generator().manual_seed(0)
    aug = APRPolicy("apr_sp", p_prob=1.0, compile=compiled)
    t_aug = median_seconds(lambda: aug(x[:n], g), device, args.repeats, 1)
    check.add(section, f"APR-SP share{tag}", t_aug / times["apr_sp"],
              f"APR-SP {t_aug * 1e3:.2f} ms of a {times['apr_sp'] * 1e3:.1f} ms step at batch {n}")


def section_data_step(check, args, device, until) -> None:
    """The GPU-decode backend (torchvision ``decode_jpeg`` on the device, crops/flips there) feeding
    apr.train.train_step, as a fraction of the same step on synthetic data."""
    from apr.data import build_image_loader, scan_image_folder
    from apr.train import train_step

    n, size, side, batches = (4, 32, 48, 4) if args.quick else (args.batch, 224, 375, 6)
    workers = min(8, os.cpu_count() or 1)
    model = resnet50_classifier(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    policy, g = APRPolicy("none"), torch.Generator().manual_seed(0)
    x, y = batch(n, size, device)
    t_synth = median_seconds(lambda: train_step(model, opt, x, y, policy=policy, generator=g), device,
                             max(2, args.repeats // 2), args.warmup)
    t0 = time.perf_counter()
    index = scan_image_folder(write_photo_jpegs(args.tmp / "jpegs", n * (batches + 1), side))
    check.add("data -> step", "JPEG folder", f"{len(index.files)} photos {side}x{side} q90",
              f"written in {time.perf_counter() - t0:.1f} s; train crops to {size} px, batch {n}, {workers} reader threads")
    loader = build_image_loader(index.files, index.labels, index.classes, backend="gpu", batch_size=n, train=True,
                                image_size=size, num_workers=workers, device=device, seed=0)
    decode_rate = _loader_rate(loader, device, lambda xb, yb: None)
    step_rate = _loader_rate(loader, device, lambda xb, yb: train_step(model, opt, xb, yb, policy=policy, generator=g))
    check.add("data -> step", "GPU-decode loader alone img/s", decode_rate,
              f"decode_jpeg(device={device.type!r}) + RandomResizedCrop + flip on the device")
    check.add("data -> step", "synthetic step img/s", n / t_synth, f"{t_synth * 1e3:.1f} ms/step, ResNet-50, no APR")
    check.add("data -> step", "GPU decode feeding the step img/s", step_rate, "apr.train.train_step, no APR")
    check.add("data -> step", "fraction of the synthetic step", step_rate * t_synth / n,
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


def section_eval(check, args, device, until) -> None:
    """Evaluation throughput through apr.inference.ImageClassifier (the one inference path)."""
    n, size, batches = (4, 32, 2) if args.quick else (args.batch, 224, 10)
    model = resnet50_classifier(device).eval()
    x, _ = batch(n, size, device)

    def run():
        with torch.inference_mode():
            for _ in range(batches):
                model(x)

    t = median_seconds(run, device, max(1, args.repeats // 2), 1)
    check.add("evaluation", "ImageClassifier img/s", n * batches / t,
              f"ResNet-50, {precision_for(device)}, batch {n}, {size} px")


def section_heatmap(check, args, device, until) -> None:
    """One Fourier heat map (apr.analysis.fourier_heatmap) of an untrained ResNet-50."""
    import torchvision

    from apr.analysis import fourier_heatmap

    net = torchvision.models.resnet50().to(device).to(memory_format=torch.channels_last).eval()
    n, size, m = (4, 32, 2) if args.quick else (64, 224, 4)
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    result = fourier_heatmap(net, images, torch.zeros(n, dtype=torch.long), mean=MEAN, std=STD, max_frequency=m,
                             batch_size=min(256, 8 * n), device=device, precision=precision_for(device),
                             channels_last=True, progress=False)
    sync(device)
    check.add("heat map", "Fourier heat map s", time.perf_counter() - t0,
              f"{n} images, {size} px, max_frequency {m} (~{(2 * m + 1) * (m + 1)} frequencies), {type(result).__name__}")


# ---------------------------------------------------------------------------------------
# pytest -m cuda in a child process: its log kept in full, FAILED and ERROR names parsed


CHILD_GRACE_S = 8  # a child stops this long before its section's deadline: 5 s for SIGTERM, then SIGKILL

OUTCOME = re.compile(r"^(\S+::\S+?)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?$", re.M)


def section_pytest(check, args, device, until) -> None:
    """Every CUDA test, verbose (names stream into the log, so a stopped run still names what ran)."""
    log = args.tmp / "pytest.log"
    check.pytest_log = log
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfE", "--durations=10", "-p", "no:cacheprovider",
           *args.pytest_target]
    t0 = time.monotonic()
    code = run_child(cmd, until - time.monotonic() - CHILD_GRACE_S, log)
    text = log.read_text(errors="replace")
    outcomes = pytest_outcomes(text)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    check.add("pytest -m cuda", "counts", ", ".join(f"{v} {k.lower()}" for k, v in counts.items()),
              f"exit {'stopped at its deadline' if code is None else code}, {time.monotonic() - t0:.0f} s; "
              f"full log: gpu_check_pytest.log")
    reasons = failure_reasons(text)
    for name, outcome in outcomes.items():
        if outcome in ("FAILED", "ERROR"):
            check.add("pytest -m cuda", outcome.lower(), name, reasons.get(name.split("::")[-1], "")[:200])


BLOCK = re.compile(r"^_{3,} (?:ERROR at \w+ of )?(\S+) _{3,}$", re.M)


def failure_reasons(text: str) -> dict:
    """test name (after ``::``) -> the first ``E`` line of its traceback in the FAILURES / ERRORS blocks."""
    reasons, heads = {}, list(BLOCK.finditer(text))
    for head, after in zip(heads, heads[1:] + [None]):
        body = text[head.end():after.start() if after else len(text)]
        first = next((line[1:].strip() for line in body.splitlines() if line.startswith("E ")), "")
        reasons.setdefault(head.group(1), first)
    return reasons


def pytest_outcomes(text: str) -> dict:
    """test id -> PASSED | FAILED | ERROR | SKIPPED from ``pytest -v`` lines (and ``-rfE`` summary lines)."""
    outcomes = {name: outcome for name, outcome in OUTCOME.findall(text)}
    for outcome, name, _ in SUMMARY.findall(text):
        if outcomes.get(name) in (None, "PASSED"):  # an error in teardown of a passed test
            outcomes[name] = outcome
    return outcomes


# ---------------------------------------------------------------------------------------
# compiled variants: last, in a child process that is stopped at its deadline


def section_compiled(check, args, device, until) -> None:
    """torch.compile of the APR kernel and of ResNet-50, each row saying whether compile really compiled."""
    rows, log = args.tmp / "compiled.jsonl", args.tmp / "compiled.log"
    cmd = [sys.executable, "-m", "apr.gpu_check", "--out", str(args.tmp), "--compiled-child", str(rows),
           "--device", str(device), "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup)]
    try:
        code = run_child(cmd, until - time.monotonic() - CHILD_GRACE_S, log)
    finally:  # also on SIGTERM: every row the child finished comes back
        for line in rows.read_text().splitlines() if rows.exists() else ():
            check.add(**json.loads(line))
    if code != 0:
        tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-300:]
        check.add("compiled", "child", "stopped at its deadline" if code is None else f"exit {code}", tail)


class RowSink:
    """The child's check: each row appended to a JSON-lines file and flushed at once."""

    def __init__(self, path: Path):
        self.path = path

    def add(self, section: str, item: str, value, note: str = "") -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"section": section, "item": item, "value": value, "note": str(note)}) + "\n")


def compiled_child(args, device) -> int:
    import apr.fourier

    sink = RowSink(args.compiled_child)
    n, size = (8, 32) if args.quick else (args.batch, 224)
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    reset_compile_counters()
    _time_ops(sink, "compiled", apr_op_calls(x, compile=True), args, device,
              status=lambda: compile_status(fell_back=None if apr.fourier._COMPILED.get("fn") else "the APR kernel "
                                            "fell back to eager (apr.fourier warned)"))
    reset_compile_counters()
    _train_rows(sink, "compiled", args, device, compiled=True, status=compile_status)
    return 0


def reset_compile_counters() -> None:
    from torch._dynamo.utils import counters

    counters.clear()


def compile_status(fell_back: str | None = None) -> str:
    """Whether what ran since the last reset was really compiled: dynamo graphs, graph breaks, fallbacks."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    breaks = counters["graph_break"]
    if fell_back:
        return f"compile: FELL BACK to eager ({fell_back})"
    if graphs == 0:
        return "compile: NOT compiled (dynamo captured no graph)"
    first = next(iter(breaks), "").splitlines()[0][:120] if breaks else ""
    return f"compile: compiled, {graphs} graph(s), {sum(breaks.values())} graph break(s)" + (f" ({first})" if first else "")

