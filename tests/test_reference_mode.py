"""Reference-reproduction mode (iCGY96/APR): each switch against a re-derivation of the reference's own
formula on a few real images, the wiring from the config to the loader and the loop, and every recipe.

The reference's CIFAR train transform (datasets/transforms.py) is
``RandomApply([APRecombination()], p=1) -> RandomCrop(32, padding=4, fill=128) -> RandomHorizontalFlip
-> ToTensor``, then ``normalize`` with mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.augment import APRPolicy, apply_apr_s, loader_apr_s, sample_apr_s_params, split_apr_s_for_loader, \
    training_policy
from apr.config import ConfigError, load_config
from apr.data import TensorBatchLoader, build_train_loader
from apr.data.base import epoch_permutation, mix_seed
from apr.data.cifar import load_cifar
from apr.inference import Normaliser

from conftest import sample_photos

ROOT = Path(__file__).resolve().parents[1]
REF_MEAN, REF_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
PAD = 4


@pytest.fixture(scope="module")
def images(digits_images) -> np.ndarray:
    """6 digits and the two sample photos (which overflow under APR-S), uint8 8 x 32 x 32 x 3."""
    return np.concatenate([digits_images[0][:6], sample_photos(32, 32)])


def _torchvision_padded(img: np.ndarray, fill: int) -> np.ndarray:
    """The reference's padding: torchvision's F.pad on the PIL image, as RandomCrop(padding=4, fill=fill) does."""
    from torchvision.transforms import functional as TF

    return np.asarray(TF.pad(Image.fromarray(img), PAD, fill=fill))


def _which_crop(out: np.ndarray, padded: np.ndarray) -> tuple[int, int, bool] | None:
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            crop = padded[dy:dy + 32, dx:dx + 32]
            for flip in (False, True):
                if np.array_equal(out, crop[:, ::-1] if flip else crop):  # uint8 pixels: exact
                    return dy, dx, flip
    return None


def test_pad_fill_128_is_torchvisions_randomcrop_fill(images):
    labels = np.arange(len(images))
    loader = TensorBatchLoader(images, labels, 8, train=True, crop_padding=PAD, seed=3, pad_fill=128)
    found, grey = [], 0
    for epoch in range(4):
        loader.set_epoch(epoch)
        for x, y in loader:
            for img, label in zip(x, y):
                out = np.rint(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                hit = _which_crop(out, _torchvision_padded(images[int(label)], 128))
                assert hit is not None, "not a crop (or flip) of the image padded with grey 128"
                found.append(hit)
                grey += int((out == 128).all(axis=2).sum())
    assert len({h[:2] for h in found}) > 10 and grey > 0  # many offsets, and the grey border shows
    zero = TensorBatchLoader(images, labels, 8, train=True, crop_padding=PAD, seed=3)  # default: zero padding
    for x, y in zero:
        for img, label in zip(x, y):
            out = np.rint(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            assert _which_crop(out, _torchvision_padded(images[int(label)], 0)) is not None
    with pytest.raises(ValueError, match="pad_fill is a pixel value 0..255"):
        TensorBatchLoader(images, labels, 8, train=True, pad_fill=256)


def test_float_pre_crop_path_pads_with_the_same_grey(images):
    """An identity pre-crop hook moves the crop to float images: the same batches as the uint8 path."""
    labels = np.arange(len(images))
    plain = list(TensorBatchLoader(images, labels, 4, train=True, seed=5, pad_fill=128))
    hooked = list(TensorBatchLoader(images, labels, 4, train=True, seed=5, pad_fill=128, pre_crop=lambda x, g: x))
    for (xa, ya), (xb, yb) in zip(plain, hooked):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xb, xa, atol=1e-7, rtol=0)  # two paths (uint8 crop / 255 vs float crop)


def test_apr_s_before_crop_is_the_references_pipeline(images):
    """Batch b of the loader = flip(crop(pad(APR-S(uncropped image), 128/255))), every draw from the batch's
    generator in that order: APR-S's choices, then the crop offsets, then the flips."""
    policy = APRPolicy("apr_sp", p_prob=1.0, s_overflow="wrap")
    pre_crop, loop_policy = split_apr_s_for_loader(policy)
    assert loop_policy.name == "apr_p" and loop_policy.p_prob == 1.0 and loop_policy.s_overflow == "wrap"
    labels = np.arange(len(images))
    seed, batch = 11, 4
    loader = TensorBatchLoader(images, labels, batch, train=True, seed=seed, pad_fill=128, pre_crop=pre_crop)
    order = epoch_permutation(len(images), seed, 0)
    changed = 0
    for b, (x, y) in enumerate(loader):
        idx = order[b * batch:(b + 1) * batch]
        assert y.tolist() == idx.tolist()
        g = torch.Generator().manual_seed(mix_seed(seed, 0, b, 0))
        # contiguous, as the loader's batch: wrap truncates to the uint8 grid, so a recombined value that
        # rounds to k - 1e-7 on another memory layout's FFT kernel truncates to k - 1 (as the reference's cast)
        src = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).contiguous().float() / 255
        s = apply_apr_s(src, sample_apr_s_params(batch, g, 3.0), overflow="wrap")  # APRecombination
        offs = torch.randint(0, 2 * PAD + 1, (batch, 2), generator=g)
        flips = torch.rand(batch, generator=g) < 0.5
        for k in range(batch):
            padded = np.pad(s[k].numpy(), ((0, 0), (PAD, PAD), (PAD, PAD)), constant_values=128 / 255)
            dy, dx = offs[k].tolist()
            want = padded[:, dy:dy + 32, dx:dx + 32]
            want = want[:, :, ::-1] if flips[k] else want
            torch.testing.assert_close(x[k], torch.from_numpy(want.copy()), atol=1e-6, rtol=0)
        changed += int((s - src).abs().amax(dim=(1, 2, 3)).gt(0.05).sum())
    assert changed >= 4  # APR-S really ran on the uncropped images
    # the loop then adds APR-P only: (s, apr_p(s)), the reference's mix_data on the APR-S batch
    first, second = loop_policy(x, torch.Generator().manual_seed(0))
    assert first is x and second.shape == x.shape and (second - x).abs().max() > 0.05


