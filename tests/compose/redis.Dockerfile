# Stand-in for the redis:7 image of docker-compose.yml where no registry can be reached (only
# tests/test_compose.py uses it): Debian bookworm's own redis-server (7.0), the real Redis.
ARG PYTHON_IMAGE=chatstream-local/python:3.11-bookworm
FROM ${PYTHON_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["sh", "/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]
