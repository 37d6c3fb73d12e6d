#!/bin/sh
# Starts one sentinel of the bundled highly available Redis
# (redis.bundled.highAvailability), watching the primary the other sentinels name,
# or server 0 when none answers (the first start of the set).
#
# Environment: REDIS_NODES, SENTINEL_NODES, NODE_INDEX, MASTER_NAME (as redis.sh),
# QUORUM, DOWN_AFTER_MILLISECONDS, FAILOVER_TIMEOUT_MILLISECONDS, SENTINEL_CONFIG (a
# writable file: a sentinel rewrites its configuration as it learns), and
# SENTINEL_REDIS_PASSWORD (the chatstream-sentinel user's; empty: no ACL users).
set -eu

index=${NODE_INDEX:-${HOSTNAME##*-}}
i=0
me=""
for node in $SENTINEL_NODES; do
  [ "$i" = "$index" ] && me=$node
  i=$((i + 1))
done
first=${REDIS_NODES%% *}
if [ -z "$me" ]; then
  echo "sentinel.sh: node $index is not in SENTINEL_NODES ($SENTINEL_NODES)" >&2
  exit 1
fi

primary=""
for sentinel in $SENTINEL_NODES; do
  [ "$sentinel" != "$me" ] || continue
  answer=$(timeout 3 redis-cli -h "${sentinel%:*}" -p "${sentinel##*:}" --raw \
    sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | tr '\n' ' ') || answer=""
  # shellcheck disable=SC2086
  set -- $answer
  if [ $# -eq 2 ]; then
    primary="$1:$2"
    break
  fi
done
[ -n "$primary" ] || primary=$first

# A sentinel refuses to start on a name that does not resolve yet (a pod's DNS record
# appears with the pod): wait for it, for a while.
waited=0
until timeout 3 redis-cli -h "${primary%:*}" -p "${primary##*:}" ping >/dev/null 2>&1 || [ "$waited" -ge 60 ]; do
  sleep 1
  waited=$((waited + 1))
done

config=${SENTINEL_CONFIG:-/data/sentinel.conf}
umask 077
cat > "$config" <<CONF
port ${me##*:}
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${me%:*}
sentinel announce-port ${me##*:}
sentinel monitor $MASTER_NAME ${primary%:*} ${primary##*:} $QUORUM
sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MILLISECONDS
sentinel failover-timeout $MASTER_NAME $FAILOVER_TIMEOUT_MILLISECONDS
sentinel parallel-syncs $MASTER_NAME 1
CONF
if [ -n "${SENTINEL_REDIS_PASSWORD:-}" ]; then
  printf 'sentinel auth-user %s chatstream-sentinel\nsentinel auth-pass %s %s\n' \
    "$MASTER_NAME" "$MASTER_NAME" "$SENTINEL_REDIS_PASSWORD" >> "$config"
fi
echo "sentinel.sh: watching $primary as $MASTER_NAME"
exec redis-server "$config" --sentinel
