#!/usr/bin/env bash
# Container check: does the image that `docker build .` makes actually work?
#
#   bash .ci/container-check.sh          (run by .ci/run; root, Debian or Ubuntu)
#
# What it checks, on the project's own Dockerfile:
#   1. the image builds;
#   2. a container of it serves 200 on /healthz (over HTTPS or plain HTTP: the port serves both);
#   3. the image's own HEALTHCHECK passes inside the running container;
#   4. the server runs as a non-root user;
#   5. SIGTERM (`podman stop`, 10 s grace) stops it with exit code 0, i.e. the final cache flush
#      ran and nothing had to be killed;
#   6. with ./certs bind-mounted as `docker compose up` creates it (an empty folder owned by root,
#      which uid 10001 cannot write), it still serves HTTPS.
# Why: the tests run bbo_stream.py on the host; only a real build and run catch a missing file in
# a COPY, a dependency the image lacks, a wrong USER or permission, or a HEALTHCHECK that cannot pass.
#
# How, without Docker or a reachable image registry: podman (rootful, no daemon) builds the
# Dockerfile as is.  When the `python:*-slim` base named by FROM is neither in podman's storage
# nor pullable, a stand-in is built: a minimal Debian bookworm (Python 3.11, pip, CA
# certificates) made by debootstrap from the host's own Debian mirror, with `python` and `pip` in
# /usr/local/bin as in the official image, imported under the FROM name.  Settings that let
# podman work inside a CI container or VM:
#   - runc as the OCI runtime (crun refuses some hybrid cgroup v1/v2 hosts), cgroupfs as the
#     cgroup manager (no systemd), and file-based events and logs;
#   - default ulimits lowered to 8192 open files and processes (raising them to podman's default
#     needs CAP_SYS_RESOURCE, which a CI container usually lacks);
#   - the host's CA bundle mounted into the build, so pip trusts what the host trusts (a network
#     whose HTTPS goes through an inspecting proxy has its CA only there).
# All of podman's configuration and storage lives under CONTAINER_CHECK_DIR, so the host's own
# podman setup is neither read nor changed; the base stand-in is kept there, so a second run
# takes seconds.
#
# Outcome:
#   exit 0 and "container-check: PASSED ..."  every check above passed;
#   exit 0 and "container-check: SKIPPED: <reason>"  this machine cannot run containers (not root,
#          podman/runc/debootstrap missing and not installable, no Linux namespaces, podman
#          unusable, no base image and no Debian mirror to make one);
#   exit 1 and "container-check: FAILED: <what>"  the image failed a check: CI must fail.
#
# Environment: CONTAINER_CHECK_DIR (default /var/tmp/bbo-stream-container-check),
#   CONTAINER_CHECK_IMAGE (default localhost/bbo-stream:check), DEBIAN_MIRROR (default: the host's apt mirror).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${CONTAINER_CHECK_DIR:-/var/tmp/bbo-stream-container-check}
IMAGE=${CONTAINER_CHECK_IMAGE:-localhost/bbo-stream:check}
NAME=bbo-stream-check-$$
START=$SECONDS

say() { printf 'container-check: %s\n' "$*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*"; exit 1; }
first_line() { local text=$1; text=${text%%$'\n'*}; printf '%s' "${text:0:200}"; }

# ---- can this machine run containers at all? (otherwise: skip, saying why) -------------------
[ -f "$ROOT/Dockerfile" ] || fail "no Dockerfile in $ROOT"
[ "$(id -u)" = 0 ] || skip "not root (debootstrap and rootful podman need root)"
missing=""
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null 2>&1 || skip "missing:$missing, and no apt-get to install them"
  say "installing$missing"
  # --no-install-recommends: podman's dependencies bring its network stack (CNI plugins, iptables).
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; }
  if ! apt_install podman runc debootstrap && ! { apt-get update -qq >/dev/null 2>&1 && apt_install podman runc debootstrap; }; then
    skip "apt-get could not install$missing"
  fi
fi
if ! err=$(unshare --mount --uts --ipc --pid --net --fork true 2>&1); then
  skip "no Linux namespaces for containers here (unshare: $(first_line "$err"))"
fi

