"""Atomic writers: every format, and no partial file on any failure."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from parallel_agent.errors import OutputError, UsageError
from parallel_agent.io import (
    check_writable,
    detect_output_format,
    iter_records,
    open_writer,
    write_records_like_input,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_formats_round_trip(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / f"out.{fmt}"
    expected = [1, {"a": [1, 2]}, "x\ny", None, "é", True]
    with open_writer(str(target), fmt) as writer:
        writer.write(expected[:2])
        writer.write([])
        writer.write_encoded_jsonl(b'"x\\ny"\nnull\n')
        writer.write_encoded_jsonl(b"")
        writer.write(iter(expected[4:5]))
        writer.write_encoded_jsonl(b"true")
    assert writer.count == len(expected)
    text = target.read_text(encoding="utf-8")
    loaded = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    assert loaded == expected
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_many_values_are_written_in_batches(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million aggregate rows written to JSON Lines were all encoded before the first byte went
    out: 4.7 GB of peak memory (found by a hostile-user helper). A batch is written as it fills."""
    from parallel_agent.io import writers

    monkeypatch.setattr(writers, "WRITE_BATCH", 3)
    target = tmp_path / f"out.{fmt}"
    values = [{"k": i, "text": f"v{i}"} for i in range(10)]
    with open_writer(str(target), fmt) as writer:
        puts: list[bytes] = []
        put = writer._put
        monkeypatch.setattr(writer, "_put", lambda data: puts.append(data) or put(data))
        writer.write(values)
    assert len(puts) >= 4  # 3 + 3 + 3 + 1 values
    got = [record.value for record in iter_records(str(target), fmt)]
    if fmt == "csv":  # CSV reads back strings
        values = [{key: str(value) for key, value in row.items()} for row in values]
    assert got == values


def test_empty_outputs(tmp_path: Path) -> None:
    for name in ("out.json", "out.jsonl", "out.csv"):
        with open_writer(str(tmp_path / name), detect_output_format(name)):
            pass
    assert json.loads((tmp_path / "out.json").read_text()) == []
    assert (tmp_path / "out.jsonl").read_bytes() == b""
    assert (tmp_path / "out.csv").read_bytes() == b""


