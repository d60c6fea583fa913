#!/usr/bin/env bash
# Make this machine a skyferry host: apt packages, CRIU >= 4.2, pycriu sources, kernel knobs.
# Idempotent: a second run only checks and finishes in seconds.
#
#   usage: scripts/bootstrap-host.sh            (Debian 12 or Ubuntu 24.04+, as root)
#
# CRIU: the distro's when it is >= 4.2; otherwise built from Debian unstable's source tarball,
# fetched through apt with a private sources list that reuses this machine's configured mirror URIs
# (the system's own apt sources are not changed). Installed to /usr/local/sbin/criu; the source tree
# stays in $SKYFERRY_CACHE so `make venv` can install pycriu from the same version.
set -euo pipefail

CRIU_VERSION=4.2.1
CRIU_DEB_VERSION=4.2.1-1
CACHE=${SKYFERRY_CACHE:-/var/cache/skyferry}
CRIU_SRC=$CACHE/criu-$CRIU_VERSION
# CRIU's RUNDIR (a build-time setting): it caches its kernel-feature probe there (criu.kdat), but only on a
# tmpfs (criu/kerndat.c), else it probes again on every run, ~40 ms inside each freeze. Built with the
# default /run, a host whose /run is no tmpfs never caches; a directory of its own can be one.
CRIU_RUNDIR=/run/criu
# Without GnuTLS (CRIU's own TLS page server, which skyferry never uses: its tunnel has its own TLS).
# Loading it costs every CRIU start 2 ms (3.7 -> 1.7 ms for `criu --version`), twice in each restore.
CRIU_MAKE=(RUNDIR="$CRIU_RUNDIR" NO_GNUTLS=1)
OS_RELEASE=${SKYFERRY_OS_RELEASE:-/etc/os-release}  # tests point this at other distributions' files
PIPE_MAX=4194304

say() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

# --- refuse what we cannot handle, before touching anything ---
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and sets kernel parameters); nothing was changed"
[ -r "$OS_RELEASE" ] || die "cannot read $OS_RELEASE; supported: Debian 12, Ubuntu 24.04 or newer; nothing was changed"
. "$OS_RELEASE"
case "${ID}:${VERSION_ID:-}" in
  debian:12|debian:13) ;;
  ubuntu:24.04|ubuntu:24.10|ubuntu:25.*|ubuntu:26.*) ;;
  *) die "unsupported OS '${PRETTY_NAME:-$ID}'; supported: Debian 12, Ubuntu 24.04 or newer; nothing was changed" ;;
esac
command -v apt-get >/dev/null || die "apt-get not found; nothing was changed"

RUNTIME_PKGS=(runc wireguard-tools wireguard-go iproute2 iptables nftables iperf3 kmod procps
              python3 python3-venv python3-dev git make gcc cloud-init busybox-static
              podman conmon docker.io containerd tar  # engines: pipeline/runtimes/podman.py, pipeline/runtimes/docker.py
              qemu-system-x86 qemu-utils mmdebstrap genisoimage iputils-ping)  # VM hosts: providers/qemu.py, vmimage.py; workload_images.py
TEST_PKGS=(chromium)  # the runbook HTML report, opened in a real headless browser (tests/pipeline/runbooks)
# Installed with their service kept from starting (below): the tests run their own binary, config and port.
QUIET_PKGS=(prometheus)  # a real Prometheus scrapes the agents (tests/pipeline/agent/test_prometheus.py)
BUILD_PKGS=(libbsd-dev libcap-dev libnet1-dev libnftables-dev libnl-3-dev
            libprotobuf-c-dev libprotobuf-dev pkgconf protobuf-c-compiler protobuf-compiler
            python3-protobuf uuid-dev dpkg-dev xz-utils)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# Debian's prometheus starts its service on install (every address, port 9090) and enables it for every
