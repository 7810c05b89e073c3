"""The reference pages of the documentation, written from the code itself so that they cannot drift:
every recipe field (msllm/config.py: its type, default and the text its `doc(...)` carries) and every
`msllm` command with its arguments (the argparse parsers of msllm/cli.py).

docs/hooks.py adds both pages to the mkdocs site at build time; tests/unit/test_docs.py checks that every
field and every command is in them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from msllm.cli import build_parser
from msllm.config import Recipe, _type_name

# Fields are nested with dots; the fields of a list's items (model.scales) with `[]`.
LIST_ITEM = "[]"
HELP_WIDTH = 100  # `--help` text is wrapped at this width, whatever the terminal building the docs


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    key: str  # "data.tokenizer.vocab_size", "model.scales[].factor"
    type: str
    default: str
    help: str
    required: bool
    section: bool  # a dataclass: its fields follow


def _items_dataclass(tp: Any) -> type | None:
    """The dataclass of a `list[SomeDataclass]` type, else None."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shown_default(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return repr(value)


def config_fields(cls: type | None = None, prefix: str = "") -> Iterator[FieldDoc]:
    """Every field of the recipe (or of `cls`), depth first: sections, then their fields, the fields
    of list items (`model.scales[]`) after the list."""
    cls = Recipe if cls is None else cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        help, required = f.metadata.get("help", ""), f.metadata.get("required", False)
        if dataclasses.is_dataclass(tp):
            yield FieldDoc(key, tp.__name__, "", help, required, True)
            yield from config_fields(tp, key)
            continue
        yield FieldDoc(key, _type_name(tp), _shown_default(_default(f)), help, required, False)
        item = _items_dataclass(tp)
        if item is not None:
            yield from config_fields(item, key + LIST_ITEM)


def _prose(text: str) -> str:
    """`text` safe as markdown: `*`, `_`, `<` and `[` outside code spans are shown as they are."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the parts outside `code`
        parts[i] = (
            parts[i]
            .replace("\\", "\\\\")
            .replace("*", "\\*")
            .replace("_", "\\_")
            .replace("<", "&lt;")
            .replace("[", "\\[")
        )
    return "`".join(parts)


def _code(text: str) -> str:
    """`text` as one inline code span, whatever backticks it holds."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def config_reference() -> str:
    """The markdown of the recipe reference page."""
    out = [
        "# Recipe reference",
        "",
        "Every field of a recipe, generated from the dataclasses of `msllm/config.py` when the docs are "
        "built (`msllm show-config --docs` prints the same from the command line). A recipe is a YAML "
        "file with the sections below; [Recipes](../recipes.md) explains `base:`, `--set` and the checks.",
        "",
    ]
    for row in config_fields():
        depth = row.key.count(".")
        if row.section:
            level = "#" * min(2 + depth, 4)
            out += [f"{level} `{row.key}`", "", _prose(row.help), ""]
            continue
        line = f"- **`{row.key}`** ({_code(row.type)}"
        line += ", required" if row.required else f", default {_code(row.default)}"
        line += f"): {_prose(row.help)}"
        out += [line, ""]
    return "\n".join(out).rstrip() + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the order `msllm --help` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _help_text(parser: argparse.ArgumentParser) -> str:
    formatter_class = parser.formatter_class
    parser.formatter_class = lambda prog: formatter_class(prog, width=HELP_WIDTH)
    try:
        text = parser.format_help()
    finally:
        parser.formatter_class = formatter_class
    return text.rstrip()


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) or action.metavar or action.dest
        if action.option_strings and action.nargs != 0:
            name += " " + (action.metavar or action.dest.upper())
        notes = []
        if action.required and action.option_strings:
            notes.append("required")
        if action.option_strings and action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS):
            notes.append(f"default {_code(repr(action.default))}")
        note = f" ({', '.join(notes)})" if notes else ""
        rows.append(f"- {_code(name)}{note}: {_prose(action.help or '')}")
    return rows


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown of the command-line reference page."""
    if parser is None:
        parser = build_parser()
    out = [
        "# Command-line reference",
        "",
        "Every `msllm` command and its arguments, generated from the argparse parsers of `msllm/cli.py` "
        "when the docs are built: each section holds what `msllm COMMAND --help` prints. Every command "
        "turns a bad input into one line on stderr and exit code 2 ([Troubleshooting](../troubleshooting.md)).",
        "",
        "```text",
        _help_text(parser),
        "```",
        "",
    ]
    for name, help, sub in _subcommands(parser):
        out += [f"## `msllm {name}`", "", _prose(help[:1].upper() + help[1:]) + ".", ""]
        out += _arguments(sub) + [""]
        out += ["```text", _help_text(sub), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def subcommand_names(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The names of `msllm`'s subcommands."""
    if parser is None:
        parser = build_parser()
    return [name for name, _, _ in _subcommands(parser)]
