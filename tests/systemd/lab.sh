#!/bin/bash
# tests/systemd/lab.sh - boot a throw-away, real systemd (the host's own /usr, systemd 252 on
# Debian 12) in a systemd-nspawn container, run commands in it, tear it down.
#
# baton's copy of /work/shared/systemd-lab/run-in-systemd.sh. Differences from the original:
#   * LAB_DIR defaults to /tmp/baton-systemd-lab; LAB_NAME to baton-<pid> for 'run' (so that
#     parallel runs never share a container, a cgroup or a run directory) and to 'baton' for the
#     step-by-step subcommands (start, exec, stop... must agree on it). run.sh always sets it.
#   * 'setup' is serialized with flock on $LAB_DIR/setup.lock and unpacks into a temporary
#     directory renamed into place, so parallel runs can share one LAB_DIR (and its download).
#   * the usage text below names this script.
# tests/systemd/run.sh drives it; it is usable alone for debugging (start, shell, stop).
#
# Works on a host whose PID 1 is NOT systemd (no machined, no host D-Bus needed):
#   * container = tmpfs root + host /usr bound read-only   (--volatile=yes)
#   * private network namespace (loopback only)            (--private-network)
#   * private mount namespace with a private tmpfs on /run, so nspawn's scratch
#     dirs (/run/systemd/nspawn*) never land in the host's /run
#   * container cgroups live under <cgroup-root>/systemd-lab-<name>, removed on stop
#   * nothing in the host's /etc, /var or network is touched
#
# Usage:
#   lab.sh setup            make systemd-nspawn available (see LAB_INSTALL)
#   lab.sh start            boot the container and wait until it is ready
#   lab.sh exec CMD [ARG..] run CMD inside (nsenter), exit status is CMD's
#   lab.sh unit CMD [ARG..] run CMD inside as a transient unit
#                                      (systemd-run --wait --pipe: proper cgroup/journal)
#   lab.sh shell            interactive shell inside
#   lab.sh stop             dump journal to $RUN/journal.log, power off, clean up
#   lab.sh status           show pids and system state
#   lab.sh run CMD [ARG..]  setup + start + exec CMD + stop (always), exit = CMD's
#
# Environment knobs:
#   LAB_DIR=/tmp/baton-systemd-lab   all state lives below here
#   LAB_NAME=baton-<pid>|baton   container/hostname; several can run in parallel
#   LAB_SHARE=$LAB_DIR/share.$LAB_NAME   host dir bound read-write at /lab inside (never wiped)
#   LAB_BINDS="A:B C:D"          extra read-write binds (nspawn --bind syntax)
#   LAB_BINDS_RO="A:B"           extra read-only binds (nspawn --bind-ro syntax)
#   LAB_CGROUP=unified|auto      unified (default): container gets a pure cgroup2 tree
#                                auto: nspawn decides (hybrid on a hybrid host)
#   LAB_INSTALL=extract|apt      how 'setup' provides systemd-nspawn if it is not installed:
#                                extract (default): apt-get download + dpkg -x into $LAB_DIR
#                                (host packages untouched); apt: apt-get install systemd-container
#                                (apt mode untested here: it would upgrade the host's systemd)
#   LAB_BOOT_TIMEOUT=60          seconds to wait for the container to become ready
#   LAB_EXEC_TIMEOUT=900         per exec/unit command
#   LAB_MAX_LIFETIME=3600        hard cap on the container's lifetime (timeout(1) on nspawn)
#   LAB_INIT_ARGS="..."          extra args for the container's systemd (e.g. systemd.log_level=debug)
#   LAB_ROOT=volatile|overlay    volatile (default): tmpfs root, empty /etc, host /usr read-only.
#                                overlay: copy-on-write overlay of the host's / (upper layer in a
#                                tmpfs of LAB_OVERLAY_SIZE, default 2g): /usr and dpkg's database are
#                                writable, so `dpkg -i` works inside; host units enabled in /etc start too.
#
# Example (Rust service + unit files from the host):
#   LAB_BINDS_RO="$PWD/target/release:/opt/app $PWD/deploy:/opt/units" lab.sh start
#   lab.sh exec sh -c 'cp /opt/units/app.socket /opt/units/app.service /etc/systemd/system/ &&
#                                 systemctl daemon-reload && systemctl start app.socket'
#   lab.sh exec python3 -c 'import socket; socket.create_connection(("127.0.0.1",8080))'
#   lab.sh exec systemctl reload app; lab.sh exec systemctl show -P MainPID app
#   lab.sh exec journalctl -u app --no-pager
#   lab.sh stop
# Files can also be dropped in while it runs: host path /proc/<leader>/root/... is the container's
# tmpfs root (/etc, /run, /var, /tmp are writable; /usr is the host's, read-only).
#
# Designed for and tested on a host whose PID 1 is not systemd (hybrid cgroup layout).
# Not tested on a systemd-booted host: there the container's cgroup would be created at the
# top of the cgroup tree, outside systemd's slices (plain nspawn registration is the norm there).
set -euo pipefail

