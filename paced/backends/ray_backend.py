"""Generation on a Ray cluster: one actor per device, each holding one of our backends.

    pip install 'paced[ray]'          # ray[data]; not ray[llm], which pins another vLLM
    paced rollout ... --ray           # RAY_ADDRESS, or a new local cluster
    paced rollout ... --ray ray://head:10001 --backend vllm --tensor-parallel-size 2

`RayBackend` is a `Backend`: a job hands it a batch of prompts with one seed each, exactly as it
would a local backend; the batch is cut into one contiguous slice per actor, each actor's own
backend (a vLLM engine on its GPUs, or transformers on the CPU) generates its slice, and the
results come back in prompt order. Every sample is still its own request with its own seed, so
the output equals a single-process run's; grading and the atomic commits stay in the job's
process. Actors: `actors`, else one per `tensor_parallel_size` GPUs of the cluster, else one
per alive node (each takes one CPU). Every node needs paced installed and the model directory
(or the Hugging Face cache holding a Hub id) at the same path (a shared filesystem).
"""

from __future__ import annotations

import os
from pathlib import Path

from paced.backends.base import Backend, Completion, SamplingConfig, check_model_dir, resolve_seeds
from paced.errors import InputError, PacedError


class _GenerationActor:
    """A Ray actor's state: one local backend."""

    def __init__(self, name: str, model_dir: str, kwargs: dict):
        from paced.backends import load_backend

        self.backend = load_backend(name, model_dir, **kwargs)

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[str], params: SamplingConfig,
                 seeds: list[int]) -> list[list[Completion]]:
        return self.backend.generate(prompts, params, seeds=seeds)

    def close(self) -> None:
        self.backend.close()


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise InputError("--ray needs the ray package: pip install 'paced[ray]'") from err
    return ray


def count_actors(ray, gpus_per_actor: int) -> tuple[int, int]:
    """(actors, GPUs each) for the connected cluster: one per `gpus_per_actor` GPUs, else per node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        if gpus < gpus_per_actor:
            raise InputError(f"the Ray cluster has {gpus} GPUs; --tensor-parallel-size {gpus_per_actor} "
                             "needs more")
        return gpus // gpus_per_actor, gpus_per_actor
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive"))), 0


class RayBackend(Backend):
    """Fans a job's requests out to backends held by Ray actors (see the module doc)."""

    name = "ray"

    def __init__(self, backend_name: str, model_dir: str | Path, *, address: str | None = "local",
                 actors: int | None = None, **kwargs):
        ray = _import_ray()
        self._ray, self.actors = ray, []
        self._owns_cluster = not ray.is_initialized()
        if self._owns_cluster:
            target = None if address in (None, "local") else address
            try:
                ray.init(address=target or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                         include_dashboard=False, logging_level="WARNING")
            except ConnectionError as err:
                raise InputError(f"cannot reach the Ray cluster at {target}: {err}") from err
        count, gpus = count_actors(ray, int(kwargs.get("tensor_parallel_size") or 1))
        remote = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus)(_GenerationActor)
        path = str(check_model_dir(model_dir))  # an absolute path (a Hub id: its snapshot in the HF cache)
        self.actors = [remote.remote(backend_name, path, kwargs)
                       for _ in range(actors or count)]
        self._gather([a.ready.remote() for a in self.actors])  # surfaces load errors here, not at generate

    def _gather(self, refs: list) -> list:
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayActorError as err:
            raise PacedError(f"a Ray generation actor died: {err}") from err
        except self._ray.exceptions.RayTaskError as err:
            cause = err.as_instanceof_cause()
            raise (cause if isinstance(cause, PacedError)
                   else PacedError(f"Ray generation failed: {err}")) from err

    def generate(self, prompts: list[str], params: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        if not self.actors:
            raise InputError("the ray backend is closed")
        seeds = resolve_seeds(prompts, params, seeds)
        size = -(-len(prompts) // len(self.actors)) if prompts else 1
        slices = [(i, min(i + size, len(prompts))) for i in range(0, len(prompts), size)]
        busy = self.actors[: len(slices)]
        parts = self._gather([a.generate.remote(prompts[lo:hi], params, seeds[lo:hi])
                              for a, (lo, hi) in zip(busy, slices, strict=True)])
        return [completions for part in parts for completions in part]

    def close(self) -> None:
        """Free the actors (and stop the local cluster this backend started); safe twice."""
        actors, self.actors = self.actors, []
        for actor in actors:
            self._ray.kill(actor)
        if actors and self._owns_cluster:
            self._ray.shutdown()