def test_csv_header_from_first_record_and_cells(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with open_writer(str(target), "csv") as writer:
        writer.write([{"id": 1, "tags": ["a", "b"], "name": "Smith, J", "ok": True}])
        writer.write_encoded_jsonl(b'{"id": 2, "name": "Zo\xc3\xab", "ok": null}\n')
    assert target.read_text(encoding="utf-8").splitlines() == [
        "id,tags,name,ok",
        '1,"[""a"",""b""]","Smith, J",true',
        "2,,Zoë,",
    ]


def test_csv_non_object_records_use_a_value_column(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with open_writer(str(target), "csv") as writer:
        writer.write([1, "two", [3]])
    assert target.read_text().splitlines() == ["value", "1", "two", "[3]"]


def test_csv_new_field_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with (
        pytest.raises(OutputError, match="record 2 has fields b that the CSV header"),
        open_writer(str(target), "csv") as writer,
    ):
        writer.write([{"a": 1}, {"a": 2, "b": 3}])
    assert not target.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("block_size", [3, 1 << 16])
def test_csv_records_round_trip_like_input(tmp_path: Path, block_size: int) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(
        '\ufeffz,a,note\r\n02134,"x, y","two\nlines"\n\n9,,"say ""hi"" é"\n'.encode()
    )
    originals = [r.value for r in iter_records(str(source), "csv", block_size=block_size)]
    copy = tmp_path / "failed.csv"
    assert write_records_like_input(str(copy), "csv", originals) == 2
    assert copy.read_text(encoding="utf-8").splitlines()[0] == "z,a,note"
    assert [r.value for r in iter_records(str(copy), "csv")] == originals


def test_a_carriage_return_in_a_csv_field_reads_back_as_written(tmp_path: Path) -> None:
    """A value or a header field holding a lone carriage return comes back as written, on every
    Python (3.11's writer left it unquoted with "\n" lines, and a reader split the row there):
    pagent's own reader, the csv module, and a file fed back as input."""
    import csv

    records = [{"id": "1", "text": "a\rb", "k\r": "x"}, {"id": "2", "text": "plain", "k\r": ""}]
    target = tmp_path / "out.csv"
    with open_writer(str(target), "csv") as writer:
        writer.write(records)
    with target.open(newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [
            ["id", "text", "k\r"],
            ["1", "a\rb", "x"],
            ["2", "plain", ""],
        ]
    assert [r.value for r in iter_records(str(target), "csv")] == records
    assert target.read_bytes().endswith(b"\n2,plain,\n")  # a row without one: as before
    copy = tmp_path / "failed.csv"
    assert write_records_like_input(str(copy), "csv", records) == 2
    assert [r.value for r in iter_records(str(copy), "csv")] == records


def test_write_records_like_input_keeps_csv_header_without_records(tmp_path: Path) -> None:
    target = tmp_path / "failed.csv"
    assert write_records_like_input(str(target), "csv", [], fields=["b", "a"]) == 0
    assert target.read_text() == "b,a\n"


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_records_round_trip_like_input(tmp_path: Path, fmt: str) -> None:
    originals = [{"id": 1, "x": [1, "é"]}, 2, None]
    target = tmp_path / f"failed.{fmt}"
    write_records_like_input(str(target), fmt, originals)
    assert [r.value for r in iter_records(str(target), fmt)] == originals


def test_unencodable_value_is_an_output_error(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    with (
        pytest.raises(OutputError, match="record 2 cannot be encoded"),
        open_writer(str(target), "jsonl") as writer,
    ):
        writer.write([1, {1, 2}])
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_exception_discards_and_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n")
    with pytest.raises(RuntimeError), open_writer(str(target), "jsonl") as writer:
        writer.write([1, 2])
        assert leftovers(tmp_path) != []
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "previous\n"
    assert leftovers(tmp_path) == []


def test_exception_leaves_no_target(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt), open_writer(str(target), "json") as writer:
        writer.write([1])
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_replacing_keeps_the_previous_file_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    target.chmod(0o600)
    with open_writer(str(target), "jsonl") as writer:
        writer.write([1])
    assert target.read_text() == "1\n"
    assert target.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_os_failure_at_commit_leaves_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n")
    monkeypatch.setattr(os, step, enospc)
    with (
        pytest.raises(OutputError, match=r"^cannot write .*out\.jsonl: No space left on device$"),
        open_writer(str(target), "jsonl") as writer,
    ):
        writer.write(range(10))
    assert target.read_text() == "previous\n"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("code", "fails"), [(errno.EIO, True), (errno.EINVAL, False)])
def test_folder_fsync_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, fails: bool
) -> None:
    target = tmp_path / "out.jsonl"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        with open_writer(str(target), "jsonl") as writer:
            writer.write([1])
    except OutputError as exc:
        assert fails
        assert str(exc) == f"cannot write {target}: {os.strerror(code)}"
    else:
        assert not fails
    assert leftovers(tmp_path) == []


def test_failure_at_explicit_close_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.jsonl"
    with (
        pytest.raises(OutputError, match="No space left on device"),
        open_writer(str(target), "jsonl") as writer,
    ):
        writer.write([1])
        real_close = writer.stream.close

        def close() -> None:
            real_close()
            enospc()

        monkeypatch.setattr(writer.stream, "close", close)
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    with (
        pytest.raises(OutputError, match="No space left on device"),
        open_writer(str(target), "json") as writer,
    ):
        monkeypatch.setattr(writer.stream, "write", enospc)
        writer.write([1])
    assert not target.exists()
    assert leftovers(tmp_path) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, so ENOSPC comes from the kernel (needs root and mount)."""
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    folder = tmp_path / "full"
    folder.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mount not permitted here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_real_enospc_on_a_full_filesystem(tiny_tmpfs: Path) -> None:
    target = tiny_tmpfs / "out.jsonl"
    target.write_text("previous\n")
    with (
        pytest.raises(OutputError, match="No space left on device"),
        open_writer(str(target), "jsonl") as writer,
    ):
        for _ in range(100):
            writer.write(["x" * 4096])
    assert target.read_text() == "previous\n"
    assert leftovers(tiny_tmpfs) == []


def test_unwritable_targets(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="missing does not exist"):
        check_writable(str(tmp_path / "missing" / "out.json"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="Not a directory"):
        check_writable(str(blocker / "out.json"))
    with pytest.raises(UsageError, match="it is a folder"):
        check_writable(str(tmp_path))
    with pytest.raises(OutputError, match=r"x\.json: No such file or directory"):
        open_writer(str(tmp_path / "missing" / "x.json"), "json")
    with pytest.raises(OutputError, match="Not a directory"):
        open_writer(str(blocker / "x.json"), "json")
    check_writable(str(tmp_path / "fine.json"))
    check_writable("-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_stdout_writer() -> None:
    stream = io.BytesIO()
    with open_writer("-", "json", stdout=stream) as writer:
        writer.write([1, 2])
    assert json.loads(stream.getvalue()) == [1, 2]


def test_output_format_detection(tmp_path: Path) -> None:
    # A character device, a link to one and a FIFO are streams: JSON Lines unless named for a
    # format (found by a hostile-user helper: `--output /dev/null` was refused, exit 2).
    os.symlink("/dev/null", tmp_path / "nowhere")
    os.mkfifo(tmp_path / "pipe")
    os.mkfifo(tmp_path / "pipe.csv")
    for stream in ("/dev/null", str(tmp_path / "nowhere"), str(tmp_path / "pipe")):
        assert detect_output_format(stream) == "jsonl"
    assert detect_output_format(str(tmp_path / "pipe.csv")) == "csv"
    assert detect_output_format("x.CSV") == "csv"
    assert detect_output_format("x.ndjson") == "jsonl"
    assert detect_output_format("-") == "jsonl"
    assert detect_output_format("-", "JSON") == "json"
    with pytest.raises(UsageError, match="--output-format"):
        detect_output_format("x.txt")
    with pytest.raises(UsageError, match="unknown output format"):
        detect_output_format("x.json", "xml")
