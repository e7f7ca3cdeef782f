"""apr.data.gpu_decode (data.backend: gpu) on the CPU: the loader contract, agreement with the torchvision
backend, skipped files, and running where DALI is not installed. The CUDA test decodes with nvJPEG."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.config import Config
from apr.data import build_image_loader, build_train_loader, build_val_loader, resolve_backend, scan_image_folder
from apr.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(root: Path, backend: str = "gpu", **data) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.backend, cfg.data.image_size, cfg.data.val_resize = str(root), backend, 24, 28
    cfg.data.num_workers = 2 if backend == "gpu" else 0
    cfg.train.batch_size, cfg.train.seed = 8, 3
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_batches_follow_the_contract(imagenet_tree):
    train, val = build_train_loader(_cfg(imagenet_tree)), build_val_loader(_cfg(imagenet_tree), classes=None)
    assert type(train).__name__ == "GpuDecodeLoader" and len(train) == 8 and train.num_samples == 64
    batches = list(train)
    assert len(batches) == 8
    for x, y in batches:
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == "cpu" and 0 <= x.min() and x.max() <= 1 and x.std() > 0.05
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted([0, 1, 2, 3] * 16)
    labels = torch.cat([y for _, y in val])
    assert len(val) == 3 and val.num_samples == 24
    assert labels.tolist() == scan_image_folder(imagenet_tree / "val").labels


# The two backends decode with the same libjpeg-turbo (PIL and torchvision.io: bit-identical here) and draw the
# same crop boxes and flips from the same per-sample seeds. What differs is the resize: the torchvision backend
# resizes uint8 tensors (fixed-point antialias weights, output rounded to uint8: <= 0.5/255 each), this one
# resizes float32. Measured on these trees: max 1.0/255, mean 0.3/255.
MAX_DIFF, MEAN_DIFF = 1.5 / 255, 0.5 / 255


@pytest.mark.parametrize("train", [True, False])
def test_output_equals_the_torchvision_backend(imagenet_tree, train):
    out = {}
    for backend in ("gpu", "torchvision"):
        cfg = _cfg(imagenet_tree, backend)
        loader = build_train_loader(cfg) if train else build_val_loader(cfg, classes=None)
        out[backend] = [batch for _, batch in zip(range(3), loader)]
    for (x, y), (xt, yt) in zip(out["gpu"], out["torchvision"]):
        assert torch.equal(y, yt)  # integer labels: the same samples in the same order
        torch.testing.assert_close(x, xt, atol=MAX_DIFF, rtol=0)
        assert (x - xt).abs().mean() <= MEAN_DIFF


def test_non_square_photos_resize_the_shorter_side_like_torchvision(tmp_path):
    """Real photos 96x144 (landscape) and 144x96 (portrait): val keeps the aspect ratio, train crops boxes."""
    from conftest import sample_photos

    photos = list(sample_photos(96, 144)) + [p.transpose(1, 0, 2).copy() for p in sample_photos(96, 144)]
    files = []
    for i, photo in enumerate(photos):
        files.append(str(tmp_path / f"p{i}.JPEG"))
        Image.fromarray(photo).save(files[-1], quality=90)
    for train in (True, False):
        got = {b: list(build_image_loader(files, [0, 1, 2, 3], ["a", "b", "c", "d"], backend=b, batch_size=4,
                                          train=train, image_size=64, resize=None if train else 73, num_workers=0))
               for b in ("gpu", "torchvision")}
        (x, _), (xt, _) = got["gpu"][0], got["torchvision"][0]
        assert x.shape == (4, 3, 64, 64)
        torch.testing.assert_close(x, xt, atol=MAX_DIFF, rtol=0)


def test_val_equals_pil_reference(imagenet_tree):
    """Independent path: PIL bilinear resize of the 32x32 image to 28x28, center 24x24 crop, /255."""
    loader = build_val_loader(_cfg(imagenet_tree), classes=None)
    images = torch.cat([x for x, _ in loader])
    for i, path in enumerate(scan_image_folder(imagenet_tree / "val").files):
        img = Image.open(path).convert("RGB").resize((28, 28), Image.BILINEAR)
        ref = np.asarray(img, dtype=np.float32)[2:26, 2:26].transpose(2, 0, 1) / 255.0
        assert np.abs(images[i].numpy() - ref).max() <= 2.5 / 255


def test_seeded_epochs_differ_and_the_global_rng_is_left_alone(imagenet_tree):
    cfg = _cfg(imagenet_tree)
    a, b = build_train_loader(cfg), build_train_loader(cfg)
    first, again = list(a), list(b)
    for (xa, ya), (xb, yb) in zip(first, again):  # same path twice: bit-exact
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    second = list(a)  # the next epoch: another order
    assert not torch.equal(torch.cat([y for _, y in second]), torch.cat([y for _, y in first]))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(build_train_loader(cfg))
    assert torch.equal(torch.rand(3), expected)


def test_two_rank_sharding(imagenet_tree):
    index = scan_image_folder(imagenet_tree / "train")
    ids = list(range(63))
    per_rank = []
    for rank in (0, 1):
        loader = build_image_loader(index.files[:63], ids, index.classes, backend="gpu", batch_size=8, train=True,
                                    image_size=16, num_workers=2, rank=rank, world_size=2, seed=1)
        assert len(loader) == 3
        per_rank.append([int(y) for _, lab in loader for y in lab])
    assert len(per_rank[0]) == len(per_rank[1]) == 24 and not set(per_rank[0]) & set(per_rank[1])
    seen = []
    for rank in (0, 1):
        loader = build_image_loader(index.files[:23], ids[:23], index.classes, backend="gpu", batch_size=5,
                                    train=False, image_size=16, resize=20, num_workers=2, rank=rank, world_size=2)
        got = [int(y) for _, lab in loader for y in lab]
        assert len(got) == loader.num_samples
        next(iter(loader))  # an abandoned eval pass does not shorten the next one
        assert [int(y) for _, lab in loader for y in lab] == got
        seen += got
    assert sorted(seen) == list(range(23))


@pytest.mark.parametrize("k", [0, 5, 8])
def test_exact_resume(imagenet_tree, k):
    cfg = _cfg(imagenet_tree)
    ref = build_train_loader(cfg)
    reference = []
    for epoch in range(3):
        ref.set_epoch(epoch)
        reference.append(list(ref))
    loader = build_train_loader(cfg)
    list(loader)
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(k):
        next(it)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    buf.seek(0)
    resumed = build_train_loader(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    got = []
    for epoch in ((1, 2) if k < 8 else (2,)):
        resumed.set_epoch(epoch)
        got += list(resumed)
    expected = reference[1][k:] + reference[2] if k < 8 else reference[2]
    assert len(got) == len(expected)
    for (x, y), (xr, yr) in zip(got, expected):
        assert torch.equal(y, yr) and torch.equal(x, xr)


def test_another_backends_state_is_refused(imagenet_tree):
    torchvision_state = build_train_loader(_cfg(imagenet_tree, "torchvision")).state_dict()
    with pytest.raises(UserError, match="loader state is for backend 'torchvision', this loader uses gpu"):
        build_train_loader(_cfg(imagenet_tree)).load_state_dict(torchvision_state)


def test_grayscale_cmyk_and_png_named_jpeg_come_out_as_rgb(tmp_path):
    """ImageNet holds grayscale and CMYK JPEGs and one PNG saved as .JPEG: all decode to 3 channels."""
    ramp = np.linspace(0, 255, 40 * 48 * 3).reshape(40, 48, 3).astype(np.uint8)
    files = [tmp_path / f"{name}.JPEG" for name in ("gray", "cmyk", "png")]
    Image.fromarray(ramp).convert("L").save(files[0], quality=95)
    Image.fromarray(ramp).convert("CMYK").save(files[1], quality=95)
    Image.fromarray(ramp).save(files[2], format="PNG")
    loader = build_image_loader([str(f) for f in files], [0, 1, 2], ["a", "b", "c"], backend="gpu", batch_size=3,
                                train=False, image_size=40, num_workers=1)
    (x, y), = list(loader)
    assert x.shape == (3, 3, 40, 40) and y.tolist() == [0, 1, 2] and not loader.skipped_files
    for image, path in zip(x, files):
        ref = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)[:, 4:44].transpose(2, 0, 1) / 255
        np.testing.assert_allclose(image.numpy(), ref, atol=1e-6)


def _scramble(path: Path, seed: int = 0) -> None:
    """Keep the JPEG header (through the start-of-scan marker) and the end marker; random body."""
    data = path.read_bytes()
    body = data.index(b"\xff\xda") + 14
    noise = np.random.default_rng(seed).integers(0, 256, len(data) - body - 2, dtype=np.uint8).tobytes()
    path.write_bytes(data[:body] + noise + b"\xff\xd9")


def test_undecodable_files_are_replaced_in_training_and_left_out_in_eval(tmp_path, imagenet_tree):
    root = tmp_path / "tree"
    shutil.copytree(imagenet_tree, root)
    text = root / "train" / "n00000001" / "zz_text.JPEG"
    text.write_text("<html>not a jpeg</html>")
    cfg = _cfg(root, verify_images=False)
    loader, again = build_train_loader(cfg), build_train_loader(cfg)
    with pytest.warns(UserWarning, match=r"skipped undecodable image .*zz_text\.JPEG.*replaced"):
        batches = list(loader)
    assert len(batches) == len(loader) == 8 and all(x.shape == (8, 3, 24, 24) for x, _ in batches)
    assert list(loader.skipped_files) == [str(text)]
    with pytest.warns(UserWarning):
        repeat = list(again)
    for (xa, ya), (xb, yb) in zip(batches, repeat):  # the stand-in is seeded: same path twice, bit-exact
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    bad = root / "val" / "n00000002" / "zz_bad.JPEG"
    shutil.copy(next((root / "val" / "n00000002").iterdir()), bad)
    _scramble(bad)
    files = [str(bad)] + [str(p) for p in sorted((root / "val" / "n00000000").iterdir())[:3]]
    val = build_image_loader(files, [2, 0, 0, 0], ["a", "b", "c"], backend="gpu", batch_size=2, train=False,
                             image_size=24, num_workers=1)
    with pytest.warns(UserWarning, match="left out of the evaluation"):
        labels = [int(v) for _, y in val for v in y]
    assert labels == [0, 0, 0]


def test_without_dali_auto_picks_gpu_or_torchvision_and_dali_names_the_fix(monkeypatch, imagenet_tree):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed (undone after the test)
    assert resolve_backend("auto", "cpu") == "torchvision" and resolve_backend("auto", "cuda:1") == "gpu"
    assert resolve_backend("gpu", "cpu") == "gpu"
    loader = build_train_loader(_cfg(imagenet_tree, "auto", num_workers=0))
    assert type(loader).__name__ == "TorchvisionImageLoader" and len(list(loader)) == 8
    with pytest.raises(UserError) as caught:
        build_train_loader(_cfg(imagenet_tree, "dali"))
    message = str(caught.value)
    assert "\n" not in message and "pip install nvidia-dali-cuda120" in message and "data.backend=gpu" in message
    with pytest.raises(ValueError, match="unknown data backend 'nvjpeg'"):
        resolve_backend("nvjpeg")


def test_with_dali_installed_auto_keeps_dali():
    pytest.importorskip("nvidia.dali")
    assert resolve_backend("auto", "cpu") == "dali" and resolve_backend("auto", "cuda") == "dali"


def test_every_apr_module_imports_without_dali():
    """What the lent GPU box has: no nvidia.dali. A fresh interpreter, so no other test's DALI is disturbed."""
    code = ("import sys, pkgutil, importlib; sys.modules['nvidia.dali'] = None; import apr\n"
            "names = [m.name for m in pkgutil.walk_packages(apr.__path__, 'apr.') if not m.name.endswith('__main__')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "from apr.data.dali import require_dali\n"
            "try:\n    require_dali()\nexcept ImportError as exc:\n    print('refused:', exc)\n"
            "print(len(names), 'modules')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: data.backend=dali needs NVIDIA DALI" in proc.stdout and "modules" in proc.stdout


@pytest.mark.cuda
def test_nvjpeg_decode_on_the_gpu_agrees_with_the_cpu_path(imagenet_tree):
    """Same code, device string "cuda": batches live on the GPU, resume is bit-exact there, and nvJPEG's pixels
    stay close to libjpeg-turbo's (two decoders: IDCT and chroma upsampling differ by a few levels; the bounds
    are loose on purpose and the mean is the meaningful one)."""
    cpu = [b for _, b in zip(range(3), build_val_loader(_cfg(imagenet_tree), classes=None))]
    cfg = _cfg(imagenet_tree)
    gpu = [b for _, b in zip(range(3), build_val_loader(cfg, classes=None, device="cuda"))]
    for (x, y), (xc, yc) in zip(gpu, cpu):
        assert x.device.type == "cuda" and y.device.type == "cuda" and x.dtype == torch.float32
        assert torch.equal(y.cpu(), yc)
        diff = (x.cpu() - xc).abs()
        assert diff.mean() <= 3 / 255 and diff.max() <= 48 / 255, (diff.mean() * 255, diff.max() * 255)
    train, again = build_train_loader(cfg, device="cuda"), build_train_loader(cfg, device="cuda")
    for (xa, ya), (xb, yb) in zip(train, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_training_on_the_gpu_backend_resumes_after_sigterm_with_identical_weights(imagenet_tree, tmp_path):
    """End to end through apr.train: the loop cannot tell the backend apart, and the resume is exact."""
    import os
    import signal

    from apr.checkpoint import find_latest_checkpoint
    from apr.train import train
    from test_train import tiny_config, weights

    extra = ("data.backend=gpu", "aug.name=apr_sp")
    straight = train(tiny_config(imagenet_tree, tmp_path / "a", *extra), progress=False)

    def preempt(info):
        if info["epoch"] == 1 and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(imagenet_tree, tmp_path / "b", *extra)
    first = train(cfg, progress=False, on_step_end=preempt)
    assert (straight.status, first.status, first.epoch, first.step) == ("finished", "preempted", 1, 2)
    second = train(cfg, resume="auto", progress=False)
    assert second.status == "finished" and second.global_step == straight.global_step
    a = weights(find_latest_checkpoint(tmp_path / "a" / "run"))
    b = weights(find_latest_checkpoint(tmp_path / "b" / "run"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_background_thread_passes_errors_on_and_stops_when_abandoned():
    import threading

    from apr.data.gpu_decode import in_background

    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in in_background(items, 1, "apr-test-errors"):
            got.append(item)
    assert got == [1, 2]
    endless = in_background(lambda: iter(range(10**9)), 2, "apr-test-abandon")
    assert [next(endless), next(endless)] == [0, 1]  # in order
    endless.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("apr-test-")]


def test_an_abandoned_pass_leaves_no_decode_thread(imagenet_tree):
    import threading

    loader = build_train_loader(_cfg(imagenet_tree))
    it = iter(loader)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(("apr-decode", "apr-read"))]
    assert loader.state_dict()["batch"] == 1  # the position counts what was handed over, not what was decoded
