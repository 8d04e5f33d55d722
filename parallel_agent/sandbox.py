"""The asteval interpreter behind `parallel_agent.conditions`, with pagent's limits.

Apart from `conditions` so that asteval is imported only when an expression is first evaluated.
"""

from __future__ import annotations

import ast
import io
from collections.abc import Iterable
from typing import Any

from asteval import Interpreter
from asteval.astutils import op2func

from parallel_agent.conditions import (
    _AMPLIFYING_METHODS,
    MAX_EXPRESSION_LENGTH,
    MAX_ITERATIONS,
    SandboxLimitError,
    _check_binop,
    _check_size,
    _guard_method,
    _size,
    base_symbols,
)


class SandboxInterpreter(Interpreter):  # type: ignore[misc]
    """asteval with size checks on operators and methods, and an iteration budget."""

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

    def on_binop(self, node: ast.BinOp) -> Any:
        left = self.run(node.left)
        right = self.run(node.right)
        _check_binop(type(node.op), left, right)
        return op2func(node.op)(left, right)

    def on_attribute(self, node: ast.Attribute) -> Any:
        value = super().on_attribute(node)
        owner = getattr(value, "__self__", None)
        if node.attr in _AMPLIFYING_METHODS and isinstance(owner, str | bytes | list):
            return _guard_method(node.attr, value, owner)
        return value

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
                yield value

        # asteval re-evaluates `gnode.iter`; hand it a pre-evaluated, counted iterable instead.
        holder = ast.Constant(value=counted())  # type: ignore[arg-type]
        patched = ast.comprehension(
            target=gnode.target, iter=holder, ifs=gnode.ifs, is_async=gnode.is_async
        )
        super().do_generator([patched, *gnodes[1:]], node, out)
