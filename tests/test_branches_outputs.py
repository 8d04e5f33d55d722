"""Issue 12: flow decisions gate the nodes they choose; the output is explicit and never a node
that did not run (RELIABILITY: exit 0 means the output is right)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from parallel_agent.cli import app


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PAGENT_STORE", f"sqlite:///{tmp_path / 'state.db'}")
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


def branch_pipeline(condition: str, target_deps: str, output: str = "") -> str:
    """The pipeline from the issue: filter, a branch point, two aggregates on the filter."""
    return f"""
name: branches
{output}
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 7}}]}}
  - name: domestic
    dependencies: [split]
    modules: [{{use: filter, expr: "item['country'] == 'US'"}}]
  - name: gate
    type: flow_control
    dependencies: [domestic]
    decisions: [{{next_node: by_state, condition: "{condition}"}}]
    default: quarantine
  - name: by_state
    dependencies: {target_deps}
    modules: [{{use: aggregate, group_by: state, compute: {{n: count}}}}]
  - name: quarantine
    dependencies: {target_deps}
    modules: [{{use: aggregate, reduce: count}}]
"""


def records(tmp_path: Path, count: int = 100) -> str:
    path = tmp_path / "in.jsonl"
    states = ["CA", "NY", "TX"]
    rows = [
        {"country": "US" if i % 4 else "CA", "state": states[i % 3], "n": i} for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def expected_by_state(count: int = 100) -> list[dict[str, Any]]:
    groups: dict[str, int] = {}
    for i in range(count):
        if i % 4:
            state = ["CA", "NY", "TX"][i % 3]
            groups[state] = groups.get(state, 0) + 1
    return [{"state": state, "n": n} for state, n in groups.items()]


@pytest.mark.parametrize("target_deps", ["[domestic]", "[domestic, gate]"])
@pytest.mark.parametrize("chosen", ["by_state", "quarantine"])
def test_the_chosen_branch_runs_once_and_is_the_output(
    cli: Any, tmp_path: Path, target_deps: str, chosen: str
) -> None:
    condition = "len(failed_subtasks) == 0" if chosen == "by_state" else "false"
    other = "quarantine" if chosen == "by_state" else "by_state"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(branch_pipeline(condition, target_deps, output=f"output: {chosen}"))
    events = tmp_path / "events.jsonl"
    out = tmp_path / "out.json"
    result = cli(
        "run", str(pipeline), "--data", records(tmp_path), "--output", str(out),
        "--events", str(events), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    seen = list(map(json.loads, events.read_text().splitlines()))
    finished = [e["node"] for e in seen if e["kind"] == "node_finished"]
    assert finished.count(chosen) == 1
    # The other never ran: at the end it is announced skipped, not chosen (it has a state).
    assert [
        (e["kind"], e.get("outcome"), e.get("error")) for e in seen if e.get("node") == other
    ] == [("node_finished", "skipped", "not run: no branch chose it")]
    states = {
        node: values.get("state") for node, values in json.loads(result.stdout)["nodes"].items()
    }
    assert (states[chosen], states[other]) == ("succeeded", "skipped")
    value = json.loads(out.read_text())
    assert value == (expected_by_state() if chosen == "by_state" else 75)


@pytest.mark.parametrize("chosen", ["by_state", "quarantine"])
def test_an_output_node_that_was_not_chosen_is_no_output_exit_1(
    cli: Any, tmp_path: Path, chosen: str
) -> None:
    """The issue's bug: the output was the branch not taken, written as null with exit 0."""
    condition = "true" if chosen == "by_state" else "false"
    other = "quarantine" if chosen == "by_state" else "by_state"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(branch_pipeline(condition, "[domestic]", output=f"output: {other}"))
    out = tmp_path / "out.json"
    result = cli("run", str(pipeline), "--data", records(tmp_path), "--output", str(out), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "no_output"
    assert f"output node '{other}' did not run" in summary["error"]
    assert not out.exists()


def test_a_guarded_output_node_that_was_skipped_writes_nothing(cli: Any, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("""
name: guarded
nodes:
  - {name: split, type: planner, modules: [{use: split}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item"}]}
  - {name: total, dependencies: [work], modules: [{use: aggregate, reduce: count}],
     node_config: {condition: "false"}}
""")
    out = tmp_path / "out.json"
    result = cli("run", str(pipeline), "--data", records(tmp_path), "--output", str(out))
    assert result.exit_code == 1
    assert "output node 'total' did not run: its condition was false" in result.stderr
    assert not out.exists()


def test_several_sinks_without_output_are_refused_naming_them(cli: Any, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(branch_pipeline("true", "[domestic]"))
    for command in (
        ["validate", str(pipeline)],
        ["run", str(pipeline), "--data", records(tmp_path)],
    ):
        result = cli(*command)
        assert result.exit_code == 2, result.stderr
        assert "the output is ambiguous" in result.stderr
        assert "(by_state, quarantine)" in result.stderr


def test_output_must_name_a_data_node(cli: Any, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(branch_pipeline("true", "[domestic]", output="output: gate"))
    result = cli("validate", str(pipeline))
    assert result.exit_code == 2
    # Located like every pipeline error (it was not; found by a hostile-user helper).
    assert (
        "p.yaml, line 3, column 1: output: node 'gate' is not a map, filter or aggregate node"
        in (result.stderr)
    )
    pipeline.write_text(branch_pipeline("true", "[domestic]", output="output: by_stat"))
    result = cli("validate", str(pipeline))
    assert result.exit_code == 2
    assert "unknown node 'by_stat' (did you mean 'by_state'?)" in result.stderr


def test_output_node_option_writes_other_sinks(cli: Any, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("""
name: two-sinks
output: total
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 7}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item['n']"}]}
  - {name: total, dependencies: [work], modules: [{use: aggregate, reduce: sum}]}
  - {name: listing, dependencies: [work], modules: [{use: aggregate}]}
""")
    out, listing = tmp_path / "total.json", tmp_path / "listing.jsonl"
    result = cli(
        "run", str(pipeline), "--data", records(tmp_path, 10), "--output", str(out),
        "--output-node", f"listing={listing}", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text()) == sum(range(10))
    assert listing.read_text().split() == [str(i) for i in range(10)]
    summary = json.loads(result.stdout)
    assert summary["outputs"] == {"listing": {"path": str(listing), "rows": 10}}
    bad = cli("run", str(pipeline), "--data", records(tmp_path, 10), "--output-node", "nope=x.json")
    assert bad.exit_code == 2 and "--output-node: there is no node 'nope'" in bad.stderr
    bad = cli(
        "run", str(pipeline), "--data", records(tmp_path, 10), "--output-node", "split=x.json"
    )
    assert bad.exit_code == 2 and "'split' is not a map, filter or aggregate" in bad.stderr
    bad = cli("run", str(pipeline), "--data", records(tmp_path, 10), "--output-node", "listing")
    assert bad.exit_code == 2 and "expected NODE=PATH" in bad.stderr


def test_validate_warns_about_a_target_that_runs_anyway(cli: Any, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("""
name: loop-back
nodes:
  - {name: split, type: planner, modules: [{use: split}]}
  - {name: work, dependencies: [split], modules: [{use: map, expr: "item"}]}
  - {name: gate, type: flow_control, dependencies: [work], default: work}
""")
    result = cli("validate", str(pipeline))
    assert result.exit_code == 0
    assert "pagent: warning: node 'work' is a target of flow control node 'gate'" in result.stderr


def test_graph_marks_gated_nodes(cli: Any, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    text = branch_pipeline("true", "[domestic]", output="output: top")
    text += """  - {name: top, dependencies: [by_state], modules: [{use: aggregate, reduce: count}]}
"""
    pipeline.write_text(text)
    text = cli("graph", str(pipeline)).stdout
    assert "runs only when gate chooses it" in text
    assert text.count("runs only when gate chooses it") == 2
    # Downstream of a target, gated with it (found by a hostile-user helper: it said nothing).
    assert (
        "  top [executor] aggregate reduce: count (after by_state)\n      runs only when gate chooses by_state"
        in text
    )


def test_report_counts_records_in_out_and_dropped(cli: Any, tmp_path: Path) -> None:
    """Issue 12 item 5: each node's received/emitted/dropped records and the rows written."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("""
name: counts
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 7}]}
  - {name: keep, dependencies: [split], modules: [{use: filter, expr: "item['n'] % 4 != 0"}]}
  - {name: half, dependencies: [keep], modules: [{use: map, expr: "10 // (item['n'] % 5)"}]}
  - {name: rows, dependencies: [half], modules: [{use: aggregate}]}
""")
    out = tmp_path / "out.jsonl"
    result = cli(
        "run", str(pipeline), "--data", records(tmp_path, 100), "--output", str(out), "--json"
    )
    assert result.exit_code == 1  # n % 5 == 0 fails
    summary = json.loads(result.stdout)
    nodes = {node["node"]: node for node in summary["report"]["nodes"]}
    kept = [n for n in range(100) if n % 4]
    failing = [n for n in kept if n % 5 == 0]
    assert (nodes["keep"]["items_in"], nodes["keep"]["items_out"]) == (100, len(kept))
    assert nodes["keep"]["items_dropped"] == 100 - len(kept)
    assert nodes["half"]["items_in"] == len(kept)
    assert nodes["half"]["items_out"] == len(kept) - len(failing)
    assert nodes["half"]["items_dropped"] == 0 and nodes["half"]["items_failed"] == len(failing)
    assert (
        summary["items"]["output"] == len(out.read_text().splitlines()) == len(kept) - len(failing)
    )
    assert f"  keep  100 -> {len(kept)}  ({100 - len(kept)} dropped)" in result.stderr
    assert f"pagent: {len(kept) - len(failing)} rows written to {out}" in result.stderr


def test_an_aggregate_over_a_filter_counts_what_it_received(cli: Any, tmp_path: Path) -> None:
    """An aggregate fed by a filter (no chunks of its own) said 0 in and 0 out (found by a
    hostile-user helper): it receives what the filter kept and emits its rows."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("""
name: counts
output: agg
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 7}]}
  - {name: keep, dependencies: [split], modules: [{use: filter, expr: "item['n'] % 4 != 0"}]}
  - {name: agg, dependencies: [keep], modules: [{use: aggregate, group_by: state, compute: {n: count}}]}
  - {name: one, dependencies: [keep], modules: [{use: aggregate, reduce: count}]}
""")
    out = tmp_path / "out.json"
    result = cli(
        "run", str(pipeline), "--data", records(tmp_path, 100), "--output", str(out),
        "--output-node", f"one={tmp_path / 'one.json'}", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    nodes = {node["node"]: node for node in json.loads(result.stdout)["report"]["nodes"]}
    kept = len([n for n in range(100) if n % 4])
    assert (nodes["agg"]["items_in"], nodes["agg"]["items_out"]) == (kept, 3)
    assert (nodes["one"]["items_in"], nodes["one"]["items_out"]) == (kept, 1)
    assert f"  agg   {kept} -> 3" in result.stderr
    assert f"pagent: 1 row of one written to {tmp_path / 'one.json'}" in result.stderr


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv"])
def test_rows_written_count_the_groups_in_every_format(
    cli: Any, tmp_path: Path, suffix: str
) -> None:
    """A group-by's output holds one row per group, also as one JSON array: "rows written" and
    `items.output` count the groups whatever the format (JSON said 1, the document)."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("""
name: groups
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 7}]}
  - {name: by_state, dependencies: [split], modules: [{use: aggregate, group_by: state, compute: {n: count}}]}
