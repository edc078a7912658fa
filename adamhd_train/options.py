"""Command-line options declared once, on the typed settings they fill.

A settings field that is also a command-line option carries its option in the field's metadata
(:func:`option`): the help text, the shown default, and the parser where the field's type does not say it. Both
commands build their parsers from these declarations (:func:`add_options`): ``pretrain_gpt3.py`` from
:class:`~adamhd_train.settings.TrainSettings`, ``compare.py`` from :class:`~adamhd_study.config.CompareConfig` and,
for the options it passes to every run, from ``TrainSettings`` too; a help text or a type cannot differ between
the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["CliOption", "option", "cli_option", "flag", "add_options", "parse_count"]

_OPTION = "cli"


def parse_count(text: str) -> int:
    """A whole count from the command line, with an optional k/M/B/G/T suffix or in exponent form: 4096, 375M, 4B,
    32k, 2.6e11, 1_000. Raises ``argparse.ArgumentTypeError`` (argparse then names the flag)."""
    t = text.strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = int(t) * scale  # exact for large integers
    except ValueError:
        try:
            f = float(t) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 4096, 375M, 4B)") from None
        if not math.isfinite(f) or f != int(f):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        value = int(f)
    return value


@dataclass(frozen=True)
class CliOption:
    """How a settings field appears on the command line."""

    help: str
    """What the option sets, without its default."""
    default: Optional[str] = None
    """The default as ``--help`` states it (None: the command that adds the option says it)."""
    type: Optional[Callable[[str], Any]] = None
    """The parser of one value (None: from the field's type: whole counts, numbers or text)."""
    choices: Optional[tuple] = None
    flag: Optional[str] = None
    """The option without dashes (None: the field name with ``-`` for ``_``)."""
    action: Optional[Any] = None
    """An argparse action for flags: ``"store_false"`` (a ``--no-...`` switch) or a boolean ``--x/--no-x``
    pair when the field is a ``bool``."""
    metavar: Optional[str] = None


def option(help: str, *, default_text: Optional[str] = None, type: Optional[Callable[[str], Any]] = None,
           choices: Optional[Sequence] = None, flag: Optional[str] = None, action: Optional[Any] = None,
           metavar: Optional[str] = None, **field_kwargs) -> Any:
    """A dataclass field (``field_kwargs`` as :func:`dataclasses.field` takes them) that is also a command-line
    option."""
    meta = CliOption(help=help, default=default_text, type=type, choices=tuple(choices) if choices else None,
                     flag=flag, action=action, metavar=metavar)
    return dataclasses.field(metadata={_OPTION: meta}, **field_kwargs)


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def cli_option(cls: type, name: str) -> Optional[CliOption]:
    """The option of field ``name`` of the settings class ``cls`` (None: not a command-line option)."""
    return _field(cls, name).metadata.get(_OPTION)


def flag(cls: type, name: str) -> str:
    """The command-line option of a field, without the dashes: ``max_steps`` -> ``max-steps``."""
    opt = cli_option(cls, name)
    return opt.flag if opt is not None and opt.flag else name.replace("_", "-")


def _value_type(annotation: str) -> Callable[[str], Any]:
    base = annotation.replace("Optional[", "").rstrip("]")
    return {"int": parse_count, "float": float}.get(base, str)


def add_options(parser: argparse._ActionsContainer, cls: type, names: Sequence[str], *,
                defaults: Optional[Mapping[str, str]] = None, marked: Sequence[str] = (), mark: str = "*") -> None:
    """Add the options of fields ``names`` of ``cls`` to ``parser`` (a parser or an argument group). Every value
    defaults to None (not given), so the command can tell given options from its own defaults.

    ``defaults`` replaces the declared default texts by name (a command whose defaults come from elsewhere);
    fields in ``marked`` get ``mark`` before their help (the launcher marks the options ``--from-manifest`` takes).
    """
    for name in names:
        f = _field(cls, name)
        opt = f.metadata.get(_OPTION)
        if opt is None:
            raise KeyError(f"{cls.__name__}.{name} is not a command-line option")
        shown = (defaults or {}).get(name, opt.default)
        help_text = opt.help + (f" (default: {shown})" if shown else "")
        if name in marked:
            help_text = f"{mark} {help_text}"
        kwargs: dict[str, Any] = {"dest": name, "help": help_text.replace("%", "%%"), "default": None}
        if opt.action is not None:
            kwargs["action"] = opt.action
        elif str(f.type) == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        if kwargs.get("action") not in ("store_true", "store_false", argparse.BooleanOptionalAction):
            kwargs["type"] = opt.type or _value_type(str(f.type))
        if opt.choices:
            kwargs["choices"] = opt.choices
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        parser.add_argument("--" + flag(cls, name), **kwargs)
