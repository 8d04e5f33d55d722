"""Group-by with named, mergeable reducers (`use: aggregate` with `compute:`).

Each chunk's outputs are reduced to a *partial* where the chunk is processed (in the worker process
with `processes: N`), committed with the chunk under its fencing token, and the aggregate node only
merges partials: one pass, memory in the number of groups. Every reducer state is plain JSON
(encoded by `parallel_agent.jsonl`, so integers past 64 bits and Decimals stay exact), and merging
partials in input order gives the same answer whatever the chunk size:

- integer sums are Python ints; float sums are kept exact (as a few floats whose exact sum is the
  sum, `math.fsum` style) and rounded once at the end, so they do not depend on the chunking;
- Decimals (numbers a double cannot hold as written) add up exactly, with integers too; a group
  mixing them with floats is an error rather than a rounded sum;
- groups come out in the order their first record came in the input.

No asyncio here: worker processes import this module.
"""

from __future__ import annotations

import bisect
import contextlib
import decimal
import gc
import json
import math
import operator
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from functools import cached_property
from itertools import chain
from typing import Any

import orjson

from parallel_agent.jsonl import (
    EXACT_CONTEXT,
    PlainLines,
    dumps,
    exact_number,
    loads,
    not_finite,
    plain_lines,
)

#: Values `collect` keeps per group unless told otherwise.
COLLECT_LIMIT = 1000

REDUCERS = (
    "count",
    "count_if",
    "sum",
    "mean",
    "min",
    "max",
    "first",
    "last",
    "count_distinct",
    "collect",
    "function",
)


