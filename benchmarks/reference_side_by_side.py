"""Side by side: the reference code (iCGY96/APR ``main.py --aug aprs``, unchanged) and apr's reference recipe,
on a small 6-class photo set made here (docs/reference-differences.md, benchmarks/RESULTS.md).

    python benchmarks/reference_side_by_side.py data  OUT                  # the data set, once
    python benchmarks/reference_side_by_side.py ref   OUT --ref-src DIR --seed 0 [--depth 16] [--epochs 16]
    python benchmarks/reference_side_by_side.py apr   OUT --seed 0 [--depth 16] [--set data.drop_last=false ...]
    python benchmarks/reference_side_by_side.py eval  OUT                  # every run under OUT: clean / corruption error

``--ref-src`` is a checkout of github.com/iCGY96/APR kept OUTSIDE this repository (its code is not ours to
copy). It runs through ``runpy`` with the shims of :data:`REFERENCE_SHIMS` (environment only: no GPU here,
NumPy 2, a 6-class data set); its training and data logic is untouched. ``--depth`` other than 40 is a scale
shim for a shared CPU (both sides get the same WRN-depth-2).

Data: crops of six scikit-image photos (one class each) at 32 x 32, train crops from the left 65 % of each
photo and test crops from the right 35 % (disjoint pixels), 150 + 60 per class by default, in the CIFAR-10
pickle layout under ``OUT/data/cifar10`` (and a small CIFAR-100-layout OOD set the reference's ``test()``
reads); the corruption set is the 15 CIFAR-10-C corruptions x 5 severities of the test images
(``imagecorruptions``), ``OUT/data/CIFAR-10-C/<corruption>.npy``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
REF_MEAN, REF_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

REFERENCE_SHIMS = [
    "pandas: an empty module (main.py imports it and never uses it; not installed here)",
    "torch.Tensor.cuda / nn.Module.cuda: return self (no GPU here)",
    "torch.cuda.is_available: True, so that main.py sets use_gpu and train()/test() take their only working "
    "branch; nn.DataParallel returns the module itself (one device), DataLoader pin_memory off (no GPU to pin for)",
    "torchvision CIFAR10/CIFAR100 integrity check: True (the data set is ours, not the official md5s)",
    "CIFAR10D/CIFAR100D num_classes: the class count of the data set's meta file (the code hard-codes 10/100)",
    "numpy.trapz = numpy.trapezoid (core/evaluation.py, NumPy 2)",
    "torch.set_num_threads(--threads) (a shared CPU)",
    "--depth D: WideResNet(40, ...) built as WideResNet(D, ...) (scale only; D = 40 is the reference as is)",
    "--snapshots K: core.train wrapped to copy the weights after each of the last K epochs to "
    "OUTF/snapshots/epochE.pth (observation only: the call and its arguments are unchanged)",
]


# ----------------------------------------------------------------------------------------------- data


def _crops(photo: np.ndarray, n: int, rng: np.random.Generator, x_range: tuple[float, float]) -> np.ndarray:
    from PIL import Image

    h, w = photo.shape[:2]
    x0, x1 = int(x_range[0] * w), int(x_range[1] * w)
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        side = int(rng.integers(min(h, x1 - x0) // 5, min(h, x1 - x0) // 2 + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(x0, x1 - side + 1))
        out[i] = np.asarray(Image.fromarray(photo[y:y + side, x:x + side]).resize((32, 32), Image.BILINEAR))
    return out


def _write_pickles(folder: Path, train, test, names: list[str], cifar100: bool = False) -> None:
    rows = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # noqa: E731  (R, G, B planes per row)
    folder.mkdir(parents=True, exist_ok=True)
    key = "fine_labels" if cifar100 else "labels"  # str keys, as the official files read by torchvision
    if cifar100:
        parts = {"train": train, "test": test}
    else:
        idx = np.array_split(np.arange(len(train[0])), 5)
        parts = {f"data_batch_{i + 1}": (train[0][p], train[1][p]) for i, p in enumerate(idx)}
        parts["test_batch"] = test
    for part, (x, y) in parts.items():
        with open(folder / part, "wb") as f:
            pickle.dump({"data": rows(x), key: [int(v) for v in y]}, f)
    with open(folder / ("meta" if cifar100 else "batches.meta"), "wb") as f:
        pickle.dump({("fine_label_names" if cifar100 else "label_names"): list(names)}, f)


def make_data(out: Path, per_class_train: int = 150, per_class_test: int = 60, seed: int = 0) -> None:
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for k, name in enumerate(PHOTOS):
        photo = np.asarray(getattr(skdata, name)())[..., :3]
        tr_x.append(_crops(photo, per_class_train, rng, (0.0, 0.65)))
        te_x.append(_crops(photo, per_class_test, rng, (0.65, 1.0)))
        tr_y += [k] * per_class_train
        te_y += [k] * per_class_test
    order = rng.permutation(len(tr_y))
    train = (np.concatenate(tr_x)[order], np.array(tr_y)[order])
    test = (np.concatenate(te_x), np.array(te_y))
    _write_pickles(out / "data/cifar10/cifar-10-batches-py", train, test, list(PHOTOS))
    ood = _crops(np.asarray(skdata.retina()), 60, rng, (0.0, 1.0))  # the reference's test() also scores an OOD set
    _write_pickles(out / "data/cifar100/cifar-100-python", (ood, np.zeros(60)), (ood, np.zeros(60)), ["retina"], True)
    _write_corruptions(out / "data/CIFAR-10-C", *test)
    print(f"wrote {len(train[1])} train / {len(test[1])} test images, 6 classes, and the corruption set under {out}")


def _write_corruptions(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from imagecorruptions import corrupt

    folder.mkdir(parents=True, exist_ok=True)
    for name in CORRUPTIONS:
        cells = [np.stack([np.uint8(np.clip(corrupt(img, corruption_name=name, severity=s), 0, 255)) for img in images])
                 for s in range(1, 6)]
        np.save(folder / f"{name}.npy", np.concatenate(cells))
    np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.int64))


# ------------------------------------------------------------------------------------------ the two sides


def _ref_wrapper(ref_src: Path, args) -> str:
    """The reference's main.py run unchanged through runpy, after the environment shims (REFERENCE_SHIMS)."""
    return f"""
import os, sys, types, runpy
import numpy as np, torch, torch.nn as nn
sys.path.insert(0, {str(ref_src)!r}); os.chdir({str(ref_src)!r})
torch.set_num_threads({args.threads})
import importlib.machinery
sys.modules['pandas'] = types.ModuleType('pandas')
sys.modules['pandas'].__spec__ = importlib.machinery.ModuleSpec('pandas', None)
np.trapz = np.trapezoid
torch.Tensor.cuda = lambda self, *a, **k: self
nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.is_available = lambda: True
torch.cuda.manual_seed_all = lambda *a, **k: None
torch.cuda.empty_cache = lambda: None
nn.DataParallel = lambda module, device_ids=None: module
import torch.utils.data as tud
_dl_init = tud.DataLoader.__init__
def _dl(self, *a, **k):
    k['pin_memory'] = False
    _dl_init(self, *a, **k)
tud.DataLoader.__init__ = _dl
import torchvision.datasets.cifar as tvc
tvc.check_integrity = lambda *a, **k: True
tvc.CIFAR10._check_integrity = lambda self: True
import model.wide_resnet as wr
_wr_init = wr.WideResNet.__init__
wr.WideResNet.__init__ = lambda self, depth, *a, **k: _wr_init(self, {args.depth}, *a, **k)
import datasets.cifar10 as dc
for cls in (dc.CIFAR10D, dc.CIFAR100D):
    def _init(self, *a, _orig=cls.__init__, **k):
        _orig(self, *a, **k)
        self.num_classes = len(self.train_loader.dataset.classes)
    cls.__init__ = _init
import core
_train = core.train
def _train_and_snapshot(net, *a, epoch=None, **k):
    result = _train(net, *a, epoch=epoch, **k)
    if epoch + 1 > {args.epochs} - {args.snapshots}:
        folder = os.path.join({args.ref_args[3]!r}, 'snapshots'); os.makedirs(folder, exist_ok=True)
        torch.save({{n: t.detach().clone() for n, t in net.state_dict().items()}}, os.path.join(folder, f'epoch{{epoch + 1:04d}}.pth'))
    return result
core.train = _train_and_snapshot
sys.argv = ['main.py'] + {args.ref_args!r}
runpy.run_path('main.py', run_name='__main__')
"""