""")
    out = tmp_path / f"out.{suffix}"
    result = cli("run", str(pipeline), "--data", records(tmp_path), "--output", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["items"]["output"] == 3
    assert f"pagent: 3 rows written to {out}" in result.stderr


def test_orders_by_currency_example(cli: Any, tmp_path: Path) -> None:
    """pipelines/orders_by_currency.yaml: the gate chooses the group-by; rows by total, largest
    first, equal to a plain-Python computation over the example data."""
    root = Path(__file__).resolve().parent.parent / "pipelines"
    data = root / "data" / "orders.jsonl"
    out = tmp_path / "by_currency.json"
    result = cli(
        "run", str(root / "orders_by_currency.yaml"), "--data", str(data), "--output", str(out)
    )
    assert result.exit_code == 0, result.stderr
    groups: dict[str, list[float]] = {}
    for line in data.read_text().splitlines():
        order = json.loads(line)
        if order.get("price") is not None and order["price"] > 0:
            groups.setdefault(order["currency"], []).append(order["price"])
    from fractions import Fraction

    want = sorted(
        (
            {
                "currency": currency,
                "orders": len(prices),
                "total": float(sum(map(Fraction, prices))),
                "mean": float(sum(map(Fraction, prices)) / len(prices)),
                "largest": max(prices),
            }
            for currency, prices in groups.items()
        ),
        key=lambda row: row["total"],
        reverse=True,
    )
    assert json.loads(out.read_text()) == want
    validate = cli("validate", str(root / "orders_by_currency.yaml"))
    assert validate.exit_code == 0 and "warning" not in validate.stderr


def test_maps_chosen_right_after_the_split(cli: Any, tmp_path: Path) -> None:
    """A branch between two maps that both consume the split: only the chosen one runs, and the
    run is counted by it (the other's queued chunks are not unfinished work)."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        """
name: pick-a-map
output: plus
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 3}]}
  - {name: gate, type: flow_control, dependencies: [split], decisions: [{next_node: plus, condition: "len(subtasks) > 0"}], default: minus}
  - {name: minus, dependencies: [split], modules: [{use: map, expr: "-item['n']"}]}
  - {name: plus, dependencies: [split], modules: [{use: map, expr: "item['n']"}]}
  - {name: total, dependencies: [plus], modules: [{use: aggregate, reduce: sum}]}
  - {name: negative, dependencies: [minus], modules: [{use: aggregate, reduce: sum}]}
