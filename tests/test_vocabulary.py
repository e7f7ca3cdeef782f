"""One command vocabulary: every command spells, types and explains a common flag the same way."""

import argparse
import importlib

import pytest

from apr.cli import DEFAULT_SUFFIX, DEPRECATED, VOCABULARY, add_common, add_flag

# command -> the function that builds its parser and parses argv (the console scripts' entry points)
COMMANDS = {
    "apr-train": "apr.commands.train:main",
    "apr-eval": "apr.commands.evaluate:main",
    "apr-ood": "apr.ood:main",
    "apr-attack": "apr.adversarial.__main__:main",
    "apr-analysis": "apr.analysis.cli:main",
    "apr-corrupt": "apr.corrupt:main",
    "apr-layout": "apr.data.layout:main",
    "apr-report": "apr.report:main",
    "apr-demo": "apr.demo:main",
}


class _Caught(Exception):
    def __init__(self, parser):
        super().__init__("parser caught")
        self.parser = parser


def parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command builds, caught when it starts parsing (no command runs)."""
    module, func = COMMANDS[command].split(":")
    main = getattr(importlib.import_module(module), func)

    def catch(self, args=None, namespace=None):
        raise _Caught(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(_Caught) as caught:
            main(["--help"])
    return caught.value.parser


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def _option_actions(parser):
    return [a for a in parser._actions if a.option_strings]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_vocabulary_flag_has_one_dest_type_and_help(command, monkeypatch):
    by_flag = {flag: (name, spec) for name, (flag, spec) in VOCABULARY.items()}
    for parser in all_parsers(parser_of(command, monkeypatch)):
        for action in _option_actions(parser):
            flag = next((o for o in action.option_strings if o in by_flag), None)
            if flag is None:
                continue
            name, spec = by_flag[flag]
            assert action.dest == name, f"{command} {flag}"
            assert action.help in (spec["help"], spec["help"] + DEFAULT_SUFFIX), f"{command} {flag}"
            assert action.type == spec.get("type"), f"{command} {flag}"
            assert action.choices == spec.get("choices"), f"{command} {flag}"
            assert action.nargs == spec.get("nargs", action.nargs), f"{command} {flag}"


@pytest.mark.parametrize("command", COMMANDS)
def test_debug_is_listed_in_every_help_and_old_spellings_are_hidden(command, monkeypatch):
    for parser in all_parsers(parser_of(command, monkeypatch)):
        text = parser.format_help()
        assert "--debug" in text, f"{command} {parser.prog}"
        for action in _option_actions(parser):
            old = [o for o in action.option_strings if o in DEPRECATED or o in ("--limit-per-class", "--eps")]
            if old and not (command == "apr-attack" and old == ["--eps"]):  # the attack's --eps is its Linf bound
                assert action.help == argparse.SUPPRESS, f"{command} {old}"
        for gone in ("--quiet", "--in-cifar", "--limit-per-class", "--data DIR", "--in DIR", "--n N"):
            assert gone not in text, f"{command} {parser.prog} still shows {gone}"


def test_the_same_idea_has_one_spelling_across_commands(monkeypatch):
    """The in-distribution folder is --val wherever a command reads one (ood's --in, analysis' --data before)."""
    for command in ("apr-eval", "apr-ood", "apr-attack", "apr-analysis"):
        flags = {o for p in all_parsers(parser_of(command, monkeypatch)) for a in _option_actions(p)
                 if a.help != argparse.SUPPRESS for o in a.option_strings}
        assert {"--val", "--cifar", "--checkpoint", "--out", "--max-images", "--precision", "--device"} <= flags, command


@pytest.mark.parametrize("old, new, value", [
    (["--in", "DIR"], "val", "DIR"), (["--in-cifar", "DIR"], "cifar", "DIR"), (["--n", "7"], "max_images", 7),
    (["--quiet"], "progress", False),
])
def test_old_spellings_still_work_and_say_what_to_write(old, new, value, capsys):
    parser = argparse.ArgumentParser()
    add_common(parser, "max_images", "progress", old=[o for o in ("--n", "--quiet") if o in old])
    group = parser.add_mutually_exclusive_group()
    add_flag(group, "val", old=["--in"])
    add_flag(group, "cifar", old=["--in-cifar"])
    args = parser.parse_args(old)
    assert getattr(args, new) == value
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"note: {old[0]} is deprecated") and len(err.splitlines()) == 1
    assert ("--no-progress" if new == "progress" else VOCABULARY[new][0]) in err


def test_an_old_spelling_belongs_to_its_flag():
    with pytest.raises(ValueError, match="--in"):
        add_flag(argparse.ArgumentParser(), "cifar", old=["--in"])


@pytest.mark.parametrize("argv, dest, value", [
    (["heatmap", "--eps", "2.5"], "noise_norm", 2.5), (["heatmap", "--noise-norm", "2.5"], "noise_norm", 2.5),
    (["heatmap", "--data", "D"], "val", "D"),
])
def test_heatmap_noise_norm_has_its_own_name(argv, dest, value):
    from apr.analysis.cli import build_parser

    args = build_parser().parse_args(argv + ["--checkpoint", "a.pt", "--out", "o"] +
                                     ([] if "--data" in argv else ["--val", "v"]))
    assert getattr(args, dest) == value


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    from apr.inference import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision(None, "cuda") == "bf16"
    assert resolve_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")