def run_reference(out: Path, args) -> None:
    run = out / f"ref_d{args.depth}_s{args.seed}"
    args.ref_args = ["--data", str(out / "data"), "--outf", str(run), "--model", "wide_resnet", "--aug", args.aug,
                     "--max-epoch", str(args.epochs), "--seed", str(args.seed), "--eval-freq", "0"]
    t0 = time.time()
    subprocess.run([sys.executable, "-c", _ref_wrapper(Path(args.ref_src).resolve(), args)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    _note(run, {"side": "reference", "depth": args.depth, "seed": args.seed, "epochs": args.epochs,
                "seconds": time.time() - t0, "images": 900 * args.epochs})


def run_apr(out: Path, args) -> None:
    name = f"apr_d{args.depth}_s{args.seed}" + "".join(f"_{s.split('.')[-1].replace('=', '-')}" for s in args.set)
    recipe = Path(__file__).resolve().parents[1] / "configs/cifar" / (
        "cifar10_wrn40_2_apr_sp_reference.yaml" if args.aug == "aprs" else "cifar10_wrn40_2_apr_p_reference.yaml")
    sets = [f"data.root={out / 'data/cifar10'}", f"train.epochs={args.epochs}", f"train.seed={args.seed}",
            f"model.name=wrn{args.depth}_2", f"train.output_dir={out}", f"train.run_name={name}",
            "train.val_every=0", f"train.num_threads={args.threads}", f"checkpoint.keep_last={max(1, args.snapshots)}",
            *args.set]
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "apr.commands.train", "--config", str(recipe), "--no-progress",
                    *sum((["--set", s] for s in sets), [])], check=True)
    _note(out / name, {"side": "apr", "depth": args.depth, "seed": args.seed, "epochs": args.epochs,
                       "sets": args.set, "seconds": time.time() - t0})


