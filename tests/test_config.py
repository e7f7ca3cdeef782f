"""Config: YAML recipes -> typed dataclasses, overrides, and errors that name the key."""

import re
from pathlib import Path

import pytest
import yaml

from apr.config import Config, ConfigError, apply_overrides, config_to_dict, load_config, save_config, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_paper_imagenet_recipe():
    cfg = load_config()
    assert cfg.model.name == "resnet50" and cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.schedule == "step" and cfg.optim.step_size == 30 and cfg.train.epochs == 100


@pytest.mark.parametrize("recipe", sorted(shipped_recipes().values()), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config) and cfg.validate() is cfg
    if "apr_sp" in recipe.name:
        assert cfg.aug.name == "apr_sp"
    if "deepaugment" in recipe.name:
        assert len(cfg.data.extra_roots) == 2


def test_overrides_parse_yaml_scalars_and_lists(tmp_path):
    cfg = load_config(ROOT / "configs/imagenet/resnet50_apr_sp.yaml",
                      ["train.epochs=5", "optim.lr=0.2", "model.compile=true", "optim.schedule=multistep",
                       "optim.milestones=[2, 4]", "data.root=/tmp/x y"])
    assert cfg.train.epochs == 5 and cfg.optim.lr == 0.2 and cfg.model.compile is True
    assert cfg.optim.milestones == [2, 4] and cfg.data.root == "/tmp/x y"
    assert isinstance(cfg.optim.lr, float)


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config(overrides=["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    (["train.epochz=5"], "unknown config key(s) train.epochz"),
    (["trian.epochs=5"], "unknown config key(s) trian"),
    (["train.epochs=five"], "train.epochs must be an integer"),
    (["train.epochs=2.5"], "train.epochs must be an integer"),
    (["model.compile=yes please"], "model.compile must be true or false"),
    (["aug.name=mixup"], "aug.name must be one of none, apr_p, apr_s, apr_sp"),
    (["aug.p_prob=1.5"], "aug.p_prob must lie in [0, 1]"),
    (["optim.schedule=multistep"], "needs optim.milestones"),
    (["data.crop_scale=[0.5]"], "data.crop_scale"),
    (["train.epochs"], "must look like section.key=value"),
    (["optim.milestones=3"], "optim.milestones must be a list"),
    (["optim.lr=-0.1"], "optim.lr must be >= 0"),
    (["optim.weight_decay=-0.0001"], "optim.weight_decay must be >= 0"),
    (["optim.step_size=0"], "optim.step_size must be >= 1"),
    (["optim.gamma=0"], "optim.gamma must be > 0"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs must be >= 0"),
    (["train.epochs=5", "optim.warmup_epochs=6"], "optim.warmup_epochs=6.0 exceeds train.epochs=5"),
    (["train.val_every=-1"], "train.val_every must be >= 0"),
    (["train.log_every=0"], "train.log_every must be >= 1"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1"),
    (["checkpoint.every_steps=-5"], "checkpoint.every_steps must be >= 0"),
    (["model.drop_rate=1.0"], "model.drop_rate must lie in [0, 1)"),
    (["data.std=[0.2, 0.0, 0.2]"], "data.std must be positive"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    (["adversarial.method=pgd"], "adversarial.method must be one of none, fgsm"),
    (["adversarial.eps=0"], "adversarial.eps must lie in (0, 1]"),
    (["adversarial.eps=-8/255"], "adversarial.eps must lie in (0, 1]"),
    (["adversarial.eps=8"], "adversarial.eps must lie in (0, 1] in pixel units"),
    (["adversarial.eps=eight"], "adversarial.eps must be a number or a fraction like 8/255"),
    (["adversarial.eps=8/0"], "adversarial.eps must be a number or a fraction like 8/255"),
    (["adversarial.eps=.nan"], "adversarial.eps must be a finite number"),
    (["adversarial.alpha=0.0"], "adversarial.alpha must lie in (0, 1]"),
    (["adversarial.alpha=inf"], "adversarial.alpha must be a number or a fraction"),
    (["adversarial.check_steps=0"], "adversarial.check_steps must be >= 1"),
    (["adversarial.overfit_drop=0"], "adversarial.overfit_drop must lie in (0, 1]"),
    (["aug.s_prob=1.5"], "aug.s_prob must lie in [0, 1]"),
    (["aug.loss=avg"], "aug.loss must be one of sum, mean"),
    (["optim.schedule=cyclic", "optim.warmup_epochs=1"], "set optim.warmup_epochs=0"),
    (["optim.cyclic_momentum=[0.8, 0.9]"], "needs optim.schedule=cyclic"),
    (["optim.schedule=cyclic", "optim.cyclic_momentum=[0.9, 0.8]"], "optim.cyclic_momentum must be []"),
    (["optim.schedule=cyclic", "optim.cyclic_momentum=[0.9]"], "optim.cyclic_momentum must be []"),
])
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    assert message in str(err.value)


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["aug.name=apr_p", "data.extra_roots=[/a, /b]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["aug"]["name"] == "apr_p"


def test_apply_overrides_does_not_mutate_its_input():
    data = {"train": {"epochs": 3}}
    apply_overrides(data, ["train.epochs=4"])
    assert data == {"train": {"epochs": 3}}


def test_override_text_stays_text_for_string_keys():
    cfg = load_config(overrides=["data.root=2024", "train.precision=fp32", "train.run_name=no"])
    assert cfg.data.root == "2024" and cfg.train.precision == "fp32" and cfg.train.run_name == "no"


def test_yaml_boolean_in_a_string_key_gets_a_hint(tmp_path):
    (tmp_path / "r.yaml").write_text("train:\n  precision: no\n")
    with pytest.raises(ConfigError, match="train.precision must be a string, got False \\(quote it"):
        load_config(tmp_path / "r.yaml")


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; a float key must still take it, in a recipe or --set."""
    (tmp_path / "r.yaml").write_text("optim:\n  weight_decay: 1e-4\n")
    assert load_config(tmp_path / "r.yaml").optim.weight_decay == 1e-4
    cfg = load_config(overrides=["optim.lr=2E-3"])
    assert cfg.optim.lr == 0.002
    with pytest.raises(ConfigError, match="optim.weight_decay must be >= 0"):
        load_config(overrides=["optim.weight_decay=-5e-4"])
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        load_config(overrides=["optim.lr=1e-4x"])


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.momentum=.nan", "optim.momentum"),
    ("optim.gamma=.inf", "optim.gamma"), ("data.mean=[0.5, .nan, 0.5]", "data.mean[1]"),
    ("aug.s_severity=.inf", "aug.s_severity"), ("optim.weight_decay=-.inf", "optim.weight_decay"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"{re.escape(key)} must be a finite number"):
        load_config(overrides=[override])


def test_duplicate_recipe_key_is_refused_with_both_lines(tmp_path):
    (tmp_path / "r.yaml").write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.4\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' on lines 2 and 4"):
        load_config(tmp_path / "r.yaml")
    (tmp_path / "s.yaml").write_text("train:\n  epochs: 3\noptim:\n  lr: 0.1\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train' on lines 1 and 5"):
        load_config(tmp_path / "s.yaml")


def test_cifar_recipes_scale_lr_with_the_global_batch():
    """One process keeps the reference lr (0.1 at batch 128); two double the batch and so the lr."""
    for recipe in sorted((Path(__file__).resolve().parents[1] / "configs" / "cifar").glob("*.yaml")):
        cfg = load_config(recipe)
        assert cfg.optim.lr_base_batch == cfg.train.batch_size == 128, recipe.name


def test_num_threads_is_a_non_negative_train_key():
    assert load_config().train.num_threads == 0
    assert load_config(overrides=["train.num_threads=3"]).train.num_threads == 3
    with pytest.raises(ConfigError, match="train.num_threads must be >= 0"):
        load_config(overrides=["train.num_threads=-1"])


def test_adversarial_sizes_read_as_fractions_or_numbers_and_are_saved_as_numbers(tmp_path):
    cfg = load_config(overrides=["adversarial.method=fgsm", "adversarial.eps=8/255", "adversarial.alpha=0.04"])
    assert cfg.adversarial.eps == pytest.approx(8 / 255, rel=1e-12) and cfg.adversarial.alpha == 0.04
    assert load_config().adversarial.method == "none"  # standard training unless asked
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert isinstance(again.adversarial.eps, float)
    assert again.adversarial.eps == pytest.approx(8 / 255, rel=1e-12)


@pytest.mark.parametrize("name, lr, epochs, aug, p_prob, s_prob", [
    ("baseline", 0.2, 30, "none", None, None), ("apr_p", 0.22, 55, "apr_p", 0.16, None),
    ("apr_s", 0.23, 65, "apr_sp", 0.0, 1.0), ("apr_sp", 0.2, 90, "apr_sp", 0.16, 0.9)])
def test_fgsm_recipes_carry_the_reference_numbers(name, lr, epochs, aug, p_prob, s_prob):
    cfg = load_config(ROOT / f"configs/cifar/cifar10_preact18_fgsm_{name}.yaml")
    assert (cfg.optim.lr, cfg.train.epochs, cfg.aug.name) == (lr, epochs, aug)
    assert p_prob is None or cfg.aug.p_prob == p_prob
    assert s_prob is None or cfg.aug.s_prob == s_prob
    assert cfg.model.name == "preact_resnet18" and cfg.optim.schedule == "cyclic" and cfg.aug.loss == "mean"
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.train.batch_size) == (0.9, 5e-4, 128)
    assert cfg.adversarial.method == "fgsm" and cfg.train.precision == "bf16"
    assert cfg.optim.cyclic_momentum == [0.8, 0.9]  # the reference's CyclicLR default cycle_momentum
    assert cfg.adversarial.eps == pytest.approx(8 / 255) and cfg.adversarial.alpha == pytest.approx(10 / 255)
