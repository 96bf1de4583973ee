# The two set-up commands (README): `make run` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup run test doctor
setup:
	@bash scripts/setup.sh

# The main job on its embedded default: GRPO on the tiny-math model (local Ray, CPU vLLM).
run: setup
	$(VENV)/bin/dspost run recipes/grpo_math.yaml

test: setup
	$(VENV)/bin/python -m pytest -q -ra $(PYTEST_ARGS) tests

doctor: setup
	$(VENV)/bin/dspost doctor