def _note(run: Path, info: dict) -> None:
    (run / "side_by_side.json").write_text(json.dumps(info, indent=1))


# ------------------------------------------------------------------------------------------------- eval


def _weight_files(run: Path, side: str) -> list[Path]:
    """Each side's saved weights, oldest epoch first (the last is the final weights)."""
    if side == "apr":
        return sorted(run.glob("checkpoint-e*.pt"))  # zero-padded epoch numbers sort as numbers
    final = next((run / "checkpoints").glob("*_.pth"))
    snapshots = sorted((run / "snapshots").glob("epoch*.pth"))
    return snapshots or [final]


def _load_weights(path: Path, depth: int, side: str):
    """One side's weights in apr's WideResNet (the same architecture; the reference's names mapped)."""
    import torch

    from apr.models import create_model

    model = create_model(f"wrn{depth}_2", 6)
    if side == "apr":
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    else:
        state = reference_state_to_apr(torch.load(path, map_location="cpu"))
    model.load_state_dict(state)
    return model.eval()


def reference_state_to_apr(state: dict) -> dict:
    """The reference WideResNet's parameter names -> apr's (block{s}.layer.{i}.X -> blocks.{k}.X, bn1 -> bn)."""
    out, n = {}, None
    per_stage = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("block1."))
    for key, value in state.items():
        parts = key.split(".")
        if parts[0].startswith("block"):
            k = (int(parts[0][5:]) - 1) * per_stage + int(parts[2])
            rest = ".".join(parts[3:]).replace("conv_shortcut", "shortcut")
            out[f"blocks.{k}.{rest}"] = value
        else:
            out[key.replace("bn1.", "bn.")] = value
    return out


