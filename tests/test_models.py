"""Model factory: timm names, the CIFAR WideResNets, clear errors for unknown names."""

import pytest
import torch

from apr.models import ModelError, WideResNet, create_model


@pytest.mark.parametrize("name", ["cnn_tiny", "wrn16_2", "resnet10t"])
def test_models_classify_32px_batches(name):
    model = create_model(name, 7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_wrn40_2_has_the_published_size():
    # WRN-40-2 for CIFAR-10 has about 2.2 M parameters (Zagoruyko & Komodakis 2016, Table 1)
    params = sum(p.numel() for p in create_model("wrn40_2", 10).parameters())
    assert 2.1e6 < params < 2.3e6


def test_resnet50_is_the_standard_architecture():
    params = sum(p.numel() for p in create_model("resnet50", 1000).parameters())
    assert params == 25_557_032  # torchvision / timm resnet50


def test_unknown_names_and_bad_shapes_are_clear_errors():
    with pytest.raises(ModelError, match="unknown model 'resnet5O'"):
        create_model("resnet5O", 10)
    with pytest.raises(ModelError, match="depth must be 6n\\+4"):
        WideResNet(41, 2, 10)
    with pytest.raises(ModelError, match="num_classes must be >= 1"):
        create_model("cnn_tiny", 0)


# --------------------------------------------------------------------------- PreActResNet-18


def _preact18_param_count(num_classes: int) -> int:
    """Re-derived by hand: 3x3 stem; per block BN(in) + conv3x3(in->out) + BN(out) + conv3x3(out->out)
    (+ a 1x1 conv shortcut where the shape changes); final BN(512); linear head."""
    def block(cin, cout, shortcut):
        return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if shortcut else 0)

    total = 3 * 64 * 9
    cin = 64
    for cout in (64, 128, 256, 512):
        total += block(cin, cout, cin != cout) + block(cout, cout, False)
        cin = cout
    return total + 2 * 512 + 512 * num_classes + num_classes


def test_preact_resnet18_has_the_reference_size():
    assert _preact18_param_count(10) == 11_172_170  # = 11,171,146 (no final BN, kuangliu's) + 1,024
    for classes in (10, 100):
        model = create_model("preact_resnet18", classes)
        assert sum(p.numel() for p in model.parameters()) == _preact18_param_count(classes)


def test_preact_resnet18_keeps_the_reference_tensor_names():
    """Names as in the APR reference's autoattacks/preact_resnet.py, so its FGSM checkpoints load."""
    keys = set(create_model("preact_resnet18", 10).state_dict())
    for key in ("conv1.weight", "layer1.0.bn1.weight", "layer1.1.conv2.weight", "layer2.0.shortcut.0.weight",
                "layer4.1.bn2.running_var", "bn.weight", "linear.weight", "linear.bias"):
        assert key in keys, key
    assert "layer1.0.shortcut.0.weight" not in keys  # identity shortcut where the shape is kept
    assert not any(k.startswith("layer5") for k in keys)


def test_preact_resnet18_output_and_gradients():
    torch.manual_seed(0)
    model = create_model("preact_resnet18", 10)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = model(images)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every layer takes part
    with pytest.raises(ModelError, match="has no dropout"):
        create_model("preact_resnet18", 10, drop_rate=0.1)


# --------------------------------------------------------------------------- zero_init_last


def _timm_last_bns(model):
    from timm.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    return [b.bn2 if isinstance(b, BasicBlock) else b.bn3 for b in blocks]


@pytest.mark.parametrize("name", ["resnet10t", "resnet14t"])  # BasicBlock, Bottleneck
def test_zero_init_last_switches_timm_resnets(name):
    for flag, expected in ((False, 1.0), (True, 0.0), (None, 0.0)):  # None: timm's default (zeroed)
        for bn in _timm_last_bns(create_model(name, 5, zero_init_last=flag)):
            torch.testing.assert_close(bn.weight.detach(), torch.full_like(bn.weight, expected))
    # the other BatchNorms keep weight 1 either way
    model = create_model(name, 5, zero_init_last=True)
    last = {id(bn) for bn in _timm_last_bns(model)}
    others = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and id(m) not in last]
    assert others and all(bool((m.weight == 1).all()) for m in others)