def test_apr_s_before_crop_resumes_exactly(images):
    """The pre-crop draws come from the batch's own generator: a resumed loader replays the same batches."""
    pre_crop, _ = split_apr_s_for_loader(APRPolicy("apr_sp"))
    make = lambda: TensorBatchLoader(images, np.arange(8), 2, train=True, seed=1, pad_fill=128,  # noqa: E731
                                     pre_crop=pre_crop)
    reference = list(make())
    loader = make()
    it = iter(loader)
    next(it)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    for (xa, ya), (xb, yb) in zip(list(resumed), reference[1:]):  # the same path twice: bit-exact
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_reference_std_is_the_references_normalize(images):
    from torchvision import transforms

    ref = transforms.Compose([transforms.ToTensor(), transforms.Normalize(list(REF_MEAN), list(REF_STD))])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ours = Normaliser(REF_MEAN, REF_STD)(x)
    for k in range(len(images)):
        torch.testing.assert_close(ours[k], ref(Image.fromarray(images[k])), atol=1e-5, rtol=1e-5)
    cfg = load_config(ROOT / "configs/cifar/cifar10_wrn40_2_apr_sp_reference.yaml")
    assert tuple(cfg.data.mean) == REF_MEAN and tuple(cfg.data.std) == REF_STD


def test_config_wires_loader_and_loop(cifar10_folder, tmp_path):
    from apr.train import train

    cfg = load_config(ROOT / "configs/cifar/cifar10_wrn40_2_apr_sp_reference.yaml", overrides=[
        f"data.root={cifar10_folder}", "model.name=cnn_tiny", "train.epochs=1", "train.batch_size=8",
        "train.max_steps_per_epoch=2", f"train.output_dir={tmp_path}", "train.run_name=ref", "train.val_every=0"])
    assert training_policy(cfg).name == "apr_p" and loader_apr_s(cfg) is not None
    loader = build_train_loader(cfg)
    assert loader.pad_fill == 128 and loader.pre_crop is not None
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    default = load_config(overrides=["data.dataset=cifar10", f"data.root={cifar10_folder}", "aug.name=apr_sp",
                                     "train.batch_size=8"])
    assert training_policy(default).name == "apr_sp" and loader_apr_s(default) is None
    assert build_train_loader(default).pre_crop is None and build_train_loader(default).pad_fill == 0
    result = train(cfg, progress=False)  # the training setup takes both halves from the config
    assert result.status == "finished" and result.global_step == 2


