"""Distribution-shift suites (apr.data.suites + apr.evaluation.evaluate_shift) on tiny trees built here
in each suite's published layout, scored by a constructed model whose logits are a fixed function of
a marker (the red level of a flat-colour image): the expected errors are counted by hand below.

Marker levels (the model's top logits):
  L0 -> class 0                      L1 -> class 1, then 5
  L2 -> class 1, then 10             L3 -> class 3
ImageNet-R/-A's subset here is every 5th class (0, 5, 10, ...): class 1 and 3 lie outside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apr.data.suites import (C_BAR_SEVERITIES, CIFAR10_CLASSES, EvalError, make_clean_suite, make_shift_suite,
                             parse_suite_args, read_class_list)
from apr.evaluation import SHIFT_SCHEMA, EvalModel, EvalOptions, evaluate_shift

WNIDS = [f"n{k:08d}" for k in range(1000)]
SUBSET = WNIDS[::5]  # 200 classes, as ImageNet-R / -A
LEVELS = 4
FAST = EvalOptions(backend="torchvision", num_workers=0, batch_size=4, precision="fp32", device="cpu",
                   progress=False)


class MarkerModel(nn.Module):
    """Logits = table[level], level = round(mean red value * (LEVELS - 1)) of a [0, 1] image."""

    def __init__(self, num_classes: int):
        super().__init__()
        table = torch.zeros(LEVELS, num_classes)
        table[0, 0] = 10.0
        table[1, 1], table[1, 5] = 10.0, 5.0
        table[2, 1] = 10.0
        if num_classes > 10:
            table[2, 10] = 5.0
        table[3, 3] = 10.0
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x[:, 0].mean(dim=(1, 2)) * (LEVELS - 1)).round().long().clamp(0, LEVELS - 1)
        return self.table[level]


def marker_model(tmp_path: Path, classes) -> EvalModel:
    path = tmp_path / "marker.pt"
    torch.save({"levels": LEVELS}, path)
    return EvalModel(MarkerModel(len(classes)), list(classes), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), path,
                     image_size=16, val_resize=16)


def flat_image(level: int, size: int = 20) -> Image.Image:
    red = round(level * 255 / (LEVELS - 1))
    return Image.fromarray(np.full((size, size, 3), (red, 128, 128), dtype=np.uint8))


def write_tree(root: Path, content: dict[str, list[int]], empty: list[str] = ()) -> Path:
    """<root>/<folder>/<i>.JPEG, one flat image per marker level listed; ``empty``: folders without images."""
    for folder in empty:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for folder, levels in content.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, level in enumerate(levels):
            flat_image(level).save(root / folder / f"{i}.JPEG", quality=95)
    return root


def r_tree(root: Path) -> Path:
    """200 wnid folders; images in three of them. Masked predictions: L0 -> 0, L1 -> 5, L2 -> 10."""
    content = {WNIDS[0]: [0, 0, 2], WNIDS[5]: [1, 2], WNIDS[10]: [2, 0]}
    return write_tree(root, content, empty=SUBSET)


def run_shift(model, suites: dict[str, Path], out: Path, options=FAST, **kwargs) -> dict:
    return evaluate_shift(model, [make_shift_suite(n, p) for n, p in suites.items()], out, options, **kwargs)


# ----------------------------------------------------------------------------- scoring


def test_imagenet_r_is_scored_on_its_200_classes(tmp_path):
    result = run_shift(marker_model(tmp_path, WNIDS), {"imagenet-r": r_tree(tmp_path / "r")}, tmp_path / "out",
                       run_name="m")
    assert result["schema"] == SHIFT_SCHEMA
    cell = result["suites"]["imagenet-r"]["cells"]["imagenet-r"]
    # n0: L0 ok, L0 ok, L2 -> 10 wrong; n5: L1 -> 5 ok (its best logit, class 1, is outside the subset),
    # L2 -> 10 wrong; n10: L2 -> 10 ok, L0 wrong. Without the mask L1/L2 would predict class 1: 2 of 7 right.
    assert (cell["count"], cell["correct"]) == (7, 4)
    assert cell["error"] == pytest.approx(3 / 7)
    assert cell["scored_classes"] == 200
    assert result["suites"]["imagenet-r"]["source"]["classes"] == 200
    on_disk = json.loads((tmp_path / "out" / "m.shift.json").read_text())
    assert on_disk["suites"]["imagenet-r"]["cells"]["imagenet-r"]["correct"] == 4


def test_masking_also_sets_the_confidence(tmp_path):
    """Softmax over the 200 logits: L1's confidence is exp(5)/(exp(5) + 199), not exp(10)/(...) over 1000."""
    write_tree(tmp_path / "a", {WNIDS[5]: [1]}, empty=SUBSET)
    cell = run_shift(marker_model(tmp_path, WNIDS), {"imagenet-a": tmp_path / "a"},
                     tmp_path / "out")["suites"]["imagenet-a"]["cells"]["imagenet-a"]
    confidence = np.exp(5.0) / (np.exp(5.0) + 199)
    assert cell["correct"] == 1
    bins = cell["calibration"]
    np.testing.assert_allclose(sum(bins["confidence_sum"]), confidence, rtol=1e-5)
    np.testing.assert_allclose(cell["ece"], 1 - confidence, rtol=1e-5)