def evaluate_runs(out: Path, threads: int, corruption: bool = True) -> None:
    import torch

    from apr.data.cifar import load_cifar

    torch.set_num_threads(threads)
    x, y, _ = load_cifar(out / "data/cifar10", "cifar10", train=False)
    labels_c = np.load(out / "data/CIFAR-10-C/labels.npy")
    mean, std = torch.tensor(REF_MEAN).view(1, 3, 1, 1), torch.tensor(REF_STD).view(1, 3, 1, 1)

    def error(model, images, labels) -> float:
        t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():
            pred = torch.cat([model((b - mean) / std).argmax(1) for b in t.split(256)])
        return float((pred.numpy() != labels).mean() * 100)

    rows = []
    for run in sorted(p.parent for p in out.glob("*/side_by_side.json")):
        info = json.loads((run / "side_by_side.json").read_text())
        files = _weight_files(run, info["side"])
        model = _load_weights(files[-1], info["depth"], info["side"])
        if "clean" not in info:
            info["clean"] = error(model, x, y)
            _note(run, info)
        if len(files) > 1 and "clean_per_epoch" not in info:  # the last K epochs' weights: less noise than one
            info["clean_per_epoch"] = [error(_load_weights(f, info["depth"], info["side"]), x, y) for f in files]
            _note(run, info)
        if corruption and "corruption" not in info:
            info["corruption"] = float(np.mean([error(model, np.load(out / f"data/CIFAR-10-C/{c}.npy"), labels_c)
                                                for c in CORRUPTIONS]))
            _note(run, info)
        last_k = info.get("clean_per_epoch")
        print(f"{run.name:40s} clean {info['clean']:5.1f}  corruption {info.get('corruption', float('nan')):5.1f}  "
              + (f"clean, mean of last {len(last_k)} epochs {np.mean(last_k):5.1f}  " if last_k else "")
              + f"({info['seconds']:.0f} s)", flush=True)
        rows.append(info)
    print_comparison(rows)


def print_comparison(rows: list[dict]) -> None:
    """Per side (and set of overrides): mean +- sample std over seeds, and reference minus apr with its
    standard error (Welch): how far apart the sides are in units of their seed-to-seed noise."""
    import statistics

    def key(info):
        return (info["side"], info["depth"], tuple(info.get("sets", [])))

    groups: dict[tuple, list[dict]] = {}
    for info in rows:
        groups.setdefault(key(info), []).append(info)
    metrics = {"clean": lambda i: i.get("clean"), "corruption": lambda i: i.get("corruption"),
               "clean_last_epochs": lambda i: float(np.mean(i["clean_per_epoch"])) if "clean_per_epoch" in i else None}
    stats = {}
    for group, infos in sorted(groups.items()):
        line = []
        for name, get in metrics.items():
            values = [v for v in map(get, infos) if v is not None]
            if len(values) >= 2:
                stats[(group, name)] = (statistics.mean(values), statistics.stdev(values), len(values))
                line.append(f"{name} {statistics.mean(values):5.1f} +- {statistics.stdev(values):4.1f}")
        print(f"{' '.join(map(str, group[:2]))} {list(group[2]) or ''} (seeds {sorted(i['seed'] for i in infos)}): "
              + ", ".join(line))
    sides = sorted({g for g, _ in stats})
    for ref in (g for g in sides if g[0] == "reference"):
        for apr in (g for g in sides if g[0] == "apr" and g[1] == ref[1]):
            for name in metrics:
                if (ref, name) in stats and (apr, name) in stats:
                    (m1, s1, n1), (m2, s2, n2) = stats[(ref, name)], stats[(apr, name)]
                    se = (s1 ** 2 / n1 + s2 ** 2 / n2) ** 0.5
                    print(f"  reference - apr {list(apr[2]) or ''}, {name}: {m1 - m2:+5.1f} points "
                          f"(standard error {se:4.1f}, {abs(m1 - m2) / se if se else float('inf'):.1f} SE)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["data", "ref", "apr", "eval"])
    p.add_argument("out", type=Path)
    p.add_argument("--ref-src", help="checkout of iCGY96/APR (outside this repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=int, default=40)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--aug", default="aprs", choices=["aprs", "none"], help="reference --aug (none = APR-P only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--snapshots", type=int, default=4, help="keep the weights of the last K epochs on both sides")
    p.add_argument("--set", action="append", default=[], help="apr side: extra --set overrides")
    p.add_argument("--clean-only", action="store_true", help="eval: skip the corruption set")
    a = p.parse_args(argv)
    if a.what == "data":
        make_data(a.out)
    elif a.what == "ref":
        run_reference(a.out, a)
    elif a.what == "apr":
        run_apr(a.out, a)
    else:
        evaluate_runs(a.out, a.threads, corruption=not a.clean_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
