"""The snapshot side record: one type, read and written only through store/snapshots.py."""

from __future__ import annotations

import argparse
import json

import pytest

from paced.errors import DamagedError
from paced.store.home import add_home_argument, open_home, resolve_home
from paced.store.snapshots import (
    SnapshotRecord,
    read_snapshot_record,
    snapshot_record_path,
    snapshot_records,
    write_snapshot_record,
)


def test_a_record_reads_back_as_written_and_lists_by_snapshot_id(tmp_path):
    home = open_home(tmp_path / "h")
    later = SnapshotRecord(snapshot_id="20260102T000000000000Z-bbbbbbbb", student_id="s1", sampling_hash="h",
                           lineage={"key": "k", "checkpoint_id": "m-1"}, history=[{"checkpoint_id": "m-1"}])
    first = SnapshotRecord(snapshot_id="20260101T000000000000Z-aaaaaaaa", student_id="s1", sampling_hash="h",
                           fingerprint="f", inputs=[{"path": "x", "bytes": 1}], problems=3,
                           datasets=["arith"])
    for record in (later, first):
        write_snapshot_record(home, record)
    assert read_snapshot_record(home, "s1", first.snapshot_id) == first
    assert [r.snapshot_id for r in snapshot_records(home, "s1")] == [first.snapshot_id, later.snapshot_id]
    # the file keeps the keys it always had: no lineage keys on a plain refresh's record
    on_disk = json.loads(snapshot_record_path(home, "s1", first.snapshot_id).read_text())
    assert "lineage" not in on_disk and on_disk["fingerprint"] == "f" and on_disk["sampling"] is None
    assert read_snapshot_record(home, "s1", "20260103T000000000000Z-cccccccc") is None


def test_a_side_file_that_is_not_a_record_is_a_damaged_file_naming_it(tmp_path):
    home = open_home(tmp_path / "h")
    path = snapshot_record_path(home, "s1", "20260101T000000000000Z-aaaaaaaa")
    path.parent.mkdir(parents=True)
    for text in (json.dumps(["not", "a", "record"]), '{"snapshot_id": "trunc'):
        path.write_text(text)
        with pytest.raises(DamagedError, match=f"damaged file {path}.*move it aside"):
            read_snapshot_record(home, "s1", "20260101T000000000000Z-aaaaaaaa")
        with pytest.raises(DamagedError):
            list(snapshot_records(home, "s1"))
    path.write_text(json.dumps({"sampling": {"chat_template": True}}))  # ids left out: the path names them
    record = read_snapshot_record(home, "s1", "20260101T000000000000Z-aaaaaaaa")
    assert (record.student_id, record.sampling) == ("s1", {"chat_template": True})


def test_the_home_flag_lives_beside_resolve_home(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_home_argument(parser)
    monkeypatch.setenv("PACED_HOME", str(tmp_path / "env"))
    assert resolve_home(parser.parse_args([]).home) == (tmp_path / "env").resolve()
    assert resolve_home(parser.parse_args(["--home", str(tmp_path / "h")]).home) == (tmp_path / "h").resolve()
