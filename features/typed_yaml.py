"""YAML files to typed dataclasses: unknown keys and wrong types refused with their dotted path.

Shared by data specs (`features.spec`) and job configs (`trainer.config`); each passes its
own exception class so a user sees which kind of file is wrong.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from pathlib import Path

import yaml


def coerce(cls, value, where: str, error: type[Exception],
           shorthands: dict[type, Callable[[str], object]] | None = None,
           hidden: frozenset[str] = frozenset()):
    """Build `cls` from plain YAML values.

    `shorthands` maps a dataclass to a builder used when the YAML gives a bare string for
    it; `hidden` names dataclass fields that a file may not set (filled in by the loader).
    A bare string where a tuple of strings is expected is taken as a one-item tuple.
    """
    shorthands = shorthands or {}

    def build(cls, value, where):
        if dataclasses.is_dataclass(cls):
            if isinstance(value, str) and cls in shorthands:
                return shorthands[cls](value)
            if not isinstance(value, dict):
                raise error(f"{where}: expected a mapping, got {type(value).__name__}")
            hints = typing.get_type_hints(cls)
            known = {f.name for f in dataclasses.fields(cls)} - hidden
            unknown = sorted(set(value) - known)
            if unknown:
                raise error(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
            return cls(**{k: build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
        if typing.get_origin(cls) is tuple:
            (item,) = {a for a in typing.get_args(cls) if a is not Ellipsis}
            if isinstance(value, str) and item is str:
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise error(f"{where}: expected a list, got {value!r}")
            return tuple(build(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if cls is dict:
            if not isinstance(value, dict):
                raise error(f"{where}: expected a mapping, got {type(value).__name__}")
            return dict(value)
        if cls is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise error(f"{where}: expected a finite number, got {value!r}") from None
        if cls in (int, float, str, bool) and not (isinstance(value, cls)
                                                   and not (cls is int and isinstance(value, bool))):
            raise error(f"{where}: expected {cls.__name__}, got {value!r}")
        return value

    return build(cls, value, where)


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names one key twice (plain `yaml.safe_load` keeps the last silently)."""


class StrictSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding the same key twice, naming both lines.

    Keys brought in by a merge (`<<: *anchor`) may be overridden, as YAML intends; only the
    keys written in the mapping itself must be unique.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(f"duplicate key {key!r} on line {line} (first on line {first}); "
                                            "a key may appear once per mapping")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads a float only with a dot, so `5e-05` or `1e3` would be strings and a number key
# would refuse them; YAML 1.2 reads them as floats, as every other config tool does.
StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789"))


def safe_load(text: str):
    """`yaml.safe_load`, refusing duplicate mapping keys (`DuplicateKeyError`): what `yaml.safe_load`
    does, with the SafeLoader subclass that counts keys (no constructor beyond SafeLoader's)."""
    loader = StrictSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path, error: type[Exception], what: str):
    """`yaml.safe_load` of a file that must exist, duplicate keys refused; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text: {err}") from err
    except DuplicateKeyError as err:
        raise error(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from err