@pytest.mark.parametrize("overrides, message", [
    (["data.apr_s_before_crop=true", "aug.name=apr_sp"], "applies to the CIFAR loader only"),
    (["data.dataset=cifar10", "data.apr_s_before_crop=true", "aug.name=apr_s"], "needs aug.name=apr_sp"),
    (["data.dataset=cifar10", "data.apr_s_before_crop=true", "aug.name=apr_sp", "aug.sp_clean_first=true"],
     "sp_clean_first=false"),
    (["data.pad_fill=300"], "data.pad_fill is a pixel value 0..255"),
    (["data.drop_last=false"], "data.drop_last=false applies to the CIFAR loader only"),
])
def test_reference_switches_refuse_what_they_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_reference_recipes_hold_the_references_values():
    """The values of iCGY96/APR main.py / imagenet.py / datasets/transforms.py, as the recipe comments say."""
    cifar = sorted((ROOT / "configs/cifar").glob("*_reference.yaml"))
    assert len(cifar) == 4
    for path in cifar:
        c = load_config(path)
        assert (c.optim.lr, c.optim.momentum, c.optim.nesterov, c.optim.weight_decay) == (0.1, 0.9, True, 5e-4)
        assert (c.optim.schedule, c.optim.milestones, c.optim.gamma) == ("multistep", [60, 120, 160, 190], 0.2)
        assert (c.train.epochs, c.train.batch_size, c.optim.lr_base_batch, c.train.precision) == (200, 128, 128, "fp32")
        assert (c.aug.p_prob, c.aug.fourier_dims, c.aug.p_space, c.aug.p_clamp) == (0.6, "chw", "unit", False)
        assert (tuple(c.data.std), c.data.pad_fill, c.data.crop_padding) == (REF_STD, 128, 4)
        assert c.data.drop_last is False  # DataLoader(shuffle=True) keeps the last partial batch
        assert c.model.name == "wrn40_2" and c.model.zero_init_last is False
        assert c.aug.name in ("apr_p", "apr_sp") and c.data.apr_s_before_crop == (c.aug.name == "apr_sp")
        if c.aug.name == "apr_sp":
            assert c.aug.s_overflow == "wrap" and c.aug.s_severity == 3.0
    r = load_config(ROOT / "configs/imagenet/resnet50_apr_sp_reference.yaml")
    assert (r.aug.name, r.aug.p_prob, r.aug.p_space, r.aug.s_overflow, r.aug.p_clamp) == \
        ("apr_sp", 0.5, "normalized", "wrap", False)
    assert r.model.zero_init_last is False and r.model.name == "resnet50"
    assert (r.optim.lr, r.optim.lr_base_batch, r.optim.nesterov, r.optim.weight_decay) == (0.1, 256, False, 1e-4)
    assert (r.optim.schedule, r.optim.step_size, r.optim.gamma, r.train.epochs) == ("step", 30, 0.1, 100)
    assert r.train.batch_size * 8 == 256 and r.train.precision == "fp32"
    # the other CIFAR recipes no longer call themselves the reference's recipe while using another std
    for path in sorted((ROOT / "configs/cifar").glob("*wrn*.yaml")):  # the FGSM recipes use autoattacks/ own std
        if not path.name.endswith("_reference.yaml"):
            text = path.read_text()
            assert "the original APR repo's recipe" not in text and "0.2023/0.1994/0.2010" in text


# ---------------------------------------------------------------------------------------------------------------
# Step-level equivalence with the reference (iCGY96/APR): its data order (datasets/cifar10.py's DataLoader), its
# dataset pipeline (datasets/transforms.py + datasets/APR.py) and one iteration of core/train.py's train(),
# transcribed below with the random draws forced to apr's, against apr's loader and apr.train.train.


