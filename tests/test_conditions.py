"""The sandbox: what expressions may do, what they are refused, and how errors read."""

from __future__ import annotations

import re
import threading
import time

import pytest

from parallel_agent.conditions import (
    AGGREGATE_NAMES,
    ITEM_NAMES,
    MAX_SIZE,
    compile_condition,
    compile_expression,
)
from parallel_agent.errors import ConditionError

WHAT = "node 'flow_control', decision 2 (next_node 'aggregator')"
PENDING = "subtasks != null and len([st for st in subtasks if st['status'] == 'pending']) > 0"


def test_walkthrough_conditions_read_exactly_their_keys() -> None:
    cond = compile_condition(PENDING, what=WHAT)
    assert cond.names == frozenset({"subtasks"})  # `st` is bound, `len`/`null` are symbols
    assert cond.evaluate({"subtasks": [{"status": "pending"}]}) is True
    assert cond.evaluate({"subtasks": [{"status": "completed"}]}) is False
    assert cond.evaluate({}) is False  # a missing key reads as None
    both = compile_condition("len(completed_subtasks) == len(subtasks)", what=WHAT)
    assert both.names == frozenset({"completed_subtasks", "subtasks"})
    assert both.evaluate({"completed_subtasks": [1], "subtasks": [2]}) is True


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("true and not false", True),
        ("null is None and True", True),
        ("any(x > 1 for x in [1, 2])", True),
        ("{k: v * 2 for k, v in d.items()}", {"a": 2}),
        ("sorted({3, 1, 2})", [1, 2, 3]),
        ("sum(range(5)) + max([1, 9]) + abs(-1)", 20),
        ("[i for i, v in enumerate(['a', 'b']) if v == 'b']", [1]),
        ("f'{x:>4}'", "   1"),
        ("x if x > 0 else -x", 1),
        ("d.get('missing', 'fallback')", "fallback"),
    ],
)
def test_allowed_constructs(source: str, expected: object) -> None:
    assert compile_condition(source, what=WHAT).evaluate({"x": 1, "d": {"a": 1}}) == expected


@pytest.mark.parametrize(
    "source",
    [
        "__import__('os').system('id')",
        "().__class__.__base__",
        "().__class__.__base__.__subclasses__()",
        "open('/etc/passwd')",
        "open('/etc/passwd').read()",
        "getattr(x, '__class__')",
        "eval('1')",
        "exec('x = 1')",
        "type(x)",
        "x._private",
        "lambda: 1",
        "(y := 1)",
        "import os",
        "x = 1",
        "x +",
        "f'{x:>999999999}'",
        "",
    ],
)
def test_refused_at_compile_time(source: str) -> None:
    with pytest.raises(ConditionError) as info:
        compile_condition(source, what=WHAT)
    assert WHAT in str(info.value)
    if source:
        assert repr(source) in str(info.value)


@pytest.mark.parametrize(
    "source",
    [
        "[0]*10**9",
        "'a' * 10**9",
        "[[0] * 1000] * 10**6",
        "2 ** 10**9",
        "(10**10000) ** 10000",
        "1 << 10**9",
        "'x'.ljust(10**9)",
        "('a' * 10).replace('a', 'a' * 200000)",
        "'-'.join(['x' * 100000] * 100)",
        "list(range(10**9))",
        "sum([[0] * 1000] * 100, [])",
        "'%0999999999d' % 1",
        "len([1 for a in range(10**6) for b in range(10**6)])",
        # C-level work a comprehension step hides (found by a hostile-user helper: hours of CPU,
        # with the event loop and its signal handlers stuck behind it).
        "sum(sum(range(999999)) for _ in range(999999)) > 0",
        "len([0 for xs in [list(range(10**6))] for _ in range(10**6) if -1 in xs])",
        "len([0 for s in ['x' * 200000] for _ in range(10**6) if s.count('y')])",
        "len([0 for s in ['x' * 200000] for _ in range(10**6) if s == s + 'y'])",
        "len([0 for xs in [list(range(10**6))] for _ in range(10**6) if max(xs) < 0])",
        "[max(zip(range(999999))) for _ in range(200)][0]",  # zip and enumerate are charged too
        "[max(enumerate(range(999999))) for _ in range(200)][0]",
        "1 / 0",
        "len(missing)",
    ],
)
def test_runtime_refusals_fail_fast_with_node_decision_and_expression(source: str) -> None:
    compiled = compile_condition(source, what=WHAT)
    start = time.monotonic()
    with pytest.raises(ConditionError) as info:
        compiled.evaluate({})
    assert time.monotonic() - start < 5  # a liveness bound: nothing allocates gigabytes
    assert WHAT in str(info.value) and repr(source) in str(info.value)


