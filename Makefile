# Clientele: the two commands a new user needs are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test lint fmt bench build clean-data validate-k8s

## Runs every service in one process on embedded SQLite with the in-process cache, loads demo
## data through the public API and keeps serving until Ctrl-C.
run:
	./scripts/run.sh

## Runs formatting and lint checks, renders and validates the Kubernetes manifests, then every
## test, reusing or starting PostgreSQL and Redis.
test: lint validate-k8s
	./scripts/test-env.sh ./scripts/run-tests.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Renders every deploy/k8s overlay and validates it offline (schemas + the platform's rules).
validate-k8s:
	./scripts/validate-k8s.sh

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --release -p clienteled -p clientele

## Benchmarks against baselines measured in the same run (see BENCHMARKS.md).
bench:
	./scripts/test-env.sh ./scripts/bench.sh

## Deletes the embedded default's data folder.
clean-data:
	rm -rf clientele-data