mkdir -p "$DIR/conf" "$DIR/storage" "$DIR/run"
cat >"$DIR/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$DIR/storage"
runroot = "$DIR/run"
EOF
cat >"$DIR/conf/containers.conf" <<EOF
[containers]
log_driver = "k8s-file"
default_ulimits = ["nofile=8192:8192", "nproc=8192:8192"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$DIR/run/events.log"
runtime = "runc"
EOF
printf 'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n' >"$DIR/conf/registries.conf"
export CONTAINERS_STORAGE_CONF=$DIR/conf/storage.conf CONTAINERS_CONF=$DIR/conf/containers.conf \
       CONTAINERS_REGISTRIES_CONF=$DIR/conf/registries.conf
if ! err=$(podman info 2>&1 >/dev/null); then
  skip "podman does not work here (podman info: $(first_line "$err"))"
fi

# ---- the base image: pulled, or a Debian stand-in ---------------------------------------------
BASE=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$ROOT/Dockerfile")
case "$BASE" in */*) ;; *) BASE=docker.io/library/$BASE ;; esac
if ! podman image exists "$BASE" && ! timeout 60 podman pull -q "$BASE" >/dev/null 2>&1; then
  case "$BASE" in
    *python:3.11*) ;;
    *) say "note: the stand-in for $BASE has Debian bookworm's Python 3.11" ;;
  esac
  rootfs=$DIR/base-rootfs
  if [ ! -x "$rootfs/usr/bin/python3" ]; then
    mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /^http/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "no $BASE to pull: building a stand-in from $mirror (debootstrap, a minute or two)"
    rm -rf "$rootfs"
    if ! timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
         bookworm "$rootfs" "$mirror" >"$DIR/debootstrap.log" 2>&1; then
      rm -rf "$rootfs"
      skip "no $BASE image and debootstrap could not make a stand-in from $mirror (log: $DIR/debootstrap.log)"
    fi
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED      # pip installs system-wide, as in the official image
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  fi
  tar -C "$rootfs" -c . | podman import -q --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$BASE" >/dev/null
fi

# ---- 1. build ---------------------------------------------------------------------------------
ca_mount=()
[ -f /etc/ssl/certs/ca-certificates.crt ] && ca_mount=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
t=$SECONDS
if ! podman build --pull=never --format docker "${ca_mount[@]}" -t "$IMAGE" "$ROOT" >"$DIR/build.log" 2>&1; then
  tail -n 25 "$DIR/build.log"
  fail "podman build (last lines above; whole log: $DIR/build.log)"
fi
say "built $IMAGE in $((SECONDS - t)) s"

# ---- 2. run, /healthz -------------------------------------------------------------------------
cleanup() { podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
podman run -d --name "$NAME" -p 127.0.0.1::5000 "$IMAGE" >/dev/null 2>"$DIR/run.err" \
  || fail "podman run: $(first_line "$(cat "$DIR/run.err")")"
hostport=$(podman port "$NAME" 5000/tcp | head -n 1)       # 127.0.0.1:<free port picked by podman>
if [ -z "$hostport" ]; then
  podman logs "$NAME" 2>&1 | tail -n 25
  fail "no published port: the container stopped at once (exit code $(podman inspect -f '{{.State.ExitCode}}' "$NAME"); logs above)"
fi
scheme=""
for _ in $(seq 150); do                                    # up to ~60 s for the first start
  for s in https http; do
    code=$(curl -ks -o /dev/null -w '%{http_code}' -m 2 "$s://$hostport/healthz" || true)
    if [ "$code" = 200 ]; then scheme=$s; break 2; fi
  done
  [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 0.2
done
if [ -z "$scheme" ]; then
  podman logs "$NAME" 2>&1 | tail -n 25
  fail "no 200 on /healthz (last status ${code:-none}; container logs above)"
fi

# ---- 3. HEALTHCHECK, 4. user ------------------------------------------------------------------
# An image without HEALTHCHECK fails here too ("has no defined healthcheck").
if ! out=$(podman healthcheck run "$NAME" 2>&1); then
  fail "HEALTHCHECK: $(first_line "${out:-unhealthy}")"
fi
uid=$(podman exec "$NAME" id -u) || fail "podman exec id -u"
[ "$uid" != 0 ] || fail "the server runs as root"

# ---- 5. SIGTERM -------------------------------------------------------------------------------
t0=$(date +%s%N)
podman stop -t 10 "$NAME" >/dev/null 2>&1 || true
stop_ms=$((($(date +%s%N) - t0) / 1000000))
rc=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
if [ "$rc" != 0 ]; then
  podman logs "$NAME" 2>&1 | tail -n 15
  fail "SIGTERM: exit code $rc after $stop_ms ms (0 expected; container logs above)"
fi
# ---- 6. a ./certs the server cannot write -------------------------------------------------------
certs="$DIR/root-owned-certs"
rm -rf "$certs" && mkdir -m 755 "$certs"                  # root's: the server's uid cannot write it
podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
podman run -d --name "$NAME" -p 127.0.0.1::5000 -v "$certs:/app/certs" "$IMAGE" >/dev/null 2>"$DIR/run.err" \
  || fail "podman run with ./certs: $(first_line "$(cat "$DIR/run.err")")"
hostport=$(podman port "$NAME" 5000/tcp | head -n 1)
code=""
for _ in $(seq 150); do
  code=$(curl -ks -o /dev/null -w '%{http_code}' -m 2 "https://$hostport/healthz" || true)
  [ "$code" = 200 ] && break
  [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 0.2
done
if [ "$code" != 200 ]; then
  podman logs "$NAME" 2>&1 | tail -n 25
  fail "with a root-owned ./certs: no 200 on https://.../healthz (last status ${code:-none}; container logs above)"
fi
[ -z "$(ls -A "$certs")" ] || fail "with a root-owned ./certs: the server wrote into it"

say "PASSED in $((SECONDS - START)) s: /healthz 200 over $scheme, HEALTHCHECK healthy, uid $uid, SIGTERM -> exit 0 in $stop_ms ms, HTTPS with a root-owned ./certs"