LAB_DIR=${LAB_DIR:-/tmp/baton-systemd-lab}
# 'run' is self-contained: a name unique to this process. The step-by-step subcommands
# (start, exec, stop...) are separate processes, so they default to one fixed name.
if [ -z "${LAB_NAME:-}" ]; then
  case "${1:-}" in run) LAB_NAME=baton-$$;; *) LAB_NAME=baton;; esac
fi
RUN=$LAB_DIR/run.$LAB_NAME
LAB_SHARE=${LAB_SHARE:-$LAB_DIR/share.$LAB_NAME}
LAB_CGROUP=${LAB_CGROUP:-unified}
LAB_INSTALL=${LAB_INSTALL:-extract}
LAB_BOOT_TIMEOUT=${LAB_BOOT_TIMEOUT:-60}
LAB_EXEC_TIMEOUT=${LAB_EXEC_TIMEOUT:-900}
LAB_MAX_LIFETIME=${LAB_MAX_LIFETIME:-3600}
LAB_ROOT=${LAB_ROOT:-volatile}
LAB_OVERLAY_SIZE=${LAB_OVERLAY_SIZE:-2g}
CG_LEAF=systemd-lab-$LAB_NAME
EXTRACT_ROOT=$LAB_DIR/nspawn-root
INNER_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
           HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" SYSTEMD_PAGER= SYSTEMD_COLORS=0)

log() { echo "[lab $LAB_NAME] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$LAB_NAME" in *[!A-Za-z0-9-]*|"") die "LAB_NAME must be [A-Za-z0-9-]+";; esac

# ---------------------------------------------------------------- setup ----
nspawn_cmd() {   # prints the command prefix to run systemd-nspawn
  if command -v systemd-nspawn >/dev/null; then
    command -v systemd-nspawn
  elif [ -x "$EXTRACT_ROOT/usr/bin/systemd-nspawn" ]; then
    echo "env LD_LIBRARY_PATH=$EXTRACT_ROOT/usr/lib/x86_64-linux-gnu/systemd $EXTRACT_ROOT/usr/bin/systemd-nspawn"
  else
    return 1
  fi
}

