#!/usr/bin/env bash
# The Compose stack (docker-compose.yml) on this machine: `make image`, `make up`, `make down`.
#
#   deploy/stack.sh image   build the service image (and, offline, the other services' images)
#   deploy/stack.sh up      image, then start the stack in the background and wait until nginx answers
#   deploy/stack.sh down    stop and remove its containers and network (the named volume
#                           redis-data, the sessions, stays; `down --volumes` removes it too)
#   deploy/stack.sh ps      its containers
#
# The engine is Docker with its compose plugin where a Docker engine answers, else podman with
# podman-compose (or `podman compose`). The same docker-compose.yml either way.
#
# Images. Online, the official images (redis, nginx, prometheus, grafana) are pulled and the
# service is built on python:3.11-slim. Offline (no registry answers, or LSTM_OFFLINE=1), every
# image is built here: a Debian 12 base made by debootstrap from Debian's packages (built once,
# then reused), the service on it, and redis, nginx and prometheus from Debian's packages
# (deploy/offline.Dockerfile); deploy/compose.offline.yml swaps those image names in and nothing
# else. Grafana has no Debian package, so offline it is not started (said when it is skipped).
#
# TLS at nginx: LSTM_TLS=1 adds docker-compose.tls.yml (certificate and key from LSTM_TLS_DIR,
# https on LSTM_TLS_PORT, 8443). API keys: LSTM_KEYS_FILE=path adds docker-compose.keys.yml (the
# key file mounted into each replica as LSTM_API_KEYS).
#
# Settings (environment): COMPOSE_PROJECT_NAME (default lstm-sessions), LSTM_OFFLINE
# (auto | 1 | 0), LSTM_PUBLIC_PORT / PROMETHEUS_PORT / GRAFANA_PORT (host ports, as in the
# compose file), REDIS_APPENDFSYNC (everysec; see the compose file), LSTM_UP_TIMEOUT_S (180).
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-lstm-sessions}
SERVICE_IMAGE=lstm-sessions:latest  # the name docker-compose.yml runs
BASE_IMAGE=localhost/lstm-base:bookworm
OFFLINE_IMAGES=(redis nginx prometheus)
OFFLINE_SKIPPED=(grafana)

say() { printf 'stack: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

engine() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker
  elif command -v podman >/dev/null; then echo podman
  else die "no container engine: install Docker with its compose plugin, or podman, podman-compose and runc (deploy/podman-setup.sh does it on Debian)"
  fi
}

compose() {
  local files=(-f docker-compose.yml)
  if offline; then files+=(-f deploy/compose.offline.yml); fi
  if [ "${LSTM_TLS:-0}" = 1 ]; then files+=(-f docker-compose.tls.yml); fi
  if [ -n "${LSTM_KEYS_FILE:-}" ]; then
    [ -r "$LSTM_KEYS_FILE" ] || die "LSTM_KEYS_FILE=$LSTM_KEYS_FILE is not a readable file"
    export LSTM_KEYS_FILE
    LSTM_KEYS_FILE=$(realpath "$LSTM_KEYS_FILE")
    files+=(-f docker-compose.keys.yml)
  fi
  if [ "$(engine)" = docker ]; then
    docker compose "${files[@]}" -p "$COMPOSE_PROJECT_NAME" "$@"
  elif command -v podman-compose >/dev/null; then
    podman-compose "${files[@]}" -p "$COMPOSE_PROJECT_NAME" "$@"
  elif podman compose version >/dev/null 2>&1; then
    podman compose "${files[@]}" -p "$COMPOSE_PROJECT_NAME" "$@"
  else
    die "podman is here but no compose for it: install podman-compose"
  fi
}

OFFLINE_DECIDED=""
offline() {
  if [ -z "$OFFLINE_DECIDED" ]; then
    case "${LSTM_OFFLINE:-auto}" in
      1 | yes | true) OFFLINE_DECIDED=1 ;;
      0 | no | false) OFFLINE_DECIDED=0 ;;
      auto)
        # Any HTTP answer (401 without a token) means the registry is reachable.
        local code
        code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' https://registry-1.docker.io/v2/ || true)
        if [ "${code:-000}" = 000 ]; then OFFLINE_DECIDED=1; else OFFLINE_DECIDED=0; fi
        if [ "$OFFLINE_DECIDED" = 1 ]; then say "no image registry answers: offline images (LSTM_OFFLINE=0 to insist)"; fi
        ;;
      *) die "LSTM_OFFLINE must be auto, 1 or 0, not ${LSTM_OFFLINE}" ;;
    esac
  fi
  [ "$OFFLINE_DECIDED" = 1 ]
}

image_exists() { "$(engine)" image inspect "$1" >/dev/null 2>&1; }

