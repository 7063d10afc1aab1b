"""Models named by a local folder or by a Hugging Face Hub id, resolved offline through a
pre-populated Hugging Face cache (the layout `hf download` leaves: refs/main -> snapshots/REV)."""

import json
import shutil

import huggingface_hub.constants
import pytest

from paced.backends.base import check_model_dir, model_id
from paced.cli import main
from paced.errors import InputError

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """An HF cache holding `paced-test/tiny` (the tiny model's files); HF_HUB_OFFLINE=1 (conftest)."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--paced-test--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    return repo / "snapshots" / REVISION


def test_a_hub_id_resolves_to_its_cached_snapshot_and_hashes_like_the_folder(hub_cache, tiny_model_dir):
    assert check_model_dir("paced-test/tiny") == hub_cache.resolve()
    assert model_id("paced-test/tiny") == model_id(tiny_model_dir)
    assert check_model_dir(tiny_model_dir) == tiny_model_dir.resolve()  # a folder stays a folder
    with pytest.raises(InputError, match=r"not found: no local folder 'paced-test/absent'.*hf download"):
        check_model_dir("paced-test/absent")
    with pytest.raises(InputError, match="model directory not found"):
        check_model_dir("./no/such/folder")


def test_evaluate_takes_a_hub_id_and_a_chat_template_flag(hub_cache, tiny_model_dir, tmp_path, capsys):
    home = str(tmp_path / "h")
    assert main(["import", "builtin:arithmetic", "--n", "4", "--dataset", "a", "--home", home]) == 0
    capsys.readouterr()
    args = ["evaluate", "--model", "paced-test/tiny", "--dataset", "a", "--greedy-only", "--max-new-tokens",
            "2", "--backend", "transformers", "--home", home]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["model"]["model_id"] == model_id(tiny_model_dir)
            and report["model"]["sets"]["a"]["greedy"]["problems"] == 4)
    assert main([*args, "--chat-template"]) == 1  # the tiny tokenizer has no template: said in one line
    assert "has no chat template" in capsys.readouterr().err


def test_train_takes_hub_ids_and_warns_when_the_snapshot_saw_other_prompts(hub_cache, tmp_path, capsys):
    from api_fixtures import make_service_home

    from paced.store.files import write_json_atomic

    home, sid = make_service_home(tmp_path, n=20)
    write_json_atomic(home.snapshots_dir("s1") / f"{sid}.json", {"sampling": {"chat_template": True}})
    shards = tmp_path / "m"
    assert main(["manifest", "build", "--student", "s1", "--dataset", "arith", "--out", str(shards),
                 "--home", str(home.root)]) == 0
    assert json.loads(capsys.readouterr().out)["measured_with_chat_template"] is True
    assert main(["train", "--student", "paced-test/tiny", "--teacher", "paced-test/tiny", "--from",
                 str(shards),
                 "--out", str(tmp_path / "out"), "--steps", "1", "--batch-size", "2", "--no-progress",
                 "--home", str(home.root)]) == 0
    err = capsys.readouterr().err
    assert ("warning: snapshot" in err and "rendered with the chat template" in err
            and "add --chat-template" in err)
    assert (tmp_path / "out" / "final" / "config.json").is_file()
