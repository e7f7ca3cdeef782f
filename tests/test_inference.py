"""The one inference path: normalisation, precision vocabulary, eval mode, logits per batch."""

import pytest
import torch
from torch import nn

from apr.inference import ImageClassifier, Normaliser, autocast, check_precision, eval_mode, predict_batches


def test_normaliser_matches_the_formula_and_identity_without_stats():
    x = torch.rand(2, 3, 4, 4)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(Normaliser(mean, std)(x), expected)
    assert Normaliser(None, None)(x) is x
    assert Normaliser(mean, std, channels_last=True)(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mean,std", [([0.5] * 3, None), ([0.5] * 3, [0.2, 0.0, 0.2]), ([0.5] * 3, [0.2] * 2)])
def test_normaliser_refuses_bad_stats(mean, std):
    with pytest.raises(ValueError):
        Normaliser(mean, std)


def test_precision_vocabulary_is_bf16_fp16_or_fp32():
    assert [check_precision(p) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    for bad in ("no", "half", "float32"):
        with pytest.raises(ValueError, match="bf16 \\| fp16 \\| fp32"):
            check_precision(bad)
    with autocast("cpu", "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_classifier_gives_float_logits_and_gradients_reach_the_image():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    clf = ImageClassifier(model, [0.5] * 3, [0.25] * 3, precision="bf16")
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    logits = clf(x)
    assert logits.dtype == torch.float32 and logits.shape == (2, 5)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert set(clf.model.state_dict()) == {"1.weight", "1.bias"}


def test_predict_batches_runs_in_eval_mode_and_restores_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(12, 3))
    clf = ImageClassifier(model, None, None).train()
    batches = [(torch.rand(4, 3, 2, 2), torch.arange(4) % 3) for _ in range(2)]
    out = list(predict_batches(clf, batches))
    again = list(predict_batches(clf, batches))
    assert clf.training
    for (a, la), (b, lb) in zip(out, again):  # dropout off: the same path twice is bit-identical
        assert torch.equal(a, b) and torch.equal(la, lb)
    with eval_mode(clf):
        assert not clf.training
    assert clf.training
