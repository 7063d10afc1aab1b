"""Rollouts on a local Ray cluster (2 CPU actors, transformers backend) equal the single-process
rollout; engine options are validated with one-line errors."""

from __future__ import annotations

import pytest

from paced.backends.engine import EngineOptions, open_backend
from paced.errors import InputError
from paced.jobs.rollout import rollout
from paced.store.home import open_home
from tests.jobs.test_rollout import CONFIG, make_home, rows_of


def test_engine_options_are_validated_and_only_go_to_the_vllm_backend():
    for kwargs, message in (({"tensor_parallel_size": 0}, "--tensor-parallel-size must be an integer >= 1"),
                            ({"gpu_memory_utilization": 1.5},
                             r"--gpu-memory-utilization must be in \(0, 1\]"),
                            ({"dtype": "fp8"}, "--dtype must be one of auto, float32"),
                            ({"max_model_len": -4}, "--max-model-len must be"),
                            ({"ray_actors": 2}, "--ray-actors needs --ray")):
        with pytest.raises(InputError, match=message):
            EngineOptions(**kwargs)
    options = EngineOptions(tensor_parallel_size=2, dtype="bfloat16", enforce_eager=True)
    assert options.backend_kwargs("vllm") == {"tensor_parallel_size": 2, "dtype": "bfloat16",
                                              "enforce_eager": True}
    assert EngineOptions().backend_kwargs("transformers") == {}
    with pytest.raises(InputError,
                       match="--tensor-parallel-size, --dtype, --enforce-eager only apply to the vllm"):
        options.backend_kwargs("transformers")


def test_engine_option_errors_reach_the_cli_as_one_line(tmp_path, tiny_model_dir, capsys):
    from paced.cli import main

    home = make_home(tmp_path, n=2)
    args = ["rollout", "--student", str(tiny_model_dir), "--dataset", "arith", "--backend", "transformers",
            "--home", str(home)]
    assert main([*args, "--gpu-memory-utilization", "2"]) != 0
    assert main([*args, "--max-model-len", "64"]) != 0
    err = capsys.readouterr().err
    assert "--gpu-memory-utilization must be in (0, 1]" in err and "only apply to the vllm backend" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_rollout_on_a_local_ray_cluster_equals_the_single_process_rollout(tmp_path, tiny_model_dir):
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install 'paced[ray]')")
    from paced.backends.hf_backend import HFBackend

    single, on_ray = make_home(tmp_path / "single", n=10), make_home(tmp_path / "ray", n=10)
    with HFBackend(tiny_model_dir, batch_size=64) as backend:
        rollout(open_home(single), None, "arith", CONFIG, student_id="s1", backend=backend, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        engine = EngineOptions(ray="local", ray_actors=2)
        with open_backend("transformers", tiny_model_dir, engine, batch_size=64) as backend:
            assert len(backend.actors) == 2
            summary = rollout(open_home(on_ray), None, "arith", CONFIG, student_id="s1", backend=backend,
                              progress=False)
            assert summary["samples"] == 20
        assert ray.is_initialized()  # a cluster it did not start is left running
    finally:
        ray.shutdown()
    a, b = rows_of(on_ray, "s1"), rows_of(single, "s1")
    assert a.num_rows == 20 and a.equals(b)
