# The two set-up commands (README): `make run` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PYTEST_ARGS ?=
MUTANTS_ARGS ?=

.PHONY: setup run test doctor mutants
setup:
	@bash scripts/setup.sh

# The main job on its embedded default: GRPO on the tiny-math model (local Ray, CPU vLLM).
run: setup
	$(VENV)/bin/dspost run recipes/grpo_math.yaml

test: setup
	$(VENV)/bin/python -m pytest -q -ra $(PYTEST_ARGS) tests

# The mutation check (TESTING.md): each listed change to the code must make its guarding tests fail. Slow (the
# GRPO rows start vLLM engines), so not part of `make test`. E.g. make mutants MUTANTS_ARGS="--only 'fp8-*'".
mutants: setup
	$(VENV)/bin/python scripts/mutants.py $(MUTANTS_ARGS)

doctor: setup
	$(VENV)/bin/dspost doctor
