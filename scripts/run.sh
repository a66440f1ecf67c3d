#!/usr/bin/env bash
# `make run`: the whole platform on one machine with no external services. Builds the
# binaries, starts `clienteled` (every service, embedded SQLite in ./clientele-data, in-process
# cache), loads demo data through the public gRPC API with `clientele demo`, shows a profile,
# and keeps serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

export CLIENTELE_DATA_DIR=${CLIENTELE_DATA_DIR:-clientele-data}
export CLIENTELE_GRPC_ADDR=${CLIENTELE_GRPC_ADDR:-127.0.0.1:50051}
export CLIENTELE_ENDPOINT=${CLIENTELE_ENDPOINT:-http://$CLIENTELE_GRPC_ADDR}
unset CLIENTELE_DATABASE_URL CLIENTELE_REDIS_URL

echo "==> building (release; the first build takes a few minutes)"
cargo build --release -q -p clienteled -p clientele
bin=${CARGO_TARGET_DIR:-target}/release

echo "==> starting clienteled on $CLIENTELE_GRPC_ADDR (data in $CLIENTELE_DATA_DIR)"
"$bin/clienteled" --target all &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM

host=${CLIENTELE_GRPC_ADDR%:*}; port=${CLIENTELE_GRPC_ADDR##*:}
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && break
  kill -0 $server 2>/dev/null || { echo "clienteled exited; see the log above" >&2; exit 1; }
  sleep 0.1
done

echo "==> loading demo data through the gRPC API"
"$bin/clientele" demo

cat <<MSG

==> Clientele is running on $CLIENTELE_ENDPOINT (metrics: http://${CLIENTELE_METRICS_ADDR:-127.0.0.1:9464}/metrics).
    Try:  $bin/clientele profiles get <profile-id>
          $bin/clientele profiles export <profile-id>
    The development token is in $CLIENTELE_DATA_DIR/dev-token. Press Ctrl-C to stop.
MSG
wait $server
