#!/usr/bin/env bash
# Shared by the packaging end-to-end test (e2e.sh) and the Ansible proof test
# (packaging/ansible/test/run.sh): the cached Debian rootfs, booting and stopping a
# systemd-nspawn container in cgroups of our own, running commands and traffic in it,
# and held transfers. Source it; it defines functions and defaults only.
#
# Globals the container functions use: ROOT (its root directory), NAME (machine
# name), CG (cgroup name), LOG (log directory), PIDFILE (where the nspawn pid is
# kept, for a later run to find), and they set NSPAWN_PID and CPID (the container's
# systemd, as the host sees it). To drive several containers, set these per call.

SUITE=bookworm
MIRROR=${E2E_MIRROR:-http://deb.debian.org/debian}
INCLUDE=systemd,systemd-sysv,dbus,procps,rpm,bpftool,python3,python3-apt
# CAP_BPF/CAP_PERFMON/CAP_NET_ADMIN: nspawn's default set lacks them, and the
# container's systemd can only hand out what its own bounding set has.
# --system-call-filter: nspawn's seccomp filter blocks bpf() otherwise, and
# pidfd_getfd (send_mode auto's promotion; e2e check 7 got EPERM inside the container
# with the unit's own filter allowing it).
# shellcheck disable=SC2054 # the commas are nspawn's list syntax
NSPAWN_ARGS=(--register=no --keep-unit --console=passive --resolv-conf=off --timezone=off
  --link-journal=no "--system-call-filter=bpf pidfd_getfd" --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN)
# (python3 and python3-apt: Ansible's modules run on the nodes; apt needs python3-apt.)

BOOTS=${BOOTS:-0}
say() { printf '   %s\n' "$*"; }
secs_since() { python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$1"; }
now() { date +%s.%N; }

# ---------------------------------------------------------------- container control

cgroup_roots() {
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    echo /sys/fs/cgroup
  else
    # Hybrid: nspawn needs the container's cgroup in the named v1 `systemd`
    # hierarchy and in the cgroup2 one.
    [ -d /sys/fs/cgroup/systemd ] && echo /sys/fs/cgroup/systemd
    [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ] && echo /sys/fs/cgroup/unified
  fi
}

# Remove our cgroups, deepest first (they must be empty by then).
remove_cgroups() {
  local r d
  for r in $(cgroup_roots); do
    d=$r/$CG
    [ -d "$d" ] || continue
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
      [ -d "$d" ] || break
      sleep 0.3
    done
    [ -d "$d" ] && say "warning: could not remove cgroup $d"
  done
}

# Every pid in our cgroups (the container's processes).
cgroup_pids() {
  local r
  for r in $(cgroup_roots); do
    [ -d "$r/$CG" ] && find "$r/$CG" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -u
}

alive() { [ -n "$1" ] && [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

cx() { # run a command inside the container (host cgroup; use xrun for traffic)
  timeout -k 5 "${CX_TIMEOUT:-120}" nsenter -t "$CPID" -a -- env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb "$@"
}

# Run a command as a transient service of the container's systemd, so that it is in
# the container's cgroup tree where the sock_ops program sees its sockets.
xrun() { cx systemd-run --quiet --pipe --wait --collect --service-type=exec "$@"; }

boot() {
  local r t0 st c
  BOOTS=$((BOOTS + 1))
  for r in $(cgroup_roots); do mkdir -p "$r/$CG" || return 1; done
  t0=$(now)
  (
    for r in $(cgroup_roots); do echo "$BASHPID" > "$r/$CG/cgroup.procs"; done
    exec setsid systemd-nspawn -D "$ROOT" -M "$NAME" -b "${NSPAWN_ARGS[@]}"
  ) </dev/null >"$LOG/nspawn-boot$BOOTS.log" 2>&1 &
  NSPAWN_PID=$!
  echo "$NSPAWN_PID" > "$PIDFILE"
  CPID=
  for _ in $(seq 100); do
    for c in $(cat /proc/"$NSPAWN_PID"/task/*/children 2>/dev/null); do
      if grep -Eq '^NSpid:[[:space:]]+[0-9]+[[:space:]]+1$' "/proc/$c/status" 2>/dev/null; then CPID=$c; fi
    done
    [ -n "$CPID" ] && break
    alive "$NSPAWN_PID" || break
    sleep 0.1
  done
  if [ -z "$CPID" ]; then
    say "nspawn did not start a container; its output:"; sed 's/^/   | /' "$LOG/nspawn-boot$BOOTS.log"
    return 1
  fi
  for _ in $(seq 300); do
    st=$(CX_TIMEOUT=5 cx systemctl is-system-running 2>/dev/null)
    case "$st" in
      running) break ;;
      degraded) say "container is degraded:"; cx systemctl --failed --no-legend | sed 's/^/   | /'; break ;;
    esac
    sleep 0.2
  done
  case "$st" in running|degraded) ;; *) say "container did not finish booting (state: ${st:-none})"; return 1 ;; esac
  say "booted container (nspawn pid $NSPAWN_PID, systemd pid $CPID, cgroup $CG) in $(secs_since "$t0") s"
}

stop_container() {
  local p
  [ -n "$NSPAWN_PID" ] || return 0
  if alive "$NSPAWN_PID" && [ -n "$CPID" ]; then
    CX_TIMEOUT=10 cx systemctl poweroff >/dev/null 2>&1
    for _ in $(seq 150); do alive "$NSPAWN_PID" || break; sleep 0.2; done
  fi
  if alive "$NSPAWN_PID"; then
    say "nspawn $NSPAWN_PID still running after poweroff: SIGTERM"
    kill -TERM "$NSPAWN_PID" 2>/dev/null
    for _ in $(seq 50); do alive "$NSPAWN_PID" || break; sleep 0.2; done
    alive "$NSPAWN_PID" && { say "SIGKILL nspawn $NSPAWN_PID"; kill -KILL "$NSPAWN_PID" 2>/dev/null; }
  fi
  wait "$NSPAWN_PID" 2>/dev/null
  # Anything left in the container's cgroups is the container's: end it.
  for _ in 1 2 3; do
    p=$(cgroup_pids)
    [ -z "$p" ] && break
    say "killing leftover container processes: $(echo $p)"
    kill -KILL $p 2>/dev/null
    sleep 0.3
  done
  remove_cgroups
  rm -f "$PIDFILE"
  NSPAWN_PID='' CPID=''
}

fail() { REASON="$*"; say "FAILED: $*"; return 1; }
note() { NOTES="${NOTES:+$NOTES; }$*"; }

# json FIELD < json: print a field of the (last) JSON document on stdin.
json() {
  python3 -c '
import json, sys
text = sys.stdin.read().strip()
try:
    d = json.loads(text)
except ValueError:
    d = json.loads(text.splitlines()[-1]) if text else {}
v = d
for k in sys.argv[1].split("."):
    v = v.get(k, "") if isinstance(v, dict) else ""
print(v if isinstance(v, str) else json.dumps(v))' "$1"
}

stat_of() { # stat_of NAME: one datapath counter via bypassctl
  cx bypassctl --json stats 2>/dev/null | json "$1"
}

wait_active() { # wait_active SECONDS
  for _ in $(seq $(($1 * 5))); do
    [ "$(cx systemctl is-active bypassd 2>/dev/null)" = active ] && return 0
    sleep 0.2
  done
  return 1
}

wait_bus() { # until bypassctl reaches the daemon
  for _ in $(seq 50); do
    cx bypassctl status >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

unit_prop() { cx systemctl show bypassd -p "$1" --value 2>/dev/null; }

# Start a transfer whose receiver holds reading until FILE exists, so it is open and
# has data in flight while the caller restarts/upgrades/purges, in the container
# CPID names. Several may run at once (one per TAG; XFER_PIDS and XFER_OUTS keep
# them); waits until its sockets are accelerated and data is redirected.
declare -A XFER_PIDS=() XFER_OUTS=()
start_held_transfer() { # TAG
  local tag=$1 ins0 red0 XFER_OUT XFER_PID
  ins0=$(stat_of sockets_inserted); red0=$(stat_of redirected_bytes)
  XFER_OUT=$LOG/xfer-$tag.json
  cx rm -f "/root/e2e/hold-$tag"
  ( CX_TIMEOUT=300 xrun --unit="e2e-xfer-$tag" /root/e2e/bypass-traffic pair --bind 127.0.0.1 \
      --bytes "$HELD_BYTES" --seed 42 --timeout-secs 240 --hold-file "/root/e2e/hold-$tag" \
      >"$XFER_OUT" 2>"$LOG/xfer-$tag.err" ) &
  XFER_PID=$!
  XFER_PIDS[$tag]=$XFER_PID XFER_OUTS[$tag]=$XFER_OUT
  for _ in $(seq 100); do
    if [ "$(stat_of sockets_inserted)" -ge $((ins0 + 2)) ] 2>/dev/null &&
       [ "$(stat_of redirected_bytes)" -gt "$red0" ] 2>/dev/null; then
      say "transfer $tag open and accelerated: sockets_inserted $ins0 -> $(stat_of sockets_inserted), redirected_bytes $red0 -> $(stat_of redirected_bytes) (receiver holding)"
      return 0
    fi
    alive "$XFER_PID" || break
    sleep 0.2
  done
  fail "transfer $tag did not get accelerated (sockets_inserted $ins0 -> $(stat_of sockets_inserted)); output: $(cat "$XFER_OUT" "$LOG/xfer-$tag.err" 2>/dev/null | tail -3)"
}

finish_held_transfer() { # TAG: release the receiver, wait, check the result is intact
  local tag=$1 rc out
  cx touch "/root/e2e/hold-$tag"
  wait "${XFER_PIDS[$tag]}"; rc=$?
  unset "XFER_PIDS[$tag]"
  out=$(cat "${XFER_OUTS[$tag]}")
  if [ "$rc" != 0 ] || [ "$(json ok <<<"$out")" != true ]; then
    fail "transfer $tag failed (exit $rc): $out $(tail -3 "$LOG/xfer-$tag.err" 2>/dev/null)"
    return 1
  fi
  if [ "$(json bytes_sent <<<"$out")" != "$HELD_BYTES" ] || [ "$(json bytes_received <<<"$out")" != "$HELD_BYTES" ]; then
    fail "transfer $tag moved $(json bytes_sent <<<"$out")/$(json bytes_received <<<"$out") bytes, expected $HELD_BYTES each way"
    return 1
  fi
  say "transfer $tag intact: ok=true, $HELD_BYTES bytes each way, sha256_sent $(json sha256_sent <<<"$out" | cut -c1-16)…, sha256_received $(json sha256_received <<<"$out" | cut -c1-16)…"
}

journal() { # journal SINCE: bypassd's journal since Unix time SINCE, or this boot ("boot")
  if [ "$1" = boot ]; then
    cx journalctl -u bypassd -b 0 --no-pager -o cat 2>/dev/null
  else
    cx journalctl -u bypassd --since "@$1" --no-pager -o cat 2>/dev/null
  fi
}

journal_has() { # journal_has SINCE PATTERN (journald stores lines asynchronously: poll)
  for _ in $(seq 25); do
    journal "$1" | grep -q -- "$2" && return 0
    sleep 0.2
  done
  return 1
}

kill_transfers() { # the local ends (systemd-run clients) of transfers still running
  local t
  for t in "${!XFER_PIDS[@]}"; do kill "${XFER_PIDS[$t]}" 2>/dev/null; done
}

# ---------------------------------------------------------------- the rootfs

# ensure_rootfs CACHE_DIR: build the rootfs tarball with mmdebstrap unless CACHE_DIR
# has it (the name carries a hash of the package list); sets ROOTFS_TAR.
ensure_rootfs() {
  local cache=$1 t0
  mkdir -p "$cache" || return 1
  ROOTFS_TAR=$cache/rootfs-$SUITE-$(printf '%s' "$INCLUDE" | sha256sum | cut -c1-12).tar
  [ -e "$ROOTFS_TAR" ] && [ ! -f "$ROOTFS_TAR" ] && rm -rf "$ROOTFS_TAR"
  [ -f "$ROOTFS_TAR" ] && return 0
  echo "building the $SUITE rootfs with mmdebstrap (cached as $ROOTFS_TAR)"
  t0=$(now)
  rm -rf "$cache/rootfs-partial-$$.tar"
  if ! mmdebstrap --quiet --variant=minbase --format=tar --include="$INCLUDE" --aptopt='Acquire::Retries "3"' \
       "$SUITE" "$cache/rootfs-partial-$$.tar" "$MIRROR" >"$LOG/mmdebstrap.log" 2>&1; then
    echo "mmdebstrap failed:"; tail -20 "$LOG/mmdebstrap.log"; rm -rf "$cache/rootfs-partial-$$.tar"
    return 1
  fi
  mv "$cache/rootfs-partial-$$.tar" "$ROOTFS_TAR"
  echo "rootfs built in $(secs_since "$t0") s"
}

unpack_rootfs() { # DIR: a fresh copy of the rootfs
  rm -rf "$1" && mkdir -p "$1" && tar -C "$1" --numeric-owner -xpf "$ROOTFS_TAR"
}

# stop_stale PIDFILE ROOT: a killed earlier run may have left its container: end it
# (exact pid, only if it is that run's nspawn on ROOT).
stop_stale() {
  local old
  [ -f "$1" ] || return 0
  old=$(cat "$1")
  if [ -n "$old" ] && tr '\0' ' ' < "/proc/$old/cmdline" 2>/dev/null | grep -q "systemd-nspawn -D $2 "; then
    echo "stopping the container of an earlier run (nspawn pid $old)"
    kill -TERM "$old"; sleep 2; kill -KILL "$old" 2>/dev/null
  fi
  rm -f "$1"
}

remove_empty_cgroups() { # PREFIX: empty cgroups an earlier run left
  local r d
  for r in $(cgroup_roots); do
    for d in "$r/$1"*; do
      [ -d "$d" ] && [ -z "$(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] &&
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    done
  done
}

