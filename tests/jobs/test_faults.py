"""Faults and bad inputs on the command line: real damaged files (truncated Parquet, broken JSON,
a folder where a file belongs), bad values refused before anything is written, a real full disk
and a real read-only filesystem (a small tmpfs), concurrent refreshes. Every fault is one line on
stderr and exit 1, never a traceback and never a silent exit 0."""

import json
import math
import os
import subprocess
import threading

import pytest
from fault_helpers import fill, small_tmpfs, truncate
from test_refresh import commit, rollout_rows

from paced.backends.base import SamplingConfig
from paced.cli import main
from paced.errors import InputError
from paced.jobs.refresh import refresh_student
from paced.jobs.rollout import RolloutConfig
from paced.store.home import open_home
from paced.store.problems import read_problems
from paced.store.snapshots import list_snapshots


def fails(capsys, *argv) -> str:
    """Run `paced argv`: exit 1 and exactly one line on stderr, which is returned."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def measured(tmp_path, capsys):
    """A home with 20 problems of data set `d`, rollouts of student s1 and one snapshot of them."""
    h = tmp_path / "h"
    assert main(["import", "builtin:arithmetic", "--n", "20", "--dataset", "d", "--home", str(h)]) == 0
    home = open_home(h)
    ids = read_problems(home, "d")["id"].to_pylist()
    commit(home, rollout_rows(ids[:10], 4)), commit(home, rollout_rows(ids[10:], 4, seed=1))
    assert main(["refresh", "--home", str(h)]) == 0
    capsys.readouterr()
    return home


# ---- damaged files -------------------------------------------------------------------------------


def test_a_truncated_snapshot_is_named_and_refresh_rebuilds_it_from_its_rollouts(measured, capsys, tmp_path):
    home = measured
    [sid] = list_snapshots(home, "s1")
    path = home.snapshots_dir("s1") / f"{sid}.parquet"
    good = path.read_bytes()
    truncate(path)
    line = fails(capsys, "passrates", "show", "--student", "s1", "--home", home.root)
    assert str(path) in line and "paced refresh --student s1" in line
    line = fails(capsys, "manifest", "build", "--student", "s1", "--dataset", "d", "--out", tmp_path / "m",
                 "--home", home.root)
    assert str(path) in line and not (tmp_path / "m").exists()
    assert main(["refresh", "--home", str(home.root)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["written"] and result["repaired"] and result["snapshot_id"] == sid
    assert path.read_bytes() == good and list_snapshots(home, "s1") == [sid]
    assert main(["passrates", "show", "--student", "s1", "--home", str(home.root)]) == 0


def test_a_truncated_rollout_batch_is_named(measured, capsys):
    home = measured
    batch = sorted(home.rollouts_dir("s1", "h1", "d").glob("batch-*.parquet"))[1]
    commit(home, rollout_rows(["x"], 4))  # new inputs: refresh must read every batch
    truncate(batch)
    line = fails(capsys, "refresh", "--home", home.root)
    assert str(batch) in line and "paced rollout" in line


def test_a_damaged_problems_part_or_dataset_record_is_named(measured, capsys, tmp_path):
    home = measured
    [part] = sorted(home.problems_dir("d").glob("part-*.parquet"))
    good = part.read_bytes()
    truncate(part)
    line = fails(capsys, "import", "builtin:arithmetic", "--n", "30", "--dataset", "d", "--home", home.root)
    assert str(part) in line
    line = fails(capsys, "manifest", "build", "--student", "s1", "--dataset", "d", "--out", tmp_path / "m",
                 "--home", home.root)
    assert str(part) in line
    part.write_bytes(good)
    (home.problems_dir("d") / "dataset.json").write_text("{not json")
    line = fails(capsys, "rollout", "--student", tmp_path / "no-model", "--student-id", "s2", "--dataset",
                 "d", "--home", home.root)
    assert "dataset.json" in line and "not valid JSON" in line


@pytest.mark.parametrize("damage", ["sampling", "side", "side-list"])
def test_damaged_json_side_files_are_named(measured, capsys, damage):
    home = measured
    commit(home, rollout_rows(["x"], 4))  # so that refresh reads the side files
    folder = home.rollouts_dir("s1", "h1", "d")
    if damage == "sampling":
        path = folder / "sampling.json"
        path.write_bytes(b"\xff\xfe garbage")
    else:
        [sid] = list_snapshots(home, "s1")
        path = home.snapshots_dir("s1") / f"{sid}.json"
        path.write_text("[1, 2]" if damage == "side-list" else '{"fingerprint": ')
    line = fails(capsys, "refresh", "--home", home.root)
    assert str(path) in line and "damaged file" in line


def test_a_schema_marker_that_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "h" / "SCHEMA_VERSION.json").mkdir(parents=True)
    line = fails(capsys, "passrates", "show", "--student", "s1", "--home", tmp_path / "h")
    assert "SCHEMA_VERSION.json" in line and "folder" in line


# ---- bad values, refused before anything is written -----------------------------------------------

NESTED = {"prompt": "1+1=", "answer": "2", "meta": json.loads("[" * 40 + "]" * 40)}
BAD_SOURCES = {
    "nan.jsonl": (b'{"prompt": "1+1=", "answer": NaN}\n', "NaN"),
    "inf.jsonl": (b'{"prompt": "1+1=", "answer": 2}\n{"prompt": "2+2=", "answer": Infinity}\n', "line 2"),
    "utf8.jsonl": (b'{"prompt": "1+1=\xff", "answer": "2"}\n', "UTF-8"),
    "utf8.csv": (b"prompt,answer\n1+1=\xff,2\n", "UTF-8"),
    "big.jsonl": (json.dumps({"prompt": "1+1=", "answer": "2", "difficulty": 2**80}).encode(), "difficulty"),
    "nested.jsonl": (json.dumps(NESTED).encode(), "nested"),
    "deep.jsonl": (b'{"prompt": "a", "answer": "b", "m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                   "nested"),
}


@pytest.mark.parametrize("name", sorted(BAD_SOURCES))
def test_import_refuses_bad_values_and_writes_nothing(tmp_path, capsys, name):
    data, words = BAD_SOURCES[name]
    source = tmp_path / name
    source.write_bytes(data)
    line = fails(capsys, "import", source, "--dataset", "d", "--home", tmp_path / "h")
    assert str(source) in line and words in line
    assert not (tmp_path / "h" / "problems").exists()


def test_builtin_import_refuses_a_negative_holdout(tmp_path, capsys):
    line = fails(capsys, "import", "builtin:arithmetic", "--n", "5", "--holdout", "-1", "--dataset", "d",
                 "--home", tmp_path / "h")
    assert "--holdout must be >= 0" in line and not (tmp_path / "h" / "problems").exists()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_sampling_refuses_non_finite_temperatures(value):
    with pytest.raises(InputError, match="temperature"):
        SamplingConfig(temperature=value)
    with pytest.raises(InputError, match="top_p"):
        SamplingConfig(top_p=value)


def test_rollout_flag_errors_are_one_line_and_leave_no_folder(measured, capsys):
    home = measured
    before = sorted(p.relative_to(home.root) for p in (home.root / "rollouts").rglob("*"))
    for flags, words in ((["--temperature", "nan"], "temperature"), (["--temperature", "inf"], "temperature"),
                         (["-k", "100000"], "`k` must be <= 1024"), (["--limit", "0"], "--limit")):
        line = fails(capsys, "rollout", "--student", home.root / "no-model", "--student-id", "s2",
                     "--dataset", "d", *flags, "--home", home.root)
        assert words in line
    with pytest.raises(InputError):
        RolloutConfig(k=1025)
    assert sorted(p.relative_to(home.root) for p in (home.root / "rollouts").rglob("*")) == before


def test_refresh_refuses_a_sampling_hash_that_is_not_a_name(measured, capsys):
    line = fails(capsys, "refresh", "--sampling-hash", "../x", "--home", measured.root)
    assert "sampling_hash '../x' is not a valid name" in line


# ---- concurrency -------------------------------------------------------------------------------------


def test_concurrent_refreshes_write_one_snapshot(tmp_path):
    home = open_home(tmp_path / "h")
    for b in range(6):
        commit(home, rollout_rows([f"p{b}-{i:03d}" for i in range(300)], 8, seed=b))
    barrier, results, errors = threading.Barrier(4), [], []

    def one():
        barrier.wait()
        try:
            results.append(refresh_student(home, "s1"))
        except Exception as err:  # noqa: BLE001 - collected and asserted on below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert len(list_snapshots(home, "s1")) == 1
    assert sum(r["written"] for r in results) == 1 and len({r["snapshot_id"] for r in results}) == 1


# ---- a real full disk and a real read-only filesystem ------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk") as disk:
        open_home(disk / "h")
        filler = fill(disk)
        line = fails(capsys, "import", "builtin:arithmetic", "--n", "2000", "--dataset", "d", "--home",
                     disk / "h")
        assert "No space left on device" in line and "free some space" in line
        assert not list((disk / "h").rglob(".tmp-*")) and not list((disk / "h").rglob("part-*"))
        filler.unlink()
        assert main(["import", "builtin:arithmetic", "--n", "2000", "--dataset", "d", "--home",
                     str(disk / "h")]) == 0


def test_a_read_only_filesystem_is_one_line(tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk") as disk:
        open_home(disk / "h")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        line = fails(capsys, "import", "builtin:arithmetic", "--n", "20", "--dataset", "d", "--home",
                     disk / "h")
        assert "Read-only file system" in line and "read-only" in line


def test_data_files_are_group_readable_and_folders_group_listable(measured, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["manifest", "build", "--student", "s1", "--dataset", "d", "--out", str(tmp_path / "m"),
                     "--no-require-reference", "--home", str(measured.root)]) == 0
    finally:
        os.umask(old)
    for path in [*measured.root.rglob("*"), *(tmp_path / "m").rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))
