"""Shared test setup: offline by construction, one tiny model and one vLLM engine per session.

`tests/` mirrors `paced/`: one folder per package (curriculum, backends, grading, tasks, api,
jobs, trainer, integrations) and client/ for paced/client.py, each with a conftest.py where
its tests share fixtures. Helpers several folders use stay here (`api_fixtures.py`,
`trainer_helpers.py`, `fault_helpers.py`); `test_layers.py` and `test_packaging.py` check the
whole package. Tests over ~20 s are marked `slow`: `make test-fast` (`pytest -m "not slow"`)
leaves them out, `make test` runs everything.
"""

from __future__ import annotations

import os

# Offline: no model or data set hub at test time (set before anything imports transformers).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
# One torch thread unless told otherwise: on a small shared machine two OpenMP threads that
# spin-wait for each other made a tiny model's matmuls ~80x slower (0.5 ms vs 40 ms).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Llama with the character tokenizer, saved once per session."""
    from paced.tasks.models import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def vllm_backend(tiny_model_dir):
    """One vLLM engine over `tiny_model_dir` for the whole session (starting one takes 10-60 s).

    Tests must not close it. Skips where vllm is not installed."""
    pytest.importorskip("vllm")
    from paced.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(tiny_model_dir)
    yield backend
    backend.close()
