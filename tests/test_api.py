"""The public API: every advertised name resolves, and `import apr` stays light."""

import subprocess
import sys

import apr


def test_every_exported_name_resolves():
    for name in apr.__all__:
        assert getattr(apr, name) is not None, name


def test_unknown_names_raise_attribute_error():
    try:
        apr.not_a_thing
    except AttributeError as exc:
        assert "not_a_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_apr_does_not_import_dali_or_timm():
    code = "import sys, apr; print('nvidia.dali' in sys.modules, 'timm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "False"]
