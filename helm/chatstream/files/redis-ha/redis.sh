#!/bin/sh
# Starts one Redis server of the bundled highly available Redis
# (redis.bundled.highAvailability): as a replica of the primary the sentinels name,
# or as the primary when there is none yet. The arguments are redis-server's.
#
# Environment: REDIS_NODES (host:port of every server, in StatefulSet order),
# NODE_INDEX (this one's place in it; default: the pod name's ordinal),
# SENTINEL_NODES (host:port of every sentinel), MASTER_NAME, PRIMARY_WAIT_SECONDS,
# REPLICATION_PASSWORD (empty: no ACL users).
set -eu

index=${NODE_INDEX:-${HOSTNAME##*-}}
i=0
me=""
first=""
for node in $REDIS_NODES; do
  [ -n "$first" ] || first=$node
  [ "$i" = "$index" ] && me=$node
  i=$((i + 1))
done
if [ -z "$me" ]; then
  echo "redis.sh: node $index is not in REDIS_NODES ($REDIS_NODES)" >&2
  exit 1
fi

# The primary (host:port) as the first sentinel that answers names it; nothing when none does.
ask_sentinels() {
  for sentinel in $SENTINEL_NODES; do
    answer=$(timeout 3 redis-cli -h "${sentinel%:*}" -p "${sentinel##*:}" --raw \
      sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null | tr '\n' ' ') || answer=""
    # shellcheck disable=SC2086
    set -- $answer
    if [ $# -eq 2 ]; then
      echo "$1:$2"
      return
    fi
  done
}

# INFO replication of another server, as "role offset" (offset: its replication
# offset, which a replica keeps after losing its primary; 0 before its first sync).
replication_of() {
  # shellcheck disable=SC2086
  timeout 3 redis-cli -h "${1%:*}" -p "${1##*:}" \
    ${REPLICATION_PASSWORD:+--user chatstream-replication --pass "$REPLICATION_PASSWORD" --no-auth-warning} \
    info replication 2>/dev/null | tr -d '\r' | awk -F: '$1 == "role" { role = $2 } $1 == "master_repl_offset" { offset = $2 } END { if (role) print role, offset + 0 }' || true
}

# Another server serving as the primary, asked directly (for when no sentinel answers).
primary_among_others() {
  for node in $REDIS_NODES; do
    [ "$node" != "$me" ] || continue
    case "$(replication_of "$node")" in
      master*) echo "$node"; return ;;
    esac
  done
}

# Whether another server holds the set's data: a primary, or a replica that has synced.
others_hold_data() {
  for node in $REDIS_NODES; do
    [ "$node" != "$me" ] || continue
    # shellcheck disable=SC2046
    set -- $(replication_of "$node")
    case "${1:-}" in
      master) return 0 ;;
      slave) [ "${2:-0}" -gt 0 ] && return 0 ;;
    esac
  done
  return 1
}

primary=$(ask_sentinels)
# No sentinel answers when they are starting too: then a server already serving as the
# primary is the one to follow; when none is, the set is starting, and server 0 leads.
[ -n "$primary" ] || primary=$(primary_among_others)
echo "redis.sh: the primary, as the set answers: ${primary:-none}"
if [ -z "$primary" ]; then
  primary=$first
elif [ "$primary" = "$me" ] && others_hold_data; then
  # This server is named the primary, but it is only starting: it has lost what it held
  # (or kept a stale copy on disk) while the others hold the data. Serving as the primary
  # now would make every replica copy its state. Wait for the sentinels to notice it is
  # down and promote a replica; then follow that one.
  waited=0
  while [ "$primary" = "$me" ] && [ "$waited" -lt "${PRIMARY_WAIT_SECONDS:-30}" ]; do
    sleep 1
    waited=$((waited + 1))
    named=$(ask_sentinels)
    [ -n "$named" ] || named=$(primary_among_others)
    [ -z "$named" ] || primary=$named
  done
  [ "$primary" != "$me" ] || echo "redis.sh: no other server was promoted within ${PRIMARY_WAIT_SECONDS:-30}s; starting as the primary" >&2
fi

# Announced by name, so that the sentinels and the replicas reach it wherever its pod runs.
set -- "$@" --port "${me##*:}" --replica-announce-ip "${me%:*}" --replica-announce-port "${me##*:}"
if [ -n "${REPLICATION_PASSWORD:-}" ]; then
  # Any server may become a replica after a failover: all of them know the replication user.
  set -- "$@" --masteruser chatstream-replication --masterauth "$REPLICATION_PASSWORD"
fi
if [ "$primary" != "$me" ]; then
  echo "redis.sh: starting as a replica of $primary"
  set -- "$@" --replicaof "${primary%:*}" "${primary##*:}"
else
  echo "redis.sh: starting as the primary"
fi
exec redis-server "$@"
