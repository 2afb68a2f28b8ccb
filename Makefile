# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: env demo up test bench

env:
	@scripts/setup-env.sh

demo: env
	.venv/bin/dreamflow demo

up: env
	.venv/bin/dreamflow up

test: env
	.venv/bin/pytest