class GroupingError(Exception):
    """A key or reducer could not be computed for a record (its message names the record)."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _encode(value: Any) -> str:
    """A value as canonical JSON text (the group key form): 1, 1.0, true and "1" differ. A
    Decimal is written as it reads back: Decimal("0.50") (say from `round()`) as 0.5, the
    float it equals, so the two are one group, as they are one value in the output."""
    text = dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    if _holds_decimal(value):
        text = dumps(loads(text), option=orjson.OPT_SORT_KEYS).decode()
    return text


def _holds_decimal(value: Any) -> bool:
    if isinstance(value, Decimal):
        return True
    if isinstance(value, list | tuple):
        return any(map(_holds_decimal, value))
    if isinstance(value, dict):
        return any(map(_holds_decimal, value.values()))
    return False


# -- reducers -------------------------------------------------------------------------------


#: What a partial holds in place of a state it shares with an earlier column (a mean with the
#: sum of the same field): the merger fills it in. Partials stored by earlier versions hold null
#: there, which the merger ignores alike.
SHARED = 0


class Reducer:
    """`of(values)` reduces one chunk's values of a group to a state, `merge` combines two states
    (the first from earlier records), `result` gives the output value. Values never include a
    missing field or null (those are skipped and counted)."""

    needs_values = True
    in_any_order = False
    """True when states merged in any order give the same result, so that a split's workers may
    each merge the chunks they reduced (`RunningTotal`)."""

    def of(self, values: list[Any]) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def result(self, state: Any) -> Any:
        return state

    def notice(self, states: Sequence[Any]) -> str | None:
        """Something the user should know about the result (a truncated collect)."""
        return None


class Count(Reducer):
    in_any_order = True

    def of(self, values: list[Any]) -> Any:
        return len(values)

    merge = staticmethod(operator.add)  # type: ignore[assignment]


class CountIf(Count):
    def of(self, values: list[Any]) -> Any:
        return sum(1 for value in values if value)


def _exact_parts(values: Sequence[float]) -> tuple[int, list[float]]:
    """A whole multiple of 2**1023 (an int, 0 unless the sum is past the float range) and
    floats, whose exact sum is the exact sum of `values`: the correctly rounded sum, then the
    rounding error of that, and so on until nothing is left (each step is `math.fsum`, exact
    over its inputs; a few steps at most). Non-finite sums are kept as they are, an infinity
    minus an infinity as a NaN (the result then fails the run, whatever the chunking)."""
    try:
        total = math.fsum(values)
    except ValueError:  # inf - inf
        return 0, [math.nan]
    except OverflowError:  # a step past the float range, though the total may be in it
        if not all(map(math.isfinite, values)):
            return 0, [_not_finite_sum(values)]
        return _fraction_parts(values)
    parts = [total]
    if not math.isfinite(total):
        return 0, parts
    rest = [*values, -total]
    try:
        while True:
            error = math.fsum(rest)
            if error == 0.0:
                return 0, parts
            parts.append(error)
            rest.append(-error)
    except OverflowError:
        return _fraction_parts(values)


#: The largest power of two a float holds: the whole multiple of it a sum past the float range
#: holds is kept as an int.
_BIG = Fraction(2**1023)
_FLOAT_MAX = Fraction(sys.float_info.max)


def _fraction_parts(values: Sequence[float]) -> tuple[int, list[float]]:
    """`_exact_parts` by exact rational arithmetic, for sums whose steps leave the float range
    (`math.fsum([1e308, 1e308, -1e308])` refuses, though the sum is 1e308). A sum past the
    range itself keeps its whole 2**1023s as an int (a state's integer total), so a chunk's
    partial of [1e308, 1e308] still merges with one of -1e308 to 1e308, exactly, however many
    such partials come and in whatever order. Every float is a multiple of the smallest one,
    so each remainder is too, and the loop ends."""
    exact = sum(map(Fraction, values), Fraction(0))
    whole = 0
    if abs(exact) > _FLOAT_MAX:
        count = int(abs(exact) // _BIG)
        whole = (count if exact > 0 else -count) * 2**1023
        exact -= whole
    parts: list[float] = []
    while exact:
        part = float(exact)
        parts.append(part)
        exact -= Fraction(part)
    return whole, parts or [0.0]


def _not_finite_sum(values: Sequence[float]) -> float:
    """The sum of floats among which is an infinity or a NaN: that of those alone (an infinity,
    or a NaN for inf - inf). The finite ones cannot change it, and adding them too could
    overflow into a NaN, or not, depending on the order of merging."""
    try:
        return math.fsum(value for value in values if not math.isfinite(value))
    except ValueError:  # inf - inf
        return math.nan


_MIXED = "cannot add floats and Decimals without rounding (convert one kind with float())"


def _decimal_total(state: Any) -> Decimal | None:
    """The exact sum of a state's Decimals (its fifth element, as text), None when it has none."""
    return Decimal(state[4]) if len(state) > 4 else None


class Sum(Reducer):
    """State: [integer total, floats whose exact sum is the float total, floats seen, n] and,
    once a Decimal was seen, the exact total of the Decimals as text. (A float total past the
    float range keeps its whole 2**1023s in the integer total.) Every total is exact, so
    the result is rounded once (floats) or not at all (ints, Decimals), whatever the chunking."""

    in_any_order = True  # exact totals: the order of the additions cannot show

    def of(self, values: list[Any]) -> Any:
        kinds = set(map(type, values))
        if bool in kinds:  # JSON's true is not 1: count them with count_if
            raise TypeError("needs numbers, got bool")
        if kinds <= {int}:
            return [sum(values), [], 0, len(values)]
        if kinds == {float}:
            return _float_sum(values)
        if not kinds <= {int, float, Decimal}:
            odd = next(kind for kind in kinds if kind not in (int, float, Decimal))
            raise TypeError(f"needs numbers, got {odd.__name__}")
        if Decimal in kinds:
            if float in kinds:
                raise TypeError(_MIXED)
            with decimal.localcontext(EXACT_CONTEXT):
                exact = sum((value for value in values if type(value) is Decimal), Decimal(0))
            ints = sum(value for value in values if type(value) is not Decimal)
            return [ints, [], 0, len(values), str(exact)]
        floats = [value for value in values if type(value) is float]
        ints = sum(value for value in values if type(value) is not float)
        whole, parts = _exact_parts(floats)
        return [ints + whole, parts, len(floats), len(values)]

    def merge(self, a: Any, b: Any) -> Any:
        floats = a[1] + b[1]
        whole = 0
        if len(floats) > 4:
            if all(map(math.isfinite, floats)):
                whole, floats = _exact_parts(floats)
            else:
                floats = [_not_finite_sum(floats)]
        merged = [a[0] + b[0] + whole, floats, a[2] + b[2], a[3] + b[3]]
        if len(a) == 4 and len(b) == 4:  # no Decimals: the common case, kept cheap
            return merged
        exact_a, exact_b = _decimal_total(a), _decimal_total(b)
        if merged[2]:
            raise TypeError(_MIXED)
        with decimal.localcontext(EXACT_CONTEXT):
            return [*merged, str((exact_a or Decimal(0)) + (exact_b or Decimal(0)))]

    def total(self, state: Any, divisor: int = 1) -> Any:
        ints, floats, seen = state[0], state[1], state[2]
        decimals = _decimal_total(state)
        if decimals is not None:
            with decimal.localcontext(EXACT_CONTEXT):
                return _exact_quotient(decimals + ints, divisor)
        if not seen:
            if divisor == 1:
                return ints
            try:
                return ints / divisor
            except OverflowError:  # a mean of integers past the float range: exact, as a Decimal
                with decimal.localcontext(EXACT_CONTEXT):
                    return _exact_quotient(Decimal(ints), divisor)
        if not all(map(math.isfinite, floats)):
            return _not_finite_sum(floats) / divisor
        if not ints and divisor < 2**53:
            # The exact sum as one float if it is one: then IEEE division (the divisor is exact
            # as a float) is correctly rounded, as the Fraction below would be, and far cheaper.
            # `+ 0.0`: a zero sum is 0.0, as from the Fraction, never -0.0.
            whole, parts = _exact_parts(floats) if len(floats) > 1 else (0, floats)
            if not whole and len(parts) == 1:
                return parts[0] / divisor + 0.0
            if not whole and divisor == 1:
                with contextlib.suppress(OverflowError):  # past the range: the Fraction says so
                    return math.fsum(parts) + 0.0  # correctly rounded, as exact as the Fraction
        exact = Fraction(ints) + sum(map(Fraction, floats))
        try:
            return float(exact / divisor)
        except OverflowError:  # past the float range: an infinity, which fails the run, named
            return math.inf if exact > 0 else -math.inf

    def result(self, state: Any) -> Any:
        return self.total(state) if state[3] else None


def _exact_quotient(total: Decimal, divisor: int) -> Decimal:
    """`total` / `divisor`: exact when the quotient ends, else rounded (half even) to the total's
    significant digits plus 20, never fewer than 34 (a mean is the one result that may round,
    as a float mean does)."""
    if divisor == 1:
        return total
    try:
        with decimal.localcontext(EXACT_CONTEXT):
            return total / divisor
    except decimal.Inexact:
        context = EXACT_CONTEXT.copy()
        context.prec = max(34, len(total.as_tuple().digits) + 20)
        context.clear_traps()
        with decimal.localcontext(context):
            return total / divisor


class Mean(Sum):
    def result(self, state: Any) -> Any:
        return self.total(state, state[3]) if state[3] else None


class Extreme(Reducer):
    def __init__(self, pick: Callable[..., Any]) -> None:
        self.pick = pick

    def of(self, values: list[Any]) -> Any:
        return self.pick(values) if values else None

    def merge(self, a: Any, b: Any) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        return self.pick(a, b)


class First(Reducer):
    def of(self, values: list[Any]) -> Any:
        return [values[0]] if values else None

    def merge(self, a: Any, b: Any) -> Any:
        return a if a is not None else b

    def result(self, state: Any) -> Any:
        return None if state is None else state[0]


class Last(First):
    def of(self, values: list[Any]) -> Any:
        return [values[-1]] if values else None

    def merge(self, a: Any, b: Any) -> Any:
        return b if b is not None else a


class CountDistinct(Reducer):
    """State: the distinct values as sorted JSON texts (a set while merging)."""

    def of(self, values: list[Any]) -> Any:
        return sorted({_encode(value) for value in values})

    def merge(self, a: Any, b: Any) -> Any:
        merged = a if isinstance(a, set) else set(a)
        merged.update(b)
        return merged

    def result(self, state: Any) -> Any:
        return len(state)


class Collect(Reducer):
    """State: [the first `limit` values, how many there were]."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def of(self, values: list[Any]) -> Any:
        return [values[: self.limit], len(values)]

    def merge(self, a: Any, b: Any) -> Any:
        kept = a[0]
        if len(kept) < self.limit:
            kept.extend(b[0][: self.limit - len(kept)])
        return [kept, a[1] + b[1]]

    def result(self, state: Any) -> Any:
        return state[0]

    def notice(self, states: Sequence[Any]) -> str | None:
        over = [state for state in states if state[1] > self.limit]
        if not over:
            return None
        return (
            f"kept the first {self.limit} values in {len(over)} group(s) "
            f"(up to {max(state[1] for state in over)} values; raise `limit` to keep more)"
        )


class UserReducer(Reducer):
    """`function:` an object with init() / add(state, value) / merge(a, b) [/ result(state)],
    whose states are JSON; or a plain function of a group's values (kept whole: small groups)."""

    def __init__(self, target: Any, reference: str) -> None:
        self.target = target
        self.reference = reference
        self.mergeable = all(hasattr(target, name) for name in ("init", "add", "merge"))
        if not self.mergeable and not callable(target):
            raise GroupingError(
                f"'{reference}' is neither callable nor an object with init, add and merge"
            )

    def of(self, values: list[Any]) -> Any:
        if not self.mergeable:
            return list(values)
        state = self.target.init()
        for value in values:
            state = self.target.add(state, value)
        return self._json(state, "state")

    def merge(self, a: Any, b: Any) -> Any:
        if not self.mergeable:
            a.extend(b)
            return a
        return self._json(self.target.merge(a, b), "merged state")

    def result(self, state: Any) -> Any:
        if not self.mergeable:
            return self._json(self.target(state), "result")
        finish = getattr(self.target, "result", None)
        return self._json(finish(state), "result") if callable(finish) else state

    def _json(self, value: Any, what: str) -> Any:
        """`value`, which must be JSON (states are stored and merged elsewhere): a set or bytes
        is an error naming the function, not orjson's words at the chunk's commit."""
        try:
            dumps(value)
        except TypeError as exc:
            raise TypeError(f"{self.reference} gave a {what} that is not JSON: {exc}") from None
        return value


# -- the grouper ----------------------------------------------------------------------------

_QUICK_KINDS = frozenset({"count", "sum", "mean", "min", "max"})


def _group(keys: Iterable[Any], values: Iterable[Any]) -> dict[Any, list[Any]]:
    """{key: the values that came with it}, keys in first-seen order (`values`: positions, or a
    field's values, as many as `keys`); the one pass over the records every grouping runs, at C
    speed: each value is appended to its key's list, which the defaultdict makes on first sight."""
    groups: defaultdict[Any, list[Any]] = defaultdict(list)
    deque(map(list.append, map(groups.__getitem__, keys), values), maxlen=0)
    return dict(groups)


def _grouped(keys: list[Any], values: dict[str, list[Any]]) -> tuple[dict[Any, list[Any]], bool]:
    """({key: its group}, in first-seen order) and whether a group is its values (one value
    field: the cheapest pass) rather than its positions."""
    by_values = len(values) == 1
    column = next(iter(values.values())) if by_values else range(len(keys))
    return _group(keys, column), by_values


def _group_values(
    found: list[list[Any]], column: list[Any], by_values: bool
) -> Iterable[Sequence[Any]]:
    """Each group's values of `column`."""
    if by_values:
        return found
    return (
        (column[positions[0]],) if len(positions) == 1 else operator.itemgetter(*positions)(column)
        for positions in found
    )


def _one_number_type(values: Iterable[Any]) -> bool:
    """True when `values` are all ints or all floats (the quick partial's condition)."""
    kinds = set(map(type, values))
    return kinds == {float} or kinds == {int}


def _float_sum(values: Sequence[float]) -> list[Any]:
    """Sum.of's state of floats."""
    whole, parts = _exact_parts(values)
    return [whole, parts, len(values), len(values)]


def _int_sum(values: Sequence[int]) -> list[Any]:
    """Sum.of's state of ints."""
    return [sum(values), [], 0, len(values)]


#: The state `of` gives a group's values, by reducer and the type of every value.
_QUICK_STATE: dict[tuple[str, type], Callable[[Sequence[Any]], Any]] = {
    ("sum", float): _float_sum,
    ("sum", int): _int_sum,
    ("mean", float): _float_sum,
    ("mean", int): _int_sum,
    ("min", float): min,
    ("min", int): min,
    ("max", float): max,
    ("max", int): max,
}


def _str_key_texts(keys: Iterable[str]) -> list[str]:
    """`_key_text` of each string key, with one C-level encode each; TypeError for a lone
    surrogate (the callers name its record)."""
    return ["[" + text.decode() + "]" for text in map(orjson.dumps, keys)]


def _key_text(value: Any) -> str:
    return _encode([value])


Evaluate = Callable[[dict[str, Any]], Any]


@dataclass
class _Column:
    """One named reducer and where its values come from (a field, an expression, or the item)."""

    name: str
    kind: str
    reducer: Reducer
    field: str | None = None
    evaluate: Evaluate | None = None


def _compile(expr: str, what: str) -> Evaluate:
    from parallel_agent.conditions import compile_expression  # asteval: only where used

    return compile_expression(expr, what=what).evaluate


def _import(reference: str, what: str) -> Any:
    from parallel_agent.modules.loading import import_object

    return import_object(reference, what=what)


_BUILTIN: dict[str, Callable[[], Reducer]] = {
    "count": Count,
    "sum": Sum,
    "mean": Mean,
    "min": lambda: Extreme(min),
    "max": lambda: Extreme(max),
    "first": First,
    "last": Last,
    "count_distinct": CountDistinct,
}


def _kind(spec: dict[str, Any], here: str) -> str:
    """The one reducer a `compute:` mapping names, checking its other keys."""
    kinds = [key for key in spec if key in REDUCERS]
    if len(kinds) != 1:
        raise GroupingError(f"{here}: name exactly one reducer of {', '.join(REDUCERS)}")
    kind = kinds[0]
    allowed = {kind, "limit"} if kind == "collect" else {kind}
    if kind == "function":
        allowed |= {"field", "expr"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise GroupingError(f"{here}: unknown key '{extra[0]}'")
    return kind


def _source(column: _Column, source: Any, here: str) -> _Column:
    """Where a reducer's values come from: a field, `{expr: ...}`, or (function) the item."""
    if isinstance(source, dict) and set(source) == {"expr"} and isinstance(source["expr"], str):
        column.evaluate = _compile(source["expr"], f"{here} ({column.kind})")
    elif isinstance(source, str) and source:
        column.field = source
    elif not (source is None and column.kind == "function"):
        raise GroupingError(f"{here}: {column.kind} takes a field name or {{expr: ...}}")
    return column


def parse_reducer(name: str, spec: Any, what: str) -> _Column:
    """A `compute:` entry: `count`, `{count_if: EXPR}`, `{KIND: FIELD}`, `{KIND: {expr: E}}`,
    `{collect: FIELD, limit: N}` or `{function: pkg.mod:obj, field|expr: ...}`."""
    here = f"{what}, compute '{name}'"
    if spec == "count":
        return _Column(name, "count", Count())
    if not isinstance(spec, dict):
        raise GroupingError(f"{here}: give count or a mapping like {{sum: field}}")
    kind = _kind(spec, here)
    argument = spec[kind]
    if kind == "count_if":
        if not isinstance(argument, str):
            raise GroupingError(f"{here}: count_if takes an expression over item")
        return _Column(name, kind, CountIf(), evaluate=_compile(argument, f"{here} (count_if)"))
    if kind == "function":
        if not isinstance(argument, str):
            raise GroupingError(f"{here}: function takes 'package.module:object'")
        reducer: Reducer = UserReducer(_import(argument, here), argument)
        source: Any = {"expr": spec["expr"]} if "expr" in spec else spec.get("field")
        return _source(_Column(name, kind, reducer), source, here)
    if kind == "collect":
        limit = spec.get("limit", COLLECT_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise GroupingError(f"{here}: limit must be an integer >= 1")
        return _source(_Column(name, kind, Collect(limit)), argument, here)
    return _source(_Column(name, kind, _BUILTIN[kind]()), argument, here)


def parse_keys(group_by: Any, what: str) -> list[tuple[str, str | None, Evaluate | None]]:
    """`group_by`: a field, a list of fields, or a mapping of key names to expressions."""
    if group_by is None:
        return []
    if isinstance(group_by, str):
        return [(group_by, group_by, None)]
    if isinstance(group_by, list) and all(isinstance(f, str) for f in group_by):
        return [(f, f, None) for f in group_by]
    if isinstance(group_by, dict) and all(isinstance(e, str) for e in group_by.values()):
        return [
            (name, None, _compile(expr, f"{what}, group_by '{name}'"))
            for name, expr in group_by.items()
        ]
    raise GroupingError(f"{what}: group_by is a field, a list of fields or {{name: expression}}")


@dataclass
class Grouper:
    """Computes and merges the partials of one aggregate node."""

    what: str
    keys: list[tuple[str, str | None, Evaluate | None]]
    columns: list[_Column]
    params: dict[str, Any] = field(default_factory=dict)
    sort_by: list[str] = field(default_factory=list)
    descending: bool = False
    top: int | None = None

    @classmethod
    def from_options(
        cls, options: dict[str, Any], what: str, params: dict[str, Any] | None = None
    ) -> Grouper:
        compute = options.get("compute") or {}
        return cls(
            what=what,
            keys=parse_keys(options.get("group_by"), what),
            columns=[parse_reducer(name, spec, what) for name, spec in compute.items()],
            params=dict(params or {}),
            sort_by=_as_list(options.get("sort_by")),
            descending=bool(options.get("descending")),
            top=options.get("top"),
        )

    # -- per chunk --

    def _names(self, item: Any, number: int) -> dict[str, Any]:
        return {"item": item, "index": number - 1, "record": number, "params": self.params}

    def _key(self, item: Any, number: int) -> str:
        values = []
        for name, field_name, evaluate in self.keys:
            if evaluate is not None:
                try:
                    values.append(evaluate(self._names(item, number)))
                except Exception as exc:
                    raise GroupingError(
                        f"{self.what}: record {number}: group_by '{name}': {_describe(exc)}"
                    ) from None
            else:
                values.append(self._field(item, field_name or name, number))
        try:
            text = _encode(values)
        except TypeError as exc:
            raise self._unwritable_key(values, number, str(exc)) from None
        # orjson writes a NaN or an infinity (an expression's) as null: that key would join the
        # null group. Only then is the key looked at closer.
        if "null" in text and not_finite(values):
            raise self._unwritable_key(values, number, "a NaN or infinity")
        return text

    def _unwritable_key(self, key: list[Any], number: int, why: str) -> GroupingError:
        """A key JSON text cannot hold (a string with a lone surrogate, a set, a NaN or an
        infinity): named with its record, as every other key error is, instead of failing the
        chunk with orjson's words or joining the null group."""
        names = ", ".join(name for name, _, _ in self.keys)
        shown = ascii(key[0] if len(key) == 1 else key)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return GroupingError(
            f"{self.what}: record {number}: group_by '{names}' is {shown}, which JSON cannot "
            f"hold ({why})"
        )

    def _field(self, item: Any, name: str, number: int) -> Any:
        if type(item) is not dict:
            raise GroupingError(
                f"{self.what}: record {number}: field '{name}' needs object results, "
                f"got {type(item).__name__}"
            )
        return item.get(name)

    def partial(self, items: Sequence[Any], numbers: Sequence[int]) -> dict[str, Any]:
        """The partial of one chunk's outputs (`numbers`: their input record numbers)."""
        quick = self._quick_partial(items)
        return quick if quick is not None else self._general_partial(items, numbers)

    def _general_partial(self, items: Sequence[Any], numbers: Sequence[int]) -> dict[str, Any]:
        fields: dict[str, list[Any]] = {}  # a field's value in every item, read once
        groups = self._groups(items, numbers, fields)
        skipped = [0] * len(self.columns)
        same_state = self.same_states()
        rows = []
        for key, positions in groups.items():
            states: list[Any] = []
            picked: dict[str, list[Any]] = {}  # one field's values, shared by its reducers
            for index, column in enumerate(self.columns):
                values = self._values(column, items, numbers, positions, picked, fields)
                skipped[index] += len(positions) - len(values)
                if same_state[index] is not None:  # stored once: the merger fills it in
                    states.append(SHARED)
                    continue
                try:
                    states.append(column.reducer.of(values))
                except Exception as exc:
                    raise GroupingError(
                        f"{self.what}: compute '{column.name}' ({column.kind}) on records "
                        f"{numbers[positions[0]]}-{numbers[positions[-1]]}: {_describe(exc)}"
                    ) from None
            rows.append([key, states])
        return {"groups": rows, "skipped": skipped}

    @cached_property
    def _quick_columns(self) -> list[tuple[str, str | None]] | None:
        """(kind, field) of every column when the key is one field and each column a plain
        count or a sum, mean, min or max of a field: the shape `_quick_partial` handles."""
        if len(self.keys) != 1 or self.keys[0][2] is not None:
            return None
        found: list[tuple[str, str | None]] = []
        if not self.columns:
            return None
        for column in self.columns:
            if column.evaluate is not None or column.kind not in _QUICK_KINDS:
                return None
            if (column.kind == "count") != (column.field is None):
                return None  # a count of a field skips nulls: the general path
            found.append((column.kind, column.field))
        return found

    def _quick_partial(self, items: Sequence[Any]) -> dict[str, Any] | None:
        """`partial` of the common case, with C-level passes where it can: objects with a
        string key and numeric fields each all ints or all floats, checked once per chunk
        rather than per group. Anything else (None) takes the general path, which gives the
        same partial for this case and names the record for every error."""
        columns = self._quick_columns
        if columns is None or not items:
            return None
        read = self._quick_read(items, columns)
        if read is None:
            return None
        keys, values = read
        if type(keys[0]) is not str:  # an int or null key field: no grouping pass to waste
            return None
        try:
            groups, by_values = _grouped(keys, values)
        except TypeError:  # an unhashable key
            return None
        found = list(groups.values())
        fields = {
            name: list(_group_values(found, column, by_values)) for name, column in values.items()
        }
        return self._quick_rows(columns, groups, [len(group) for group in found], fields)

    def lines_partial(self, plain: PlainLines) -> dict[str, Any] | None:
        """`_quick_partial` of the records of JSON Lines that `jsonl.plain_lines` cleared,
        each record parsed and put in its group at once, then dropped.

        Record by record, each record is read while it is in the processor's cache; parsing
        the whole chunk first and then reading every record again from memory took a quarter
        more time. Where the text allows (`PlainLines.skippable`), msgspec reads only the key
        and the fields the reducers need into a small struct, skipping the rest: 8.0 ms ->
        4.4 ms per 20,000 records of three fields, against orjson building every record's dict.
        None (a line that is not JSON, a record of another shape) leaves the chunk to the
        general path."""
        columns = self._quick_columns
        if columns is None or not plain.lines:
            return None
        try:
            groups = self._read_groups(plain)
        # Not JSON (orjson's and msgspec's errors are ValueErrors), a missing field (KeyError,
        # or msgspec's), not an object (TypeError, or msgspec's).
        except (ValueError, KeyError, TypeError):
            return None
        found: list[Sequence[Any]] = list(groups.values())
        names = self._quick_fields
        fields: dict[str, list[Sequence[Any]]]
        if len(names) <= 1:  # a group is its field's values (or, for counts alone, its keys)
            fields = dict.fromkeys(names, found)
        else:
            by_group = [list(zip(*group, strict=True)) for group in found]
            fields = {
                name: [group[index] for group in by_group] for index, name in enumerate(names)
            }
        if not all(
            _one_number_type(chain.from_iterable(per_group)) for per_group in fields.values()
        ):
            return None
        return self._quick_rows(columns, groups, [len(group) for group in found], fields)

    @cached_property
    def _quick_key(self) -> str:
        """The field of the quick shape's one key."""
        return self.keys[0][1] or self.keys[0][0]

    @cached_property
    def _quick_fields(self) -> list[str]:
        """The fields the quick shape's reducers read, each once, in `compute` order."""
        columns = self._quick_columns or []
        return list(dict.fromkeys(name for _, name in columns if name is not None))

    def _read_groups(self, plain: PlainLines) -> dict[Any, list[Any]]:
        """{key: the values of the reducers' field (a tuple of them for several fields, the
        key for counts alone) in each of its records}, in first-seen order. The loops name
        the attributes they read: a call per record to fetch them cost a fifth of the loop."""
        groups: defaultdict[Any, list[Any]] = defaultdict(list)
        struct = self._record_struct if plain.skippable else None
        if struct is not None:
            decode, pick = struct
            if pick is None:
                for record in map(decode, plain.lines):
                    groups[record.key].append(record.value)
            else:
                for record in map(decode, plain.lines):
                    groups[record.key].append(pick(record))
            return groups
        key_name = self._quick_key
        take = operator.itemgetter(*self._quick_fields or [key_name])
        for record in map(orjson.loads, plain.lines):
            groups[record[key_name]].append(take(record))
        return groups

    @cached_property
    def _record_struct(self) -> tuple[Callable[[bytes], Any], Callable[[Any], Any] | None] | None:
        """msgspec's reading of a line into a struct of the key (`key`) and the reducers'
        fields alone, and how to take the fields from it: None when they are one field other
        than the key (`value`). None for a field name msgspec cannot match (with a quote, a
        backslash or a control character)."""
        import msgspec

        key_name = self._quick_key
        names = [name for name in self._quick_fields if name != key_name]
        if len(names) == 1 and len(self._quick_fields) == 1:
            attributes = {key_name: "key", names[0]: "value"}
        else:
            attributes = {key_name: "key"} | {name: f"f{i}" for i, name in enumerate(names)}
        try:
            record = msgspec.defstruct(
                "QuickRecord",
                [
                    (attribute, Any, msgspec.field(name=name))
                    for name, attribute in attributes.items()
                ],
                gc=False,  # nothing a record holds refers back to it: never in a cycle
            )
        except ValueError:
            return None
        decode = msgspec.json.Decoder(record).decode
        if "value" in attributes.values():
            return decode, None
        fields = self._quick_fields or [key_name]
        return decode, operator.attrgetter(*(attributes[name] for name in fields))

    def _quick_rows(
        self,
        columns: list[tuple[str, str | None]],
        groups: dict[Any, Any],
        counts: list[int],
        fields: dict[str, list[Sequence[Any]]],
    ) -> dict[str, Any] | None:
        """The quick partial of `groups` (keys in first-seen order), given each group's record
        count and {field: each group's values of it} (each field all ints or all floats)."""
        # Only strings are grouped as they are: an int key would meet an equal float or bool.
        # A key of another type would be a group of its own (no str equals it), so checking
        # the groups' keys checks every record's.
        if set(map(type, groups)) != {str}:
            return None
        same_state = self.same_states()
        per_column: list[Iterable[Any]] = []
        try:
            for index, (kind, name) in enumerate(columns):
                if kind == "count":
                    per_column.append(counts)
                elif same_state[index] is not None:  # a mean sharing a sum's state: stored once
                    per_column.append([SHARED] * len(counts))
                else:
                    per_group = fields[name or ""]
                    state = _QUICK_STATE[kind, type(per_group[0][0])]
                    per_column.append(list(map(state, per_group)))
        except (ArithmeticError, ValueError):  # inf - inf, an overflowing sum: named there
            return None
        try:
            texts = _str_key_texts(groups)
        except TypeError:  # a lone surrogate: the general path names its record
            return None
        states = zip(*per_column, strict=True)
        rows = [[key, list(row)] for key, row in zip(texts, states, strict=True)]
        return {"groups": rows, "skipped": [0] * len(columns)}

    def _quick_read(
        self, items: Sequence[Any], columns: list[tuple[str, str | None]]
    ) -> tuple[list[Any], dict[str, list[Any]]] | None:
        """The key of every item and {field: its value in every item}, read in C; None unless
        every item is an object and each field's values are all ints or all floats."""
        key_name = self._quick_key
        values: dict[str, list[Any]] = {}
        try:
            keys = list(map(operator.itemgetter(key_name), items))
            for _, name in columns:
                if name is not None and name not in values:
                    values[name] = list(map(operator.itemgetter(name), items))
        except (KeyError, TypeError):  # an item that is not an object, or lacks a field
            return None
        if not all(map(_one_number_type, values.values())):
            return None
        return keys, values

    def same_states(self) -> list[int | None]:
        """For each column, an earlier column whose per-chunk state it shares (a sum and a mean
        of the same field have the same state), or None."""
        found: list[int | None] = []
        first: dict[str, int] = {}
        for index, column in enumerate(self.columns):
            if column.kind in ("sum", "mean") and column.field is not None:
                found.append(first.setdefault(column.field, index))
                if found[-1] == index:
                    found[-1] = None
            else:
                found.append(None)
        return found

    def _groups(
        self, items: Sequence[Any], numbers: Sequence[int], fields: dict[str, list[Any]]
    ) -> dict[str, list[int]]:
        """Positions of the items of each group, groups in first-seen order, by key text."""
        if not self.keys:
            return {"[]": list(range(len(items)))} if items else {}
        if len(self.keys) == 1 and self.keys[0][2] is None:
            name = self.keys[0][1] or self.keys[0][0]
            column = self._column(items, numbers, name, fields)
            try:
                return self._groups_by_field(column)
            except TypeError:  # find the record whose key JSON text cannot hold, and name it
                for position, value in enumerate(column):
                    try:
                        _key_text(value)
                    except TypeError as exc:
                        raise self._unwritable_key([value], numbers[position], str(exc)) from None
                raise
        keys = [self._key(item, numbers[position]) for position, item in enumerate(items)]
        return _group(keys, range(len(items)))

    def _column(
        self, items: Sequence[Any], numbers: Sequence[int], name: str, fields: dict[str, list[Any]]
    ) -> list[Any]:
        """Field `name` of every item (None where missing), in one pass; `fields` keeps it."""
        found = fields.get(name)
        if found is None:
            try:
                found = fields[name] = [item.get(name) for item in items]
            except AttributeError:
                for position, item in enumerate(items):
                    self._field(item, name, numbers[position])
                raise
        return found

    def _groups_by_field(self, values: list[Any]) -> dict[str, list[int]]:
        """The common case, one field: strings are grouped as they are and encoded once per
        group; other values by their JSON text (so 1, 1.0 and true stay apart)."""
        positions = range(len(values))
        if set(map(type, values)) == {str}:
            groups = _group(values, positions)
            return dict(zip(_str_key_texts(groups), groups.values(), strict=True))
        return _group(map(_key_text, values), positions)

    def _values(
        self,
        column: _Column,
        items: Sequence[Any],
        numbers: Sequence[int],
        positions: list[int],
        picked: dict[str, list[Any]],
        fields: dict[str, list[Any]],
    ) -> list[Any]:
        if column.kind == "count" and column.field is None and column.evaluate is None:
            return positions
        if column.evaluate is not None:
            values = []
            for position in positions:
                try:
                    value = column.evaluate(self._names(items[position], numbers[position]))
                except Exception as exc:
                    raise GroupingError(
                        f"{self.what}: record {numbers[position]}: compute '{column.name}': "
                        f"{_describe(exc)}"
                    ) from None
                if value is not None or column.kind == "count_if":
                    values.append(value)
            return values
        name = column.field
        if name is None:  # a function over whole items
            return [items[position] for position in positions]
        if name not in picked:
            every = self._column(items, numbers, name, fields)
            if len(positions) == 1:
                raw = [every[positions[0]]]
            else:  # a C-level gather of the group's values
                raw = list(operator.itemgetter(*positions)(every))
            picked[name] = [value for value in raw if value is not None] if None in raw else raw
        return picked[name]

    def encode_partial(self, items: Sequence[Any], numbers: Sequence[int]) -> str:
        return partial_text(self.partial(items, numbers))

    # -- merging --

    def merger(self) -> Merger:
        return Merger(self)

    @cached_property
    def in_any_order(self) -> bool:
        """True when every reducer merges in any order (`Reducer.in_any_order`)."""
        return all(column.reducer.in_any_order for column in self.columns)


@dataclass
class MergedPartials:
    """The partials a split committed with the chunks it queued for one aggregate, merged in
    input order as it queued them (or as its workers' running totals), while its workers were
    still reading.

    A cache of what the store holds, never a second truth: the aggregate takes it only when
    the store says every one of its chunks is done and there are exactly `chunks` of them
    (each then committed by that split, with the partial merged here); else it merges the
    stored partials."""

    merger: Merger
    chunks: int = 0


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class Merger:
    """Merges partials in input order; memory is the number of groups."""

    def __init__(self, grouper: Grouper) -> None:
        self.grouper = grouper
        self.groups: dict[str, list[Any]] = {}
        self.skipped = [0] * len(grouper.columns)
        same_state = grouper.same_states()
        self.shared = [(i, earlier) for i, earlier in enumerate(same_state) if earlier is not None]
        """(column, earlier column) pairs with one state: a partial holds it once (null in the
        later column), the merge combines it once."""
        self.merged = [
            (i, column.reducer.merge)
            for i, column in enumerate(grouper.columns)
            if same_state[i] is None
        ]

    def add(self, partial: dict[str, Any]) -> None:
        groups, shared, merged = self.groups, self.shared, self.merged
        key, index = None, 0
        try:
            for key, states in partial["groups"]:
                current = groups.get(key)
                if current is None:
                    for index, earlier in shared:
                        states[index] = states[earlier]
                    groups[key] = states
                    continue
                for index, merge in merged:
                    current[index] = merge(current[index], states[index])
                for index, earlier in shared:
                    current[index] = current[earlier]
        except Exception as exc:
            column = self.grouper.columns[index]
            raise GroupingError(
                f"{self.grouper.what}: compute '{column.name}' ({column.kind}) for "
                f"group {key}: {_describe(exc)}"
            ) from None
        for index, count in enumerate(partial["skipped"]):
            self.skipped[index] += count

    def add_stored(self, text: bytes | str, node: str) -> bool:
        """Merge `node`'s partial out of a chunk's stored partials; False when they hold none.

        A parsed partial is a tree of some 4,000 lists for 1,000 groups, without a cycle: the
        cyclic collector, left on, would scan it several times over while it is read and merged
        (measured: 39 ms -> 31 ms for 50 such partials), and refcounting frees it anyway."""
        with _collector_paused():
            partial = load_partials(text).get(node)
            if partial is None:
                return False
            self.add(partial)
        return True

    def rows(self) -> list[dict[str, Any]]:
        """One row per group: the key fields, then the reducers, in `compute` order; groups in
        the order of their first record, then `sort_by` and `top`."""
        grouper = self.grouper
        names = [name for name, _, _ in grouper.keys]
        rows = []
        for key, states in self.groups.items():
            row = dict(zip(names, loads(key), strict=True))
            for column, state in zip(grouper.columns, states, strict=True):
                try:
                    row[column.name] = column.reducer.result(state)
                except Exception as exc:
                    raise GroupingError(
                        f"{grouper.what}: compute '{column.name}' ({column.kind}): {_describe(exc)}"
                    ) from None
            rows.append(row)
        if grouper.sort_by:
            rows = self._sorted(rows)
        if grouper.top is not None:
            rows = rows[: grouper.top]
        return rows

    def _sorted(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stable sort on `sort_by`; nulls come last either way."""
        grouper = self.grouper
        for name in reversed(grouper.sort_by):
            present = [row for row in rows if row.get(name) is not None]
            absent = [row for row in rows if row.get(name) is None]
            try:
                present.sort(key=lambda row: row[name], reverse=grouper.descending)
            except TypeError as exc:
                raise GroupingError(f"{grouper.what}: sort_by '{name}': {exc}") from None
            rows = present + absent
        return rows

    def notices(self) -> list[str]:
        """What was skipped (missing fields, nulls) and what was cut (collect past its limit)."""
        grouper = self.grouper
        found = []
        for index, column in enumerate(grouper.columns):
            if self.skipped[index]:
                source = f"'{column.field}'" if column.field else "the expression"
                found.append(
                    f"{grouper.what}: compute '{column.name}' ({column.kind}) skipped "
                    f"{self.skipped[index]} record(s) where {source} was missing or null"
                )
            note = column.reducer.notice([states[index] for states in self.groups.values()])
            if note:
                found.append(f"{grouper.what}: compute '{column.name}' (collect) {note}")
        return found

    def skipped_counts(self) -> dict[str, int]:
        return {
            column.name: self.skipped[index]
            for index, column in enumerate(self.grouper.columns)
            if self.skipped[index]
        }


class RunningTotal:
    """A split worker's merge of the partials of the chunks it reduced (for an aggregate whose
    reducers merge in any order), so that the coordinator merges one total per worker instead
    of every chunk's partial. Each group is dumped with where it was first seen (its chunk's
    first record, and its place among this total's groups, which a worker adds in input
    order): the coordinator puts the groups of several totals back in input order with it."""

    def __init__(self, grouper: Grouper) -> None:
        self.merger = Merger(grouper)
        self.chunks: list[int] = []
        """The first record (0-based) of each chunk merged."""
        self.added: list[int] = []
        """How many groups the total had before each chunk was merged."""

    def add(self, partial: dict[str, Any], first: int) -> None:
        """Merge the partial of the chunk whose first record is `first` (it may take over the
        partial's lists). The chunks must come in input order, or a group's first place would
        be wrong: GroupingError (the coordinator then does without this total)."""
        if self.chunks and first <= self.chunks[-1]:
            raise GroupingError(f"chunk at record {first + 1} came after a later one")
        self.added.append(len(self.merger.groups))
        self.merger.add(partial)
        self.chunks.append(first)

    def dump(self) -> dict[str, Any]:
        """The total as plain JSON (`merge_totals` reads it): groups with where they were
        first seen, each state shared by two columns written once."""
        shared = {index for index, _ in self.merger.shared}
        groups = []
        for place, (key, states) in enumerate(self.merger.groups.items()):
            chunk = self.chunks[bisect.bisect_right(self.added, place) - 1]
            kept = [SHARED if i in shared else state for i, state in enumerate(states)]
            groups.append([key, kept, [chunk, place]])
        return {"groups": groups, "skipped": self.merger.skipped, "chunks": self.chunks}


def merge_totals(grouper: Grouper, totals: list[dict[str, Any]]) -> Merger:
    """The merger of several workers' `RunningTotal.dump`s, its groups in input order."""
    merger = Merger(grouper)
    first_seen: dict[str, list[int]] = {}
    for total in totals:
        rows = []
        for key, states, seen in total["groups"]:
            earlier = first_seen.get(key)
            if earlier is None or seen < earlier:
                first_seen[key] = seen
            rows.append([key, states])
        merger.add({"groups": rows, "skipped": total["skipped"]})
    merger.groups = dict(sorted(merger.groups.items(), key=lambda item: first_seen[item[0]]))
    return merger


def build_groupers(
    aggregates: dict[str, dict[str, Any]], params: dict[str, Any] | None = None
) -> dict[str, Grouper]:
    """The groupers of the aggregate nodes fed by one node: {aggregate node: options}."""
    return {
        node: Grouper.from_options(options, f"node '{node}', aggregate", params)
        for node, options in aggregates.items()
    }


def load_partials(text: bytes | str) -> dict[str, Any]:
    """A chunk's stored partials: `jsonl.loads` (orjson for speed, every number exact), unless
    the text holds something orjson refuses (`Infinity` in a state): then the standard library,
    numbers read the same way."""
    try:
        return dict(loads(text))
    except orjson.JSONDecodeError:
        return dict(json.loads(text, parse_float=exact_number))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a moment (unless someone else turned it off)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def partial_text(value: Any) -> str:
    """A partial as JSON text: orjson's when it holds every state exactly, else the standard
    library's (it writes a state's `Infinity`, and integers past 64 bits exactly), or, for a
    state holding Decimals, `jsonl.dumps`'s."""
    try:
        text = orjson.dumps(value)
    except TypeError:  # an integer past 64 bits, a Decimal, a lone surrogate
        pass
    else:
        # orjson writes a NaN or an infinity as null; no state of a finite partial holds null
        # (a shared state is SHARED), so text without "null" is exact, and the rest is rare.
        if b"null" not in text:
            return text.decode()
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except TypeError:
        return dumps(value).decode()


def chunk_partials(
    groupers: dict[str, Grouper],
    outputs: Sequence[Any],
    numbers: Sequence[int],
    origins: Sequence[int] | None,
) -> str:
    """Every consuming aggregate's partial of one chunk's outputs, as JSON text. `numbers` are
    the chunk's input record numbers, `origins` the items the outputs came from (None: all)."""
    if origins is not None:
        numbers = [numbers[origin] for origin in origins]
    partials = {node: grouper.partial(outputs, numbers) for node, grouper in groupers.items()}
    return partial_text(partials)


#: How the payload of a chunk queued by a split for an aggregate starts when it holds that
#: aggregate's partial (computed by the split's worker while it checked the chunk) instead of the
#: input lines: the form such a chunk waits in when it is not added committed (its aggregate is a
#: branch target, or the run was cancelled). No JSON Lines payload starts with a NUL byte, so
#: the two kinds cannot be mistaken.
PARTIAL_PAYLOAD = b"\x00partial\n"


def lines_partials(
    groupers: dict[str, Grouper], payload: bytes
) -> dict[str, dict[str, Any]] | None:
    """`split_partials` of a JSON Lines chunk read straight into the groups of its one
    aggregate (`Grouper.lines_partial`), or None when the chunk takes the general path: the
    split feeds several aggregates, the chunk's text needs a closer reading (`plain_lines`),
    or the aggregate or its records are not of the quick shape."""
    if len(groupers) != 1:
        return None
    plain = plain_lines(payload)
    if plain is None:
        return None
    ((node, grouper),) = groupers.items()
    partial = grouper.lines_partial(plain)
    return None if partial is None else {node: partial}


def split_partials(
    groupers: dict[str, Grouper], values: Sequence[Any], first: int
) -> dict[str, dict[str, Any]]:
    """{aggregate node: its partial} of a split's chunk whose first record has the number
    `first + 1` (`partial_text({node: partial})` is what the chunk commits). An aggregate
    whose partial fails is left out: it reduces the chunk's lines itself, so the failure is
    the chunk's, retried and reported as any other."""
    numbers = range(first + 1, first + 1 + len(values))
    found = {}
    for node, grouper in groupers.items():
        try:
            found[node] = grouper.partial(values, numbers)
        except Exception:
            continue
    return found
