"""The nouns every generation backend shares: sampling settings, completions, seeds, model ids.

Pure Python (no torch, no vllm at import), so jobs can build a `SamplingConfig`, hash it and
derive seeds without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from paced.errors import InputError

# Files that decide what a model generates: config, weights, tokenizer, chat template.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.bin", "*.safetensors.index.json",
    "*.bin.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "*.model", "chat_template.*",
)
SEED_MODULUS = 2**62  # vLLM adds the sample index to a request seed; stay far below int64 max.


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: K completions per prompt, the same for every backend.

    `n` is K; `temperature` 0 means greedy; `top_p` is nucleus sampling (1 = off); no top-k.
    `stop` strings end a completion (the text is cut before the first one); `chat_template`
    renders each prompt as one user turn with the tokenizer's chat template.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    seed: int = 0
    stop: tuple[str, ...] = field(default=())
    chat_template: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.n < 1:
            raise InputError(f"`n` must be >= 1, got {self.n}")
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"`{name}` must be a finite number, got {getattr(self, name)}",
                                 detail={"field": name})
        if self.temperature < 0:
            raise InputError(f"`temperature` must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise InputError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"`stop` must be non-empty strings, got {self.stop!r}")

    def hash(self) -> str:
        """12 hex chars over every field (all of them change outputs); stable across runs."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Completion:
    """One sampled continuation. `tokens` counts generated tokens, the final EOS or the token
    that completed a stop string included; `text` excludes EOS and the stop string;
    `finish_reason` is "stop" (EOS or stop string) or "length" (hit `max_new_tokens`)."""

    text: str
    tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] | None = None


def derive_seed(seed: int, key: int | str) -> int:
    """A seed for one prompt from the run seed and a stable key (problem id or prompt index).

    Seeding per prompt, not per batch, keeps a prompt's samples the same whatever batch it
    lands in, so a killed and resumed rollout equals an uninterrupted one."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def sample_seed(run_seed: int, problem_id: str, sample_idx: int) -> int:
    """The seed of sample `sample_idx` of one problem under a run seed: `derive_seed(run_seed,
    problem_id) + sample_idx` (vLLM seeds the i-th of n samples with seed + i). `paced rollout`
    and the trainer's group sampling both use it, so their samples can be compared one to one."""
    return (derive_seed(run_seed, problem_id) + sample_idx) % SEED_MODULUS


def resolve_seeds(prompts: list[str], params: SamplingConfig, seeds: list[int] | None) -> list[int]:
    """Per-prompt seeds: the caller's, or derived from (params.seed, prompt index)."""
    if seeds is None:
        return [derive_seed(params.seed, i) for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise InputError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    return [int(s) % SEED_MODULUS for s in seeds]


HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_model_dir(model_dir: str | Path) -> Path:
    """A local model directory with a config.json, or a Hugging Face Hub id (`org/name`)
    resolved to its snapshot in the Hugging Face cache (fetched there first unless
    HF_HUB_OFFLINE=1); else an InputError naming both places looked in."""
    path = Path(model_dir).expanduser()
    if not path.exists() and HUB_ID.match(str(model_dir)) and not str(model_dir).startswith("."):
        path = hub_snapshot(str(model_dir))
    if not path.is_dir():
        raise InputError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise InputError(f"no config.json in model directory: {path}")
    return path.resolve()


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of Hub model `repo_id` (see `check_model_dir`)."""
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(repo_id, repo_type="model", local_files_only=offline))
    except Exception as err:  # the hub's many errors (not cached, no network, no such repo): one line
        where = f"no local folder {repo_id!r}, and the Hugging Face cache ({constants.HF_HUB_CACHE})"
        how = "has no snapshot of it (HF_HUB_OFFLINE=1: fetch it first with `hf download " + repo_id + "`)" \
            if offline else f"could not fetch it: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        raise InputError(f"model {repo_id!r} not found: {where} {how}",
                         detail={"field": "model", "value": repo_id}) from err


def model_files(model_dir: Path) -> list[Path]:
    """The files that decide a model's outputs, sorted by relative path."""
    files = {p for pattern in MODEL_FILE_PATTERNS for p in model_dir.rglob(pattern) if p.is_file()}
    return sorted(files, key=lambda p: p.relative_to(model_dir).as_posix())


def model_id(model_dir: str | Path) -> str:
    """"m-" + 12 hex chars of sha256 over the model's files (relative paths and contents).

    Changes when weights, config or tokenizer change; the directory's location does not matter.
    """
    root = check_model_dir(model_dir)
    digest = hashlib.sha256()
    for path in model_files(root):
        rel = path.relative_to(root).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "big") + rel + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return "m-" + digest.hexdigest()[:12]


def render_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Token ids per prompt, the same for every backend.

    Plain prompts get the tokenizer's special tokens (e.g. BOS); chat prompts are rendered as
    one user turn with the generation prompt, whose template already holds any BOS."""
    if not chat_template:
        return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("`chat_template` is set but the tokenizer has no chat template")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                      add_generation_prompt=True)
        for p in prompts
    ]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def check_prompt_lengths(prompt_ids: list[list[int]], max_length: int | None) -> None:
    """InputError when a prompt does not fit the model's context."""
    if max_length is None:
        return
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= max_length:
            raise InputError(
                f"prompt {i} is {len(ids)} tokens; the model's context is {max_length} tokens"
            )


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


class Backend:
    """What every backend offers: `generate`, `close`, and use as a context manager."""

    name = "base"

    def generate(
        self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt, in prompt order.

        `seeds` (one per prompt) fix each prompt's samples whatever else is in the batch; by
        default they are derived from `params.seed` and the prompt's index."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model; the backend cannot generate afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
