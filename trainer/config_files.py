"""Reading job config files and `--set` overrides into plain values, before the models validate them.

`read_config_file` composes a file on its `base:` chain; `parse_override` and `assign` put one
`section.key=value` into the plain mapping of a config, type- and range-checking that key at once
with the model's own validation so the error names the `--set` key.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from features.typed_model import explain
from features.typed_yaml import read_yaml, safe_load


class ConfigError(ValueError):
    """A config file has an unknown key, a wrong type, or a missing path."""


MAX_BASE_DEPTH = 8


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The plain YAML mapping of a config file. A top-level `base: other.yaml` (relative to the file)
    is read first and this file's values are laid over it: sections merge key by key, any other
    value (lists included) replaces the base's. A chain that loops or runs deeper than
    `MAX_BASE_DEPTH` files is refused."""
    resolved = Path(path).resolve()
    if resolved in _chain:
        raise ConfigError(f"{path}.base: the chain of bases loops back to {path}")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_BASE_DEPTH} files in the chain of bases")
    raw = read_yaml(path, ConfigError, "config file")
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    raw = dict(raw)
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}.base: expected the path of another config file, got {base!r}")
    return _laid_over(read_config_file(Path(path).parent / base, (*_chain, resolved)) or {}, raw)


def _laid_over(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _laid_over(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def parse_override(item: str) -> tuple[list[str], object]:
    key, sep, text = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. retrieval.epochs=2")
    try:
        return path, safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {' '.join(str(err).split())}") from err


def assign(raw: dict, cls: type[BaseModel], path: list[str], value, done: tuple[str, ...] = ()) -> None:
    """Set `path` (below the already-walked `done`) in the plain dict `raw` of model `cls`."""
    name, rest = path[0], path[1:]
    dotted = ".".join((*done, name))
    known = cls.model_fields
    if name not in known:
        where = f" of {'.'.join(done)}" if done else ""
        raise ConfigError(f"--set {dotted}: unknown key {name!r}; known keys{where} are {sorted(known)}")
    hint = known[name].annotation
    section = isinstance(hint, type) and issubclass(hint, BaseModel)
    if rest:
        if not section:
            raise ConfigError(f"--set {'.'.join((*done, *path))}: {dotted} is a value, not a section")
        assign(raw[name], hint, rest, value, (*done, name))
    elif section and isinstance(value, dict):
        for key, item in value.items():
            assign(raw[name], hint, [str(key)], item, (*done, name))
    else:
        try:  # this key's type and range now, naming it; the rules across fields wait for the whole result
            cls.model_validate({**raw, name: value})
        except ValidationError as err:
            if err.errors()[0]["type"] != "cross_field":
                raise ConfigError(explain(err, cls, " ".join(("--set", ".".join(done))).strip(),
                                          "." if done else " ")) from None
        raw[name] = value
