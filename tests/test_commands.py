"""Install and commands: every command is a console script that wraps its ``python -m`` main; recipes ship
as package data, addressable by name; torch is a range, CI's exact versions live in constraints.txt."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import apr
from apr.config import ConfigError, load_config, recipes_root, resolve_recipe, shipped_recipes

PACKAGE = Path(apr.__file__).resolve().parent
ROOT = PACKAGE.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def pyproject() -> dict:
    path = ROOT / "pyproject.toml"
    if not path.is_file():
        pytest.skip("not a source checkout")
    return tomllib.loads(path.read_text())


COMMANDS = {  # console script -> the python -m module it stands for (the study runner uses the -m form)
    "apr-train": "apr.commands.train", "apr-eval": "apr.commands.evaluate", "apr-ood": "apr.ood",
    "apr-attack": "apr.adversarial", "apr-report": "apr.report", "apr-analysis": "apr.analysis",
    "apr-corrupt": "apr.corrupt", "apr-layout": "apr.data.layout", "apr-demo": "apr.demo",
    "apr-gpu-check": "apr.gpu_check", "apr-study": "apr.study",
}


def _entry(script: str):
    module, _, attr = pyproject()["project"]["scripts"][script].partition(":")
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in this checkout")  # apr.gpu_check arrives with the GPU check's branch
    return getattr(importlib.import_module(module), attr)


def test_every_command_is_a_console_script():
    assert set(pyproject()["project"]["scripts"]) == set(COMMANDS)


@pytest.mark.parametrize("script", sorted(set(COMMANDS) - {"apr-gpu-check"}))
def test_console_script_prints_its_help(script, capsys):
    with pytest.raises(SystemExit) as done:
        _entry(script)(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["apr-layout", "apr-report", "apr-ood"])
def test_console_script_user_error_is_one_error_line(script, tmp_path, capsys):
    argv = {"apr-layout": [str(tmp_path / "nowhere")], "apr-report": [str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
            "apr-ood": ["--checkpoint", str(tmp_path / "none.pt"), "--val", str(tmp_path), "--ood",
                        f"x={tmp_path}", "--out", str(tmp_path / "o")]}[script]
    assert _entry(script)(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) <= 2, err


def _help(script, capsys) -> str:
    with pytest.raises(SystemExit):
        _entry(script)(["--help"])
    return capsys.readouterr().out


def test_layout_check_of_a_wrong_root_is_one_error_line(tmp_path):
    """README's own check, as ``python -m``: no traceback for a folder that is not there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "apr.data.layout", str(tmp_path / "imagenet")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "RuntimeWarning" not in line]
    assert lines[0] == f"error: dataset folder not found: {tmp_path / 'imagenet'}" and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- recipes


def test_recipes_are_package_data_and_configs_links_to_them():
    names = shipped_recipes()
    assert {"resnet50_apr_sp", "resnet50_baseline", "cifar10_wrn40_2_apr_sp", "demo"} <= set(names)
    files = [p for p in recipes_root().rglob("*.yaml") if p.relative_to(recipes_root()).parts[0] != "studies"]
    assert len(files) == len(names)  # one name, one file: no stem shipped twice
    assert all(path.is_file() and recipes_root() in path.parents for path in names.values())
    if (ROOT / "configs").exists():  # a source checkout: configs/ is the same folder, not a copy
        assert (ROOT / "configs").resolve() == (PACKAGE / "configs").resolve()
    patterns = pyproject()["tool"]["setuptools"]["package-data"]["apr"]
    for path in names.values():
        rel = path.relative_to(PACKAGE)
        assert any(rel.match(p) for p in patterns), rel


@pytest.mark.parametrize("spec", ["resnet50_apr_sp", "resnet50_apr_sp.yaml", "imagenet/resnet50_apr_sp",
                                  "configs/imagenet/resnet50_apr_sp.yaml"])
def test_recipe_by_name_or_path_from_any_folder(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe(spec) == recipes_root() / "imagenet" / "resnet50_apr_sp.yaml"
    assert load_config(spec).aug.name == "apr_sp"


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("resnet50_apr_sp").write_text("aug: {name: apr_p}\n")
    assert load_config("resnet50_apr_sp").aug.name == "apr_p"


@pytest.mark.parametrize("spec, close", [("resnet50_aprsp", "resnet50_apr_sp"), ("cifar/resnet50_apr_sp", None),
                                         ("zzz", None)])
def test_unknown_recipe_is_one_error_naming_close_names(spec, close):
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe") as err:
        resolve_recipe(spec)
    message = str(err.value)
    assert "\n" not in message and "--list-configs" in message
    assert (close in message) if close else ("none has a close name" in message or "close names" in message)


def test_list_configs_names_every_shipped_recipe(capsys):
    from apr.commands.train import main

    assert main(["--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_recipes())
    assert any(line.split()[1] == "imagenet/resnet50_apr_sp.yaml" and "ResNet-50" in line for line in lines)


# ----------------------------------------------------------------------------- install


def test_torch_is_a_range_and_dali_an_extra_per_cuda_major():
    project = pyproject()["project"]
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip(): d for d in project["dependencies"]}
    assert "==" not in deps["torch"] and "==" not in deps["torchvision"]
    assert not any(name.startswith("nvidia-dali") for name in deps)
    extras = project["optional-dependencies"]
    assert extras["dali-cuda12"][0].startswith("nvidia-dali-cuda120")
    assert extras["dali-cuda13"][0].startswith("nvidia-dali-cuda130")
    assert any(d.startswith("nvidia-dali-cuda120") for d in extras["dev"])  # the CPU twin stays tested


def test_constraints_pin_versions_inside_the_supported_ranges():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = pyproject()["project"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"]
                                                                   + project["optional-dependencies"]["dev"])}
    pins = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert all(str(p.specifier).startswith("==") for p in pins)
    pinned = {canonicalize_name(p.name): p.specifier for p in pins}
    assert set(ranges) <= set(pinned), set(ranges) - set(pinned)
    for name, spec in pinned.items():
        version = str(spec).lstrip("=")
        assert ranges.get(name) is None or ranges[name].contains(version), (name, version, ranges[name])
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[dev]"' in ci


# ----------------------------------------------------------------------------- README and docs

def _readme() -> str:
    if not (ROOT / "README.md").is_file():
        pytest.skip("not a source checkout")
    return (ROOT / "README.md").read_text()


def test_readme_is_short_and_its_two_commands_are_what_ci_runs():
    readme = _readme()
    assert len(readme.splitlines()) <= 200
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in readme.splitlines() if line.startswith("python -m pip install")]
    assert [c.split(" && ")[1] for c in commands] == ["python -m apr.demo", "python -m pytest -q"]
    for command in commands:
        install, run = command.split(" && ")
        assert install in ci and (run in ci or run == "python -m apr.demo")


@pytest.mark.parametrize("page", ["README.md", "docs/training.md", "docs/evaluation.md", "docs/ood.md",
                                  "docs/adversarial.md", "docs/library.md", "docs/demo.md",
                                  "docs/reliability.md", "docs/slurm.md", "docs/gpu.md", "docs/studies.md",
                                  "docs/reference-differences.md"])
def test_relative_links_lead_to_files(page):
    import re

    _readme()
    text = (ROOT / page).read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        path = ((ROOT / page).parent / target).resolve()
        assert path.exists(), f"{page}: {target}"
