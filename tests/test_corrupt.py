"""apr.corrupt on a tiny tree of real digit photos: layout, the pixels against imagecorruptions
itself, severity ordering, resume, determinism, the spatter fix, errors and the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apr.corrupt import (ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, CorruptionError, corrupt_image,
                         make_corrupted_tree, output_path, preprocess, scan_source)
from conftest import write_imagefolder

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["n00000000", "n00000001"]


@pytest.fixture(scope="module")
def src_tree(tmp_path_factory, digits_images) -> Path:
    """2 classes x 2 real digit images, 32x32 RGB JPEG."""
    images, labels = digits_images
    idx = [i for k in (0, 1) for i in np.flatnonzero(labels == k)[:2]]
    return write_imagefolder(tmp_path_factory.mktemp("src"), images[idx], labels[idx], CLASSES)


@pytest.fixture(scope="module")
def generated(src_tree, tmp_path_factory):
    """All 15 + 4 corruptions x 5 severities with two worker processes."""
    dst = tmp_path_factory.mktemp("dst") / "corrupted"
    summary = make_corrupted_tree(src_tree, dst, corruptions=ALL_CORRUPTIONS, resize=None, crop=None, workers=2,
                                  progress=False)
    return dst, summary


def sources(src_tree: Path) -> list[Path]:
    return sorted(src_tree.glob("*/*.JPEG"))


def load(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def test_layout_and_count(generated, src_tree):
    dst, summary = generated
    assert summary.source_images == 4 and summary.outputs == 4 * 19 * 5
    assert summary.written == summary.outputs and summary.skipped == 0
    files = sorted(dst.rglob("*.JPEG"))
    assert len(files) == 4 * 19 * 5
    for c in ALL_CORRUPTIONS:
        for s in range(1, 6):
            for src in sources(src_tree):
                out = dst / c / str(s) / src.parent.name / src.name
                assert out.is_file(), out
    for f in files[::7]:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    assert not list(dst.rglob("*.tmp*"))
    manifest = json.loads((dst / "apr_corrupt.json").read_text())
    assert manifest["resize"] is None and manifest["crop"] is None and manifest["quality"] == 85


def test_pixels_match_imagecorruptions(generated, src_tree):
    """Independent reference: imagecorruptions.corrupt with the documented seed, JPEG q85."""
    from imagecorruptions import corrupt

    dst, _ = generated
    src = sources(src_tree)[1]
    clean = np.asarray(Image.open(src).convert("RGB"))
    for c, s in (("gaussian_noise", 2), ("impulse_noise", 4), ("glass_blur", 1), ("frost", 3), ("contrast", 5)):
        rel = f"{src.parent.name}/{src.name}"
        seed = int.from_bytes(hashlib.sha256(f"{c}/{s}/{rel}".encode()).digest()[:4], "little")
        np.random.seed(seed)
        ref = corrupt(clean, severity=s, corruption_name=c, **({"seed": seed} if c in ("impulse_noise", "glass_blur")
                                                                else {}))
        buf = io.BytesIO()
        Image.fromarray(ref).save(buf, format="JPEG", quality=85, optimize=True)
        assert (dst / c / str(s) / rel).read_bytes() == buf.getvalue(), (c, s)


def test_corrupted_differ_and_severity_orders(generated, src_tree):
    dst, _ = generated
    srcs = sources(src_tree)
    for c in ALL_CORRUPTIONS:
        for s in (1, 5):
            diffs = [np.abs(load(dst / c / str(s) / p.parent.name / p.name) - load(p)).mean() for p in srcs]
            assert min(diffs) > 1.0, (c, s, diffs)  # every image visibly changed
    # mean distance from clean rises with severity (checked on corruptions where it is monotone by design)
    for c in ("gaussian_noise", "impulse_noise", "defocus_blur", "brightness", "contrast"):
        dist = [np.mean([np.abs(load(dst / c / str(s) / p.parent.name / p.name) - load(p)).mean() for p in srcs])
                for s in range(1, 6)]
        assert all(a < b for a, b in zip(dist, dist[1:])), (c, dist)


def test_resume_rewrites_only_missing(generated, src_tree):
    dst, _ = generated
    victim = dst / "fog" / "3" / CLASSES[1] / sources(src_tree)[3].name
    before = victim.read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in dst.rglob("*.JPEG") if p != victim}
    victim.unlink()
    (victim.parent / f".{victim.name}.tmp-99999").write_bytes(b"half-written")  # debris of a killed run
    summary = make_corrupted_tree(src_tree, dst, corruptions=ALL_CORRUPTIONS, resize=None, crop=None, workers=2,
                                  progress=False)
    assert summary.written == 1 and summary.skipped == 4 * 19 * 5 - 1
    assert victim.read_bytes() == before  # deterministic: the same bytes come back
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    (victim.parent / f".{victim.name}.tmp-99999").unlink()
    with pytest.raises(CorruptionError, match="generated with different settings quality=85 \\(now 90\\)"):
        make_corrupted_tree(src_tree, dst, resize=None, crop=None, quality=90, workers=1, progress=False)


def test_a_fresh_tree_needs_no_decode_check_but_a_foreign_file_is_checked(src_tree, tmp_path, monkeypatch):
    """apr-corrupt just encoded every file of a fresh tree with PIL: the evaluators' decode check finds them in
    its cache; a folder holding a file apr-corrupt did not write is decoded as before, and so is a resumed tree."""
    from apr.data import layout

    monkeypatch.setenv("APR_CACHE_DIR", str(tmp_path / "cache"))
    dst = tmp_path / "c"
    (dst / "fog" / "2" / CLASSES[0]).mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(dst / "fog" / "2" / CLASSES[0] / "foreign.png")
    make_corrupted_tree(src_tree, dst, corruptions=["fog", "contrast"], severities=(1, 2), resize=None, crop=None,
                        workers=0, progress=False)
    decoded = []
    monkeypatch.setattr(layout, "decode_problem", lambda path: decoded.append(Path(path)))
    files = sorted(str(f) for f in dst.rglob("*") if f.suffix in (".JPEG", ".png"))
    assert layout.check_files(files, decode=True) == [None] * len(files)
    assert {f.parent for f in decoded} == {dst / "fog" / "2" / CLASSES[0]}  # only the folder with a foreign file
    (dst / "contrast" / "1" / CLASSES[1] / (sources(src_tree)[3].stem + ".JPEG")).unlink()
    monkeypatch.setenv("APR_CACHE_DIR", str(tmp_path / "cache2"))
    make_corrupted_tree(src_tree, dst, corruptions=["fog", "contrast"], severities=(1, 2), resize=None, crop=None,
                        workers=0, progress=False)  # resumed: one file written, the rest skipped
    decoded.clear()
    layout.check_files(files, decode=True)
    assert len(decoded) == len(files)  # nothing recorded: the kept files were not encoded by this run


def test_deterministic_in_process(generated, src_tree, tmp_path):
    """Another run, in this process instead of two workers, gives the same bytes; the caller's
    NumPy RNG is left alone."""
    dst, _ = generated
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    names = ("glass_blur", "impulse_noise", "spatter", "frost", "elastic_transform")
    make_corrupted_tree(src_tree, tmp_path / "again", corruptions=names, resize=None, crop=None, workers=1,
                        progress=False)
    assert np.array_equal(np.random.get_state()[1], state)
    again = sorted((tmp_path / "again").rglob("*.JPEG"))
    assert len(again) == 4 * len(names) * 5
    for f in again:
        assert f.read_bytes() == (dst / f.relative_to(tmp_path / "again")).read_bytes(), f


def test_spatter_without_liquid_keeps_the_image(digits_images):
    """Upstream spatter divides 0/0 when its random liquid layer is empty and returns black."""
    from imagecorruptions import corrupt

    img = digits_images[0][0]
    for seed in range(400):
        np.random.seed(seed)
        with np.errstate(all="ignore"):
            upstream = corrupt(img, severity=1, corruption_name="spatter")
        if upstream.max() == 0:
            break
    else:
        pytest.fail("no seed reproduced the upstream all-black spatter output")
    assert np.array_equal(corrupt_image(img, "spatter", 1, seed), img)
    other = corrupt_image(img, "spatter", 1, seed + 1)
    np.random.seed(seed + 1)
    assert np.array_equal(other, corrupt(img, severity=1, corruption_name="spatter"))


def test_preprocess_matches_torchvision():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for size, resize, crop in (((300, 400), 256, 224), ((61, 45), 40, 32), ((224, 224), 256, 224)):
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ref = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop)])(img)
        assert np.array_equal(preprocess(img, resize, crop), np.asarray(ref))
    grey = Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8))
    assert preprocess(grey, None, None).shape == (40, 50, 3)
    with pytest.raises(CorruptionError, match="smaller than the crop 64"):
        preprocess(grey, None, 64)


def test_bad_inputs(tmp_path, src_tree, digits_images):
    with pytest.raises(CorruptionError, match="does not exist"):
        make_corrupted_tree(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptionError, match="has no class folders"):
        scan_source(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(digits_images[0][0]).save(flat / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(CorruptionError, match="holds 1 images directly: move them into one folder per class"):
        scan_source(flat)
    (tmp_path / "holes" / "n01").mkdir(parents=True)
    with pytest.raises(CorruptionError, match="class folder\\(s\\) without images \\(n01\\)"):
        scan_source(tmp_path / "holes")
    with pytest.raises(CorruptionError, match="unknown corruption\\(s\\) \\['gausian_noise'\\]"):
        make_corrupted_tree(src_tree, tmp_path / "out", corruptions=["gausian_noise"], progress=False)
    with pytest.raises(CorruptionError, match="severities must be integers in 1..5"):
        make_corrupted_tree(src_tree, tmp_path / "out", severities=[0, 1], progress=False)
    with pytest.raises(CorruptionError, match="must not lie inside the source"):
        make_corrupted_tree(src_tree, src_tree / "c", progress=False)
    small = write_imagefolder(tmp_path / "small", digits_images[0][:1, :24, :24], np.array([0]), ["n00"])
    with pytest.raises(CorruptionError, match="24x24 after preprocessing; imagecorruptions needs at least 32x32"):
        make_corrupted_tree(small, tmp_path / "small_out", corruptions=["contrast"], resize=None, crop=None,
                            workers=1, progress=False)
    assert scan_source(src_tree, limit_per_class=1) == [(c, sources(src_tree)[2 * i].name)
                                                        for i, c in enumerate(CLASSES)]
    assert output_path("/d", "fog", 3, "n01", "x.png") == Path("/d/fog/3/n01/x.JPEG")


def test_cli(src_tree, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "apr.corrupt", *a], capture_output=True, text=True,
                                    cwd=REPO, env=env)
    proc = run("--help")
    assert proc.returncode == 0 and "--no-resize" in proc.stdout and "--extra" in proc.stdout
    out = tmp_path / "cli"
    proc = run(str(src_tree), str(out), "--corruptions", "contrast", "--severities", "1", "2", "--no-resize",
               "--workers", "1", "--limit-per-class", "1", "--extra", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["written"] == 2 * 5 * 2  # 2 images x (contrast + 4 extra) x 2 severities
    assert sorted(p.name for p in out.iterdir()) == sorted(["apr_corrupt.json", "contrast", *EXTRA_CORRUPTIONS])
    proc = run(str(tmp_path / "missing"), str(out))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert len(CORRUPTIONS) == 15


def test_unreadable_source_files_are_skipped_not_fatal(tmp_path, digits_images):
    """A truncated JPEG or an HTML page named .JPEG in the source (apr.data's header check) is skipped."""
    images, labels = digits_images
    src = write_imagefolder(tmp_path / "src", images[:2], np.array([0, 0]), ["n00000000"])
    good = sorted(src.glob("*/*.JPEG"))
    (src / "n00000000" / "broken.JPEG").write_bytes(good[0].read_bytes()[:300])
    (src / "n00000000" / "page.JPEG").write_text("<html>not an image</html>")
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file"):
        summary = make_corrupted_tree(src, tmp_path / "dst", corruptions=["gaussian_noise"], severities=[1],
                                      resize=None, crop=None, workers=1, progress=False)
    assert summary.source_images == 2
    assert sorted(p.name for p in (tmp_path / "dst").rglob("*.JPEG")) == sorted(p.name for p in good)


def _live_processes_in_group(pgid: int) -> list[str]:
    """Pids of the live (not zombie) processes of a process group, from /proc."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            live.append(entry)
    return live


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_workers_stop_with_the_parent_and_a_rerun_completes_the_tree(sig, src_tree, generated, tmp_path):
    """#9.7: SIGTERM (handled: workers stopped, exit 143) or SIGKILL (workers get SIGTERM from the
    kernel) to the main process mid-run leaves no worker running and no temporary file; a rerun
    writes exactly the missing outputs, byte-identical to an uninterrupted run."""
    import signal
    import time

    reference, _ = generated
    names = ["gaussian_noise", "glass_blur"]  # glass_blur's numba compile (seconds) keeps the run going
    dst = tmp_path / "interrupted"
    log = tmp_path / "stderr.txt"  # a file, not a pipe: orphans holding a pipe open would hang the test
    with log.open("w") as stderr_file:
        proc = subprocess.Popen([sys.executable, "-m", "apr.corrupt", str(src_tree), str(dst), "--corruptions",
                                 *names, "--no-resize", "--workers", "2", "--no-progress"], cwd=REPO,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.DEVNULL, stderr=stderr_file)
    try:
        deadline = time.monotonic() + 120
        while not list(dst.rglob("*.JPEG")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.kill(proc.pid, getattr(signal, sig))
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _live_processes_in_group(proc.pid) == [], "worker processes outlived the parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if sig == "SIGTERM":
        stderr = log.read_text()
        assert proc.returncode == 143 and "Traceback" not in stderr and "leaked" not in stderr, stderr
    done = sorted(dst.rglob("*.JPEG"))
    assert 0 < len(done) < 4 * 2 * 5  # stopped mid-run
    assert not [p for p in dst.rglob("*") if p.is_file() and p.suffix != ".JPEG" and p.name != "apr_corrupt.json"]
    for path in done:  # nothing half-written: each file is the uninterrupted run's
        assert path.read_bytes() == (reference / path.relative_to(dst)).read_bytes(), path
    summary = make_corrupted_tree(src_tree, dst, corruptions=names, resize=None, crop=None, workers=1,
                                  progress=False)
    assert summary.skipped == len(done) and summary.written == 4 * 2 * 5 - len(done)
    for path in dst.rglob("*.JPEG"):
        assert path.read_bytes() == (reference / path.relative_to(dst)).read_bytes(), path
