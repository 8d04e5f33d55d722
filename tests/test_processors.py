"""In-process processors and blocking user code: a sync function runs on its own thread, so it never
stalls the event loop (lease heartbeats, other chunks), and a call that outlives its timeout is
abandoned rather than waited for at the end of the run."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from parallel_agent.modules.processors import ExpressionProcessor, FunctionProcessor

#: Outer bound of a blocked call in these tests: a liveness bound, never a speed one.
BLOCK_S = 10.0


def call_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pagent-call" and t.is_alive()]


@pytest.mark.parametrize("rate_limit", [None, 1000.0])
def test_sync_function_leaves_the_event_loop_free(rate_limit: float | None) -> None:
    """The function waits for an event that only a coroutine on the loop sets: it can only
    finish if the loop keeps running while the function blocks (with or without a rate limit)."""
    unblocked = threading.Event()

    def waits_for_the_loop(item: int) -> int:
        if not unblocked.wait(BLOCK_S):
            raise RuntimeError("the event loop was blocked")
        return item * 2

    async def main() -> Any:
        processor = FunctionProcessor(waits_for_the_loop, "test", rate_limit=rate_limit)
        work = asyncio.ensure_future(processor.process_chunk([1, 2], range(1, 3), {}))
        await asyncio.sleep(0.01)
        unblocked.set()
        return await work

    outcome = asyncio.run(main())
    assert (outcome.outputs, outcome.errors) == ([2, 4], [])


def test_sync_call_past_its_timeout_is_abandoned_not_awaited() -> None:
    """`asyncio.run` returns while the timed-out call still blocks: nothing joins its thread."""
    release = threading.Event()

    def blocks(item: int) -> int:
        release.wait(BLOCK_S)
        return item

    async def main() -> None:
        processor = FunctionProcessor(blocks, "test")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await processor.process_chunk([1], range(1, 2), {})

    try:
        asyncio.run(main())
        assert call_threads(), "the blocked call should still be running, abandoned"
    finally:
        release.set()


def test_expression_errors_stay_per_item_on_the_thread() -> None:
    processor = ExpressionProcessor("10 // item", "test")
    outcome = asyncio.run(processor.process_chunk([5, 0, 2], range(4, 7), {}))
    assert outcome.outputs == [2, 5]
    assert [(error.record, error.input) for error in outcome.errors] == [(5, 0)]
    assert "ZeroDivisionError" in outcome.errors[0].error
    assert outcome.origins == [0, 2], "the outputs came from the first and third items"


def double_or_fail(item: int) -> int:
    if item == 0:
        raise ValueError("zero")
    return item * 2


async def async_double_or_fail(item: int) -> int:
    return double_or_fail(item)


def keep_odd(item: int) -> bool:
    if item == 0:
        raise ValueError("zero")
    return item % 2 == 1


@pytest.mark.parametrize(
    "processor",
    [
        FunctionProcessor(double_or_fail, "test"),
        FunctionProcessor(double_or_fail, "test", rate_limit=1000.0),
        FunctionProcessor(async_double_or_fail, "test"),
        ExpressionProcessor("item * 2 if item else 1 // 0", "test"),
    ],
    ids=["sync", "rate-limited", "async", "expr"],
)
def test_map_numbers_failures_by_input_record_after_a_filter(processor: Any) -> None:
    """The chunk's items are input records 3, 7 and 8 (a filter upstream dropped the rest): a
    failure carries its own record number and `origins` says which items gave the outputs."""
    outcome = asyncio.run(processor.process_chunk([4, 0, 5], [3, 7, 8], {}))
    assert outcome.outputs == [8, 10]
    assert [error.record for error in outcome.errors] == [7]
    assert outcome.origins == [0, 2]


@pytest.mark.parametrize(
    "processor",
    [
        FunctionProcessor(keep_odd, "test", keep_if_true=True),
        FunctionProcessor(keep_odd, "test", keep_if_true=True, rate_limit=1000.0),
        ExpressionProcessor("item % 2 == 1 if item else 1 // 0", "test", keep_if_true=True),
    ],
    ids=["sync", "rate-limited", "expr"],
)
def test_filter_reports_which_items_it_kept(processor: Any) -> None:
    outcome = asyncio.run(processor.process_chunk([1, 0, 2, 3], [10, 11, 12, 13], {}))
    assert outcome.outputs == [1, 3]
    assert [error.record for error in outcome.errors] == [11]
    assert outcome.origins == [0, 3]


def test_expression_index_is_the_input_index() -> None:
    processor = ExpressionProcessor("index", "test")
    outcome = asyncio.run(processor.process_chunk(["a", "b"], [5, 9], {}))
    assert outcome.outputs == [4, 8]
    assert outcome.origins is None


def test_batch_filter_keeps_origins() -> None:
    processor = FunctionProcessor(
        lambda items: [item > 1 for item in items], "test", batch=True, keep_if_true=True
    )
    outcome = asyncio.run(processor.process_chunk([1, 2, 0, 3], range(1, 5), {}))
    assert (outcome.outputs, outcome.origins) == ([2, 3], [1, 3])


def test_exception_escaping_a_batch_function_reaches_the_chunk() -> None:
    def broken(items: list[int]) -> list[int]:
        raise KeyError("missing")

    processor = FunctionProcessor(broken, "test", batch=True)
    with pytest.raises(KeyError, match="missing"):
        asyncio.run(processor.process_chunk([1, 2], range(1, 3), {}))


def stops(item: int) -> int:
    if item == 2:
        next(iter([]))  # StopIteration, which no asyncio future may hold
    return item


def exits(item: int) -> int:
    raise SystemExit(3)


def test_stop_iteration_from_a_rate_limited_function_is_an_item_error() -> None:
    processor = FunctionProcessor(stops, "test", rate_limit=1000.0)

    async def main() -> Any:
        async with asyncio.timeout(BLOCK_S):  # it used to hang for ever
            return await processor.process_chunk([1, 2, 3], range(1, 4), {})

    outcome = asyncio.run(main())
    assert outcome.outputs == [1, 3]
    assert [(error.record, "StopIteration" in error.error) for error in outcome.errors] == [
        (2, True)
    ]


@pytest.mark.parametrize(
    ("function", "batch"),
    [(lambda items: next(iter([])), True), (exits, False), (exits, True)],
    ids=["StopIteration from a batch", "SystemExit per item", "SystemExit from a batch"],
)
def test_what_no_exception_should_be_fails_the_chunk_not_the_run(
    function: Any, batch: bool
) -> None:
    processor = FunctionProcessor(function, "test", batch=batch)

    async def main() -> Any:
        async with asyncio.timeout(BLOCK_S):
            return await processor.process_chunk([1, 2], range(1, 3), {})

    with pytest.raises(RuntimeError, match="StopIteration|SystemExit: 3"):
        asyncio.run(main())


@pytest.mark.parametrize(
    ("expr", "identity"),
    [("item", True), (" item ", True), ("(item)", True), ("item['x']", False),
     ("items", False), ("item or 0", False), ("item +", False)],
)  # fmt: skip
def test_an_identity_map_passes_items_through_without_the_interpreter(
    expr: str, identity: bool
) -> None:
    """`expr: item` (a do-nothing map before an aggregate) skips the interpreter: the same
    outputs; a filter `item` still tests truthiness."""
    from parallel_agent.modules.items import is_identity

    assert is_identity(expr) is identity
    if identity:
        processor = ExpressionProcessor(expr, "test")
        assert processor.identity
        records = [{"a": 1}, None, 0, [2**70]]
        outcome = asyncio.run(processor.process_chunk(records, range(1, 5), {}))
        assert outcome.outputs == records and outcome.origins is None and not outcome.errors
        kept = ExpressionProcessor(expr, "test", keep_if_true=True)
        assert not kept.identity
        outcome = asyncio.run(kept.process_chunk(records, range(1, 5), {}))
        assert outcome.outputs == [{"a": 1}, [2**70]] and outcome.origins == [0, 3]
