"""Entry points print a user error as one line and exit 2; bugs keep their traceback."""

import pytest
import yaml

from apr.cli import run_main
from apr.config import ConfigError


def _raiser(exc):
    def main(argv):
        raise exc
    return main


def test_user_error_is_one_line_and_exit_2(capsys):
    assert run_main(_raiser(ConfigError("optim.lr must be finite; got nan")), []) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: optim.lr must be finite; got nan"
    assert "Traceback" not in err


def test_yaml_syntax_error_names_line_and_column(capsys):
    def main(argv):
        yaml.safe_load("a: 1\nb: [2, 3\n")
    assert run_main(main, []) == 2
    assert "YAML syntax error (line 3, column 1)" in capsys.readouterr().err


def test_debug_flag_keeps_the_traceback_and_bugs_are_not_hidden(monkeypatch):
    with pytest.raises(ConfigError):
        run_main(_raiser(ConfigError("x")), ["--debug"])
    monkeypatch.setenv("APR_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_main(_raiser(ConfigError("x")), [])
    monkeypatch.delenv("APR_DEBUG")
    with pytest.raises(ZeroDivisionError):
        run_main(_raiser(ZeroDivisionError("bug")), [])


def test_debug_flag_is_removed_before_main_sees_argv():
    seen = []
    assert run_main(lambda argv: seen.append(argv) or 0, ["--x", "--debug", "1"]) == 0
    assert seen == [["--x", "1"]]
