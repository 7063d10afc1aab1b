"""`paced import`: every format, every kind of bad file (nothing written), re-import no-op."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paced.cli import main
from paced.store.home import open_home
from paced.store.problems import part_files, read_problems

ROWS = [
    {"prompt": "1+1=", "answer": "2", "difficulty": 1, "source": "a"},
    {"prompt": "12+30=", "answer": "42", "difficulty": 2, "source": "b"},
    {"id": "custom", "prompt": "What is 2+2?", "answer": "4"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "prompt", "answer", "source"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in w.fieldnames})
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist([{"id": None, **r} for r in rows]), path)
    return path


def write_hf(path, rows):
    from datasets import Dataset

    Dataset.from_list([{"id": r.get("id"), "prompt": r["prompt"],
                        "answer": r["answer"]} for r in rows]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("writer,name", [(write_jsonl, "p.jsonl"), (write_csv, "p.csv"),
                                         (write_parquet, "p.parquet"), (write_hf, "hfdir")])
def test_import_each_format_then_reimport_is_a_noop(tmp_path, capsys, writer, name):
    home = tmp_path / "home"
    src = writer(tmp_path / name, ROWS)
    assert main(["import", str(src), "--dataset", "d", "--home", str(home)]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 3
    table = read_problems(open_home(home), "d")
    assert sorted(table["prompt"].to_pylist()) == sorted(r["prompt"] for r in ROWS)
    assert "custom" in table["id"].to_pylist()
    assert main(["import", str(src), "--dataset", "d", "--home", str(home)]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 0
    assert len(part_files(open_home(home), "d")) == 1


def test_metadata_and_difficulty_are_kept(tmp_path):
    home = tmp_path / "home"
    main(["import", str(write_jsonl(tmp_path / "p.jsonl", ROWS)), "--dataset", "d", "--home", str(home)])
    rows = {r["prompt"]: r for r in read_problems(open_home(home), "d").to_pylist()}
    assert rows["12+30="]["difficulty"] == 2
    assert json.loads(rows["12+30="]["metadata"]) == {"source": "b"}


def test_importing_more_rows_adds_them(tmp_path, capsys):
    home = tmp_path / "home"
    main(["import", str(write_jsonl(tmp_path / "a.jsonl", ROWS[:2])), "--dataset", "d", "--home", str(home)])
    main(["import", str(write_jsonl(tmp_path / "b.jsonl", ROWS)), "--dataset", "d", "--home", str(home)])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["added"] == 1
    assert read_problems(open_home(home), "d").num_rows == 3


@pytest.mark.parametrize("rows,expect", [
    ([{"prompt": "1+1="}], "line 1: field 'answer'"),
    ([{"prompt": "1+1=", "answer": "2"}, {"prompt": "  ", "answer": "3"}], "line 2: field 'prompt'"),
    ([{"id": "x", "prompt": "1+1=", "answer": "2"}, {"id": "x", "prompt": "1+2=", "answer": "3"}],
     "line 2: field 'id'"),
    ([{"prompt": "1+1=", "answer": "2", "difficulty": "hard"}], "field 'difficulty'"),
])
def test_bad_rows_write_nothing_and_name_file_row_and_field(tmp_path, capsys, rows, expect):
    home = tmp_path / "home"
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["import", str(src), "--dataset", "d", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and expect in err and len(err.strip().splitlines()) == 1
    assert not list((home / "problems").rglob("*.parquet")) if (home / "problems").exists() else True


def test_unreadable_files_are_clear_errors(tmp_path, capsys):
    home = str(tmp_path / "home")
    (tmp_path / "x.jsonl").write_text('{"prompt": "1", "answer": "2"}\n{not json\n')
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    assert main(["import", str(tmp_path / "x.jsonl"), "--dataset", "d", "--home", home]) == 1
    assert "line 2" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "x.parquet"), "--dataset", "d", "--home", home]) == 1
    assert "x.parquet" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "missing.csv"), "--dataset", "d", "--home", home]) == 1
    assert main(["import", str(tmp_path / "x.jsonl"), "--dataset", "../evil", "--home", home]) == 1
    assert "not a valid name" in capsys.readouterr().err


def test_conflicting_reimport_is_refused(tmp_path, capsys):
    home = str(tmp_path / "home")
    main(["import", str(write_jsonl(tmp_path / "a.jsonl", [{"id": "q", "prompt": "a", "answer": "1"}])),
          "--dataset", "d", "--home", home])
    src = write_jsonl(tmp_path / "b.jsonl",
                      [{"id": "q", "prompt": "a", "answer": "2"}, {"prompt": "b", "answer": "3"}])
    assert main(["import", str(src), "--dataset", "d", "--home", home]) == 1
    assert "already in 'd'" in capsys.readouterr().err
    assert read_problems(open_home(home), "d").num_rows == 1


def test_builtin_arithmetic_is_deterministic_with_disjoint_holdout(tmp_path, capsys):
    for name in ("h1", "h2"):
        assert main(["import", "builtin:arithmetic", "--n", "300", "--seed", "7", "--holdout", "50",
                     "--dataset", "arith", "--home", str(tmp_path / name)]) == 0
    a = read_problems(open_home(tmp_path / "h1"), "arith")
    b = read_problems(open_home(tmp_path / "h2"), "arith")
    held = read_problems(open_home(tmp_path / "h1"), "arith-heldout")
    assert a.equals(b) and a.num_rows == 300 and held.num_rows == 50
    assert not set(a["prompt"].to_pylist()) & set(held["prompt"].to_pylist())
    assert set(a["difficulty"].to_pylist()) == {1, 2, 3, 4}


def test_home_from_environment_and_newer_schema_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PACED_HOME", str(tmp_path / "envhome"))
    assert main(["import", "builtin:arithmetic", "--n", "10", "--dataset", "a"]) == 0
    assert (tmp_path / "envhome" / "problems" / "a").is_dir()
    (tmp_path / "envhome" / "SCHEMA_VERSION.json").write_text('{"schema_version": 99}')
    assert main(["import", "builtin:arithmetic", "--n", "10", "--dataset", "a"]) == 1
    assert "upgrade paced" in capsys.readouterr().err


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    assert main(["import"]) == 2
    assert main(["import", "--help"]) == 0
    assert main(["nonsense"]) == 2
    assert main(["--help"]) == 0
