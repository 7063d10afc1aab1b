"""`paced manifest build`: shards as Parquet with a manifest.json, deterministic bytes."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paced.cli import main
from paced.store.files import write_parquet_atomic
from paced.store.home import open_home
from paced.store.problems import read_problems
from paced.store.shards import REFERENCE_SCHEMA
from paced.store.snapshots import new_snapshot_id, write_snapshot


def make_home(tmp_path, n=60, with_refs=True, correct_of=lambda i: i % 9):
    home_dir = tmp_path / "home"
    assert main(["import", "builtin:arithmetic", "--n", str(n), "--dataset", "arith", "--home",
                 str(home_dir)]) == 0
    home = open_home(home_dir)
    problems = read_problems(home, "arith")
    ids = problems["id"].to_pylist()
    correct = [correct_of(i) for i in range(len(ids))]
    snap = pa.table({
        "problem_id": ids, "dataset": ["arith"] * len(ids), "student_id": ["s1"] * len(ids),
        "sampling_hash": ["h"] * len(ids), "n": [8] * len(ids), "correct": correct,
        "wrong": [8 - c for c in correct], "unparseable": [0] * len(ids), "timeout": [0] * len(ids),
        "error": [0] * len(ids), "pass_rate": [c / 8 for c in correct], "stale_age": [0] * len(ids),
        "snapshot_id": ["x"] * len(ids),
    })
    sid = new_snapshot_id("test")
    write_snapshot(home, "s1", snap.set_column(12, "snapshot_id", pa.array([sid] * len(ids))), sid)
    if with_refs:
        refs = pa.table({"problem_id": ids[::2], "dataset": ["arith"] * len(ids[::2]),
                         "teacher_id": ["t"] * len(ids[::2]), "response": problems["answer"].to_pylist()[::2],
                         "attempt": pa.array([0] * len(ids[::2]), pa.int32())}, schema=REFERENCE_SCHEMA)
        write_parquet_atomic(home.references_dir("arith", "t") / "batch-00000000.parquet", refs)
    return home_dir, sid, problems


def build(home_dir, out, *extra, keep_unreferenced=True):
    return main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--seed", "3",
                 "--shard-size", "16", "--out", str(out), "--home", str(home_dir), *extra]
                + (["--no-require-reference"] if keep_unreferenced else []))


def test_manifest_build_writes_shards_with_hashes_and_is_deterministic(tmp_path, capsys):
    home_dir, sid, problems = make_home(tmp_path)
    assert build(home_dir, tmp_path / "m1") == 0
    assert build(home_dir, tmp_path / "m2") == 0
    info = json.loads((tmp_path / "m1" / "manifest.json").read_text())
    eligible = sum(1 for i in range(problems.num_rows) if 0 < i % 9 < 8)
    assert info["items"] == eligible and info["inputs"]["snapshot_id"] == sid
    assert info["shards"] == -(-eligible // 16) and info["zero_weight"] == problems.num_rows - eligible
    rows = []
    for name, digest in info["sha256"].items():
        data = (tmp_path / "m1" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
        assert data == (tmp_path / "m2" / name).read_bytes()
        rows += pq.read_table(tmp_path / "m1" / name).to_pylist()
    assert [r["position"] for r in rows] == list(range(eligible))
    answers = dict(zip(problems["id"].to_pylist(), problems["answer"].to_pylist()))
    with_ref = [r for r in rows if r["completion"] is not None]
    assert with_ref and all(answers[r["problem_id"]] == r["completion"] for r in with_ref)
    assert all(r["dataset"] == "arith" and r["guard"] == "none" for r in rows)


def test_rebuild_same_inputs_is_noop_and_other_inputs_refused(tmp_path, capsys):
    home_dir, _, _ = make_home(tmp_path, with_refs=False)
    assert build(home_dir, tmp_path / "m") == 0
    capsys.readouterr()
    assert build(home_dir, tmp_path / "m") == 0
    assert json.loads(capsys.readouterr().out)["already_built"] is True
    assert build(home_dir, tmp_path / "m", "--scheme", "uniform") == 1
    assert "already exists" in capsys.readouterr().err
    # A folder built by an older paced (inputs without format_version or guards) is the same build.
    path = tmp_path / "m" / "manifest.json"
    info = json.loads(path.read_text())
    for key in ("format_version", "weight_floor", "uniform_mix"):
        del info["inputs"][key]
    path.write_text(json.dumps(info))
    assert build(home_dir, tmp_path / "m") == 0
    assert json.loads(capsys.readouterr().out)["already_built"] is True


def test_guards_show_in_shard_rows_and_unknown_student_is_clear(tmp_path, capsys):
    home_dir, _, problems = make_home(tmp_path, with_refs=False)
    assert build(home_dir, tmp_path / "m", "--weight-floor", "0.1") == 0
    rows = pq.read_table(tmp_path / "m" / "shard-00000.parquet").to_pylist()
    assert {r["guard"] for r in rows} == {"floor"}
    info = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert info["items"] == problems.num_rows  # the floor keeps p=0 and p=1 problems in
    assert main(["manifest", "build", "--student", "nobody", "--dataset", "arith", "--out",
                 str(tmp_path / "x"), "--home", str(home_dir)]) == 1
    assert "no pass-rate snapshot" in capsys.readouterr().err


def test_a_pool_mostly_at_weight_zero_gets_a_warning_naming_the_fix(tmp_path, capsys):
    home_dir, _, _ = make_home(tmp_path, correct_of=lambda i: 0 if i % 3 else 4)  # 2/3 never solved
    assert build(home_dir, tmp_path / "m1") == 0
    err = capsys.readouterr().err
    assert "warning" in err and "40 of 60" in err and "paced-posterior" in err
    assert build(home_dir, tmp_path / "m2", "--scheme", "paced-posterior") == 0
    assert build(home_dir, tmp_path / "m3", "--uniform-mix", "0.1") == 0
    assert "warning" not in capsys.readouterr().err
    home_dir, _, _ = make_home(tmp_path / "b")  # 2/9 at the ends: no warning
    assert build(home_dir, tmp_path / "m4") == 0
    assert "warning" not in capsys.readouterr().err


def test_weighted_loss_shards_keep_only_referenced_rows_and_load_as_a_dataset(tmp_path, capsys):
    import datasets

    home_dir, _, problems = make_home(tmp_path)
    assert build(home_dir, tmp_path / "m", keep_unreferenced=False) == 0
    assert build(home_dir, tmp_path / "m2", keep_unreferenced=False) == 0
    assert "rows without a teacher reference" in capsys.readouterr().err
    info = json.loads((tmp_path / "m" / "manifest.json").read_text())
    eligible = [i for i in range(problems.num_rows) if 0 < i % 9 < 8]
    referenced = [i for i in eligible if i % 2 == 0]  # make_home gives even ids a reference
    assert (info["items"], info["left_out_without_reference"]) == (len(referenced),
                                                                   len(eligible) - len(referenced))
    assert info["require_reference"] and info["with_reference"] == info["items"]
    assert pq.read_table(tmp_path / "m" / "manifest.parquet").num_rows == info["items"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert card == (tmp_path / "m2" / "README.md").read_text() and info["inputs"]["snapshot_id"] in card
    loaded = datasets.load_dataset(str(tmp_path / "m"), split="train")  # the card names the shards
    assert loaded.num_rows == info["items"] and "weight" in loaded.column_names
    assert all(row["completion"] for row in loaded)


def test_conversational_shards_hold_one_turn_each_and_a_pool_without_references_is_refused(tmp_path, capsys):
    import datasets

    home_dir, _, _ = make_home(tmp_path)
    assert build(home_dir, tmp_path / "m", "--form", "conversational", keep_unreferenced=False) == 0
    row = datasets.load_dataset(str(tmp_path / "m"), split="train")[0]
    assert row["prompt"] == [{"role": "user",
                              "content": row["prompt"][0]["content"]}]  # TRL's conversational form
    assert (row["completion"][0]["role"] == "assistant" and row["completion"][0]["content"]
            and row["weight"] > 0)
    bare, _, _ = make_home(tmp_path / "bare", with_refs=False)
    assert build(bare, tmp_path / "none", keep_unreferenced=False) == 1
    assert "--no-require-reference" in capsys.readouterr().err


def test_paced_train_refuses_conversational_shards_in_one_line(tmp_path, capsys, tiny_model_dir):
    home_dir, _, _ = make_home(tmp_path)
    assert build(home_dir, tmp_path / "m", "--form", "conversational") == 0
    model = str(tiny_model_dir)
    assert main(["train", "--student", model, "--teacher", model, "--from", str(tmp_path / "m"),
                 "--out", str(tmp_path / "out"), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "conversational form" in err and "Traceback" not in err


def test_manifest_inputs_read_the_inputs_of_older_manifests_and_refuse_newer_ones():
    from paced.curriculum import WeightScheme
    from paced.errors import InputError
    from paced.jobs.manifest import ManifestInputs

    inputs = ManifestInputs(student_id="s", dataset="d", snapshot_id="x",
                            weights=WeightScheme(uniform_mix=0.1), seed=3, epoch=2)
    assert ManifestInputs.from_json(inputs.to_json()) == inputs
    # written before format_version and the guards: student, data set, snapshot, scheme, seed
    old = {"student_id": "s", "dataset": "d", "snapshot_id": "x", "scheme": "paced", "alpha": 1.0,
           "beta": 1.0, "prior": [1.0, 1.0], "seed": 3}
    assert ManifestInputs.from_json(old) == ManifestInputs(student_id="s", dataset="d", snapshot_id="x",
                                                           seed=3)
    with pytest.raises(InputError, match="format 2 is newer"):
        ManifestInputs.from_json({**inputs.to_json(), "format_version": 2})
    with pytest.raises(InputError, match="lack snapshot_id"):
        ManifestInputs.from_json({"student_id": "s", "dataset": "d"})
