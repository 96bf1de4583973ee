# The two set-up commands (README): `make run` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup run test doctor
setup:
	@bash scripts/setup.sh

# The main job on its embedded default. Until the GRPO stage lands this runs the closest working
# stage: the tiny-math SFT warm start that GRPO starts from.
run: setup
	$(VENV)/bin/dspost run recipes/sft_tiny_math.yaml

test: setup
	$(VENV)/bin/python -m pytest -q -ra $(PYTEST_ARGS) tests

doctor: setup
	$(VENV)/bin/dspost doctor
