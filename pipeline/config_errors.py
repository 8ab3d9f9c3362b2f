"""params.yaml mistakes as one readable line each: the key, the bad value, what is allowed, a likely typo.

pipeline/config.py raises `InvalidValue` from its cross-field checks and hands pydantic's errors to `describe`.
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from pydantic import BaseModel

from pipeline.errors import PipelineError


class ConfigError(PipelineError):
    """params.yaml is not usable; the message says which key, what value, what is allowed."""


class InvalidValue(ValueError):
    """A cross-field problem pinned to the key the user should edit (relative to the section)."""

    def __init__(self, key: str | None, value: Any, allowed: str) -> None:
        super().__init__(f"{key or '(section)'}: got {show(value)}; {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class Unquoted(str):
    """A value shown as written (no quotes), e.g. a sum spelled out."""

    def __repr__(self) -> str:
        return str(self)


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 2
MAX_LINE = 300  # characters of one problem's line
MAX_PROBLEMS = 10  # problems listed; the rest are counted


def show(value: Any) -> str:
    """The bad value as the user wrote it, kept short (a huge list or string shows its first items)."""
    return _short.repr(list(value) if isinstance(value, tuple) else value)[:MAX_LINE]


def clip(line: str) -> str:
    """One problem's line cut to MAX_LINE characters, so no value can flood the terminal."""
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


def _section_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds `loc` (for 'did you mean')."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _meant(root: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The allowed key closest to an unknown one, if any is close (a likely typo)."""
    hint = difflib.get_close_matches(str(loc[-1]), _section_keys(root, loc), n=1)
    return hint[0] if hint else None


def _allowed(error: dict[str, Any]) -> str:
    """pydantic's 'Input should be …' as 'must be …', with plainer words for list/section types."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "tuple_type":
        return "must be a list, e.g. [64, 64]"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length', 1)} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a section (a mapping of keys)"
    return error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")


def _describe(root: type[BaseModel], error: dict[str, Any]) -> str:
    """One line for one pydantic error: key, bad value, what is allowed."""
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "missing":
        return f"{key}: missing; add it (params.yaml's comments list every key)"
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in loc[:-1])
        hint = _meant(root, loc)
        guess = f" (did you mean {hint!r}?)" if hint else ""
        return f"{key}: unknown key{guess}; allowed in {section or 'the top level'}: {', '.join(_section_keys(root, loc))}"
    bad = (error.get("ctx") or {}).get("error")
    if isinstance(bad, InvalidValue):
        full = ".".join(filter(None, [key, bad.key]))
        return f"{full}: got {show(bad.value)}; {bad.allowed}"
    return f"{key}: got {show(error.get('input'))}; {_allowed(error)}"


def describe(root: type[BaseModel], errors: list[Any]) -> list[str]:
    """One line per mistake in a validation of `root`; a renamed key (`lrr:` for `lr:`) is one mistake, not two.

    For a rename keep 'unknown key, did you mean' and drop the 'missing' it also causes.
    """
    extra = [tuple(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    meant = {loc[:-1] + (hint,) for loc in extra if (hint := _meant(root, loc))}
    lines = [clip(_describe(root, e)) for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in meant)]
    if len(lines) > MAX_PROBLEMS:
        lines[MAX_PROBLEMS - 1:] = [f"... and {len(lines) - MAX_PROBLEMS + 1} more"]
    return lines