# boot. A policy-rc.d that says 101 keeps it from starting (one already there, as in container images, is
# left alone), only for this install; then the unit is disabled.
install_quiet() {
  local made=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && made=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [ -n "$made" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  if command -v systemctl >/dev/null; then
    local p; for p in "$@"; do systemctl disable --quiet "$p.service" 2>/dev/null || true; done
  fi
}

missing=() quiet=()
for p in "${RUNTIME_PKGS[@]}" "${BUILD_PKGS[@]}" "${TEST_PKGS[@]}"; do installed "$p" || missing+=("$p"); done
for p in "${QUIET_PKGS[@]}"; do installed "$p" || quiet+=("$p"); done
# Node.js and npm check the Grafana dashboard against Grafana's published types (tests/dashboard). Asked of
# PATH, not dpkg: a NodeSource nodejs carries its own npm and conflicts with Debian's npm package.
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [ $((${#missing[@]} + ${#quiet[@]})) -gt 0 ]; then
  say "installing $((${#missing[@]} + ${#quiet[@]})) apt packages: ${missing[*]} ${quiet[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # busybox-static conflicts with busybox; only pull it when nothing else owns /bin/busybox.
  [ ${#missing[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ ${#quiet[@]} -eq 0 ] || install_quiet "${quiet[@]}"
fi

criu_ok() {  # true when $1 is a criu binary of version >= 4.2
  local v; v=$("$1" --version 2>/dev/null | awk '/^Version:/{print $2}') || return 1
  [ -n "$v" ] && dpkg --compare-versions "$v" ge 4.2
}

ours_ok() {  # true when $1 is our build: new enough, its kernel-probe cache in $CRIU_RUNDIR, no GnuTLS
  criu_ok "$1" && grep -qaF "$CRIU_RUNDIR/criu.kdat" "$1" && ! ldd "$1" | grep -q libgnutls
}

fetch_criu_source() {
  [ -f "$CRIU_SRC/Makefile" ] && return 0
  mkdir -p "$CACHE/apt/lists/partial" "$CACHE/dl"
  local uris
  uris=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uris" ] || uris=$(awk '$1=="deb" && $0 !~ /security/ {print ($2 ~ /^\[/ ? $3 : $2); exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uris" ] || die "no Debian mirror URI found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
  cat > "$CACHE/apt/sid-src.sources" <<SRC
Types: deb-src
URIs: $uris
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  # Check-Valid-Until=false: mirrors that serve a dated snapshot carry a sid Release file whose 7-day
  # validity has run out. Freshness does not matter here: the version is pinned, the index signature is
  # still checked, and the tarball is checked against that signed index below.
  local aptopts=(-o "Dir::Etc::sourcelist=$CACHE/apt/sid-src.sources" -o "Dir::Etc::sourceparts=-"
                 -o "Dir::State::Lists=$CACHE/apt/lists" -o "APT::Get::List-Cleanup=0"
                 -o "Acquire::Check-Valid-Until=false")
  say "fetching CRIU $CRIU_DEB_VERSION source from Debian unstable (mirror: $uris)"
  apt-get "${aptopts[@]}" update -qq
  # The .dsc may be missing on the mirror; the orig tarball is all we need, and apt checks it
  # against the signed Sources index either way.
  (cd "$CACHE/dl" && apt-get "${aptopts[@]}" source --download-only -qq "criu=$CRIU_DEB_VERSION" >/dev/null 2>&1) || true
  [ -f "$CACHE/dl/criu_$CRIU_VERSION.orig.tar.xz" ] || die "could not download criu_$CRIU_VERSION.orig.tar.xz from $uris"
  local want got
  want=$(awk -v f="criu_$CRIU_VERSION.orig.tar.xz" '
    /^Package: /{pkg=$2} /^Version: /{ver=$2} /^Checksums-Sha256:/{c=1; next} /^[^ ]/{c=0}
    c && $3==f && pkg=="criu" {print $1; exit}' \
    <(/usr/lib/apt/apt-helper cat-file "$CACHE"/apt/lists/*_sid_main_source_Sources* 2>/dev/null) || true)
  got=$(sha256sum "$CACHE/dl/criu_$CRIU_VERSION.orig.tar.xz" | cut -d' ' -f1)
  [ -n "$want" ] && [ "$want" = "$got" ] || die "checksum of criu_$CRIU_VERSION.orig.tar.xz does not match Debian's signed index"
  rm -rf "$CRIU_SRC.tmp"; mkdir -p "$CRIU_SRC.tmp"
  tar -xJf "$CACHE/dl/criu_$CRIU_VERSION.orig.tar.xz" -C "$CRIU_SRC.tmp" --strip-components=1
  mv "$CRIU_SRC.tmp" "$CRIU_SRC"
}

if ours_ok /usr/local/sbin/criu && [ -f "$CRIU_SRC/lib/pycriu/rpc_pb2.py" ]; then
  :
# A build of ours that predates $CRIU_RUNDIR or NO_GNUTLS is rebuilt (below), not left to shadow the
# distro's on PATH.
elif [ ! -e /usr/local/sbin/criu ] && [ -x /usr/sbin/criu ] && criu_ok /usr/sbin/criu; then
  say "distro CRIU is new enough: $(/usr/sbin/criu --version | head -1)"
  fetch_criu_source  # still needed for a matching pycriu
  make -C "$CRIU_SRC" -s lib "${CRIU_MAKE[@]}" >/dev/null
else
  fetch_criu_source
  say "building CRIU $CRIU_VERSION (about 20 s on 2 cores)"
  make -C "$CRIU_SRC" -s clean >/dev/null 2>&1  # an older build's objects may hold other settings
  make -C "$CRIU_SRC" -s -j"$(nproc)" criu "${CRIU_MAKE[@]}" >"$CACHE/criu-build.log" 2>&1 \
    || die "CRIU build failed, see $CACHE/criu-build.log"
  make -C "$CRIU_SRC" -s lib "${CRIU_MAKE[@]}" >>"$CACHE/criu-build.log" 2>&1 || die "pycriu generation failed, see $CACHE/criu-build.log"
  install -m 0755 "$CRIU_SRC/criu/criu" /usr/local/sbin/criu
  say "installed $(/usr/local/sbin/criu --version | head -1) to /usr/local/sbin/criu"
fi
# runc and the agents look criu up on PATH; make sure the new one wins over any distro copy.
if [ -x /usr/sbin/criu ] && ! criu_ok /usr/sbin/criu; then
  say "note: the distro's /usr/sbin/criu is too old; /usr/local/sbin/criu takes precedence on PATH"
fi

# Lazy pages move pages through pipes of up to 4 MiB; root without CAP_SYS_RESOURCE cannot exceed this.
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt $PIPE_MAX ]; then
  echo $PIPE_MAX > /proc/sys/fs/pipe-max-size
  say "set fs.pipe-max-size=$PIPE_MAX"
fi
# CRIU dumps a container's conntrack entries with two netlink dumps that each walk every bucket of the
# host-wide table, inside the freeze: ~10 ms each at the 262144 buckets a host with > 4 GiB gets (docs/
# migration.md, "Where the freeze goes"). Only lowered, never raised; SKYFERRY_CONNTRACK_BUCKETS overrides.
CT_BUCKETS=${SKYFERRY_CONNTRACK_BUCKETS:-32768}
CT_PROC=/proc/sys/net/netfilter/nf_conntrack_buckets
if [ -w $CT_PROC ] && [ "$(cat $CT_PROC)" -gt "$CT_BUCKETS" ]; then
  echo "$CT_BUCKETS" > $CT_PROC
  say "set net.netfilter.nf_conntrack_buckets=$CT_BUCKETS"
fi
# '-': a kernel whose conntrack is a module not loaded yet at boot skips the line; modprobe.d covers it.
SYSCTL_CONF="fs.pipe-max-size = $PIPE_MAX
-net.netfilter.nf_conntrack_buckets = $CT_BUCKETS"
if [ "$(cat /etc/sysctl.d/60-skyferry.conf 2>/dev/null)" != "$SYSCTL_CONF" ]; then
  mkdir -p /etc/sysctl.d
  echo "$SYSCTL_CONF" > /etc/sysctl.d/60-skyferry.conf
fi
if [ "$(cat /etc/modprobe.d/skyferry.conf 2>/dev/null)" != "options nf_conntrack hashsize=$CT_BUCKETS" ]; then
  mkdir -p /etc/modprobe.d
  echo "options nf_conntrack hashsize=$CT_BUCKETS" > /etc/modprobe.d/skyferry.conf
fi

mkdir -p /run/netns /var/run/wireguard

# CRIU's run directory on a tmpfs: a directory where /run is one (a normal systemd host, where tmpfiles.d
# recreates it at boot), else a small tmpfs of its own (this kind of VM, whose /run is not a tmpfs).
mkdir -p "$CRIU_RUNDIR"
if [ -d /etc/tmpfiles.d ] && [ "$(cat /etc/tmpfiles.d/skyferry-criu.conf 2>/dev/null)" != "d $CRIU_RUNDIR 0755 root root -" ]; then
  echo "d $CRIU_RUNDIR 0755 root root -" > /etc/tmpfiles.d/skyferry-criu.conf
fi
if [ "$(stat -f -c %T "$CRIU_RUNDIR")" != tmpfs ] && ! mountpoint -q /; then
  # A plain chroot (a fresh root being proven): a mount here would land in the host's mount table.
  say "note: / is no mount point (a chroot?): no tmpfs on $CRIU_RUNDIR; CRIU will probe the kernel on every run"
elif [ "$(stat -f -c %T "$CRIU_RUNDIR")" != tmpfs ]; then
  mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev,noexec skyferry-criu "$CRIU_RUNDIR" \
    || say "warning: no tmpfs on $CRIU_RUNDIR: CRIU will probe the kernel on every run (~40 ms each)"
fi
# cgroup2 with favordynmods: runc's restore moves CRIU into the container's cgroup inside the freeze, and
# each move otherwise waits out an RCU grace period (8-13 ms here; forks and exits pay a barrier instead).
# A remount replaces every cgroup2 option, so it repeats the ones in place. Not persistent: the agent's
# unit does the same on real hosts (pipeline/agent/join.py).
CGROUP2=$(findmnt -rn -t cgroup2 -o TARGET | head -1)
if [ -n "$CGROUP2" ] && ! findmnt -rn -o OPTIONS "$CGROUP2" | tr , '\n' | grep -qx favordynmods; then
  if ! mountpoint -q /; then
    say "note: / is no mount point (a chroot?): $CGROUP2 keeps its options; each restore waits ~10 ms more"
  else
    mount -o "remount,$(findmnt -rn -o OPTIONS "$CGROUP2"),favordynmods" "$CGROUP2" \
      && say "remounted $CGROUP2 with favordynmods" \
      || say "warning: $CGROUP2 without favordynmods: each restore waits ~10 ms more"
  fi
fi
say "host ready: $(criu --version 2>/dev/null | head -1), runc $(runc --version 2>/dev/null | awk 'NR==1{print $3}'), $(wg --version 2>/dev/null | awk '{print $1, $2}')"
