"""Entry-point wrapper: user errors become one ``error:`` line, bugs keep their traceback.

    sys.exit(run_main(main))          # main(argv) -> int

``--debug`` on the command line (removed before ``main`` sees it) or ``APR_DEBUG=1`` re-raises
everything with its full traceback.

The command vocabulary: every command adds its common flags with :func:`add_common` (or :func:`add_flag`
for one flag in an argument group), so the same idea has one spelling, one type and one help text in
every ``--help``. Old spellings stay as hidden aliases that print a one-line deprecation note.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Callable, Sequence

from apr.errors import UserError

__all__ = ["run_main", "format_user_error", "DEBUG_ENV", "VOCABULARY", "DEPRECATED", "PRECISION_CHOICES",
           "add_common", "add_flag", "add_deprecated", "DefaultsHelpFormatter"]

DEBUG_ENV = "APR_DEBUG"
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def format_user_error(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None when ``exc`` is a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    try:
        import yaml
    except ImportError:  # pragma: no cover - yaml is a dependency
        yaml = None
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        name = getattr(mark, "name", None)
        source = f"{name}: " if name and not str(name).startswith("<") else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return f"{source}YAML syntax error{where}: {problem}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:  # a full disk or a read-only folder
        return str(exc)
    return None


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print a user error as ``error: ...`` and return 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified below, bugs re-raised
        message = format_user_error(exc)
        if debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    if "torch.distributed" in sys.modules:  # (commands that never import torch stay fast)
        from apr.distributed import leave_world

        leave_world()
    return code


# ---------------------------------------------------------------------------------------
# the one command vocabulary

class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: ...)`` after each help text, but only where there is a default (no "default: None")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32")  # auto: apr.inference.default_precision of the device

# name -> (flag, add_argument keywords). A command may pick its own default: add_flag appends it to the help.
VOCABULARY: dict[str, tuple[str, dict]] = {
    "checkpoint": ("--checkpoint", dict(nargs="+", metavar="CKPT",
                                        help="one or more checkpoints (.pt) written by apr-train; each model gets "
                                             "its own results file")),
    "val": ("--val", dict(metavar="DIR", help="the clean / in-distribution image folder DIR/<class>/<image> "
                                              "(e.g. /data/imagenet/val)")),
    "cifar": ("--cifar", dict(metavar="DIR", help="CIFAR-10/100 python folder (cifar-10-batches-py or "
                                                  "cifar-100-python); its test set is the clean set")),
    "out": ("--out", dict(metavar="DIR", help="output folder (created if missing)")),
    "max_images": ("--max-images", dict(type=int, metavar="N",
                                        help="use a fixed, class-balanced subset of at most N images of every set "
                                             "or cell (quick checks)")),
    "batch_size": ("--batch-size", dict(type=int, metavar="N",
                                        help="images per forward pass per process")),
    "precision": ("--precision", dict(choices=PRECISION_CHOICES,
                                      help="bf16 or fp16 autocast, or full fp32; auto = bf16 on a CUDA GPU, fp32 "
                                           "on a CPU")),
    "device": ("--device", dict(help="cpu, cuda or cuda:N (default: this process's GPU when there is one, else "
                                     "the CPU)")),
    "workers": ("--workers", dict(type=int, metavar="N",
                                  help="parallel workers reading / decoding images (DALI threads or loader "
                                       "processes; 0 = in the main process)")),
    "progress": ("--progress", dict(action=argparse.BooleanOptionalAction,
                                    help="progress bars on stderr (--no-progress for batch logs)")),
    "debug": ("--debug", dict(action="store_true",
                              help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")),
}
_DEFAULTS = {"precision": "auto", "progress": True}
DEFAULT_SUFFIX = " (default: %(default)s)"

# old spelling -> (vocabulary name, value it stores; None: the option's argument). Hidden, one release.
DEPRECATED: dict[str, tuple[str, object]] = {
    "--in": ("val", None), "--data": ("val", None), "--in-cifar": ("cifar", None), "--n": ("max_images", None),
    "--quiet": ("progress", False),
}
_KEEP = object()


class _DeprecatedAlias(argparse.Action):
    """An old spelling: stores into the new flag's dest and says, once per use, what to write instead."""

    def __init__(self, option_strings, dest, new_flag: str, value=None, **kwargs):
        self.new_flag, self.value = new_flag, value
        kwargs.setdefault("nargs", 0 if value is not None else None)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        new = f"--no-{self.new_flag[2:]}" if self.value is False else self.new_flag
        print(f"note: {option_string} is deprecated and goes in the next release; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, self.value if self.value is not None else values)


def add_flag(container, name: str, *, required: bool = False, default=_KEEP, old: Sequence[str] = ()):
    """Add the vocabulary flag ``name`` to ``container`` (a parser or argument group) with its one help text;
    ``old``: deprecated spellings (keys of :data:`DEPRECATED`) accepted as hidden aliases."""
    flag, spec = VOCABULARY[name]
    kwargs = dict(spec, dest=name)
    if required:
        kwargs["required"] = True
    if default is not _KEEP:
        kwargs["default"] = default
    elif name in _DEFAULTS:
        kwargs["default"] = _DEFAULTS[name]
    if kwargs.get("default") not in (None, False, []) and kwargs.get("action") is None:
        kwargs["help"] += DEFAULT_SUFFIX
    action = container.add_argument(flag, **kwargs)
    for spelling in old:
        target, value = DEPRECATED[spelling]
        if target != name:
            raise ValueError(f"{spelling} is an old spelling of --{VOCABULARY[target][0][2:]}, not of {flag}")
        like = {k: spec[k] for k in ("type", "nargs") if k in spec and value is None}
        add_deprecated(container, spelling, name, flag, value, **like)
    return action


def add_deprecated(container, spelling: str, dest: str, new_flag: str, value=None, **kwargs) -> None:
    """A hidden old ``spelling`` of ``new_flag`` (stores into ``dest``; ``value``: a switch that stores it;
    ``kwargs``: e.g. ``type`` when the old option keeps its own meaning)."""
    container.add_argument(spelling, dest=dest, action=_DeprecatedAlias, new_flag=new_flag, value=value, **kwargs)


def add_common(parser, *names: str, required: Sequence[str] = (), defaults: dict | None = None,
               old: Sequence[str] = ()) -> None:
    """Add the vocabulary flags ``names`` (and ``--debug``, listed in every command's --help) to ``parser``.
    ``required``: names the command cannot run without; ``defaults``: this command's defaults by name;
    ``old``: deprecated spellings of these flags to accept."""
    defaults = defaults or {}
    for name in names:
        if name != "debug":
            add_flag(parser, name, required=name in required, default=defaults.get(name, _KEEP),
                     old=[s for s in old if DEPRECATED[s][0] == name])
    if not any("--debug" in a.option_strings for a in parser._actions):
        add_flag(parser, "debug")
