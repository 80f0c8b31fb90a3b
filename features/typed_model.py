"""Config sections as pydantic v2 models, validated whole at construction and on every assignment.

`TypedModel` refuses unknown keys, silent coercion (`"3"`, `true` or `3.5` for an int, `1` for a
bool), non-finite floats and integers beyond int64. Ranges and choices live on the fields
(`Field(ge=...)`, `Literal[...]`), rules across fields in `model_validator`s that raise
`cross_field(key, problem)`. `explain` turns a `ValidationError` into one line per problem naming the
dotted key, worded like the rest of adrec's errors ("expected an integer >= 1, got 0"); an
assignment that is refused raises `InvalidValue` ("RetrievalConfig.epochs: ...") and changes nothing.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

INT64 = (-(2**63), 2**63 - 1)
SEED_MAX = 2**32 - 1  # numpy / Keras seeds
TYPE_ERRORS = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}
BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "literal_error")


def as_tuple(value):
    """YAML gives lists; a bare string where names are expected is a one-item tuple."""
    if isinstance(value, list):
        return tuple(value)
    return (value,) if isinstance(value, str) else value


Names = Annotated[tuple[str, ...], BeforeValidator(as_tuple)]


class InvalidValue(ValueError):
    """An assignment refused: `<Model>.<key>: <problem>`; the attribute keeps its value."""


_UNSET = object()


class TypedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False,
                              validate_default=True)

    @field_validator("*")
    @classmethod
    def _fits_int64(cls, value):
        items = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1] for v in items):
            raise PydanticCustomError("int64", "expected an integer that fits in int64", {"value": value})
        return value

    def __setattr__(self, name: str, value) -> None:
        before = self.__dict__.get(name, _UNSET)
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            if before is not _UNSET:  # pydantic stores the value before the model's own validators refuse it
                self.__dict__[name] = before
            raise InvalidValue(explain(err, type(self), type(self).__name__)) from None


def cross_field(key: str, problem: str) -> PydanticCustomError:
    """The error a model validator raises for `key` (a field of its model, or a dotted path below it)."""
    return PydanticCustomError("cross_field", "{key}: {problem}", {"key": key, "problem": problem})


def explain(err: ValidationError, root, where: str, sep: str = ".") -> str:
    """The first problem of `err` (raised validating `root`, a model or a field's annotation) as
    `<where><sep><dotted key>: <problem>`."""
    e = err.errors(include_url=False)[0]
    loc, kind, value = list(e["loc"]), e["type"], e.get("input")
    path = lambda parts: _dotted(where, parts, sep)  # noqa: E731
    if kind == "extra_forbidden":
        section = _strip(_walk(root, loc[:-1]))
        unknown = sorted(str(x["loc"][-1]) for x in err.errors()
                         if x["type"] == kind and x["loc"][:-1] == e["loc"][:-1])
        return f"{path(loc[:-1])}: unknown key(s) {unknown}; known keys are {sorted(section.model_fields)}"
    if kind == "cross_field":
        return f"{path([*loc, *e['ctx']['key'].split('.')])}: {e['ctx']['problem']}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path(loc)}: expected a mapping, got {type(value).__name__}"
    if kind in TYPE_ERRORS:
        return f"{path(loc)}: expected {TYPE_ERRORS[kind]}, got {value!r}"
    if kind in ("tuple_type", "list_type"):
        return f"{path(loc)}: expected a list, got {value!r}"
    if kind == "int64":
        return f"{path(loc)}: expected an integer that fits in int64, got {value!r}"
    if kind == "finite_number":
        return f"{path(loc)}: expected a finite number, got {value!r}"
    if kind in BOUNDS:
        return f"{path(loc)}: expected {expectation(_walk(root, loc))}, got {value!r}"
    if kind == "value_error":  # a field's own check (an AfterValidator): its message says what it expects
        return f"{path(loc)}: {e['ctx']['error']}"
    return f"{path(loc)}: {e['msg']}"


def _dotted(where: str, loc: list, sep: str) -> str:
    out = where
    for i, part in enumerate(loc):
        out += f"[{part}]" if isinstance(part, int) else f"{sep if i == 0 else '.'}{part}"
    return out


def _walk(hint, loc: list):
    """The annotation (with its constraints) at `loc` below `hint`: a model's field, a tuple's item."""
    for part in loc:
        bare = _strip(hint)
        if isinstance(part, int):
            hint = next(a for a in typing.get_args(bare) if a is not Ellipsis)
        else:
            field = bare.model_fields[part]
            hint = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return hint


def _strip(hint):
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def constraints(hint) -> dict[str, Any]:
    """ge / gt / le / lt / min_len of a field annotation (and of what it wraps)."""
    found: dict[str, Any] = {}
    while typing.get_origin(hint) is Annotated:
        hint, *meta = typing.get_args(hint)
        for m in meta:
            for name in ("ge", "gt", "le", "lt", "min_length"):
                if getattr(m, name, None) is not None:
                    found.setdefault(name, getattr(m, name))
            for inner in getattr(m, "metadata", ()):  # a FieldInfo's own constraints
                if isinstance(inner, annotated_types.BaseMetadata):
                    for name in ("ge", "gt", "le", "lt", "min_length"):
                        if getattr(inner, name, None) is not None:
                            found.setdefault(name, getattr(inner, name))
    return found


def expectation(hint) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'a fraction in [0, 1)', "one of ['a', 'b']"."""
    bare, bounds = _strip(hint), constraints(hint)
    if typing.get_origin(bare) is Literal:
        return f"one of {list(typing.get_args(bare))}"
    if typing.get_origin(bare) is tuple:
        item = next(a for a in typing.get_args(bare) if a is not Ellipsis)
        what = expectation(item).removeprefix("an ").removeprefix("a ")
        plural = what.replace("integer", "integers").replace("number", "numbers").replace("fraction", "fractions")
        return f"a non-empty list of {plural}" if bounds.get("min_length") else f"a list of {plural}"
    noun = "an integer" if bare is int else "a number"
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if bare is float and low and high and (low[1], high[1]) == (0, 1):
        return f"a fraction in {low[0]}0, 1{high[0]}"
    if low and high:
        return f"{noun} in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{noun} {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{noun} {'<=' if high[0] == ']' else '<'} {high[1]}"
    return noun
