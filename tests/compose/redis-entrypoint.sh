# What the official image's entrypoint does for a redis-server started without a config file:
# protected mode off, or Redis refuses every connection from the other containers.
if [ "$1" = "redis-server" ]; then
    shift
    set -- redis-server "$@" --protected-mode no
fi
exec "$@"