cmd_setup() {
  [ -x /lib/systemd/systemd ] || die "host has no /lib/systemd/systemd: apt-get install systemd (dbus recommended)"
  for t in unshare nsenter timeout setsid findmnt flock; do command -v $t >/dev/null || die "missing $t (util-linux/coreutils)"; done
  if nspawn_cmd >/dev/null; then log "systemd-nspawn available: $(nspawn_cmd)"; return 0; fi
  mkdir -p "$LAB_DIR"
  # Parallel runs share LAB_DIR: one of them downloads, the others wait for it and reuse it.
  exec 9>"$LAB_DIR/setup.lock"
  flock -w 900 9 || die "timed out waiting for $LAB_DIR/setup.lock (another setup running?)"
  if nspawn_cmd >/dev/null; then exec 9>&-; log "systemd-nspawn available: $(nspawn_cmd)"; return 0; fi
  local t0; t0=$(now)
  if [ "$LAB_INSTALL" = apt ]; then
    # NOTE: pulls systemd/libsystemd0/... to the same version as systemd-container (may upgrade them)
    timeout 600 apt-get install -y -q --no-install-recommends systemd-container >&2
  else
    # Host packages stay untouched: fetch the .debs and unpack them privately.
    # systemd-container and libsystemd-shared must be the SAME version (private ABI).
    local v d x f
    v=$(apt-cache policy systemd-container | awk '/Candidate:/{print $2}')
    [ -n "$v" ] && [ "$v" != "(none)" ] || { timeout 300 apt-get update -q >&2; v=$(apt-cache policy systemd-container | awk '/Candidate:/{print $2}'); }
    [ -n "$v" ] && [ "$v" != "(none)" ] || die "apt knows no systemd-container package (check /etc/apt/sources.list)"
    d=$LAB_DIR/debs; rm -rf "$d"; mkdir -p "$d"
    ( cd "$d" && timeout 300 apt-get download -q "systemd-container=$v" "libsystemd-shared=$v" ) > "$LAB_DIR/setup.log" 2>&1 \
      || { cat "$LAB_DIR/setup.log" >&2; die "apt-get download failed"; }
    # unpack next to the final place and rename, so a half-unpacked tree is never used
    x=$(mktemp -d "$LAB_DIR/nspawn-root.XXXXXX")
    for f in "$d"/systemd-container_*.deb "$d"/libsystemd-shared_*.deb; do dpkg -x "$f" "$x"; done
    [ -x "$x/usr/bin/systemd-nspawn" ] || die "no usr/bin/systemd-nspawn in the downloaded packages"
    rm -rf "$EXTRACT_ROOT"; mv "$x" "$EXTRACT_ROOT"
  fi
  exec 9>&-
  nspawn_cmd >/dev/null || die "systemd-nspawn still not available"
  log "setup done in $(since "$t0")s: $($(nspawn_cmd) --version | head -1)"
}

# -------------------------------------------------------------- helpers ----
pid_alive() {  # running and not a zombie (a non-systemd PID 1 may reap orphans lazily)
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  [ "$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null)" != Z ]
}
read_pid() { cat "$RUN/$1.pid" 2>/dev/null || true; }
children() { cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -v '^$' || true; }

cgroup_dirs() {  # the host cgroup dirs we own (cgroup2 + the v1 name=systemd hierarchy if any)
  local m
  m=$(findmnt -n -t cgroup2 -o TARGET | head -1); [ -n "$m" ] && echo "$m/$CG_LEAF"
  m=$(findmnt -n -t cgroup -o TARGET,OPTIONS | awk '$2 ~ /name=systemd/{print $1; exit}'); [ -n "$m" ] && echo "$m/$CG_LEAF"
  return 0
}

cleanup_cgroups() {
  local d i
  for d in $(cgroup_dirs); do
    [ -d "$d" ] || continue
    for i in $(seq 20); do
      find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
      [ -d "$d" ] || break; sleep 0.1
    done
    [ -d "$d" ] && log "WARNING: could not remove $d (processes left: $(cat "$d"/cgroup.procs 2>/dev/null | tr '\n' ' '))"
  done
  return 0
}

is_ns_init() { grep -qE '^NSpid:.*[0-9][[:space:]]+1$' /proc/"$1"/status 2>/dev/null; }  # pid 1 of a child pid-ns

leader() {  # container PID 1 (host pid), verified
  local l; l=$(read_pid leader)
  if pid_alive "$l" && is_ns_init "$l"; then echo "$l"; return 0; fi
  return 1
}

in_ctr() {  # in_ctr TIMEOUT CMD...   (stdin/stdout/stderr pass through)
  local t=$1; shift; local l; l=$(leader) || die "container $LAB_NAME is not running"
  timeout -k 5 "$t" nsenter -t "$l" -a -r -w -- "${INNER_ENV[@]}" "$@"
}

