"""Atomic writers: every format, and no partial file on any failure."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest

from parallel_agent.errors import OutputError, UsageError
from parallel_agent.io import check_writable, detect_output_format, open_writer


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_formats_round_trip(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / f"out.{fmt}"
    values = [1, {"a": [1, 2]}, "x\ny", None]
    with open_writer(str(target), fmt) as writer:
        writer.write(values[:2])
        writer.write([])
        writer.write_encoded_jsonl(b'"x\\ny"\nnull\n')
    text = target.read_text()
    loaded = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    assert loaded == values
    assert leftovers(tmp_path) == []


def test_empty_json_array(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with open_writer(str(target), "json"):
        pass
    assert json.loads(target.read_text()) == []


def test_csv_header_from_first_record_and_json_cells(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with open_writer(str(target), "csv") as writer:
        writer.write([{"id": 1, "tags": ["a", "b"], "name": "Smith, J"}, {"id": 2, "name": "Zoë"}])
    assert target.read_text(encoding="utf-8").splitlines() == [
        "id,tags,name",
        '1,"[""a"",""b""]","Smith, J"',
        "2,,Zoë",
    ]


def test_csv_new_field_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with (
        pytest.raises(OutputError, match="record 2 has fields b"),
        open_writer(str(target), "csv") as w,
    ):
        w.write([{"a": 1}, {"a": 2, "b": 3}])
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_exception_discards_and_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n")
    with pytest.raises(RuntimeError), open_writer(str(target), "jsonl") as writer:
        writer.write([1, 2])
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "previous\n"
    assert leftovers(tmp_path) == []


def test_enospc_at_fsync_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.jsonl"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with (
        pytest.raises(OutputError, match="No space left on device"),
        open_writer(str(target), "jsonl") as writer,
    ):
        writer.write(range(10))
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_unwritable_targets(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        check_writable(str(tmp_path / "missing" / "out.json"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        check_writable(str(blocker / "out.json"))
    with pytest.raises(OutputError, match="is a folder"):
        check_writable(str(tmp_path))
    with pytest.raises(OutputError):
        open_writer(str(tmp_path / "missing" / "x.json"), "json")


def test_stdout_writer() -> None:
    stream = io.BytesIO()
    with open_writer("-", "jsonl", stdout=stream) as writer:
        writer.write([1, 2])
    assert stream.getvalue() == b"1\n2\n"


def test_output_format_detection() -> None:
    assert detect_output_format("x.CSV") == "csv"
    assert detect_output_format("-") == "jsonl"
    with pytest.raises(UsageError):
        detect_output_format("x.txt")
