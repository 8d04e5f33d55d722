"""The end-of-run report's data: percentiles, error types, per-node lines and failure groups read
from a run store (durations are given, never measured, so nothing depends on the machine's speed)."""

from __future__ import annotations

import orjson
import pytest
from helpers import runs

from parallel_agent.report import (
    FailureGroup,
    NodeReport,
    RunReport,
    build_report,
    error_type,
    percentile,
    pipeline_node_names,
)
from parallel_agent.store.base import ChunkSpec, RunInfo
from parallel_agent.store.memory import MemoryStore

TASK = "t-report"


def test_percentiles_interpolate_between_closest_ranks() -> None:
    values = [float(v) for v in (7, 1, 10, 3, 2, 9, 4, 6, 5, 8)]  # 1..10, unsorted
    assert percentile(values, 0.5) == pytest.approx(5.5)
    assert percentile(values, 0.95) == pytest.approx(9.55)
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 10.0
    assert percentile([0.25], 0.5) == 0.25
    assert percentile([0.25], 0.95) == 0.25
    assert percentile([1.0, 2.0], 0.95) == pytest.approx(1.95)
    assert percentile([], 0.5) is None


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("ValueError: seven is not allowed", "ValueError"),
        ("ValueError: invalid literal for int() with base 10: 'x'", "ValueError"),
        ("KeyError: 'price'", "KeyError"),
        ("ZeroDivisionError", "ZeroDivisionError"),
        ("json.decoder.JSONDecodeError: Expecting value", "json.decoder.JSONDecodeError"),
        ("record 8: ValueError: seven is not allowed", "ValueError"),
        (
            "ConditionError: node 'w', map: ZeroDivisionError: division by zero in expression "
            "'1 / item'",
            "ZeroDivisionError",
        ),
        ("ConditionError: node 'w', map: the expression is empty", "ConditionError"),
        ("timed out after 30 s", "timed out after 30 s"),
        (
            "command exited with status 3 on records 40-42: disk on fire",
            "command exited with status 3",
        ),
        ("lease expired after 3 attempts", "lease expired after 3 attempts"),
        ("", "error"),
    ],
)
def test_error_type_is_the_exception_name_or_the_message_head(error: str, kind: str) -> None:
    assert error_type(error) == kind


def make_info() -> RunInfo:
    pipeline = {"name": "demo", "nodes": [{"name": "split"}, {"name": "work"}, {"name": "collect"}]}
    return runs.make_info(TASK, pipeline_text=orjson.dumps(pipeline).decode())


def item_errors(*records: tuple[int, str]) -> bytes:
    return orjson.dumps([{"record": r, "error": e, "input": r - 1} for r, e in records])


async def filled_store() -> MemoryStore:
    """Node `work`: 6 chunks of 10 records. Chunks 0-4 commit with durations 0.1..0.5 s (chunk 1
    on its second attempt) and item errors; chunk 5 fails for good after timing out twice."""
    store = MemoryStore()
    await store.create_run(make_info())
    payload = b"".join(b"%d\n" % n for n in range(10))
    chunks = [ChunkSpec(i, i * 10, 10, payload) for i in range(6)]
    await store.add_chunks(TASK, "work", chunks)
    await store.seal(TASK, "work")
    errors = {
        0: item_errors((3, "ValueError: bad 2"), (9, "ValueError: bad 8")),
        2: item_errors((21, "KeyError: 'price'")),
        3: item_errors((31, "ValueError: bad 30"), (32, "ValueError: bad 31")),
        4: item_errors((41, "ValueError: bad 40"), (45, "ValueError: bad 44")),
    }
    now = 1000.0
    for index in range(6):
        lease = (await store.claim(TASK, "work", "me", lease_s=30, now=now))[0]
        assert lease.index == index
        if index in (1, 5):  # a failed first attempt: retried (claimed again)
            await store.fail(lease, "timed out after 1 s", retry_in_s=0.0, now=now)
            lease = (await store.claim(TASK, "work", "me", lease_s=30, now=now))[0]
        if index == 5:
            await store.fail(lease, "timed out after 1 s", retry_in_s=None, now=now)
            continue
        failed = len(orjson.loads(errors.get(index, b"[]")))
        await store.commit(
            lease,
            result=b"",
            errors=errors.get(index, b"[]"),
            items_ok=10 - failed,
            items_failed=failed,
            duration_s=0.1 * (index + 1),
        )
    return store