# ---------------------------------------------------------------- start ----
cmd_start() {
  local nspawn t0 w= n= l= state i
  nspawn=$(nspawn_cmd) || die "systemd-nspawn not found: run '$0 setup' first"
  if pid_alive "$(read_pid wrapper)"; then die "container $LAB_NAME already running (wrapper pid $(read_pid wrapper))"; fi
  cleanup_cgroups
  rm -rf "$RUN"; mkdir -p "$RUN" "$LAB_SHARE"
  od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$RUN/machine-id"; echo >> "$RUN/machine-id"
  local cgdirs=() d
  for d in $(cgroup_dirs); do mkdir -p "$d"; cgdirs+=("$d"); done

  local rootargs=(-D / --volatile=yes)     # tmpfs root, host /usr read-only, empty /etc
  [ "$LAB_ROOT" = overlay ] && rootargs=(-D "$RUN/root")   # overlay of host /, mounted below
  case "$LAB_ROOT" in volatile|overlay) ;; *) die "LAB_ROOT must be volatile or overlay";; esac
  mkdir -p "$RUN/root" "$RUN/upper"
  local args=("${rootargs[@]}"
              --register=no --keep-unit     # no machined / host systemd needed
              --private-network             # only 'lo' inside
              -M "$LAB_NAME" --console=read-only --link-journal=no
              --resolv-conf=off --timezone=off
              --bind-ro="$RUN/machine-id:/etc/machine-id"   # => not a 'first boot': no presets, no firstboot wizard
              --bind="$LAB_SHARE:/lab")
  for d in ${LAB_BINDS:-};    do args+=(--bind="$d");    done
  for d in ${LAB_BINDS_RO:-}; do args+=(--bind-ro="$d"); done
  # init args are read by the container's systemd like a kernel command line
  local init_args=(systemd.mask=systemd-machine-id-commit.service ${LAB_INIT_ARGS:-})
  local uni=0; [ "$LAB_CGROUP" = unified ] && uni=1

  t0=$(now)
  # setsid: detach from the caller's session; the inner bash records its pid and becomes
  # timeout(1) -> unshare (private mount ns) -> bash (joins our cgroups, tmpfs on /run) -> nspawn
  setsid bash -c '
      echo $$ > "$1/wrapper.pid"; shift
      exec timeout -k 15 "$@"' _ "$RUN" "$LAB_MAX_LIFETIME" \
    env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=$uni LAB_ROOT="$LAB_ROOT" RUN="$RUN" LAB_OVERLAY_SIZE="$LAB_OVERLAY_SIZE" \
    unshare --mount --propagation private -- bash -c '
      n=$1; shift
      for ((i=0;i<n;i++)); do echo $$ > "$1/cgroup.procs"; shift; done
      if [ "$LAB_ROOT" = overlay ]; then
        mount -t tmpfs -o size="$LAB_OVERLAY_SIZE" lab-upper "$RUN/upper"
        mkdir -p "$RUN/upper/u" "$RUN/upper/w"
        mount -t overlay lab-root -o lowerdir=/,upperdir="$RUN/upper/u",workdir="$RUN/upper/w" "$RUN/root"
      fi
      mount -t tmpfs -o mode=0755,size=64m lab-run /run
      exec "$@"' _ ${#cgdirs[@]} "${cgdirs[@]}" \
    $nspawn "${args[@]}" -b -- "${init_args[@]}" \
    </dev/null >"$RUN/console.log" 2>&1 &

  # find nspawn and the container's PID 1
  for i in $(seq $((LAB_BOOT_TIMEOUT*20))); do
    w=$(read_pid wrapper)
    if [ -n "$w" ]; then
      pid_alive "$w" || { cat "$RUN/console.log" >&2; cleanup_cgroups; die "nspawn exited during boot"; }
      n=$(children "$w" | head -1)
      if [ -n "$n" ]; then
        for l in $(children "$n"); do
          is_ns_init "$l" && break 2
        done
      fi
    fi
    sleep 0.05
  done
  echo "$n" > "$RUN/nspawn.pid"; echo "$l" > "$RUN/leader.pid"
  leader >/dev/null || { cat "$RUN/console.log" >&2; cmd_stop; die "container PID 1 not found"; }

  # wait until systemd has finished booting (running or degraded)
  state=unknown
  for i in $(seq $((LAB_BOOT_TIMEOUT*10))); do
    state=$(in_ctr "$LAB_BOOT_TIMEOUT" systemctl is-system-running --wait 2>/dev/null) || true
    case "$state" in running|degraded) break;; esac
    pid_alive "$(read_pid wrapper)" || break
    sleep 0.1
  done
  case "$state" in
    running) ;;
    degraded) log "WARNING: system is degraded; failed units:"; in_ctr 10 systemctl --failed --no-legend >&2 || true;;
    *) cat "$RUN/console.log" >&2; cmd_stop; die "container did not become ready (state: $state)";;
  esac
  log "container '$LAB_NAME' ready in $(since "$t0")s: state=$state leader=$l nspawn=$n wrapper=$(read_pid wrapper)"
  log "  host dir $LAB_SHARE is /lab inside; container root is also reachable from the host as /proc/$l/root"
}

