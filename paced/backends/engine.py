"""How a job's backend is built: vLLM engine options and, optionally, a Ray cluster to run on.

    --tensor-parallel-size N       GPUs one vLLM engine spans (default 1)
    --gpu-memory-utilization F     share of each GPU's memory vLLM may take, in (0, 1] (default 0.85)
    --dtype D                      auto, float32, float16 or bfloat16 (default: float32 on the CPU,
                                   auto on a GPU)
    --max-model-len N              context length of the engine (default: the model's)
    --enforce-eager                no CUDA graphs (less memory, slower; the default on the CPU)
    --ray [ADDRESS]                generate on a Ray cluster: one actor per device (see
                                   `paced.backends.ray_backend`); no ADDRESS: RAY_ADDRESS or a local one
    --ray-actors N                 how many actors (default: one per GPU, else one per node)

The vLLM options only apply to the vllm backend: given with `--backend transformers` (or
`auto` where vllm is not installed) they are an error, not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from paced.errors import InputError

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EngineOptions:
    """vLLM engine options (None: the backend's default) and where to run (Ray or here)."""

    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    ray: str | None = None  # None: in this process; "local": RAY_ADDRESS or a new local cluster
    ray_actors: int | None = None

    def __post_init__(self):
        for name in ("tensor_parallel_size", "max_model_len", "ray_actors"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}",
                                 detail={"field": name})
        g = self.gpu_memory_utilization
        if g is not None and not 0 < g <= 1:
            raise InputError(f"--gpu-memory-utilization must be in (0, 1], got {g}",
                             detail={"field": "gpu_memory_utilization"})
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}",
                             detail={"field": "dtype"})
        if self.ray_actors is not None and self.ray is None:
            raise InputError("--ray-actors needs --ray", detail={"field": "ray_actors"})

    def vllm_kwargs(self) -> dict:
        """The options that were given, as `VLLMBackend` keyword arguments."""
        names = ("tensor_parallel_size", "gpu_memory_utilization", "dtype", "max_model_len", "enforce_eager")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def backend_kwargs(self, backend_name: str) -> dict:
        """Keyword arguments for `load_backend(backend_name, ...)`; InputError when the vLLM
        options were given for another backend."""
        kwargs = self.vllm_kwargs()
        if kwargs and backend_name != "vllm":
            flags = ", ".join("--" + k.replace("_", "-") for k in kwargs)
            raise InputError(f"{flags} only apply to the vllm backend, not {backend_name!r}",
                             detail={"field": "backend"})
        return kwargs


DEFAULT_ENGINE = EngineOptions()


def open_backend(name: str | None, model_dir: str | Path, engine: EngineOptions = DEFAULT_ENGINE, **extra):
    """A backend over `model_dir`: here (`load_backend`), or on Ray when `engine.ray` is set."""
    from paced.backends import default_backend_name, load_backend

    name = default_backend_name() if name in (None, "auto") else name
    kwargs = {**engine.backend_kwargs(name), **extra}
    if engine.ray is None:
        return load_backend(name, model_dir, **kwargs)
    from paced.backends.ray_backend import RayBackend

    return RayBackend(name, model_dir, address=engine.ray, actors=engine.ray_actors, **kwargs)


def add_engine_arguments(parser, *, ray: bool = True) -> None:
    group = parser.add_argument_group("vLLM engine (the vllm backend only)")
    group.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs per engine (default 1)")
    group.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="share of GPU memory vLLM may use, in (0, 1] (default 0.85)")
    group.add_argument("--dtype", default=None, help=f"one of {', '.join(DTYPES)} (default: float32 on CPU, "
                                                     "auto on GPU)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="engine context length (default: the model's)")
    group.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    if ray:
        group = parser.add_argument_group("Ray (pip install 'paced[ray]')")
        group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                           help="generate on a Ray cluster, one actor per device; no ADDRESS: RAY_ADDRESS "
                                "or a new local cluster")
        group.add_argument("--ray-actors", type=int, default=None,
                           help="actors to start (default: one per GPU of the cluster, else one per node)")


def engine_options(args) -> EngineOptions:
    """EngineOptions from parsed `add_engine_arguments` flags."""
    return EngineOptions(tensor_parallel_size=args.tensor_parallel_size,
                         gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype,
                         max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                         ray=getattr(args, "ray", None), ray_actors=getattr(args, "ray_actors", None))
