"""Sandboxed expressions: flow-control conditions, node guards and per-item `expr`s.

Expressions are parsed once, checked statically, and evaluated by asteval (never `eval`) against a
whitelisted symbol table: no `open`, no imports, no dunder access, no statements. Allocation is capped
(`[0]*10**9`, `'x'.ljust(10**9)`, `10**10**9` fail fast) and comprehensions have an iteration budget,
because conditions run inside the engine's event loop. Nothing is kept at module level: each compiled
expression owns its interpreters (one per thread, since per-item expressions run in worker threads).
"""

from __future__ import annotations

import ast
import contextvars
import decimal
import difflib
import functools
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any

from parallel_agent.errors import ConditionError
from parallel_agent.jsonl import EXACT_CONTEXT

if TYPE_CHECKING:
    from parallel_agent.sandbox import SandboxInterpreter

MAX_EXPRESSION_LENGTH = 10_000
MAX_SIZE = 1_000_000
"""Largest sequence (elements or characters) an expression may build, counting nested items."""
MAX_INT_BITS = 100_000
MAX_ITERATIONS = 1_000_000
"""Comprehension iterations allowed per evaluation."""
MAX_EVALUATION_BYTES = 256 * 1024 * 1024
"""Memory one evaluation may allocate in total: the sizes of the values it builds (operators,
calls, comprehensions, slices, f-strings), added up over the whole evaluation. So the total for a
run is this times the evaluations in flight (one per thread evaluating an expression)."""

evaluation_cancelled: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "evaluation_cancelled", default=None
)
"""Set by whoever runs evaluations on a thread it may abandon (a stopping run): an evaluation
stops at its next step once the event is set."""

MAX_WORK = 10_000_000
"""Elements the builtins, operators and methods of one evaluation may walk in C (`sum`, `sorted`,
`in`, `==`, `str.count`...), each charged the length of what it walks. The iteration budget counts
Python-level steps; this one bounds the C-level ones (`sum(range(10**6))` a million times over
would otherwise run for hours, with the event loop and its signal handlers stuck behind it)."""

evaluation_work: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "evaluation_work", default=None
)
"""The running evaluation's work count (set by the interpreter when an evaluation starts)."""


def charge_work(size: int) -> None:
    """Add `size` walked elements to the running evaluation's count; past MAX_WORK it fails."""
    counter = evaluation_work.get()
    if counter is not None and size:
        counter[0] += size
        if counter[0] > MAX_WORK:
            raise SandboxLimitError(f"the expression would walk more than {MAX_WORK} elements")