# Extra build inputs this machine needs (deploy/context/README.md): its local wheels (pip's
# find-links) and the CA certificates it trusts beyond Debian's.
fill_context() {
  rm -f deploy/context/wheels/*.whl deploy/context/ca/*.crt
  local dir
  for dir in ${PIP_FIND_LINKS:-}; do
    [ -d "$dir" ] && find "$dir" -maxdepth 1 -name 'torch-*.whl' -exec cp {} deploy/context/wheels/ \;
  done
  if [ -d /usr/local/share/ca-certificates ]; then
    find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' -exec cp {} deploy/context/ca/ \;
  fi
  return 0
}

base_image() {
  if image_exists "$BASE_IMAGE"; then return; fi
  command -v debootstrap >/dev/null || die "offline images need debootstrap (apt-get install debootstrap)"
  say "building the Debian 12 base image $BASE_IMAGE with debootstrap (about a minute, once)"
  local root status=0
  root=$(mktemp -d)
  # No RETURN trap: it would stay set and run again (root unset) when the caller returns.
  debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null \
    && tar -C "$root" -c . | "$(engine)" import - "$BASE_IMAGE" >/dev/null || status=$?
  rm -rf "$root"
  [ $status = 0 ] || die "building the base image failed ($status)"
}

build_images() {
  local e
  e=$(engine)
  fill_context
  local args=(-f deploy/Dockerfile -t "$SERVICE_IMAGE")
  if offline; then
    base_image
    # The torch wheel comes from deploy/context/wheels (or PyPI); no PyTorch index is reachable.
    args+=(--build-arg "BASE=$BASE_IMAGE" --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
    local name
    for name in "${OFFLINE_IMAGES[@]}"; do
      say "building localhost/lstm-offline-$name:bookworm from Debian's packages"
      "$e" build -q -f deploy/offline.Dockerfile --target "$name" --build-arg "BASE=$BASE_IMAGE" \
        -t "localhost/lstm-offline-$name:bookworm" deploy >/dev/null
    done
  fi
  say "building $SERVICE_IMAGE"
  # podman: the docker format keeps the HEALTHCHECK (OCI images drop it).
  [ "$e" = podman ] && args+=(--format docker)
  "$e" build -q "${args[@]}" . >/dev/null
}

wait_for_proxy() {
  local port=${LSTM_PUBLIC_PORT:-8080} deadline=$((SECONDS + ${LSTM_UP_TIMEOUT_S:-180}))
  say "waiting for the service through nginx on http://127.0.0.1:$port"
  until curl -sf -m 2 -o /dev/null "http://127.0.0.1:$port/readyz"; do
    if [ $SECONDS -ge $deadline ]; then
      compose ps >&2 || true
      die "the stack did not answer on port $port within ${LSTM_UP_TIMEOUT_S:-180} s"
    fi
    sleep 1
  done
  say "up: http://127.0.0.1:$port/ (Swagger UI), Prometheus on port ${PROMETHEUS_PORT:-9090}"
}

up() {
  build_images
  local services=()
  if offline; then
    mapfile -t services < <(compose config --services 2>/dev/null || yq_services)
    local skip name kept=()
    for skip in "${OFFLINE_SKIPPED[@]}"; do
      say "$skip: not started offline (no Debian package, no registry); its provisioning is validated by the tests"
    done
    for name in "${services[@]}"; do
      [[ " ${OFFLINE_SKIPPED[*]} " == *" $name "* ]] || kept+=("$name")
    done
    [ ${#kept[@]} -gt 0 ] || die "could not list the compose file's services"
    services=("${kept[@]}")
  fi
  # shellcheck disable=SC2046  # word splitting drops the emptied names
  compose up -d $(printf '%s ' "${services[@]}") >&2
  wait_for_proxy
}

# The service names without a compose that has `config --services` (podman-compose 1.0).
yq_services() {
  python3 -c 'import sys, yaml; print("\n".join(yaml.safe_load(open("docker-compose.yml"))["services"]))'
}

down() {
  local volumes=0
  [ "${1:-}" = "--volumes" ] && volumes=1
  compose down $([ $volumes = 1 ] && echo -v) >&2 || true
  local e label="io.podman.compose.project=$COMPOSE_PROJECT_NAME"
  e=$(engine)
  [ "$e" = docker ] && label="com.docker.compose.project=$COMPOSE_PROJECT_NAME"
  # podman-compose 1.0 leaves the project's network (and, asked to, volumes) behind: remove them.
  local left
  left=$("$e" ps -aq --filter "label=$label")
  if [ -n "$left" ]; then "$e" rm -f $left >/dev/null; fi
  left=$("$e" network ls -q --filter "label=$label")
  if [ -n "$left" ]; then "$e" network rm $left >/dev/null; fi
  if [ $volumes = 1 ]; then
    left=$("$e" volume ls -q --filter "label=$label")
    if [ -n "$left" ]; then "$e" volume rm $left >/dev/null; fi
  else
    left=$("$e" volume ls -q --filter "label=$label")
    if [ -n "$left" ]; then say "kept the named volume(s): $(echo $left) (the sessions; down --volumes removes them)"; fi
  fi
  return 0
}

# Decided once, here: subshells (process substitutions) see the exported answer.
if offline; then export LSTM_OFFLINE=1; else export LSTM_OFFLINE=0; fi

case "${1:-}" in
  engine) engine ;;  # the engine the other commands use (the tests ask, to use the same)
  base) if offline; then base_image; fi ;;
  image) build_images ;;
  up) up ;;
  down) shift; down "$@" ;;
  ps) compose ps ;;
  *) die "usage: deploy/stack.sh image|up|down [--volumes]|ps" ;;
esac
