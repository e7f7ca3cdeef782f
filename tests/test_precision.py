"""One precision vocabulary (auto | bf16 | fp16 | fp32) for training and evaluation; fp16 trains with loss scaling."""

from __future__ import annotations

import pytest
import torch

from apr.checkpoint import find_latest_checkpoint, load_checkpoint
from apr.config import load_config
from apr.inference import ImageClassifier
from apr.models import create_model
from apr.train import train, train_step


def test_fp16_inference_follows_fp32_within_half_precision():
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 4)
    images = torch.rand(6, 3, 32, 32)
    fp32 = ImageClassifier(model, (0.5,) * 3, (0.25,) * 3, precision="fp32").eval()(images)
    fp16 = ImageClassifier(model, (0.5,) * 3, (0.25,) * 3, precision="fp16").eval()(images)
    assert fp16.dtype == torch.float32 and not torch.equal(fp16, fp32)  # autocast ran, logits back in fp32
    torch.testing.assert_close(fp16, fp32, atol=2e-2, rtol=2e-2)


def test_the_training_default_is_auto():
    assert load_config().train.precision == "auto"
    assert load_config(overrides=["train.precision=fp16"]).train.precision == "fp16"


def test_train_step_with_a_grad_scaler_skips_an_overflowing_step_and_shrinks_the_scale():
    """The scaler's contract: inf/NaN gradients leave the weights untouched and halve the scale."""
    from apr.augment import APRPolicy

    torch.manual_seed(0)
    classifier = ImageClassifier(create_model("cnn_tiny", 4), None, None, precision="fp16")
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # scaled fp16 gradients overflow
    before = [p.detach().clone() for p in classifier.parameters()]
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = train_step(classifier, optimizer, images, labels, policy=APRPolicy("none"),
                      generator=torch.Generator().manual_seed(0), scaler=scaler)
    assert torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, classifier.parameters()))
    assert scaler.get_scale() < 2.0 ** 60
    scaler = torch.amp.GradScaler("cpu")  # a normal scale: the step is taken
    train_step(classifier, optimizer, images, labels, policy=APRPolicy("none"),
               generator=torch.Generator().manual_seed(0), scaler=scaler)
    assert not all(torch.equal(a, b) for a, b in zip(before, classifier.parameters()))


def test_fp16_training_runs_and_saves_its_grad_scaler(imagenet_tree, tmp_path):
    cfg = load_config(overrides=[
        f"data.root={imagenet_tree}", "data.image_size=32", "data.val_resize=32", "data.num_workers=1",
        "data.backend=torchvision", "model.name=cnn_tiny", "optim.lr=0.05", "optim.lr_base_batch=0",
        "train.epochs=1", "train.batch_size=16", "train.precision=fp16", f"train.output_dir={tmp_path}",
        "train.run_name=fp16"])
    result = train(cfg, progress=False)
    assert result.status == "finished"
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "fp16"))
    assert state["grad_scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.cuda
def test_on_cuda_auto_is_bf16_and_fp16_training_scales_its_loss(imagenet_tree, tmp_path):
    """The GPU half of the one default (auto -> bf16) and fp16 training with the CUDA GradScaler."""
    from apr.evaluation import EvalOptions

    assert EvalOptions(device="cuda").resolved().precision == "bf16"
    cfg = load_config(overrides=[
        f"data.root={imagenet_tree}", "data.image_size=32", "data.val_resize=32", "data.backend=torchvision",
        "model.name=cnn_tiny", "optim.lr_base_batch=0", "train.epochs=1", "train.batch_size=16",
        "train.precision=fp16", f"train.output_dir={tmp_path}", "train.run_name=fp16cuda"])
    assert train(cfg, progress=False).status == "finished"
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "fp16cuda"))
    assert state["grad_scaler"]["scale"] > 0
