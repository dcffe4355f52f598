# The other services' images for a machine with no image registry (deploy/stack.sh builds them
# when offline; deploy/compose.offline.yml runs them): Debian 12's own packages on the debootstrapped
# base, each behaving like the official image docker-compose.yml names, so the compose file's
# commands, mounts and healthchecks are the same. Grafana has no Debian package: none here.
#   docker build -f deploy/offline.Dockerfile --target redis --build-arg BASE=... deploy
ARG BASE=debian:bookworm

FROM ${BASE} AS redis
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
# As the official image: data in /data, and protected mode off when no config file is given, so
# the other containers may connect (the compose network is the boundary, no port is published).
RUN printf '%s\n' '#!/bin/sh' \
      'if [ "$1" = redis-server ]; then shift; exec redis-server --protected-mode no "$@"; fi' \
      'exec "$@"' > /usr/local/bin/redis-entrypoint && chmod 755 /usr/local/bin/redis-entrypoint
WORKDIR /data
USER redis
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]

FROM ${BASE} AS nginx
RUN apt-get update && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && ln -sf /dev/stderr /var/log/nginx/error.log
CMD ["nginx", "-g", "daemon off;"]

FROM ${BASE} AS prometheus
RUN apt-get update && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
