#!/usr/bin/env bash
# Benchmarks the services against raw baselines measured in the same run (`make bench`).
#
# For ProfileService: builds release binaries, creates a throwaway PostgreSQL database and a
# unique Redis key prefix, starts `clienteled --target profiles` on free ports, runs
# `clientele-bench profiles` (GetProfile with a hot cache beside raw Redis GET), then stops the
# server, drops the database and deletes the keys.
#
# Environment:
#   CLIENTELE_TEST_DATABASE_URL  PostgreSQL to create the bench database in
#                                (default postgres://postgres@127.0.0.1:5432/test)
#   CLIENTELE_TEST_REDIS_URL     Redis (default redis://127.0.0.1:6379)
#   CARGO_TARGET_DIR             where binaries are built (default target/)
#   BENCH_JSON_OUT               JSON lines appended here (default <target>/bench/run-<time>.jsonl;
#                                BENCHMARKS.md's latest-run table is regenerated from it)
#   BENCH_ONLY                   comma-separated subset of profiles,ingest,assign,decide,segmentation
#                                to measure (servers still start); a partial run leaves
#                                BENCHMARKS.md alone. Default: all.
# Extra arguments go to `clientele-bench profiles`, e.g. `--duration-secs 30 --concurrency 100`;
# BENCH_INGEST_ARGS to `clientele-bench ingest`, e.g. `--customers 10000`; BENCH_INGEST_MANY=0 skips
#                                the second ingest run (30,000 customers) beside the main one.
#
# Then for IngestService: starts `clienteled --target ingest` beside the profiles process (the
# compose topology) and runs `clientele-bench ingest` (a generated stream through IngestStream
# beside a raw PostgreSQL COPY of the same events).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}
target_dir=${CARGO_TARGET_DIR:-target}
db_url=${CLIENTELE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
redis_url=${CLIENTELE_TEST_REDIS_URL:-redis://127.0.0.1:6379}
# Each run writes its own file, from which the table in BENCHMARKS.md is regenerated.
json_out=${BENCH_JSON_OUT:-$target_dir/bench/run-$(date -u +%Y%m%dT%H%M%SZ).jsonl}

say() { echo "bench: $*" >&2; }
# Whether the named part is measured in this run (BENCH_ONLY unset: every part).
want() { [ -z "${BENCH_ONLY:-}" ] || [[ ",$BENCH_ONLY," == *",$1,"* ]]; }
rand_hex() { od -An -N6 -tx1 /dev/urandom | tr -d ' \n'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# The preferred port when nothing listens there, else one the kernel hands out.
free_port() {
  if ! port_open "$1"; then echo "$1"; return; fi
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}

# --- build ---------------------------------------------------------------------------------
say "building release binaries"
"$CARGO" build --release -p clienteled -p clientele-bench
bin=$target_dir/release

# --- throwaway database, key prefix, ports, credentials ------------------------------------
# postgres://user@host:port/dbname?params → the same server, another database name.
re='^(postgres(ql)?://[^/?]+)(/[^?]*)?(\?.*)?$'
if [[ ! $db_url =~ $re ]]; then
  say "cannot parse CLIENTELE_TEST_DATABASE_URL ($db_url); expected postgres://user@host:port/db"
  exit 1
fi
server_part=${BASH_REMATCH[1]}
query=${BASH_REMATCH[4]}
id=$(rand_hex)
bench_db=clientele_bench_$id
bench_url=$server_part/$bench_db$query
admin_url=$db_url
prefix="clientele-bench-$id:"
token="bench-$(rand_hex)$(rand_hex)"
secret="$(rand_hex)$(rand_hex)$(rand_hex)"
grpc_port=$(free_port 50751)
metrics_port=$(free_port 9751)
mkdir -p "$target_dir/bench"
log=$target_dir/bench/clienteled-profiles.log
scratch=$(mktemp -d -t clientele-bench-XXXXXX)

server_pid=
ingest_pid=
db_created=
cleanup() {
  local status=$?
  if [ -n "$ingest_pid" ] && kill -0 "$ingest_pid" 2>/dev/null; then
    kill -TERM "$ingest_pid" 2>/dev/null || true
    wait "$ingest_pid" 2>/dev/null || true
  fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ -n "$db_created" ]; then
    psql "$admin_url" -qAtc "DROP DATABASE IF EXISTS $bench_db WITH (FORCE)" >/dev/null 2>&1 \
      || psql "$admin_url" -qAtc "DROP DATABASE IF EXISTS $bench_db" >/dev/null 2>&1 \
      || say "warning: could not drop database $bench_db"
  fi
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -u "$redis_url" --scan --pattern "$prefix*" 2>/dev/null \
      | xargs -r redis-cli -u "$redis_url" del >/dev/null 2>&1 || true
  fi
  rm -rf "$scratch"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "creating database $bench_db"
psql "$admin_url" -v ON_ERROR_STOP=1 -qAtc "CREATE DATABASE $bench_db" >/dev/null
db_created=1

# --- server --------------------------------------------------------------------------------
say "starting clienteled --target profiles on 127.0.0.1:$grpc_port (metrics $metrics_port, log $log)"
env -u CLIENTELE_CONFIG \
  CLIENTELE_DATABASE_URL="$bench_url" \
  CLIENTELE_REDIS_URL="$redis_url" \
  CLIENTELE_REDIS_KEY_PREFIX="$prefix" \
  CLIENTELE_GRPC_ADDR="127.0.0.1:$grpc_port" \
  CLIENTELE_METRICS_ADDR="127.0.0.1:$metrics_port" \
  CLIENTELE_DATA_DIR="$scratch/data" \
  CLIENTELE_IDENTITY__HASH_SECRET="$secret" \
  CLIENTELE_TOKENS="[{client=\"bench\",token=\"$token\",scopes=[\"*\"]}]" \
  CLIENTELE_SHUTDOWN_GRACE_SECS=5 \
  "$bin/clienteled" --target profiles >"$log" 2>&1 &
server_pid=$!

for _ in $(seq 300); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    say "clienteled exited during start-up; last lines of $log:"
    tail -n 20 "$log" >&2
    server_pid=
    exit 1
  fi
  port_open "$grpc_port" && break
  sleep 0.2
done
if ! port_open "$grpc_port"; then
  say "clienteled did not listen on 127.0.0.1:$grpc_port within 60 s; last lines of $log:"
  tail -n 20 "$log" >&2
  exit 1
fi

# --- load ----------------------------------------------------------------------------------
want profiles && CLIENTELE_TOKEN="$token" "$bin/clientele-bench" profiles \
  --endpoint "http://127.0.0.1:$grpc_port" \
  --redis-url "$redis_url" \
  --server-key-prefix "$prefix" \
  --raw-key "${prefix}bench:raw" \
  --metrics-addr "127.0.0.1:$metrics_port" \
  --server-pid "$server_pid" \
  --json-out "$json_out" \
  "$@"

# --- ingest --------------------------------------------------------------------------------
ingest_port=$(free_port 50752)
ingest_log=$target_dir/bench/clienteled-ingest.log
say "starting clienteled --target ingest on 127.0.0.1:$ingest_port (log $ingest_log)"
env -u CLIENTELE_CONFIG \
  CLIENTELE_DATABASE_URL="$bench_url" \
  CLIENTELE_REDIS_URL="$redis_url" \
  CLIENTELE_REDIS_KEY_PREFIX="$prefix" \
  CLIENTELE_GRPC_ADDR="127.0.0.1:$ingest_port" \
  CLIENTELE_METRICS_ADDR="127.0.0.1:$(free_port 9752)" \
  CLIENTELE_DATA_DIR="$scratch/data" \
  CLIENTELE_IDENTITY__HASH_SECRET="$secret" \
  CLIENTELE_TOKENS="[{client=\"bench\",token=\"$token\",scopes=[\"*\"]}]" \
  CLIENTELE_SERVICE_TOKEN="$token" \
  CLIENTELE_ENDPOINTS__PROFILES="http://127.0.0.1:$grpc_port" \
  CLIENTELE_SHUTDOWN_GRACE_SECS=5 \
  "$bin/clienteled" --target ingest >"$ingest_log" 2>&1 &
ingest_pid=$!
for _ in $(seq 300); do
  kill -0 "$ingest_pid" 2>/dev/null || { say "ingest exited; see $ingest_log"; tail -n 20 "$ingest_log" >&2; exit 1; }
  port_open "$ingest_port" && break
  sleep 0.2
done

# One `clientele-bench ingest` run against the servers above; extra arguments are its own.
ingest_bench() {
  CLIENTELE_TOKEN="$token" "$bin/clientele-bench" ingest \
    --endpoint "http://127.0.0.1:$ingest_port" \
    --database-url "$bench_url" \
    --server-pid "$ingest_pid" \
    --profiles-pid "$server_pid" \
    --json-out "$json_out" \
    "$@"
}
# shellcheck disable=SC2086 # BENCH_INGEST_ARGS is a list of arguments
want ingest && ingest_bench ${BENCH_INGEST_ARGS:-}
# The same servers again with ten times the customers over a shorter history: fewer events per
# customer per page, so the aggregates fold has less to coalesce. Reported beside the main run
# (rate, latency, how long after the last acknowledgement the aggregates had all arrived); the
# issue's goals are judged on the main run. BENCH_INGEST_MANY=0 skips it.
if want ingest && [ "${BENCH_INGEST_MANY:-1}" != 0 ]; then
  ingest_bench --customers 30000 --days 40 --seed 43 --scenario "30,000 customers"
fi

# --- experiments (clientele-bench assign) -----------------------------------------------------
# Criterion's in-process figure first (nothing else running), then `clienteled --target
# experiments` on its own port with the feed consumers off (the ingest log left by the ingest
# bench would otherwise be folded during the measurement), then Assign / BatchAssign beside
# gRPC health Check on the same server. BENCH_ASSIGN_ARGS go to `clientele-bench assign`;
# BENCH_SKIP_CRITERION=1 skips the criterion run.
criterion_estimates=$target_dir/criterion/assign_variant/v2_ascii/new/estimates.json
if [ "${BENCH_SKIP_CRITERION:-0}" != 1 ] && want assign; then
  say "criterion: in-process assign_variant (v2, ASCII ids)"
  "$CARGO" bench -p clientele-experiments --bench assignment -- \
    --warm-up-time 1 --measurement-time 5 'assign_variant/v2_ascii$' >&2
fi
exp_pid=
stop_experiments() {
  if [ -n "$exp_pid" ] && kill -0 "$exp_pid" 2>/dev/null; then
    kill -TERM "$exp_pid" 2>/dev/null || true
    wait "$exp_pid" 2>/dev/null || true
  fi
}
trap 'status=$?; stop_experiments; (exit $status); cleanup' EXIT
exp_port=$(free_port 50753)
exp_log=$target_dir/bench/clienteled-experiments.log
say "starting clienteled --target experiments on 127.0.0.1:$exp_port (log $exp_log)"
env -u CLIENTELE_CONFIG \
  CLIENTELE_DATABASE_URL="$bench_url" \
  CLIENTELE_GRPC_ADDR="127.0.0.1:$exp_port" \
  CLIENTELE_METRICS_ADDR="127.0.0.1:$(free_port 9753)" \
  CLIENTELE_DATA_DIR="$scratch/data" \
  CLIENTELE_IDENTITY__HASH_SECRET="$secret" \
  CLIENTELE_TOKENS="[{client=\"bench\",token=\"$token\",scopes=[\"*\"]}]" \
  CLIENTELE_SERVICE_TOKEN="$token" \
  CLIENTELE_EXPERIMENTS__CONSUMERS=false \
  CLIENTELE_SHUTDOWN_GRACE_SECS=5 \
  "$bin/clienteled" --target experiments >"$exp_log" 2>&1 &
exp_pid=$!
for _ in $(seq 300); do
  kill -0 "$exp_pid" 2>/dev/null || { say "experiments exited; see $exp_log"; tail -n 20 "$exp_log" >&2; exit 1; }
  port_open "$exp_port" && break
  sleep 0.2
done

want assign && CLIENTELE_TOKEN="$token" "$bin/clientele-bench" assign \
  --endpoint "http://127.0.0.1:$exp_port" \
  --server-pid "$exp_pid" \
  --criterion-estimates "$criterion_estimates" \
  --json-out "$json_out" \
  ${BENCH_ASSIGN_ARGS:-}
stop_experiments
# --- end of experiments ------------------------------------------------------------------------
# --- offers (clientele-bench decide) --------------------------------------------------------
# OfferService: starts `clienteled --target segmentation` and `--target offers` beside the
# profiles and ingest processes above (the compose topology, one database), lets the offers
# feed consumer accrue the ingested orders (accrual throughput beside single-row INSERT
# transactions), recomputes the RFM strategy segments, loads a 100-offer catalogue and drives
# Decide open-loop at a fixed rate beside a gRPC health call and a raw Redis GET at the same
# rate. BENCH_DECIDE_ARGS go to `clientele-bench decide`, e.g. `--rate 2000 --offers 200`.
offers_pids=()
offers_cleanup() {
  local status=$?
  for p in "${offers_pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${offers_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  (exit "$status")
  cleanup
}
trap offers_cleanup EXIT
offers_start() { # name port log extra-env...
  local name=$1 port=$2 log=$3; shift 3
  say "starting clienteled --target $name on 127.0.0.1:$port (log $log)"
  env -u CLIENTELE_CONFIG \
    CLIENTELE_DATABASE_URL="$bench_url" \
    CLIENTELE_REDIS_URL="$redis_url" \
    CLIENTELE_REDIS_KEY_PREFIX="$prefix" \
    CLIENTELE_GRPC_ADDR="127.0.0.1:$port" \
    CLIENTELE_METRICS_ADDR="127.0.0.1:$(free_port 9760)" \
    CLIENTELE_DATA_DIR="$scratch/data" \
    CLIENTELE_IDENTITY__HASH_SECRET="$secret" \
    CLIENTELE_TOKENS="[{client=\"bench\",token=\"$token\",scopes=[\"*\"]}]" \
    CLIENTELE_SERVICE_TOKEN="$token" \
    CLIENTELE_ENDPOINTS__PROFILES="http://127.0.0.1:$grpc_port" \
    CLIENTELE_ENDPOINTS__INGEST="http://127.0.0.1:$ingest_port" \
    CLIENTELE_SHUTDOWN_GRACE_SECS=5 \
    "$@" \
    "$bin/clienteled" --target "$name" >"$log" 2>&1 &
  local pid=$!
  offers_pids+=("$pid")
  for _ in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { say "$name exited; see $log"; tail -n 20 "$log" >&2; exit 1; }
    port_open "$port" && return 0
    sleep 0.2
  done
  say "$name did not listen on 127.0.0.1:$port"; exit 1
}
seg_port=$(free_port 50753)
offers_port=$(free_port 50754)
offers_start segmentation "$seg_port" "$target_dir/bench/clienteled-segmentation.log"
# The bench catalogue has no experiment-gated offers, so no ExperimentService runs here and
# the experiments endpoint below is only a placeholder (an experiment offer added to the bench
# would need `clienteled --target experiments` started and this pointed at it).
offers_start offers "$offers_port" "$target_dir/bench/clienteled-offers.log" \
  CLIENTELE_ENDPOINTS__SEGMENTATION="http://127.0.0.1:$seg_port" \
  CLIENTELE_ENDPOINTS__EXPERIMENTS="http://127.0.0.1:$offers_port"
offers_pid=${offers_pids[-1]}

want decide && CLIENTELE_TOKEN="$token" "$bin/clientele-bench" decide \
  --endpoint "http://127.0.0.1:$offers_port" \
  --segmentation-endpoint "http://127.0.0.1:$seg_port" \
  --profiles-endpoint "http://127.0.0.1:$grpc_port" \
  --database-url "$bench_url" \
  --redis-url "$redis_url" \
  --raw-key "${prefix}bench:decide-raw" \
  --server-pid "$offers_pid" \
  --json-out "$json_out" \
  ${BENCH_DECIDE_ARGS:-}
# --- end offers -----------------------------------------------------------------------------

# --- segmentation --------------------------------------------------------------------------
# SegmentationService: a full batch recompute of BENCH_SEGMENTATION_ARGS' --profiles customers
# (default 1 000 000) and single-profile real-time re-scores, run by the engine in-process on
# PostgreSQL in a throwaway schema of the bench database, each beside a raw baseline; then the
# k-means step (1M x 3 standardised RFM features, k = 8) beside scikit-learn's
# KMeans(algorithm="lloyd", n_init=1) on the same data file (scripts/bench_kmeans_sklearn.py).
# scikit-learn is installed quietly with pip when missing; if that fails the comparison is
# skipped with a message. Example: BENCH_SEGMENTATION_ARGS="--profiles 200000 --kmeans-rows 0".
python_bin=python3
if ! want segmentation; then
  python_bin=""
elif ! command -v "$python_bin" >/dev/null 2>&1; then
  say "segmentation: python3 not found; the scikit-learn comparison is skipped"
  python_bin=""
elif ! "$python_bin" -c "import sklearn" >/dev/null 2>&1; then
  say "segmentation: installing scikit-learn with pip (quietly)"
  "$python_bin" -m pip install --quiet --disable-pip-version-check scikit-learn >/dev/null 2>&1 \
    || "$python_bin" -m pip install --quiet --user --disable-pip-version-check scikit-learn >/dev/null 2>&1 \
    || { say "segmentation: could not install scikit-learn; the comparison is skipped"; python_bin=""; }
fi
want segmentation && "$bin/clientele-bench" segmentation \
  --database-url "$bench_url" \
  --python "$python_bin" \
  --sklearn-script scripts/bench_kmeans_sklearn.py \
  --json-out "$json_out" \
  ${BENCH_SEGMENTATION_ARGS:-}

# --- the table -----------------------------------------------------------------------------
if [ -z "${BENCH_ONLY:-}" ]; then
  python3 scripts/bench_table.py "$json_out" BENCHMARKS.md
else
  say "partial run (BENCH_ONLY=$BENCH_ONLY): figures in $json_out; BENCHMARKS.md left as it is"
fi
