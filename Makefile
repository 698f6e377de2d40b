# NIO: `make demo` runs NIO on simulated clusters and a simulated fleet; `make test` runs every test.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/nio-target
export NIO_TOOLS_DIR ?= $(HOME)/.cache/nio-tools
export PATH := $(NIO_TOOLS_DIR)/bin:/usr/sbin:$(PATH)
CARGO ?= cargo

.PHONY: setup test lint crds fmt demo loadtest fuzz

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

# Each fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS, from its seeds and the corpus grown by earlier runs.
# cargo-fuzz needs a nightly toolchain for the sanitizer; a crash stops with the input in fuzz/artifacts/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = messages known_hosts remote_commands validation kubesim_patch
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t && \
	  CARGO_TARGET_DIR=$(HOME)/.cache/nio-fuzz-target $(CARGO) +nightly fuzz run $$t corpus/$$t seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 > corpus/$$t.log 2>&1 \
	    || { tail -40 corpus/$$t.log; echo "fuzz target $$t failed: the input is in fuzz/artifacts/$$t/"; exit 1; }; \
	  echo "$$t: $$(grep -o 'stat::number_of_executed_units: [0-9]*' corpus/$$t.log | grep -o '[0-9]*$$') executions," \
	    "$$(ls corpus/$$t | wc -l) inputs in the corpus"; \
	done

demo: setup
	$(CARGO) build --workspace --bins
	$(CARGO_TARGET_DIR)/debug/nio-loadtest demo $(DEMO_ARGS)

# The standard scenarios (release build); reports and plots in loadtest/results/.
LT = $(CARGO_TARGET_DIR)/release/nio-loadtest
# (9): waves of 1 %, 10 % (tolerating 2 % of it failing) and the rest, each soaking 5 s; 5 % of the machines break.
WAVES = {"name": "one-percent", "count": "1%", "soak": "5s"}, {"name": "ten-percent", "count": "10%", "maxFailures": "2%", "soak": "5s"}, {"name": "rest"}
WAVES_HALT = {"onFailure": "Halt", "waves": [$(WAVES)]}
WAVES_ROLLBACK = {"onFailure": "RollbackAndHalt", "waves": [$(WAVES)]}
# (10): two clusters, each rolling out its half of the fleet, sharing one disruption budget of 20 machines.
BUDGET = {"disruptionBudgets": [{"name": "fleet", "maxUnavailable": 20}]}
loadtest: setup
	$(CARGO) build --release --workspace --bins
	mkdir -p loadtest/results
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 0ms --report loadtest/results/1-throughput.json
	$(LT) run --quiet --machines 500 --sites 5 --site-limit 20 --executors 2 --switch-latency 800ms..1200ms --report loadtest/results/2-efficiency.json
	$(LT) run --quiet --machines 500 --sites 5 --site-limit 20 --executors 2 --switch-latency 800ms..1200ms --fault kill-executor@50% --ack-wait-seconds 3 --report loadtest/results/3a-kill-executor.json
	$(LT) run --quiet --machines 500 --sites 5 --site-limit 20 --executors 2 --switch-latency 800ms..1200ms --clusters 2 --report loadtest/results/3b-two-clusters.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 800ms..1200ms --fault kill-executor@50% --ack-wait-seconds 3 --report loadtest/results/3c-kill-executor-1000.json
	$(LT) compare --machines 200 --concurrency 50 --report loadtest/results/4-compare.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 0ms --nats-nodes 3 --fault kill-nats-node@50% --report loadtest/results/5-nats-cluster.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 0ms --nats-nodes 3 --fault partition-nats-node@50% --report loadtest/results/5b-nats-partition.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 0ms --poison 10000 --report loadtest/results/6-poison.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 0ms --controller-replicas 2 --fault kill-leader@50% --report loadtest/results/7-kill-leader.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 0ms --push-via webhook --report loadtest/results/8-push-webhook.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 100ms..300ms --broken 0.05 --rollout '$(WAVES_HALT)' --report loadtest/results/9a-waves-halt.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --switch-latency 100ms..300ms --broken 0.05 --rollout '$(WAVES_ROLLBACK)' --report loadtest/results/9b-waves-rollback.json
	$(LT) run --quiet --machines 1000 --sites 10 --site-limit 50 --executors 2 --clusters 2 --switch-latency 100ms..300ms --rollout '$(BUDGET)' --report loadtest/results/10-disruption-budget.json
	$(LT) run --quiet --machines 500 --sites 20 --site-limit 50 --executors 2 --switch-latency 0ms --report loadtest/results/11a-scale-500.json
	$(LT) run --quiet --machines 5000 --sites 20 --site-limit 50 --executors 2 --switch-latency 0ms --report loadtest/results/11b-scale-5000.json
	$(LT) run --quiet --machines 1000 --sites 1 --site-limit 1000 --executors 1 --switch-latency 10s --report loadtest/results/12-in-flight-1000.json
