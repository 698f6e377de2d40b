# NIO: `make demo` runs NIO on simulated clusters and a simulated fleet; `make test` runs every test.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/nio-target
export NIO_TOOLS_DIR ?= $(HOME)/.cache/nio-tools
export PATH := $(NIO_TOOLS_DIR)/bin:/usr/sbin:$(PATH)
CARGO ?= cargo

.PHONY: setup test lint crds fmt demo loadtest

setup:
	@scripts/setup

test: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

crds:
	$(CARGO) run -q -p nio-shared --bin crdgen -- crds
	$(CARGO) run -q -p nio-shared --bin crdgen -- deploy/base/crds

fmt:
	$(CARGO) fmt --all

demo: setup
	$(CARGO) build --workspace --bins
	$(CARGO_TARGET_DIR)/debug/nio-loadtest demo

loadtest: setup
	$(CARGO) build --release --workspace --bins
	$(CARGO_TARGET_DIR)/release/nio-loadtest run --machines 500 --sites 4 --site-limit 25 --executors 3 --report loadtest-report.json
