"""`moesys config --show [FILE]`: the whole training config schema as commented YAML.

Every key of the config tree (moesys.config) with its value, type, default and description (the
pydantic Field descriptions), in the order of the schema. With FILE (and `--set` overrides) the values
are that config's and the keys it changes say their default; without, the values are the defaults.
The output is valid YAML, so it can start a new config file.
"""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Iterator

from pydantic import BaseModel

from moesys.config import Config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", action="store_true", help="print every config key with its value, type, "
                        "default and description (required: the only action today)")
    parser.add_argument("file", nargs="?", default=None, metavar="FILE",
                        help="a YAML config whose values to show (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key as `moesys train --set` does (repeatable)")


def type_name(annotation) -> str:
    """int, float | None, 'a' | 'b', ... for a field annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        return f"[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _yaml_value(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def schema_lines(config: BaseModel, defaults: BaseModel, indent: str = "") -> Iterator[str]:
    """`key: value  # type; default; description` for each field, sections as nested mappings."""
    for name, field in type(config).model_fields.items():
        value, default = getattr(config, name), getattr(defaults, name)
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()
            yield f"{indent}{name}:" + (f"  # {doc[0]}" if doc else "")
            yield from schema_lines(value, default, indent + "  ")
            continue
        notes = [type_name(field.annotation)]
        if value != default:
            notes.append(f"default {_yaml_value(default)}")
        if field.description:
            notes.append(field.description)
        yield f"{indent}{name}: {_yaml_value(value)}  # " + "; ".join(notes)


def run(args: argparse.Namespace) -> int:
    if not args.show:
        raise ValueError("nothing to do: pass --show to print the config schema")
    config = load_config(args.file, args.overrides)
    print("\n".join(schema_lines(config, Config())))
    return 0
