"""pytest plugin: run the loss tests (tests/trainer/test_losses.py, test_fused.py) with tensors on a device.

    # with bench/gpu on PYTHONPATH:
    python3 -m pytest -p cuda_plugin tests/trainer/test_losses.py tests/trainer/test_fused.py

torch's default device becomes PACED_TEST_DEVICE (default cuda), so every tensor a test makes
with torch.tensor/zeros/... lands there; the tests' input builders (`make_batch`, `make_inputs`,
which draw from a CPU generator) are wrapped to draw on the CPU as before and then move their
tensors to the device. Adapted from ../shared/gpu-check/cuda_plugin.py; nothing in the project
changes.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

DEVICE = os.environ.get("PACED_TEST_DEVICE", "cuda")


def pytest_configure(config):
    torch.set_default_device(DEVICE)


def pytest_report_header(config):
    name = torch.cuda.get_device_name() if DEVICE.startswith("cuda") and torch.cuda.is_available() else DEVICE
    return f"cuda_plugin: default torch device {DEVICE} ({name})"


def _to_device(x):
    if isinstance(x, torch.Tensor):
        leaf = x.detach().to(DEVICE)
        return leaf.requires_grad_(x.requires_grad) if x.is_floating_point() else leaf
    if dataclasses.is_dataclass(x):
        return type(x)(**{f.name: _to_device(getattr(x, f.name)) for f in dataclasses.fields(x)})
    if isinstance(x, tuple | list):
        return type(x)(_to_device(v) for v in x)
    return x


@pytest.fixture(autouse=True, scope="module")
def _inputs_on_device(request):
    module = request.module
    originals = {name: getattr(module, name) for name in ("make_batch", "make_inputs")
                 if hasattr(module, name)}

    def wrap(original):
        def build(*args, **kwargs):
            with torch.device("cpu"):
                made = original(*args, **kwargs)
            return _to_device(made)
        return build

    for name, original in originals.items():
        setattr(module, name, wrap(original))
    yield
    for name, original in originals.items():
        setattr(module, name, original)