def test_sketch_and_v2_use_all_logits(tmp_path):
    write_tree(tmp_path / "sketch", {WNIDS[1]: [1, 2], WNIDS[5]: [1]})  # 1 ok, 1 ok, 5: predicts 1
    write_tree(tmp_path / "v2", {"1": [1], "3": [3], "10": [2]})  # 1 ok, 3 ok, 10: predicts 1
    result = run_shift(marker_model(tmp_path, WNIDS), {"imagenet-sketch": tmp_path / "sketch",
                                                       "imagenet-v2": tmp_path / "v2"}, tmp_path / "out")
    sketch = result["suites"]["imagenet-sketch"]["cells"]["imagenet-sketch"]
    v2 = result["suites"]["imagenet-v2"]["cells"]["imagenet-v2"]
    assert (sketch["count"], sketch["correct"]) == (3, 2)
    assert (v2["count"], v2["correct"]) == (3, 2)
    assert "scored_classes" not in sketch


def test_v2_index_folders_follow_the_sorted_wnid_order(tmp_path):
    """A model whose class list is not sorted: folder "3" is the 4th sorted wnid, wherever the model keeps it."""
    classes = list(reversed(WNIDS))  # model index 996 is n00000003
    model = marker_model(tmp_path, classes)
    write_tree(tmp_path / "v2", {"996": [3], "3": [3]})  # L3 predicts model index 3 = n00000996
    cell = run_shift(model, {"imagenet-v2": tmp_path / "v2"}, tmp_path / "out")["suites"]["imagenet-v2"]["cells"]
    assert (cell["imagenet-v2"]["count"], cell["imagenet-v2"]["correct"]) == (2, 1)  # only folder "996" is right


def c_bar_level(i: int, s: int) -> int:
    return 0 if (i + s) % 3 else 2  # in folder n00000000: L0 right, L2 wrong (predicts 1)


def c_bar_tree(root: Path, skip: tuple = ()) -> Path:
    for i, (corruption, params) in enumerate(C_BAR_SEVERITIES.items()):
        for s, param in enumerate(params, start=1):
            if (corruption, s) in skip:
                continue
            folder = str(s) if (corruption, s) == ("sparkles", 4) else f"{param:.2f}"  # both namings accepted
            write_tree(root / corruption / folder, {WNIDS[0]: [c_bar_level(i, s)]})
    return root


def test_c_bar_gives_every_cell_and_means(tmp_path):
    result = run_shift(marker_model(tmp_path, WNIDS), {"imagenet-c-bar": c_bar_tree(tmp_path / "cbar")},
                       tmp_path / "out")
    cells = result["suites"]["imagenet-c-bar"]["cells"]
    assert len(cells) == 50
    for i, corruption in enumerate(C_BAR_SEVERITIES):
        for s in range(1, 6):
            assert cells[f"{corruption}/{s}"]["correct"] == (c_bar_level(i, s) == 0), (corruption, s)