def _walking(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, a builtin that walks its arguments, charged their lengths first."""

    @functools.wraps(function)
    def walk(*args: Any, **kwargs: Any) -> Any:
        charge_work(sum(len(arg) for arg in args if isinstance(arg, Sized)))
        return function(*args, **kwargs)

    return walk


#: What asteval puts before the message of an error raised in a call (the arguments' repr, which
#: says nothing the expression does not).
_CALL_PREFIX = re.compile(r"^Error running function '[^']*' with args '.*?' and kwargs \{.*?\}: ")


FORBIDDEN_NAMES = frozenset(
    {
        "open", "eval", "exec", "compile", "getattr", "setattr", "delattr", "hasattr", "globals",
        "locals", "vars", "dir", "type", "input", "breakpoint", "help", "memoryview", "object",
        "super", "classmethod", "staticmethod", "property", "exit", "quit", "print", "id",
        "bytearray", "bytes", "iter", "next", "callable", "issubclass", "format", "repr", "hash",
    }
)  # fmt: skip
"""Names refused at compile time even if a caller binds them: they reach I/O or object internals."""

ALLOWED_NODES: tuple[type[ast.AST], ...] = (
    ast.Expression, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.IfExp, ast.Dict, ast.Set, ast.List,
    ast.Tuple, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension,
    ast.Compare, ast.Call, ast.keyword, ast.Constant, ast.Attribute, ast.Subscript, ast.Slice,
    ast.Name, ast.Load, ast.Store, ast.JoinedStr, ast.FormattedValue, ast.operator, ast.boolop,
    ast.unaryop, ast.cmpop,
)  # fmt: skip

CONSTANTS: dict[str, Any] = {"null": None, "true": True, "false": False}
_FORMAT_SPEC = re.compile(r"[<>^=]?[+\- ]?#?0?\d{0,3}[,_]?(\.\d{1,3})?[bcdeEfFgGnosxX%]?")
_NESTED: tuple[type, ...] = (str, bytes, list, tuple, set, frozenset, dict)
_SEQUENCES: tuple[type, ...] = (str, bytes, list, tuple)
_AMPLIFYING_METHODS = frozenset(
    {"ljust", "rjust", "center", "zfill", "expandtabs", "replace", "join", "extend"}
)


_ROUNDING_CONTEXT = EXACT_CONTEXT.copy()
_ROUNDING_CONTEXT.traps[decimal.Inexact] = False
_ROUNDING_CONTEXT.traps[decimal.Underflow] = False
#: Decimal methods that cannot be exact and cost seconds at EXACT_DIGITS: refused.
_INEXACT_METHODS = frozenset({"exp", "ln", "log10", "sqrt"})
#: What a Decimal operation that cannot stay exact says (see `EXACT_CONTEXT`).
_DECIMAL_SIGNALS = {
    "Inexact": "the Decimal result would be rounded (float() computes approximately)",
    "Underflow": "the Decimal result would be rounded (float() computes approximately)",
    "Overflow": "the Decimal result's exponent is out of range",
    "DivisionByZero": "Decimal division by zero",
    "DivisionUndefined": "Decimal division 0 / 0",
    "InvalidOperation": "invalid Decimal operation",
}


class SandboxLimitError(RuntimeError):
    """Raised inside an evaluation that would exceed a size or iteration cap."""


def _size(value: Any, budget: int = MAX_SIZE) -> int:
    """Elements and characters in `value`, nested containers included, counted up to `budget` + 1."""
    if not isinstance(value, _NESTED):
        return 1
    total = 0
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        total += len(item)
        if total > budget:
            return budget + 1
        if isinstance(item, dict):
            stack.extend(v for v in (*item.keys(), *item.values()) if isinstance(v, _NESTED))
        elif not isinstance(item, str | bytes):
            stack.extend(v for v in item if isinstance(v, _NESTED))
    return total


def _check_size(size: int, what: str) -> None:
    if size > MAX_SIZE:
        raise SandboxLimitError(f"{what} would exceed the size limit of {MAX_SIZE}")


def _check_binop(op: type[ast.operator], left: Any, right: Any) -> None:
    """Refuse operations whose result would be too big, before Python allocates it."""
    if op is ast.Mult:
        seq: Any
        count: Any
        seq, count = (left, right) if isinstance(left, _SEQUENCES) else (right, left)
        if isinstance(seq, _SEQUENCES) and isinstance(count, int) and count > 1:
            _check_size(_size(seq, MAX_SIZE // count + 1) * count, "repetition")
        elif (
            isinstance(left, int)
            and isinstance(right, int)
            and left.bit_length() + right.bit_length() > MAX_INT_BITS
        ):
            raise SandboxLimitError(f"integer product over {MAX_INT_BITS} bits")
    elif op is ast.Add and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        pair: tuple[Any, Any] = (left, right)
        _check_size(len(pair[0]) + len(pair[1]), "concatenation")
    elif op is ast.Pow and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise SandboxLimitError(f"power over {MAX_INT_BITS} bits")
    elif op is ast.LShift and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right > MAX_INT_BITS:
            raise SandboxLimitError(f"shift over {MAX_INT_BITS} bits")
    elif op is ast.Pow and isinstance(left, decimal.Decimal | int) and not isinstance(right, int):
        if isinstance(left, decimal.Decimal) or isinstance(right, decimal.Decimal):
            raise SandboxLimitError("a Decimal to a power that is not an integer cannot be exact")
    elif op is ast.Mod and isinstance(left, str | bytes):
        raise SandboxLimitError("%-formatting of strings is not allowed")


def _guard_method(name: str, method: Callable[..., Any], owner: Any) -> Callable[..., Any]:
    """Wrap a str/bytes/list method that can multiply its input size with a pre-check."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
            _check_size(args[0], f"str.{name}")
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            _check_size(len(owner) * max(int(tab), 1), "str.expandtabs")
        elif name == "replace" and len(args) >= 2:
            _check_size(len(owner) + (len(owner) + 1) * len(args[1]), "str.replace")
        elif name == "join" and args:
            parts = list(args[0])
            _check_size(len(owner) * len(parts), "str.join")
            _check_size(sum(_size(part) for part in parts), "str.join")
            return method(parts)
        elif name == "extend" and args:
            items = list(args[0])
            _check_size(len(owner) + len(items), "list.extend")
            return method(items)
        return method(*args, **kwargs)

    return guarded


def _capped_range(*args: int) -> range:
    result = range(*args)
    _check_size(len(result), "range")
    return result


def _safe_sum(values: Iterable[Any], start: Any = 0) -> Any:
    if not isinstance(start, int | float):
        raise SandboxLimitError("sum() only adds numbers")
    if isinstance(values, Sized):
        charge_work(len(values))
    return sum(values, start)


def _round(number: Any, digits: int | None = None) -> Any:
    """round(): asked for, so a Decimal may round here (elsewhere its arithmetic is exact)."""
    if isinstance(number, decimal.Decimal):
        with decimal.localcontext(_ROUNDING_CONTEXT):
            return round(number) if digits is None else round(number, digits)
    return round(number) if digits is None else round(number, digits)


def _safe_str(value: Any = "") -> str:
    _check_size(_size(value), "str()")
    return str(value)


def base_symbols() -> dict[str, Any]:
    """The symbols every expression sees: a whitelist of pure builtins and the JSON constants."""
    return {
        "len": len, "min": _walking(min), "max": _walking(max), "sum": _safe_sum,
        "any": _walking(any), "all": _walking(all), "abs": abs, "round": _round,
        "sorted": _walking(sorted), "reversed": _walking(lambda seq: list(reversed(seq))),
        "range": _capped_range, "str": _safe_str, "int": int, "float": float, "bool": bool,
        "list": _walking(list), "dict": _walking(dict), "set": _walking(set),
        "tuple": _walking(tuple), "enumerate": _walking(enumerate), "zip": _walking(zip),
        "isinstance": isinstance,
        "divmod": divmod, **CONSTANTS,
    }  # fmt: skip


def _static_check(tree: ast.AST, text: str, what: str) -> None:
    """Refuse constructs that could escape the sandbox, before anything runs."""
    for node in ast.walk(tree):
        problem: str | None = None
        if not isinstance(node, ALLOWED_NODES):
            problem = f"{type(node).__name__} is not allowed"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            problem = f"access to attribute '{node.attr}' is not allowed"
        elif isinstance(node, ast.Name) and (
            node.id.startswith("__") or node.id in FORBIDDEN_NAMES
        ):
            problem = f"name '{node.id}' is not allowed"
        elif isinstance(node, ast.FormattedValue) and node.format_spec is not None:
            spec = node.format_spec
            parts = spec.values if isinstance(spec, ast.JoinedStr) else [spec]
            if not all(
                isinstance(p, ast.Constant)
                and isinstance(p.value, str)
                and _FORMAT_SPEC.fullmatch(p.value)
                for p in parts
            ):
                problem = "this f-string format specification is not allowed"
        if problem is not None:
            raise _error(problem, text, what)


def _free_names(tree: ast.AST, bound: frozenset[str] = frozenset()) -> set[str]:
    """Names read by the expression that are not bound by one of its comprehensions."""
    if isinstance(tree, ast.Name):
        return set() if tree.id in bound else {tree.id}
    if isinstance(tree, ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp):
        names: set[str] = set()
        inner = set(bound)
        for generator in tree.generators:
            names |= _free_names(generator.iter, frozenset(inner))
            inner |= {n.id for n in ast.walk(generator.target) if isinstance(n, ast.Name)}
            for condition in generator.ifs:
                names |= _free_names(condition, frozenset(inner))
        parts = [tree.key, tree.value] if isinstance(tree, ast.DictComp) else [tree.elt]
        for part in parts:
            names |= _free_names(part, frozenset(inner))
        return names
    names = set()
    for child in ast.iter_child_nodes(tree):
        names |= _free_names(child, bound)
    return names


def _error(problem: str, text: str, what: str) -> ConditionError:
    """`KeyError: 'x' in expression "item['x']" (node 'n', map)`: the error first, then where."""
    located = f"{problem} in expression {text!r}"
    return ConditionError(f"{located} ({what})", problem=located)


def _unknown_names(unknown: Sequence[str], allowed: frozenset[str]) -> str:
    """`NameError: name 'factr' is not defined (did you mean 'factor'?)`, naming what may be read."""
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(allowed), n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    label = "name" if len(unknown) == 1 else "names"
    verb = "is" if len(unknown) == 1 else "are"
    readable = ", ".join(sorted(allowed))
    return f"NameError: {label} {', '.join(parts)} {verb} not defined (it may read {readable})"


class _Program:
    """A parsed, checked expression plus one interpreter per thread."""

    def __init__(self, text: str, what: str, allowed: frozenset[str] | None = None) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ConditionError(
                f"the expression is empty ({what})", problem="the expression is empty"
            )
        if len(text) > MAX_EXPRESSION_LENGTH:
            problem = f"the expression is longer than {MAX_EXPRESSION_LENGTH} characters"
            raise ConditionError(f"{problem} ({what})", problem=problem)
        self.text = text
        self.what = what
        source = text.strip()
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError as exc:
            raise _error(f"SyntaxError: {exc.msg}", text, what) from None
        _static_check(tree, text, what)
        self.names = frozenset(_free_names(tree) - set(base_symbols()))
        if allowed is not None:
            unknown = sorted(self.names - allowed)
            if unknown:
                raise _error(_unknown_names(unknown, allowed), text, what)
        # asteval runs statements; hand it the same expression wrapped as one.
        module = ast.Module(body=[ast.Expr(value=tree.body)], type_ignores=[])
        self.node = ast.fix_missing_locations(module)
        self.local = threading.local()

    def interpreter(self) -> SandboxInterpreter:
        interp: SandboxInterpreter | None = getattr(self.local, "interp", None)
        if interp is None:
            from parallel_agent.sandbox import SandboxInterpreter  # asteval: only once needed

            interp = SandboxInterpreter()
            self.local.interp = interp
            self.local.base = base_symbols()
        return interp

    def run(self, interp: SandboxInterpreter, symtable: dict[str, Any]) -> Any:
        interp.reset(symtable, self.text)
        try:
            with decimal.localcontext(EXACT_CONTEXT):
                value = interp.run(self.node.body[0], with_raise=True)
        except Exception as exc:
            raise self._error(interp, exc) from None
        if interp.error:
            raise self._error(interp, None)
        return value

    def _error(self, interp: SandboxInterpreter, exc: Exception | None) -> ConditionError:
        first = interp.error[0] if interp.error else None
        if first is not None and first.exc is not None:
            kind, message = first.exc.__name__, first.msg or interp.error_msg or ""
        elif exc is not None:
            kind, message = type(exc).__name__, str(exc)
        else:
            kind, message = "Error", ""
        message = message.strip().splitlines()[-1] if message.strip() else kind
        message = _CALL_PREFIX.sub("", message, count=1)
        message = _DECIMAL_SIGNALS.get(kind, message)
        return _error(f"{kind}: {message}", self.text, self.what)


class _Compiled:
    """Text parsed and checked once; `names` are the free names it reads. With `allowed`, a
    name outside it (and the builtins) is refused at compile time."""

    def __init__(self, text: str, *, what: str, allowed: frozenset[str] | None = None) -> None:
        self._program = _Program(text, what, allowed)
        self.text = text
        self.what = what
        self.names: frozenset[str] = self._program.names
        """Free names it reads (for a condition: cache keys, fetched in one snapshot)."""


class Condition(_Compiled):
    """A compiled condition: read `names` from a snapshot, then `evaluate` it."""

    def evaluate(self, namespace: Mapping[str, Any]) -> Any:
        """Evaluate against `namespace`; a name it lacks is None. Errors raise ConditionError."""
        program = self._program
        interp = program.interpreter()
        symtable = dict(program.local.base)
        for name in self.names:
            symtable[name] = namespace.get(name)
        return program.run(interp, symtable)

    def __repr__(self) -> str:
        return f"Condition({self.text!r})"


class Expression(_Compiled):
    """A compiled per-item expression over `item`, `index` and `params`, cheap to evaluate often."""

    def evaluate(self, namespace: Mapping[str, Any]) -> Any:
        """Evaluate with the names in `namespace` bound (others read as None)."""
        program = self._program
        interp = program.interpreter()
        symtable: dict[str, Any] = getattr(program.local, "symtable", None) or {}
        if len(symtable) != len(program.local.base) + len(self.names):
            # First use in this thread, or a comprehension left a name behind: start clean.
            symtable = dict(program.local.base)
            program.local.symtable = symtable
        for name in self.names:
            symtable[name] = namespace.get(name)
        return program.run(interp, symtable)

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile_condition(text: str, *, what: str) -> Condition:
    """Parse and check a condition once; raises ConditionError naming `what` and the expression."""
    return Condition(text, what=what)


#: The names a map or filter `expr` reads: the item, its 1-based input record number, its 0-based
#: position (`record - 1`) and the task's params.
ITEM_NAMES = frozenset({"item", "record", "index", "params"})
#: The names an aggregate `expr` reads: the results in input order and the task's params.
AGGREGATE_NAMES = frozenset({"results", "params"})


def compile_expression(text: str, *, what: str, names: frozenset[str] = ITEM_NAMES) -> Expression:
    """Parse and check an expression once; reading a name outside `names` (and the builtins)
    is a ConditionError (a misspelling must not read as None)."""
    return Expression(text, what=what, allowed=names)