# ----------------------------------------------------------------- stop ----
cmd_stop() {
  local w n l i p t0; t0=$(now)
  w=$(read_pid wrapper); n=$(read_pid nspawn); l=$(read_pid leader)
  if leader >/dev/null; then
    in_ctr 20 journalctl -b --no-pager -o short-precise > "$RUN/journal.log" 2>&1 || true
  else
    rm -f "$RUN/journal.log"
  fi
  # SIGTERM to nspawn => it sends SIGRTMIN+3 to the container's systemd => orderly poweroff
  pid_alive "$n" && kill -TERM "$n" 2>/dev/null || true
  for i in $(seq 150); do pid_alive "$w" || pid_alive "$n" || break; sleep 0.1; done
  if pid_alive "$l" && is_ns_init "$l"; then
    log "orderly shutdown timed out; SIGKILL container PID 1 ($l)"; kill -KILL "$l" 2>/dev/null || true; sleep 0.5
  fi
  for p in "$n" "$w"; do
    if pid_alive "$p"; then sleep 1; if pid_alive "$p"; then log "SIGKILL $p"; kill -KILL "$p" 2>/dev/null || true; fi; fi
  done
  for i in $(seq 50); do pid_alive "$w" || break; sleep 0.1; done
  cleanup_cgroups
  rm -f "$RUN"/*.pid
  log "container '$LAB_NAME' stopped in $(since "$t0")s (logs: $RUN/console.log$([ -s "$RUN/journal.log" ] && echo " $RUN/journal.log"))"
}

cmd_status() {
  local l
  if l=$(leader); then
    echo "running: wrapper=$(read_pid wrapper) nspawn=$(read_pid nspawn) leader=$l"
    in_ctr 10 systemctl is-system-running || true
  else
    echo "not running"; return 3
  fi
}

# ------------------------------------------------------------------ main ----
sub=${1:-}; [ $# -gt 0 ] && shift
case "$sub" in
  setup)  cmd_setup ;;
  start)  cmd_start ;;
  stop)   cmd_stop ;;
  status) cmd_status ;;
  exec)   [ $# -gt 0 ] || die "exec needs a command"; in_ctr "$LAB_EXEC_TIMEOUT" "$@" ;;
  unit)   [ $# -gt 0 ] || die "unit needs a command"
          in_ctr "$LAB_EXEC_TIMEOUT" systemd-run --quiet --wait --pipe --collect --service-type=exec "$@" ;;
  shell)  in_ctr "$LAB_EXEC_TIMEOUT" bash -l ;;
  run)    [ $# -gt 0 ] || die "run needs a command"
          T0=$(now); cmd_setup
          trap 'cmd_stop || true' EXIT
          cmd_start
          rc=0; in_ctr "$LAB_EXEC_TIMEOUT" "$@" || rc=$?
          log "command exited with $rc; total so far $(since "$T0")s"
          exit $rc ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
esac