@pytest.mark.parametrize("n, batch", [(21, 4), (20, 4), (900, 128)])
def test_one_epoch_of_data_order_is_the_references_dataloader(n, batch):
    """``DataLoader(trainset, batch_size, shuffle=True)`` (drop_last False), whose shuffle is a RandomSampler, with
    the sampler's generator seeded as apr's epoch permutation: the same index batches, the last partial one
    included (data.drop_last=false)."""
    from torch.utils.data import DataLoader, RandomSampler

    images, seed = np.zeros((n, 32, 32, 3), dtype=np.uint8), 7
    for epoch in (0, 1):
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        reference = [b.tolist() for b in DataLoader(range(n), batch_size=batch, sampler=RandomSampler(range(n), generator=g))]
        kept = TensorBatchLoader(images, np.arange(n), batch, train=True, seed=seed, drop_last=False)
        dropped = TensorBatchLoader(images, np.arange(n), batch, train=True, seed=seed)  # apr's default
        for loader in (kept, dropped):
            loader.set_epoch(epoch)
        assert [y.tolist() for _, y in kept] == reference and len(kept) == len(reference) == -(-n // batch)
        assert [y.tolist() for _, y in dropped] == reference[: n // batch] and len(dropped) == n // batch
        assert kept.num_samples == n and dropped.num_samples == n // batch * batch


def test_drop_last_false_resumes_into_the_partial_batch():
    images = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    make = lambda: TensorBatchLoader(images, np.arange(10), 4, train=True, seed=2, drop_last=False)  # noqa: E731
    straight = [y.tolist() for _, y in make()]
    loader = make()
    it = iter(loader)
    next(it), next(it)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert [y.tolist() for _, y in resumed] == straight[2:] and len(straight[2]) == 2


# the reference's ops with AugMix's level/sign draws made explicit (one transcription for the tests)
from test_augment import pil_op  # noqa: E402


def reference_apr_recombination(img: Image.Image, params, k: int) -> Image.Image:
    """datasets/APR.py ``APRecombination.__call__`` with image k's draws of ``params`` in place of np.random/random."""
    from apr.augment import OP_NAMES

    x = pil_op(OP_NAMES[params.op1[k]], img, params.level1[k].item(), params.sign1[k].item())
    if not params.recombined[k]:  # `if p > 0.5: return x`
        return x
    x_aug = pil_op(OP_NAMES[params.op2[k]], x.copy(), params.level2[k].item(), params.sign2[k].item())
    x, x_aug = np.array(x).astype(np.uint8), np.array(x_aug).astype(np.uint8)
    fft_1, fft_2 = np.fft.fftshift(np.fft.fftn(x)), np.fft.fftshift(np.fft.fftn(x_aug))
    abs_1, angle_1, abs_2, angle_2 = np.abs(fft_1), np.angle(fft_1), np.abs(fft_2), np.angle(fft_2)
    fft_1, fft_2 = abs_1 * np.exp(1j * angle_2), abs_2 * np.exp(1j * angle_1)
    mixed = np.fft.ifftn(np.fft.ifftshift(fft_1 if params.amplitude_from_first[k] else fft_2))
    return Image.fromarray(np.real(mixed).astype(np.uint8))  # the reference casts the complex array: real part


def reference_train_transform(img: Image.Image, aprs: bool, crop: tuple[int, int], flip: bool, params=None,
                              k: int = 0) -> torch.Tensor:
    """datasets/transforms.py ``train_transforms``: [APRecombination] -> RandomCrop(32, padding=4, fill=128) ->
    RandomHorizontalFlip -> ToTensor, with the crop offset and the flip coin given."""
    from torchvision.transforms import functional as TF

    if aprs:
        img = reference_apr_recombination(img, params, k)
    img = TF.crop(TF.pad(img, PAD, fill=128), crop[0], crop[1], 32, 32)
    return TF.to_tensor(TF.hflip(img) if flip else img)


def reference_mix_data(x: torch.Tensor, p: float, index: torch.Tensor, prob: float = 0.6) -> torch.Tensor:
    """core/train.py ``mix_data`` with its coin ``p`` (random.uniform) and ``index`` (torch.randperm) given."""
    if p > prob:
        return x
    fft_1 = torch.fft.fftn(x, dim=(1, 2, 3))
    abs_1, angle_1 = torch.abs(fft_1), torch.angle(fft_1)
    fft_2 = torch.fft.fftn(x[index, :], dim=(1, 2, 3))
    abs_2, angle_2 = torch.abs(fft_2), torch.angle(fft_2)
    fft_1 = abs_2 * torch.exp((1j) * angle_1)
    return torch.fft.ifftn(fft_1, dim=(1, 2, 3)).real.float()  # the reference's .float() of a complex tensor


def reference_train_iteration(net, optimizer, data, labels, p, index) -> torch.Tensor:
    """One iteration of core/train.py ``train()`` (net already in train mode, as its forward sets)."""
    from torchvision import transforms

    normalize = transforms.Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])  # datasets/transforms.py
    inputs, targets = data, labels
    inputs_mix = reference_mix_data(inputs, p, index)
    batch_size = inputs.size(0)
    inputs, inputs_mix = normalize(inputs), normalize(inputs_mix)
    inputs = torch.cat([inputs, inputs_mix], 0)
    optimizer.zero_grad()
    y = net(inputs)
    loss = torch.nn.functional.cross_entropy(y[:batch_size], targets) + \
        torch.nn.functional.cross_entropy(y[batch_size:], targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("recipe", ["cifar10_wrn40_2_apr_p_reference.yaml", "cifar10_wrn40_2_apr_sp_reference.yaml"])
def test_one_training_step_is_the_references(recipe, cifar10_folder, tmp_path):
    """apr.train.train on a reference recipe, one step, vs the transcription above fed the same draws: the
    same batch (up to PIL's uint8 rounding of APR-S), the same loss, the same weights after the step."""
    from accelerate.utils import set_seed

    from apr.augment import sample_apr_p_params
    from apr.models import create_model
    from apr.train import train

    seed, batch = 3, 16
    cfg = load_config(ROOT / "configs/cifar" / recipe, overrides=[
        f"data.root={cifar10_folder}", "train.epochs=1", f"train.batch_size={batch}", "train.max_steps_per_epoch=1",
        f"train.seed={seed}", f"train.output_dir={tmp_path}", "train.run_name=step", "train.val_every=0",
        "model.name=wrn10_2",  # a shallower WRN keeps the test fast; the step does not depend on the depth
        "optim.lr_base_batch=0"])  # lr 0.1 at this small batch too, as main.py (whose lr ignores --batch-size)
    aprs = cfg.aug.name == "apr_sp"
    x, y = next(iter(build_train_loader(cfg, seed=seed)))  # apr's first batch (the loader replays it in train)
    # the dataset side: the same images through the reference's transforms, with the loader's draws
    images, _, _ = load_cifar(cifar10_folder, "cifar10")
    idx = epoch_permutation(len(images), seed, 0)[:batch]
    g = torch.Generator().manual_seed(mix_seed(seed, 0, 0, 0))
    s_params = sample_apr_s_params(batch, g, cfg.aug.s_severity) if aprs else None
    crops, flips = torch.randint(0, 2 * PAD + 1, (batch, 2), generator=g), torch.rand(batch, generator=g) < 0.5
    ref_x = torch.stack([reference_train_transform(Image.fromarray(images[int(i)]), aprs, tuple(crops[k].tolist()),
                                                   bool(flips[k]), s_params, k) for k, i in enumerate(idx)])
    diff = (ref_x - x).abs()
    if not aprs:
        torch.testing.assert_close(x, ref_x, atol=1e-6, rtol=0)  # uint8 pixels: exact
    else:  # APR-S: PIL's uint8 ops vs apr's float ops (tests/test_augment.py bounds each op)
        assert diff.median() < 1.5 / 255 and (diff > 8 / 255).float().mean() < 0.02
    # the step: apr's training entry point ...
    result = train(cfg, progress=False)
    assert result.global_step == 1
    ckpt = torch.load(max(result.run_dir.glob("checkpoint-e*.pt")), map_location="cpu", weights_only=False)
    # ... and the reference's iteration from the same initial weights (train seeds, then builds the model),
    # the same batch and mix_data's coin and permutation taken from apr's APR-P draws
    set_seed(seed)
    net = create_model(cfg.model.name, 10, zero_init_last=cfg.model.zero_init_last).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)  # main.py
    coin = torch.rand(1, generator=torch.Generator().manual_seed(seed * 1000), dtype=torch.float64).item()
    perm = sample_apr_p_params(batch, cfg.aug.p_prob, torch.Generator().manual_seed(seed * 1000)).perm
    assert coin <= cfg.aug.p_prob  # (apr's APR-P generator of rank 0) this seed's batch is recombined
    loss = reference_train_iteration(net, optimizer, x, y, coin, perm)
    assert ckpt["history"][0]["train_loss"] == pytest.approx(loss.item(), rel=1e-4)
    # BatchNorm's first train-mode step from a fresh net amplifies float noise (1e-7 on the inputs moves single
    # weights' updates by up to ~1e-3 of the largest), so each tensor's update is compared as a whole: within
    # 1 % (relative norm); a halved loss, no nesterov or another lr is off by 25 % or more
    errors = {}
    for name, value in net.state_dict().items():
        ours, theirs = ckpt["model"][name] - before[name], value - before[name]
        if name.endswith("num_batches_tracked"):
            assert torch.equal(ours, theirs) and int(theirs) == 1
            continue
        assert theirs.abs().max() > 0, name
        errors[name] = ((ours - theirs).norm() / theirs.norm()).item()
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.01, f"{worst}: update differs by {errors[worst]:.2%}"