""".replace("output: plus", "output: total")
    )
    out = tmp_path / "out.json"
    result = cli(
        "run", str(pipeline), "--data", records(tmp_path, 10), "--output", str(out), "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text()) == sum(range(10))
    summary = json.loads(result.stdout)
    assert summary["items"]["done"] == summary["items"]["total"] == 10


@pytest.mark.parametrize("chosen", ["by_state", "everything"])
def test_split_fed_aggregates_behind_a_branch_commit_only_when_chosen(
    cli: Any, tmp_path: Path, chosen: str
) -> None:
    """Branch targets that are `compute:` aggregates fed by a split whose workers reduce the
    chunks: the chosen one's output is exact; the other never ran, so nothing of it is
    committed (0 chunks done) and it ends skipped. (The split commits the partials of an
    ungated aggregate as it queues them; a gated one's wait until it is chosen.)"""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""
name: gated-aggregates
output: {chosen}
nodes:
  - {{name: split, type: planner, modules: [{{use: split, chunk_size: 7}}], node_config: {{processes: 2}}}}
  - name: gate
    type: flow_control
    dependencies: [split]
    decisions: [{{next_node: by_state, condition: "{"true" if chosen == "by_state" else "false"}"}}]
    default: everything
  - name: by_state
    dependencies: [split]
    modules: [{{use: aggregate, group_by: state, compute: {{n: count, total: {{sum: n}}}}}}]
  - name: everything
    dependencies: [split]
    modules: [{{use: aggregate, compute: {{n: count}}}}]
""")
    out = tmp_path / "out.json"
    result = cli("run", str(pipeline), "--data", records(tmp_path), "--output", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    nodes = json.loads(result.stdout)["nodes"]
    other = "everything" if chosen == "by_state" else "by_state"
    assert (nodes[chosen]["state"], nodes[chosen]["done"], nodes[chosen]["items_done"]) == (
        "succeeded",
        15,
        100,
    )
    assert (nodes[other]["state"], nodes[other]["done"], nodes[other]["items_done"]) == (
        "skipped",
        0,
        0,
    )
    totals: dict[str, list[int]] = {}
    for i in range(100):
        state = ["CA", "NY", "TX"][i % 3]
        totals.setdefault(state, [0, 0])
        totals[state][0] += 1
        totals[state][1] += i
    want = (
        [{"state": s, "n": n, "total": t} for s, (n, t) in totals.items()]
        if chosen == "by_state"
        else [{"n": 100}]
    )
    assert json.loads(out.read_text()) == want


def test_a_target_in_a_later_layer_gets_its_upstream_run_first(cli: Any, tmp_path: Path) -> None:
    """Found by a hostile-user helper: the jump dropped the target's own dependencies that lay
    in later layers (`clean`, `enrich`), and the target wrote [] with exit 0. Unrelated nodes in
    later layers (`tripled` -> `total`) were dropped too."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        """
name: natural
output: full
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 5}]}
  - {name: clean, dependencies: [split], modules: [{use: filter, expr: "item['v'] > 0"}]}
  - name: enrich
    dependencies: [clean]
    modules: [{use: map, expr: "{'id': item['id'], 'v2': item['v'] * 2}"}]
  - name: mode
    type: flow_control
    dependencies: [split]
    decisions: [{next_node: full, condition: "params.get('mode', 'full') == 'full'"}]
    default: summary
  - {name: full, dependencies: [enrich], modules: [{use: aggregate}]}
  - {name: summary, dependencies: [enrich], modules: [{use: aggregate, reduce: count}]}
  - {name: tripled, dependencies: [clean], modules: [{use: map, expr: "item['v'] * 3"}]}
  - {name: total, dependencies: [tripled], modules: [{use: aggregate, reduce: sum}]}