def test_c_bar_missing_cells_are_named(tmp_path):
    root = c_bar_tree(tmp_path / "cbar", skip=(("plasma_noise", 2), ("sparkles", 4)))
    with pytest.raises(EvalError, match=r"plasma_noise/7\.00.*sparkles/5\.00"):
        run_shift(marker_model(tmp_path, WNIDS), {"imagenet-c-bar": root}, tmp_path / "out")
    partial = EvalOptions(**{**FAST.__dict__, "allow_partial": True})
    result = run_shift(marker_model(tmp_path, WNIDS), {"imagenet-c-bar": root}, tmp_path / "out", partial)
    assert len(result["suites"]["imagenet-c-bar"]["cells"]) == 48
    assert set(result["skipped"]) == {"imagenet-c-bar: plasma_noise/7.00", "imagenet-c-bar: sparkles/5.00"}


def cifar101_pair(root: Path, levels: list[int], labels: list[int], version: str = "v6") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = np.stack([np.asarray(flat_image(level, 32)) for level in levels]).astype(np.uint8)
    np.save(root / f"cifar10.1_{version}_data.npy", data)
    np.save(root / f"cifar10.1_{version}_labels.npy", np.asarray(labels, dtype=np.int64))
    return root


@pytest.mark.parametrize("version", ["v6", "v4"])
def test_cifar10_1(tmp_path, version):
    # L0 -> airplane (0), L3 -> cat (3), L1 -> automobile (1)
    root = cifar101_pair(tmp_path / "c101", [0, 3, 1, 0], [0, 3, 5, 9], version)
    model = marker_model(tmp_path, CIFAR10_CLASSES)
    model.image_size = 32
    cell = run_shift(model, {"cifar10.1": root}, tmp_path / "out")["suites"]["cifar10.1"]["cells"]["cifar10.1"]
    assert (cell["count"], cell["correct"]) == (4, 2)


def test_cifar10_1_refuses_a_non_cifar10_model(tmp_path):
    root = cifar101_pair(tmp_path / "c101", [0], [0])
    with pytest.raises(EvalError, match="CIFAR-10 model"):
        run_shift(marker_model(tmp_path, WNIDS), {"cifar10.1": root}, tmp_path / "out")
    (root / "cifar10.1_v6_labels.npy").unlink()
    with pytest.raises(EvalError, match="cifar10.1_v6_data.npy"):
        run_shift(marker_model(tmp_path, CIFAR10_CLASSES), {"cifar10.1": root}, tmp_path / "out")


# ----------------------------------------------------------------------------- layouts and errors


def test_unknown_wnid_and_bad_v2_folder_are_named(tmp_path):
    write_tree(tmp_path / "r", {"n99999999": [0]}, empty=SUBSET)
    with pytest.raises(EvalError, match="n99999999"):
        run_shift(marker_model(tmp_path, WNIDS), {"imagenet-r": tmp_path / "r"}, tmp_path / "out")
    write_tree(tmp_path / "v2", {"1": [1], "cat": [0]})
    with pytest.raises(EvalError, match="cat"):
        run_shift(marker_model(tmp_path, WNIDS), {"imagenet-v2": tmp_path / "v2"}, tmp_path / "out")
    with pytest.raises(EvalError, match="not found"):
        run_shift(marker_model(tmp_path, WNIDS), {"imagenet-sketch": tmp_path / "nowhere"}, tmp_path / "out")


def test_incomplete_subset_warns_and_scores_on_the_folders_found(tmp_path):
    write_tree(tmp_path / "r", {WNIDS[5]: [1]}, empty=SUBSET[:50])
    with pytest.warns(UserWarning, match="50 class folders"):
        result = run_shift(marker_model(tmp_path, WNIDS), {"imagenet-r": tmp_path / "r"}, tmp_path / "out")
    assert result["suites"]["imagenet-r"]["cells"]["imagenet-r"]["scored_classes"] == 50