@pytest.mark.parametrize("name", ["wrn16_2", "preact_resnet18"])
def test_zero_init_last_on_preactivation_nets_zeroes_the_last_conv(name):
    for flag in (None, False):  # default: no zero init (as the reference); every BN weight is one
        model = create_model(name, 3, zero_init_last=flag)
        assert all(bool((m.weight == 1).all()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert all(m.conv2.weight.abs().sum() > 0 for m in model.modules() if hasattr(m, "conv2"))
    model = create_model(name, 3, zero_init_last=True).eval()
    blocks = [m for m in model.modules() if hasattr(m, "conv2")]
    assert blocks and all(bool((b.conv2.weight == 0).all()) for b in blocks)
    identity = next(b for b in blocks if b.bn1.num_features == b.conv2.out_channels and
                    (getattr(b, "shortcut", None) is None or isinstance(b.shortcut, torch.nn.Identity)))
    x = torch.randn(2, identity.bn1.num_features, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(identity(x), x)  # the residual branch starts at zero


def test_zero_init_last_refused_where_it_does_not_apply():
    with pytest.raises(ModelError, match="has no residual blocks"):
        create_model("cnn_tiny", 3, zero_init_last=True)
    with pytest.raises(ModelError, match="has no zero_init_last option"):
        create_model("vit_tiny_patch16_224", 3, zero_init_last=False)
    assert create_model("cnn_tiny", 3, zero_init_last=False) is not None


def test_model_config_carries_zero_init_last():
    from apr.config import ConfigError, load_config

    assert load_config(None, []).model.zero_init_last is None
    assert load_config(None, ["model.zero_init_last=false"]).model.zero_init_last is False
    with pytest.raises(ConfigError, match="model.zero_init_last must be true or false"):
        load_config(None, ["model.zero_init_last=2"])


# --------------------------------------------------------------------------- third-party weights


def _trained_like(name: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """A model whose weights and BN statistics differ from any fresh init (so a load is visible)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.1)
    return model.eval()


def _assert_same_weights(model, reference):
    own, ref = model.state_dict(), reference.state_dict()
    assert own.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(own[key], ref[key], rtol=0, atol=0, msg=key)  # a copy: bit for bit
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_dataparallel_checkpoint_nested_under_state_dict_loads(tmp_path):
    from apr.models import create_model_from_weights

    source = _trained_like("resnet10t", 7)
    path = tmp_path / "model_best.pth.tar"  # torchvision-example / AugMix style checkpoint
    torch.save({"epoch": 90, "arch": "resnet10t", "best_acc1": 61.2,
                "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)
    loaded = create_model_from_weights("resnet10t", path)
    assert loaded.num_classes == 7  # read from fc.weight
    assert not loaded.model.training
    _assert_same_weights(loaded.model, source)
    assert loaded.mean == (0.485, 0.456, 0.406) and loaded.std == (0.229, 0.224, 0.225)  # timm's config


def test_nested_model_key_and_compile_prefix_load_into_a_given_model(tmp_path):
    from apr.models import load_weights

    source = _trained_like("preact_resnet18", 10)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, "step": 5}, path)
    model = load_weights(create_model("preact_resnet18", 10), path)
    _assert_same_weights(model, source)


def test_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    from apr.models import create_model_from_weights

    source = _trained_like("wrn16_2", 4)
    path = tmp_path / "wrn.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_model_from_weights("wrn16_2", path, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    _assert_same_weights(loaded.model, source)
    assert loaded.num_classes == 4 and loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)


def test_old_files_without_num_batches_tracked_load(tmp_path):
    from apr.models import load_weights

    source = _trained_like("cnn_tiny", 3)
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    _assert_same_weights(load_weights(create_model("cnn_tiny", 3), path), source)


def test_wrong_architecture_is_refused_naming_the_tensor(tmp_path):
    from apr.models import WeightsError, create_model_from_weights, load_weights

    path = tmp_path / "preact.pth"
    torch.save(_trained_like("preact_resnet18", 10).state_dict(), path)
    target = create_model("preact_resnet18", 100)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match=r"tensor linear\.weight has shape \(10, 512\) in the file but "
                                           r"\(100, 512\) in the model"):
        load_weights(target, path)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing was loaded
    with pytest.raises(WeightsError, match=r"tensor conv1\.weight has shape \(64, 3, 3, 3\) in the file but "
                                           r"\(64, 3, 7, 7\).*missing from the file.*not in the model"):
        create_model_from_weights("resnet18", path)
    with pytest.raises(WeightsError, match=r"tensor features\.0\.0\.weight of the model is missing.*"
                                           r"no tensor fits: are these weights for another architecture"):
        load_weights(create_model("cnn_tiny", 10), path)


def test_pickled_python_objects_are_refused_and_never_run(tmp_path):
    import os

    from apr.models import WeightsError, read_state_dict

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": create_model("cnn_tiny", 3).state_dict(), "args": Payload()}, path)
    with pytest.raises(WeightsError, match=r"holds a Python object \(\w+\.mkdir\) that safe loading refuses"):
        read_state_dict(path)
    assert not marker.exists()


def test_unreadable_and_empty_files_are_clear_errors(tmp_path):
    from apr.models import WeightsError, read_state_dict

    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(WeightsError, match="cannot read .*junk.pth as a PyTorch weights file"):
        read_state_dict(tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(WeightsError, match="cannot read .*junk.safetensors as a safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match=r"holds no state dict .*found keys \['epoch', 'lr'\]"):
        read_state_dict(tmp_path / "meta.pth")


def test_normalisation_given_from_timm_or_imagenet_with_a_log_line(caplog):
    from apr.models import WeightsError, normalisation_for

    assert normalisation_for("inception_v3") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm config, no download
    assert normalisation_for("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalisation_for("resnet50", [0.1, 0.2, 0.3], [1, 2, 3]) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    with caplog.at_level("WARNING", logger="apr.models"):
        assert normalisation_for("wrn40_2") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert "no normalisation known for wrn40_2: using ImageNet's" in caplog.text
    with pytest.raises(WeightsError, match="give both mean and std"):
        normalisation_for("resnet50", mean=[0.5, 0.5, 0.5])