def test_size_limit_is_generous_enough_for_real_data() -> None:
    assert compile_condition(f"len([0] * {MAX_SIZE})", what=WHAT).evaluate({}) == MAX_SIZE


def test_work_limit_is_generous_enough_for_real_data() -> None:
    """Several passes over the largest value an expression may build stay within MAX_WORK."""
    source = f"sum(range({MAX_SIZE})) + max(range({MAX_SIZE})) + len(sorted(list(range(1000))))"
    assert compile_condition(source, what=WHAT).evaluate({}) == (
        sum(range(MAX_SIZE)) + MAX_SIZE - 1 + 1000
    )
    assert compile_condition("'b' in xs and xs.count('a') == 2", what=WHAT).evaluate(
        {"xs": ["a"] * 2 + ["b"] * 5000}
    )
    # Short text compared a million times over (a comprehension's whole budget) is not charged.
    names = [f"name-{i:06d}" for i in range(MAX_SIZE)]
    source = "len([n for n in names if n == 'name-000007' or 'x' in n]) == 1"
    assert compile_condition(source, what=WHAT).evaluate({"names": names})


def test_no_values_leak_between_evaluations() -> None:
    cond = compile_condition("[v for v in data][-1] + (v or 0)", what=WHAT)
    assert cond.names == frozenset({"data", "v"})
    assert cond.evaluate({"data": [1], "v": 10}) == 11
    assert cond.evaluate({"data": [2]}) == 2  # `v` from the previous call is gone
    expr = compile_expression("[item for item in [item]][0] * 2 + index", what=WHAT)
    assert [expr.evaluate({"item": i, "index": 1}) for i in range(3)] == [1, 3, 5]


def test_values_are_not_changed_by_the_expression() -> None:
    data = {"xs": [1, 2]}
    cond = compile_condition("xs.append(3) or len(xs)", what=WHAT)
    assert cond.evaluate(data) == 3
    # Conditions evaluate against a snapshot the engine owns; the sandbox itself does not copy.
    assert data["xs"] == [1, 2, 3]


def test_expressions_are_thread_safe() -> None:
    expr = compile_expression("item * 2 + params['k']", what="node 'map', map")
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(2000):
                value = expr.evaluate({"item": i + offset, "index": i, "params": {"k": offset}})
                assert value == 2 * (i + offset) + offset
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 100_000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_expression_error_puts_the_error_type_first_and_the_node_after() -> None:
    """Issue 14: the short error type first (it is what a narrow report keeps), the node after."""
    expr = compile_expression("item['a']", what="node 'map', map")
    with pytest.raises(ConditionError) as caught:
        expr.evaluate({"item": {}})
    assert str(caught.value) == "KeyError: 'a' in expression \"item['a']\" (node 'map', map)"
    assert caught.value.problem == "KeyError: 'a' in expression \"item['a']\""


@pytest.mark.parametrize(
    ("text", "names", "unknown"),
    [
        ("item['v'] > 2 or verbose", None, "name 'verbose' is not defined"),
        ("item['v'] * factr", None, "name 'factr' is not defined"),
        ("itme + 1", None, "name 'itme' (did you mean 'item'?) is not defined"),
        ("len(result)", AGGREGATE_NAMES, "name 'result' (did you mean 'results'?) is not defined"),
        ("item + index + records", None, "name 'records' (did you mean 'record'?)"),
    ],
)
def test_an_expression_reads_only_its_documented_names(
    text: str, names: frozenset[str] | None, unknown: str
) -> None:
    """Issue 11 item 13: a misspelled name is an error when compiled, never a silent None."""
    with pytest.raises(ConditionError, match=re.escape(f"NameError: {unknown}")):
        compile_expression(text, what="node 'n', map", names=names or ITEM_NAMES)


def test_record_and_index_name_the_same_item_side_by_side() -> None:
    expr = compile_expression("[record, index, item, params['k']]", what="node 'n', map")
    namespace = {"item": "x", "record": 4, "index": 3, "params": {"k": 1}}
    assert expr.evaluate(namespace) == [4, 3, "x", 1]
    aggregate = compile_expression("len(results) + params['k']", what="a", names=AGGREGATE_NAMES)
    assert aggregate.evaluate({"results": [1, 2], "params": {"k": 1}}) == 3