"""
    )
    data = tmp_path / "n.jsonl"
    data.write_text("".join(json.dumps({"id": i, "v": i * 10}) + "\n" for i in range(1, 21)))
    out, total = tmp_path / "out.json", tmp_path / "total.json"
    result = cli(
        "run", str(pipeline), "--data", str(data), "--output", str(out),
        "--output-node", f"total={total}",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(out.read_text()) == [{"id": i, "v2": i * 20} for i in range(1, 21)]
    assert json.loads(total.read_text()) == sum(i * 30 for i in range(1, 21))

    pipeline.write_text(pipeline.read_text().replace("output: full", "output: summary"))
    summary = tmp_path / "summary.json"
    result = cli(
        "run", str(pipeline), "--data", str(data), "--output", str(summary), "--set", "mode=short"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(summary.read_text()) == 20


def test_a_target_downstream_of_another_alternative_is_refused(cli: Any, tmp_path: Path) -> None:
    """Choosing `total` ran it without `plus`, its input (0, exit 0); choosing `plus` never ran
    `total`. Such a pipeline cannot mean anything: validate and run refuse it (exit 2)."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        """
name: chained
output: total
nodes:
  - {name: split, type: planner, modules: [{use: split}]}
  - {name: m, dependencies: [split], modules: [{use: map, expr: "item['v']"}]}
  - name: gate
    type: flow_control
    dependencies: [m]
    decisions: [{next_node: total, condition: "params.get('short')"}]
    default: plus
  - {name: plus, dependencies: [m], modules: [{use: map, expr: "item + 1"}]}
  - {name: total, dependencies: [plus], modules: [{use: aggregate, reduce: sum}]}