def test_parse_suite_args():
    assert parse_suite_args(["imagenet-r=/a", "cifar10.1=/b"]) == {"imagenet-r": "/a", "cifar10.1": "/b"}
    with pytest.raises(EvalError, match="imagenet-x"):
        parse_suite_args(["imagenet-x=/a"])
    with pytest.raises(EvalError, match="NAME=FOLDER"):
        parse_suite_args(["imagenet-r"])
    with pytest.raises(EvalError, match="twice"):
        parse_suite_args(["imagenet-r=/a", "imagenet-r=/b"])


def test_read_class_list(tmp_path):
    write_tree(tmp_path / "val", {"n2": [0], "n1": [0]})
    assert read_class_list(val=str(tmp_path / "val")) == ["n1", "n2"]
    (tmp_path / "classes.txt").write_text("b\na\n")
    assert read_class_list(classes_file=str(tmp_path / "classes.txt")) == ["b", "a"]
    with pytest.raises(EvalError, match="--classes"):
        read_class_list()


# ----------------------------------------------------------------------------- resume and clean


def test_resume_skips_finished_cells_and_keeps_other_suites(tmp_path):
    model = marker_model(tmp_path, WNIDS)
    out = tmp_path / "out"
    first = run_shift(model, {"imagenet-r": r_tree(tmp_path / "r")}, out, run_name="m")
    linked = {**first, "corruption": {"mce": 64.0, "clean_error": 0.25}}  # as eval_imagenet_c.py links it
    (out / "m.shift.json").write_text(json.dumps(linked))
    done = []
    write_tree(tmp_path / "v2", {"1": [1]})
    second = run_shift(model, {"imagenet-r": tmp_path / "r", "imagenet-v2": tmp_path / "v2"}, out, run_name="m",
                       on_cell_done=lambda c, s, cell: done.append(c))
    assert done == ["imagenet-v2"]  # R was finished: not evaluated again
    assert second["suites"]["imagenet-r"] == first["suites"]["imagenet-r"]
    third = run_shift(model, {"imagenet-v2": tmp_path / "v2"}, out, run_name="m",
                      on_cell_done=lambda c, s, cell: done.append(c))
    assert done == ["imagenet-v2"] and set(third["suites"]) == {"imagenet-r", "imagenet-v2"}
    assert third["corruption"] == {"mce": 64.0, "clean_error": 0.25}
    flat_image(0).save(tmp_path / "v2" / "1" / "extra.JPEG", quality=95)  # a changed tree is scored again
    run_shift(model, {"imagenet-v2": tmp_path / "v2"}, out, run_name="m", on_cell_done=lambda c, s, cell: done.append(c))
    assert done == ["imagenet-v2", "imagenet-v2"]


def test_clean_set_is_scored_when_given(tmp_path):
    val = write_tree(tmp_path / "val", {WNIDS[0]: [0, 1], WNIDS[3]: [3]})  # 0 ok, predicts 1: wrong, 3 ok
    result = run_shift(marker_model(tmp_path, WNIDS), {"imagenet-r": r_tree(tmp_path / "r")}, tmp_path / "out",
                       clean_suite=make_clean_suite(val=str(val)))
    assert (result["clean"]["count"], result["clean"]["correct"]) == (3, 2)


# ----------------------------------------------------------------------------- torchrun


def _two_rank_worker(rank, port, root, queue):
    import os

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        root = Path(root)
        result = run_shift(marker_model(root / f"rank{rank}", WNIDS), {"imagenet-r": root / "r"}, root / "out",
                           run_name="m")
        queue.put((rank, result["suites"]["imagenet-r"]["cells"]["imagenet-r"]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_give_the_numbers_of_one(tmp_path):
    """gloo on CPU: each rank scores part of ImageNet-R (masked); the summed counts are the whole suite's."""
    import socket

    import torch.multiprocessing as mp

    r_tree(tmp_path / "r")
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_two_rank_worker, args=(port, str(tmp_path), queue), nprocs=2, join=True, start_method="spawn")
    cells = dict(queue.get(timeout=30) for _ in range(2))
    for rank in (0, 1):
        assert (cells[rank]["count"], cells[rank]["correct"]) == (7, 4)
    written = json.loads((tmp_path / "out" / "m.shift.json").read_text())
    assert written["suites"]["imagenet-r"]["cells"]["imagenet-r"]["count"] == 7
