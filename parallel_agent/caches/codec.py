"""JSON encoding for cache values; a closed tag allowlist brings known models (a Task) back.

Data never names a class to import: a stored value can only pick one of the tags that code
registered with `register_type` (the engine registers `Task` as "task"), so whatever someone
writes into the cache cannot make a reader construct arbitrary objects.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

from parallel_agent.jsonl import dumps, loads

TAG = "__pagent_type__"

_TYPES: dict[str, type[BaseModel]] = {}
_TAGS: dict[type[BaseModel], str] = {}


def register_type(tag: str, model: type[BaseModel]) -> None:
    """Let `model` instances round-trip through the cache under `tag` (idempotent)."""
    known = _TYPES.get(tag)
    if known is not None and known is not model:
        raise ValueError(f"cache type tag '{tag}' is already used by {known.__name__}")
    _TYPES[tag] = model
    _TAGS[model] = tag


def _default(value: Any) -> Any:
    tag = _TAGS.get(type(value))
    if tag is not None:
        return {TAG: tag, "data": value.model_dump(mode="json")}
    raise TypeError(f"cannot store a {type(value).__name__} in the cache (values are JSON)")


def encode(value: Any, *, sort_keys: bool = False) -> bytes:
    """Serialize a value as JSON; registered models are tagged, anything else must be JSON."""
    return dumps(value, default=_default, option=orjson.OPT_SORT_KEYS if sort_keys else 0)


def _revive(value: Any) -> Any:
    if isinstance(value, dict):
        tag = value.get(TAG)
        model = _TYPES.get(tag) if isinstance(tag, str) and len(value) == 2 else None
        if model is not None and "data" in value:
            return model.model_validate(value["data"])
        return {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


def decode(raw: bytes | str | None) -> Any:
    """Inverse of `encode`; None stays None. Only walks the value when a tag may be inside."""
    if raw is None:
        return None
    value = loads(raw)
    marker: Any = TAG.encode() if isinstance(raw, bytes) else TAG
    return _revive(value) if marker in raw else value