"""
    )
    data = tmp_path / "n.jsonl"
    data.write_text('{"v": 1}\n')
    for args in (("validate", str(pipeline)), ("run", str(pipeline), "--data", str(data))):
        result = cli(*args)
        assert result.exit_code == 2
        assert "'total' depends on 'plus', which does not run when 'total' is chosen" in (
            result.stderr
        )


def test_the_library_returns_no_results_when_no_output_was_written(tmp_path: Path) -> None:
    """`parallel_agent.run(..., results=True)` returned [] for a run that wrote nothing, which
    reads like a run over nothing (found by a hostile-user helper)."""
    import parallel_agent

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(branch_pipeline("false", "[domestic]", output="output: by_state"))
    data = records(tmp_path)
    summary = parallel_agent.run(pipeline, data, results=True, store="memory://")
    assert (summary.status, summary.exit_code, summary.results) == ("no_output", 1, None)
    pipeline.write_text(branch_pipeline("true", "[domestic]", output="output: by_state"))
    summary = parallel_agent.run(pipeline, data, results=True, store="memory://")
    assert (summary.status, summary.results) == ("complete", expected_by_state())


def test_a_condition_that_raises_stops_the_run_with_stop_reason_error(
    cli: Any, tmp_path: Path
) -> None:
    """semantics.md: a condition that raises stops the run. `stop_reason` said null, as for a
    run that went to its end (found by a hostile-user helper)."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(branch_pipeline("1 / 0", "[domestic]", output="output: by_state"))
    result = cli("run", str(pipeline), "--data", records(tmp_path), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert (summary["status"], summary["stop_reason"]) == ("partial_failure", "error")
    assert "ZeroDivisionError" in summary["error"]
    assert summary["nodes"]["gate"]["state"] == "failed"