async def test_report_from_the_store_has_node_lines_and_failure_groups() -> None:
    store = await filled_store()
    report = await build_report(
        store,
        TASK,
        nodes=["split", "work", "collect"],
        durations={"split": 0.01, "work": 2.5, "collect": 0.002},
    )
    assert [node.node for node in report.nodes] == ["split", "work", "collect"]
    split, work, collect = report.nodes
    assert split == NodeReport("split", duration_s=0.01)
    assert collect.chunks == 0 and collect.items_per_s is None
    assert work.chunks == 6 and work.chunks_done == 5 and work.chunks_failed == 1
    assert work.items_processed == 50
    assert work.items_failed == 7 + 10  # 7 item errors and the 10 records of the failed chunk
    assert work.retries == 2
    assert work.items_per_s == pytest.approx(50 / 2.5)
    # chunk durations 0.1, 0.2, 0.3, 0.4, 0.5: p50 is the middle one, p95 interpolates
    assert work.chunk_p50_s == pytest.approx(0.3)
    assert work.chunk_p95_s == pytest.approx(0.48)

    assert [(g.error_type, g.count) for g in report.failures] == [
        ("timed out after 1 s", 10),
        ("ValueError", 6),
        ("KeyError", 1),
    ]
    timeouts, values, keys = report.failures
    assert timeouts.first_records == (51, 52, 53, 54, 55)
    assert values.first_records == (3, 9, 31, 32, 41)  # the five smallest of six
    assert values.example == "ValueError: bad 2" and values.nodes == ("work",)
    assert keys.first_records == (21,)
    assert report.items_failed == 17


async def test_report_survives_its_json_form_and_nodes_come_in_pipeline_order() -> None:
    store = await filled_store()
    info = await store.get_run(TASK)
    assert info is not None
    names = pipeline_node_names(info.pipeline_text)
    assert names == ["split", "work", "collect"]
    report = await build_report(store, TASK, nodes=names)
    assert report.nodes[1].duration_s is None and report.nodes[1].items_per_s is None
    again = RunReport.from_dict(orjson.loads(orjson.dumps(report.to_dict())))
    assert again.failures == report.failures
    assert [n.node for n in again.nodes] == names
    assert again.nodes[1].chunk_p50_s == pytest.approx(0.3)
    data = report.to_dict()
    assert data["nodes"][1]["chunk_p95_s"] == pytest.approx(0.48)
    assert data["failures"][1] == {
        "error_type": "ValueError",
        "count": 6,
        "first_records": [3, 9, 31, 32, 41],
        "nodes": ["work"],
        "example": "ValueError: bad 2",
    }


def test_failure_group_keeps_a_short_list() -> None:
    group = FailureGroup("ValueError", 2, (4, 9), ("work",), "ValueError: x")
    assert FailureGroup.from_dict(group.to_dict()) == group


async def test_an_aggregate_emits_its_rows_and_chunks_a_split_committed_are_not_timed() -> None:
    """A `compute:` aggregate fed by a split: its chunks were committed with their partials as
    the split queued them (the split's workers did that work, so they have no time of their
    own), and it emitted one row per group. The report says so rather than dividing a million
    records by the few milliseconds of the merge, or counting reduced records as emitted."""
    store = MemoryStore()
    await store.create_run(make_info())
    partial = b'{"work": {"groups": [], "skipped": []}}'
    specs = [ChunkSpec(i, i * 10, 10, b"", partial=partial) for i in range(4)]
    await store.add_chunks(TASK, "work", specs)
    await store.seal(TASK, "work")
    await store.update_run(TASK, extra={"aggregate_rows:work": 3})
    report = await build_report(store, TASK, nodes=["work"], durations={"work": 0.004})
    (work,) = report.nodes
    assert (work.chunks_done, work.items_in, work.items_out, work.items_dropped) == (4, 40, 3, 0)
    assert work.items_per_s is None
    assert work.chunk_p50_s is None and work.chunk_p95_s is None
    again = RunReport.from_dict(orjson.loads(orjson.dumps(report.to_dict())))
    assert again.nodes == report.nodes
