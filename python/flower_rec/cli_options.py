"""Command-line options made from a configuration dataclass, so that a field is listed once: its
name gives the flag (``eval_steps`` -> ``--eval-steps``), its type the argument's type, its
default the shown default, its rule in the configuration's rules the choices, and its entry in
the class docstring's ``Args:`` section the help."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from .config_checks import Rule

__all__ = ["add_config_options", "config_from_args", "docstring_args"]


def add_config_options(
    parser: argparse.ArgumentParser,
    config: type,
    rules: Mapping[str, Rule],
    *,
    skip: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    unset: bool = False,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One option per field of the dataclass ``config`` but those in ``skip``.

    ``defaults`` replace field defaults on the command line. ``unset``: every option defaults
    to None whatever the field's default (shown in the help all the same) and none is required,
    for a command whose options are merged over a configuration file. ``extra``: further
    ``add_argument`` keywords per field (a metavar, aliases as ``flags``)."""
    helps = docstring_args(config)
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        options = _argument(hints[field.name], field.name)
        default = (defaults or {}).get(field.name, _default(field))
        rule = rules.get(field.name)
        if getattr(rule, "choices", None):
            options["choices"] = rule.choices
        help_text = helps.get(field.name, "").removesuffix(".")
        if default is not dataclasses.MISSING and default is not None:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        options["help"] = help_text.replace("%", "%%")
        if unset:
            options["default"] = None
        elif default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = default
        options.update((extra or {}).get(field.name, {}))
        flags = ["--" + field.name.replace("_", "-"), *options.pop("flags", ())]
        parser.add_argument(*flags, dest=field.name, **options)


def config_from_args(config: type, args: argparse.Namespace) -> Any:
    """The ``config`` dataclass of the parsed options that :func:`add_config_options` added."""
    fields = {f.name for f in dataclasses.fields(config)}
    return config(**{name: value for name, value in vars(args).items() if name in fields})


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _argument(hint: Any, name: str) -> dict[str, Any]:
    """``add_argument`` keywords for a field of type ``hint``: a bool is a ``--x / --no-x``
    switch, a list takes one or more values, ``X | None`` is an ``X``."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(kinds) == 1:
        hint = kinds[0]
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float, str):
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
    if hint in (int, float, str):
        return {"type": hint}
    if set(typing.get_args(hint)) == {str, os.PathLike}:
        return {"type": str}
    raise TypeError(f"option {name}: no command-line form for the type {hint}")


_ENTRY = re.compile(r"    (\w+(?:, \w+)*): (.*)")
_ROLE = re.compile(r":\w+:`(~?)([\w.]+)`")


def docstring_args(config: type) -> dict[str, str]:
    """Field name -> its description in the ``Args:`` section of ``config``'s docstring (an entry
    ``name: text``, or ``a, b: text`` shared by several fields; continuation lines indented
    deeper), as plain text: ``literal`` and Sphinx-role markup removed."""
    lines = inspect.cleandoc(config.__doc__ or "").splitlines()
    start = lines.index("Args:") + 1 if "Args:" in lines else len(lines)
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in lines[start:]:
        entry = _ENTRY.fullmatch(line)
        if entry:
            names = entry[1].split(", ")
            entries.update(dict.fromkeys(names, entry[2]))
        elif line.startswith("        ") and names:
            entries.update(dict.fromkeys(names, entries[names[0]] + " " + line.strip()))
        else:
            break
    return {
        name: _ROLE.sub(lambda m: m[2].rpartition(".")[2] if m[1] else m[2], text).replace("``", "")
        for name, text in entries.items()
    }
