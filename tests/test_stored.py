"""`app.stored`: the code fingerprint a coordinator records and the processors a worker rebuilds
from a stored run (issue 13: the same code everywhere, or a clear refusal)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.runs import make_info

from parallel_agent import __version__
from parallel_agent.app.stored import (
    build_stored_nodes,
    code_manifest,
    code_mismatch,
    code_references,
    stored_pipeline,
)
from parallel_agent.errors import UsageError
from parallel_agent.modules.context import RunContext
from parallel_agent.pipeline import load_pipeline, pipeline_hash
from parallel_agent.store.memory import MemoryStore

PIPELINE = """
name: code
nodes:
  - {name: split, type: planner, modules: [{use: split, chunk_size: 5}]}
  - name: shell
    dependencies: [split]
    modules: [{use: map, command: "python3 tool.py --fast", env: {MODE: a}}]
  - name: py
    dependencies: [shell]
    modules: [{use: filter, function: "mystep:keep"}]
    node_config: {concurrency: 8, processes: 4}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "p.yaml").write_text(PIPELINE)
    (tmp_path / "tool.py").write_text("print('v1')\n")
    (tmp_path / "mystep.py").write_text("def keep(item):\n    return True\n")
    return tmp_path


def test_manifest_names_every_module_and_command(folder: Path) -> None:
    pipeline = load_pipeline(str(folder / "p.yaml"))
    manifest = code_manifest(pipeline, folder)
    assert manifest["version"] == __version__
    assert set(manifest["digests"]) == {"module mystep", "command python3 tool.py --fast"}
    assert code_mismatch(manifest, pipeline, folder) is None


def test_a_changed_script_or_module_or_version_is_named(folder: Path) -> None:
    pipeline = load_pipeline(str(folder / "p.yaml"))
    manifest = code_manifest(pipeline, folder)
    (folder / "tool.py").write_text("print('v2')\n")  # the command's script file changed
    assert (code_mismatch(manifest, pipeline, folder) or "").startswith(
        "command python3 tool.py --fast: digest"
    )
    older = {**manifest, "version": "0.0.1"}
    assert "the run's coordinator has 0.0.1" in (code_mismatch(older, pipeline, folder) or "")
    assert "older pagent" in (code_mismatch(None, pipeline, folder) or "")


def test_the_environment_of_a_command_is_part_of_its_reference(folder: Path) -> None:
    pipeline = load_pipeline(str(folder / "p.yaml"))
    changed = load_pipeline(str(folder / "p.yaml"), ["nodes.1.modules.0.env.MODE=b"])
    assert code_references(pipeline) != code_references(changed)


def test_stored_pipeline_is_checked_against_its_hash(folder: Path) -> None:
    pipeline = load_pipeline(str(folder / "p.yaml"))
    text = pipeline.model_dump_json(by_alias=True)
    info = make_info(pipeline_text=text, pipeline_hash=pipeline_hash(pipeline))
    assert pipeline_hash(stored_pipeline(info)) == pipeline_hash(pipeline)
    with pytest.raises(UsageError, match="does not match its hash"):
        stored_pipeline(make_info(pipeline_text=text, pipeline_hash="0" * 64))


def test_rebuilt_nodes_are_capped_for_this_host(folder: Path) -> None:
    pipeline = load_pipeline(str(folder / "p.yaml"))
    ctx = RunContext(task_id="t1", store=MemoryStore(), owner="test")
    nodes = build_stored_nodes(pipeline, folder, ctx, max_concurrency=2, max_processes=1)
    assert [node.settings.node for node in nodes] == ["shell", "py"]
    assert nodes[0].settings.concurrency == 2
    assert nodes[1].settings.concurrency == 1  # one chunk per worker process, one process
    uncapped = build_stored_nodes(pipeline, folder, ctx)
    assert [node.settings.concurrency for node in uncapped] == [4, 4]
