"""The asteval interpreter behind `parallel_agent.conditions`, with pagent's limits.

Apart from `conditions` so that asteval is imported only when an expression is first evaluated.
"""

from __future__ import annotations

import ast
import decimal
import io
import sys
import threading
from collections.abc import Iterable, Sized
from typing import Any

from asteval import Interpreter
from asteval.astutils import op2func

from parallel_agent.conditions import (
    _AMPLIFYING_METHODS,
    _INEXACT_METHODS,
    MAX_EVALUATION_BYTES,
    MAX_EXPRESSION_LENGTH,
    MAX_ITERATIONS,
    SandboxLimitError,
    _check_binop,
    _check_size,
    _guard_method,
    _size,
    base_symbols,
    charge_work,
    evaluation_cancelled,
    evaluation_work,
)

_CHARGED: tuple[type, ...] = (str, bytes, list, tuple, set, frozenset, dict, int)
#: A method of a shorter value is not charged (its work is below the noise of evaluating it).
_WALK_FREE = 1024


def _walking_method(method: Any, size: int) -> Any:
    """A method of a long str, bytes, list or tuple, charged that length when called."""

    def walk(*args: Any, **kwargs: Any) -> Any:
        charge_work(size)
        return method(*args, **kwargs)

    return walk


def _compare_work(oper: ast.cmpop, left: Any, right: Any) -> int:
    """Elements a comparison may walk: `in` a list or tuple, its length (a dict, set or range
    looks up); `==`, `<`... between two containers, the shorter one's length. Text is compared
    and searched at memory speed: only text of _WALK_FREE characters or more is charged."""
    if isinstance(oper, ast.In | ast.NotIn):
        if isinstance(right, list | tuple):
            return len(right)
        if isinstance(right, str | bytes) and len(right) >= _WALK_FREE:
            return len(right)
        return 0
    if not (isinstance(left, Sized) and isinstance(right, Sized)):
        return 0
    shorter = min(len(left), len(right))
    if isinstance(left, str | bytes) and isinstance(right, str | bytes):
        return shorter if shorter >= _WALK_FREE else 0
    return shorter


class SandboxInterpreter(Interpreter):  # type: ignore[misc]
    """asteval with size checks on operators and methods, an iteration budget, and a memory
    budget per evaluation: every value an operator, call, comprehension, slice or f-string
    builds is charged its (shallow) size, so nested allocations add up (`[[0]*10**6 for _ in
    range(1000)]` stops at MAX_EVALUATION_BYTES, not at the machine's memory)."""

    def __init__(self) -> None:
        disabled = (
            "import", "importfrom", "while", "for", "try", "with", "functiondef", "lambda",
            "augassign", "assert", "delete", "raise", "print", "assign", "if", "return", "break",
            "continue",
        )  # fmt: skip
        super().__init__(
            symtable=base_symbols(),
            use_numpy=False,
            max_statement_length=MAX_EXPRESSION_LENGTH,
            config=dict.fromkeys(disabled, False),
            writer=io.StringIO(),
            err_writer=io.StringIO(),
        )
        self.node_handlers["generatorexp"] = self.on_listcomp
        self.iterations = 0
        self.allocated = 0
        self.cancelled: threading.Event | None = None

    def reset(self, symtable: dict[str, Any], text: str) -> None:
        self.symtable = symtable
        self.error: list[Any] = []
        self.error_msg = None
        self.expr = text
        self.code_text: list[str] = []
        self.retval = None
        self._interrupt = None
        self._calldepth = 0
        self.iterations = 0
        self.allocated = 0
        evaluation_work.set([0])
        self.cancelled = evaluation_cancelled.get()
        self._check_cancelled()

    def _check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise SandboxLimitError("evaluation stopped: the run is stopping")

    def _charge(self, value: Any) -> Any:
        """Add the memory `value` holds (not counting its elements, charged when they were made)
        to this evaluation's total; past MAX_EVALUATION_BYTES the evaluation fails."""
        if isinstance(value, _CHARGED):
            self.allocated += sys.getsizeof(value)
            if self.allocated > MAX_EVALUATION_BYTES:
                raise SandboxLimitError(
                    f"the expression would use more than {MAX_EVALUATION_BYTES >> 20} MiB"
                )
        return value

    def on_binop(self, node: ast.BinOp) -> Any:
        left = self.run(node.left)
        right = self.run(node.right)
        _check_binop(type(node.op), left, right)
        return self._charge(op2func(node.op)(left, right))

    def on_call(self, node: ast.Call) -> Any:
        return self._charge(super().on_call(node))

    def on_subscript(self, node: ast.Subscript) -> Any:
        value = super().on_subscript(node)
        return self._charge(value) if isinstance(node.slice, ast.Slice) else value

    def on_joinedstr(self, node: ast.JoinedStr) -> Any:
        return self._charge(super().on_joinedstr(node))

    def on_listcomp(self, node: ast.ListComp) -> Any:
        return self._charge(super().on_listcomp(node))

    def on_setcomp(self, node: ast.SetComp) -> Any:
        return self._charge(super().on_setcomp(node))

    def on_dictcomp(self, node: ast.DictComp) -> Any:
        return self._charge(super().on_dictcomp(node))

    def on_attribute(self, node: ast.Attribute) -> Any:
        value = super().on_attribute(node)
        owner = getattr(value, "__self__", None)
        if node.attr in _AMPLIFYING_METHODS and isinstance(owner, str | bytes | list):
            value = _guard_method(node.attr, value, owner)
        elif node.attr in _INEXACT_METHODS and isinstance(owner, decimal.Decimal):
            raise SandboxLimitError(f"Decimal.{node.attr} cannot be exact: use float()")
        if isinstance(owner, str | bytes | list | tuple) and len(owner) >= _WALK_FREE:
            return _walking_method(value, len(owner))
        return value

    def on_compare(self, node: ast.Compare) -> Any:
        """asteval's, with the elements a comparison walks charged (`x in big_list`, `a == b`)."""
        left = self.run(node.left)
        results = []
        multi = len(node.ops) > 1
        result: Any = None
        for oper, right_node in zip(node.ops, node.comparators, strict=True):
            right = self.run(right_node)
            charge_work(_compare_work(oper, left, right))
            result = op2func(oper)(left, right)
            if multi:
                results.append(result)
                if not all(results):
                    return False
                left = right
        return all(results) if multi else result

    def on_formattedvalue(self, node: ast.FormattedValue) -> Any:
        _check_size(_size(self.run(node.value)), "f-string value")
        return super().on_formattedvalue(node)

    def do_generator(self, gnodes: list[ast.comprehension], node: ast.AST, out: Any) -> None:
        gnode = gnodes[0]
        original_iter = gnode.iter
        values = self.run(original_iter)

        def counted() -> Iterable[Any]:
            for value in values:
                self.iterations += 1
                if self.iterations > MAX_ITERATIONS:
                    raise SandboxLimitError(f"more than {MAX_ITERATIONS} comprehension iterations")
                self._check_cancelled()
                yield value

        # asteval re-evaluates `gnode.iter`; hand it a pre-evaluated, counted iterable instead.
        holder = ast.Constant(value=counted())  # type: ignore[arg-type]
        patched = ast.comprehension(
            target=gnode.target, iter=holder, ifs=gnode.ifs, is_async=gnode.is_async
        )
        super().do_generator([patched, *gnodes[1:]], node, out)
