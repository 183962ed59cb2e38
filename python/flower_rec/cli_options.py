"""Command-line options made from a configuration dataclass or from the function a command calls,
so that an option is listed once: a field's or keyword parameter's name gives the flag
(``eval_steps`` -> ``--eval-steps``), its type the argument's type (a ``Literal`` its choices),
its default the shown default, its rule in the command's rules the choices, and its entry in
the docstring's ``Args:`` section the help."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from .config_checks import Rule, field_default

__all__ = ["add_config_options", "config_from_args", "docstring_args", "options_from_args"]


def add_config_options(
    parser: argparse.ArgumentParser,
    config: type | Callable[..., Any],
    rules: Mapping[str, Rule],
    *,
    skip: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    unset: bool = False,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One option per field of the dataclass ``config`` (or per parameter of the function
    ``config``) but those in ``skip``.

    ``defaults`` replace field defaults on the command line. ``unset``: every option defaults
    to None whatever the field's default (shown in the help all the same) and none is required,
    for a command whose options are merged over a configuration file. ``extra``: further
    ``add_argument`` keywords per field (a metavar, aliases as ``flags``)."""
    helps = docstring_args(config)
    for name, hint, default in _parameters(config):
        if name in skip:
            continue
        options = _argument(hint, name)
        default = (defaults or {}).get(name, default)
        rule = rules.get(name)
        if getattr(rule, "choices", None):
            options["choices"] = rule.choices
        help_text = helps.get(name, "").removesuffix(".")
        if default is not dataclasses.MISSING and default is not None:
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text += f" (default: {shown})"
        options["help"] = help_text.replace("%", "%%")
        if unset:
            options["default"] = None
        elif default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = default
        options.update((extra or {}).get(name, {}))
        flags = ["--" + name.replace("_", "-"), *options.pop("flags", ())]
        parser.add_argument(*flags, dest=name, **options)


def config_from_args(config: type, args: argparse.Namespace) -> Any:
    """The ``config`` dataclass of the parsed options that :func:`add_config_options` added."""
    return config(**options_from_args(config, args))


def options_from_args(
    config: type | Callable[..., Any], args: argparse.Namespace, *, skip: Collection[str] = ()
) -> dict:
    """The parsed options of the fields or parameters of ``config`` but those in ``skip``, by
    name."""
    names = {name for name, _, _ in _parameters(config)} - set(skip)
    return {name: value for name, value in vars(args).items() if name in names}


def _parameters(config: type | Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """``(name, type, default)`` of each field of a dataclass, or of each parameter of a
    function (``dataclasses.MISSING`` where there is no default)."""
    hints = typing.get_type_hints(config)
    if dataclasses.is_dataclass(config):
        return [(field.name, hints[field.name], field_default(field))
                for field in dataclasses.fields(config)]
    return [
        (name, hints.get(name), dataclasses.MISSING if p.default is p.empty else p.default)
        for name, p in inspect.signature(config).parameters.items()
    ]


def _argument(hint: Any, name: str) -> dict[str, Any]:
    """``add_argument`` keywords for a value of type ``hint``: a bool is a ``--x / --no-x``
    switch, a list or sequence takes one or more values, a dict a JSON object, a ``Literal`` one
    of its values, ``X | None`` is an ``X``, a union with ``str`` (a path, a device) a string."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if len(kinds) == 1:
            hint = kinds[0]
        elif str in kinds:
            return {"type": str}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is dict:
        return {"type": _json_object, "metavar": "JSON"}
    if typing.get_origin(hint) is typing.Literal:
        return {"type": type(typing.get_args(hint)[0]), "choices": list(typing.get_args(hint))}
    if typing.get_origin(hint) in (list, Sequence) and typing.get_args(hint)[0] in (int, float, str):
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"option {name}: no command-line form for the type {hint}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object {name: value, ...}")
    return value


_ENTRY = re.compile(r"    (\w+(?:, \w+)*): (.*)")
_ROLE = re.compile(r":\w+:`(~?)([\w.]+)`")


def docstring_args(config: type | Callable[..., Any]) -> dict[str, str]:
    """Field or parameter name -> its description in the ``Args:`` section of ``config``'s
    docstring (an entry ``name: text``, or ``a, b: text`` shared by several names; continuation
    lines indented deeper), as plain text: ``literal`` and Sphinx-role markup removed."""
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
