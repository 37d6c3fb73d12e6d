#!/usr/bin/env bash
# `make run`: Redis (when nothing answers at REDIS_URL), one generator and the API,
# all in the foreground. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export API_PORT="${API_PORT:-8000}"
mkdir -p .run
pids=()
redis_pid=""

cleanup() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    # Redis last: the API and the generator clean up their keys on the way out.
    if [ -n "$redis_pid" ]; then
        kill -TERM "$redis_pid" 2>/dev/null || true
        wait "$redis_pid" 2>/dev/null || true
    fi
}
trap cleanup INT TERM EXIT

if ! $PY - <<'PYEOF' 2>/dev/null
import os, redis
redis.Redis.from_url(os.environ["REDIS_URL"], socket_connect_timeout=1).ping()
PYEOF
then
    port=$($PY -c 'import os, urllib.parse; print(urllib.parse.urlparse(os.environ["REDIS_URL"]).port or 6379)')
    echo "starting redis-server on 127.0.0.1:$port"
    # In a session of its own, so that Ctrl-C (sent to the whole foreground group)
    # does not stop it before the others have finished with it.
    setsid redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$PWD/.run" --logfile "$PWD/.run/redis.log" &
    redis_pid=$!
    for _ in $(seq 50); do
        $PY -c 'import os, redis; redis.Redis.from_url(os.environ["REDIS_URL"]).ping()' 2>/dev/null && break
        sleep 0.1
    done
fi

$PY -m services.generator &
pids+=($!)
$PY -m services.api &
pids+=($!)
echo "API on http://127.0.0.1:$API_PORT (the generator is ready when /readyz answers 200); Ctrl-C stops everything."
# Exit (and clean up) as soon as any component stops.
wait -n
