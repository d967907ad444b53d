#!/usr/bin/env bash
# End-to-end test of the bypassd packages on a real systemd (PID 1).
#
# Builds (or reuses) a Debian bookworm rootfs with mmdebstrap, boots it with
# systemd-nspawn inside cgroups this script creates, and checks, inside it:
#   1 install the .deb   2 accelerated, intact transfer   3 reload (good and broken)
#   4 restart during a transfer   5 a [[links]] pair, then a bridge, between two netns
#   6 a [[links]] pair inside a service's netns (netns =, unit drop-in)
#   7 send_mode auto, without and with its unit drop-in   8 poweroff and boot again
#   9 upgrade during a transfer   10 purge during a transfer   11 the same cycle with
#   the .rpm
# It prints PASS/FAIL per check and `e2e: N passed, M failed`, exits non-zero on any
# failure, and always tears down: poweroff, kill the exact nspawn pid if needed,
# remove its cgroups depth-first. The container mounts its own bpffs instance, so
# nothing is pinned on the host.
#
# Run it through `cargo xtask e2e` (which builds the packages). Directly:
#   e2e.sh --work DIR --deb1 OLD.deb --deb2 NEWER.deb --rpm X.rpm --traffic BIN [--keep]
set -uo pipefail

WORK='' DEB1='' DEB2='' RPM='' TRAFFIC='' KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --work) WORK=$2; shift 2 ;;
    --deb1) DEB1=$2; shift 2 ;;
    --deb2) DEB2=$2; shift 2 ;;
    --rpm) RPM=$2; shift 2 ;;
    --traffic) TRAFFIC=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "e2e.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in WORK DEB1 DEB2 RPM TRAFFIC; do
  if [ -z "${!v}" ] || { [ "$v" != WORK ] && [ ! -f "${!v}" ]; }; then
    echo "e2e.sh: --${v,,} is missing or not a file (${!v:-unset})" >&2; exit 2
  fi
done
[ "$(id -u)" = 0 ] || { echo "e2e.sh: run as root (nspawn, cgroups, BPF)" >&2; exit 2; }
for c in systemd-nspawn mmdebstrap nsenter python3 timeout setsid; do
  command -v "$c" >/dev/null || { echo "e2e.sh: $c not found; run: bash packaging/ci-deps.sh" >&2; exit 2; }
done

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ROOT=$WORK/root
LOG=$WORK/log
rm -rf "$LOG"; mkdir -p "$LOG"
NAME=bypassd-e2e
CG=bypassd-e2e-$$
PIDFILE=$WORK/nspawn.pid
# shellcheck source=packaging/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=packaging/e2e/links.sh
. "$(dirname "${BASH_SOURCE[0]}")/links.sh"
# shellcheck source=packaging/e2e/sendmode.sh
. "$(dirname "${BASH_SOURCE[0]}")/sendmode.sh"
BYTES=$((64 << 20))       # plain transfers
HELD_BYTES=$((32 << 20))  # transfers held open across restart/upgrade/purge

NSPAWN_PID='' CPID='' BOOTS=0 PASSED=0 FAILED=0 NOTES='' REASON=''
T_START=$(date +%s)


cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_container
  kill_transfers
  links_teardown
  if [ "$KEEP" = 0 ]; then rm -rf "$ROOT"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "e2e: interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- helpers for checks



diagnose() {
  [ -n "$CPID" ] && alive "$CPID" || { say "(container not running)"; return; }
  say "--- systemctl status bypassd"
  cx systemctl status bypassd --no-pager -n 0 2>&1 | sed 's/^/   | /'
  say "--- journalctl -u bypassd -p warning (last 8)"
  cx journalctl -u bypassd -u bypassd-bpffs -p warning -n 8 --no-pager -o short-monotonic 2>&1 | cut -c1-400 | sed 's/^/   | /'
  say "--- journalctl -u bypassd (last 25)"
  cx journalctl -u bypassd -u bypassd-bpffs -n 25 --no-pager -o short-monotonic 2>&1 | sed 's/^/   | /'
}

run_check() { # N TITLE FUNCTION
  local n=$1 title=$2 fn=$3 t0
  NOTES='' REASON=''
  echo "== check $n: $title"
  t0=$(now)
  if { [ -n "$CPID" ] && alive "$CPID"; } || [ "$fn" = check8_reboot ]; then
    "$fn"
  else
    fail "the container is not running"
  fi
  if [ $? = 0 ]; then
    PASSED=$((PASSED + 1))
    echo "PASS $n $title ($(secs_since "$t0") s): $NOTES"
  else
    FAILED=$((FAILED + 1))
    echo "FAIL $n $title ($(secs_since "$t0") s): $REASON"
    diagnose
  fi
}

# Things every installed bypassd must show: active after READY, enabled, start-up
# lines in the journal, bypassctl status as root, write refused to nobody.
check_running_service() { # SINCE
  local since=$1 out rc st
  wait_active 30 || { fail "bypassd.service is $(cx systemctl is-active bypassd) (expected active)"; return 1; }
  st="$(unit_prop ActiveState)/$(unit_prop SubState)"
  [ "$st" = active/running ] || { fail "bypassd.service is $st"; return 1; }
  [ "$(unit_prop Type)" = notify ] || { fail "bypassd.service is not Type=notify"; return 1; }
  # Type=notify: `active` means READY=1 arrived; STATUS= carries the summary.
  out=$(unit_prop StatusText)
  case "$out" in attached*) ;; *) fail "StatusText is '$out' (expected 'attached: ...')"; return 1 ;; esac
  note "active/running after READY=1, StatusText '${out%%;*}'"
  [ "$(cx systemctl is-enabled bypassd 2>/dev/null)" = enabled ] || { fail "bypassd.service is not enabled"; return 1; }
  journal_has "$since" 'datapath \(attached\|adopted\) at' && journal_has "$since" 'bypassd ready:' ||
    { fail "journal lacks the start-up lines ('datapath attached at', 'bypassd ready:')"; return 1; }
  say "journal: $(journal "$since" | grep -m1 'datapath .* at')"
  wait_bus || { fail "bypassctl status does not reach bypassd: $(cx bypassctl status 2>&1 | tail -2)"; return 1; }
  out=$(cx bypassctl status 2>&1)
  grep -q '^State: *attached' <<<"$out" || { fail "bypassctl status: $out"; return 1; }
  say "bypassctl status (root): $(grep -E '^(Version|State|Pin dir):' <<<"$out" | tr -s ' ' | paste -sd ',')"
  out=$(cx setpriv --reuid=nobody --regid=nogroup --clear-groups bypassctl pause 2>&1); rc=$?
  if [ "$rc" = 0 ]; then fail "bypassctl pause as nobody succeeded"; return 1; fi
  [ "$(cx bypassctl --json status | json paused)" = false ] || { fail "bypassd got paused by nobody"; return 1; }
  say "bypassctl pause as nobody: exit $rc: $(head -1 <<<"$out")"
  note "journal start-up lines present; bypassctl status ok as root; 'bypassctl pause' as nobody refused (exit $rc)"
}

# ---------------------------------------------------------------- the checks

check1_install() {
  local since out rc exp caps f wd w0 w1
  since=$(cx date +%s)
  out=$(cx dpkg -i "/root/e2e/pkg1/$(basename "$DEB1")" 2>&1 </dev/null); rc=$?
  echo "$out" > "$LOG/dpkg-install.log"
  [ "$rc" = 0 ] || { fail "dpkg -i failed (exit $rc): $(tail -5 <<<"$out")"; return 1; }
  check_running_service "$since" || return 1
  # Installed where the distribution expects, conffile marked as such.
  for f in /usr/sbin/bypassd /usr/bin/bypassctl /usr/lib/systemd/system/bypassd.service \
           /usr/lib/systemd/system/bypassd-bpffs.service /usr/share/dbus-1/system.d/org.bypassd.Bypassd1.conf \
           /etc/bypassd/bypassd.toml /usr/share/man/man8/bypassd.8.gz /usr/share/man/man1/bypassctl.1.gz \
           /usr/share/bash-completion/completions/bypassctl /usr/share/zsh/vendor-completions/_bypassctl \
           /usr/share/fish/vendor_completions.d/bypassctl.fish /usr/share/doc/bypassd/copyright; do
    cx test -f "$f" || { fail "$f is not installed"; return 1; }
  done
  cx dpkg-query -W -f='${Conffiles}\n' bypassd | grep -q '^ /etc/bypassd/bypassd.toml ' ||
    { fail "/etc/bypassd/bypassd.toml is not a conffile"; return 1; }
  # Unit files are clean.
  out=$(cx systemd-analyze verify --man=no bypassd.service bypassd-bpffs.service 2>&1); rc=$?
  [ "$rc" = 0 ] && [ -z "$out" ] || { fail "systemd-analyze verify: exit $rc: $out"; return 1; }
  # Capabilities: exactly what the unit bounds it to.
  caps=$(cx grep CapBnd "/proc/$(unit_prop MainPID)/status" | awk '{print $2}')
  [ "$caps" = 000000c000001000 ] || { fail "bypassd's bounding set is $caps (expected CAP_NET_ADMIN,CAP_PERFMON,CAP_BPF = 000000c000001000)"; return 1; }
  exp=$(cx systemd-analyze security bypassd.service --no-pager 2>&1 | sed -n 's/.*Overall exposure level for bypassd.service: \([0-9.]*\).*/\1/p')
  [ -n "$exp" ] || { fail "no exposure figure from systemd-analyze security"; return 1; }
  python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 3.0 else 1)" "$exp" ||
    { fail "systemd-analyze security exposure $exp > 3.0"; return 1; }
  say "systemd-analyze security bypassd.service: exposure $exp; bounding set CAP_NET_ADMIN CAP_PERFMON CAP_BPF"
  # The watchdog: bypassd sends WATCHDOG=1 every WatchdogSec/2; see one arrive.
  wd=$(unit_prop WatchdogUSec); w0=$(unit_prop WatchdogTimestampMonotonic)
  [ -n "$wd" ] && [ "$wd" != 0 ] && [ "$wd" != infinity ] || { fail "no WatchdogSec= on bypassd.service"; return 1; }
  for _ in $(seq 100); do
    w1=$(unit_prop WatchdogTimestampMonotonic)
    [ "$w1" != "$w0" ] && break
    sleep 0.25
  done
  [ "$w1" != "$w0" ] || { fail "no WATCHDOG=1 from bypassd within 25 s (WatchdogSec=$wd)"; return 1; }
  say "watchdog: WatchdogSec=$wd, keep-alive received ($(( (w1 - w0) / 1000 )) ms after the previous one)"
  # The metrics endpoint answers on loopback inside the container (bash's /dev/tcp: no curl there).
  out=$(cx bash -c 'exec 3<>/dev/tcp/127.0.0.1/9477 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>&1)
  grep -q '^HTTP/1.1 200' <<<"$out" && grep -q '^ok: attached' <<<"$out" ||
    { fail "/healthz on 127.0.0.1:9477: $out"; return 1; }
  out=$(cx bash -c 'exec 3<>/dev/tcp/127.0.0.1/9477 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>&1)
  grep -q '^bypassd_build_info{' <<<"$out" || { fail "/metrics on 127.0.0.1:9477 lacks bypassd_build_info: $(head -3 <<<"$out")"; return 1; }
  say "metrics: /healthz 200 ok: attached, /metrics serves $(grep -c '^bypassd_' <<<"$out") samples"
  note "files installed, conffile marked, verify clean, exposure $exp, watchdog keep-alives arrive, /healthz 200"
}

check2_transfer() {
  local out ins0 red0 ins1 red1 pol
  out=$(cx bypassctl policy add --action accelerate --local-cidr 127.0.0.0/8 --remote-cidr 127.0.0.0/8 --name e2e-loopback 2>&1) ||
    { fail "bypassctl policy add: $out"; return 1; }
  pol=$(cx cat /var/lib/bypassd/policy.toml 2>/dev/null | grep -c e2e-loopback)
  [ "$pol" -ge 1 ] || { fail "runtime policy not persisted in /var/lib/bypassd/policy.toml"; return 1; }
  ins0=$(stat_of sockets_inserted); red0=$(stat_of redirected_bytes)
  out=$(xrun /root/e2e/bypass-traffic pair --bind 127.0.0.1 --bytes "$BYTES" --seed 7 --timeout-secs 120 2>"$LOG/xfer-2.err")
  echo "$out" > "$LOG/xfer-2.json"
  [ "$(json ok <<<"$out")" = true ] || { fail "transfer failed: $out $(tail -3 "$LOG/xfer-2.err")"; return 1; }
  [ "$(json sha256_sent <<<"$out")" != "" ] || { fail "no sha256 in the transfer report: $out"; return 1; }
  ins1=$(stat_of sockets_inserted); red1=$(stat_of redirected_bytes)
  say "transfer: $(json bytes_sent <<<"$out") bytes each way, $(json mib_per_sec <<<"$out") MiB/s, sha256_sent $(json sha256_sent <<<"$out" | cut -c1-16)…, sha256_received $(json sha256_received <<<"$out" | cut -c1-16)…"
  say "counters: sockets_inserted $ins0 -> $ins1, redirected_bytes $red0 -> $red1"
  [ $((ins1 - ins0)) -ge 2 ] || { fail "sockets_inserted grew by $((ins1 - ins0)) (expected >= 2)"; return 1; }
  # The safety rules (order, backpressure, recvmsg-first) send some bytes by TCP, e.g.
  # those written before the receiver's first read; a real share must be redirected.
  [ $((red1 - red0)) -ge $((BYTES / 8)) ] || { fail "redirected_bytes grew by $((red1 - red0)) (expected >= $((BYTES / 8)))"; return 1; }
  note "runtime rule added (persisted); $BYTES bytes each way intact (ok, sha256 verified); sockets_inserted +$((ins1 - ins0)), redirected_bytes +$((red1 - red0))"
}

GOOD_SHA=
check3_reload() {
  local since out sha cur
  # An operator's edit: debug logging and a config rule of their own.
  # The held transfers below need redirected data waiting at a receiver that has not
  # read yet, which the recvmsg-first splice gate would keep on TCP: switch it off.
  cx sh -c 'sed -i "s/^log_level = \"info\"/log_level = \"debug\"/; s/^splice_safety = \"auto\"/splice_safety = \"off\"/" /etc/bypassd/bypassd.toml &&
            printf "\n# operator edit (e2e)\n[[policy.rules]]\nname = \"operator ipv6 loopback\"\naction = \"accelerate\"\nlocal_cidr = \"::1/128\"\nremote_cidr = \"::1/128\"\n" >> /etc/bypassd/bypassd.toml' ||
    { fail "editing the config failed"; return 1; }
  out=$(cx bypassd --check-config /etc/bypassd/bypassd.toml 2>&1) || { fail "edited config does not check: $out"; return 1; }
  cx grep -q '^splice_safety = "off"' /etc/bypassd/bypassd.toml || { fail "the shipped config has no splice_safety = \"auto\" line to edit"; return 1; }
  sha=$(cx sha256sum /etc/bypassd/bypassd.toml | cut -d' ' -f1)
  since=$(cx date +%s)
  cx systemctl reload bypassd || { fail "systemctl reload failed"; return 1; }
  for _ in $(seq 50); do
    cur=$(cx bypassctl --json status | json config_sha256)
    [ "$cur" = "$sha" ] && break; sleep 0.2
  done
  [ "$cur" = "$sha" ] || { fail "after reload bypassd runs config $cur, expected $sha"; return 1; }
  journal_has "$since" 'configuration reloaded' || { fail "journal lacks 'configuration reloaded'"; return 1; }
  out=$(cx bypassctl policy list) # not `| grep -q`: under pipefail an early exit fails the pipe
  grep -q 'operator ipv6 loopback' <<<"$out" || { fail "the config rule is not in 'bypassctl policy list'"; return 1; }
  GOOD_SHA=$sha
  say "reload applied the edited config (sha256 ${sha:0:16}…, rule 'operator ipv6 loopback' listed)"
  # A broken config: refused, the service stays active on the old one.
  cx cp /etc/bypassd/bypassd.toml /root/e2e/good.toml
  cx sed -i 's/^capacity = 65536/capacity = 0/' /etc/bypassd/bypassd.toml
  since=$(cx date +%s)
  cx systemctl reload bypassd || { fail "systemctl reload (broken config) failed"; return 1; }
  journal_has "$since" 'reload failed, keeping the running configuration' ||
    { fail "journal does not say the reload failed"; return 1; }
  out=$(journal "$since" | grep -m1 'reload failed')
  say "journal: $out"
  grep -q 'bypassd.toml:[0-9]*:[0-9]*: .*capacity 0 is out of range' <<<"$out" ||
    { fail "the journal line does not name file:line and the reason"; return 1; }
  [ "$(cx systemctl is-active bypassd)" = active ] || { fail "bypassd is not active after a broken reload"; return 1; }
  [ "$(cx bypassctl --json status | json config_sha256)" = "$GOOD_SHA" ] || { fail "bypassd does not run the old config any more"; return 1; }
  [ "$(cx bypassctl --json status | json state)" = attached ] || { fail "bypassd is not attached after a broken reload"; return 1; }
  cx cp /root/e2e/good.toml /etc/bypassd/bypassd.toml
  cx systemctl reload bypassd
  note "edited config applied (config_sha256 matches, 'configuration reloaded' logged); broken config (capacity = 0) refused: still active and attached on the old config, journal: '${out:0:160}'"
}

check4_restart() {
  local pid0 pid1 red1 red2 since
  start_held_transfer r4 || return 1
  pid0=$(unit_prop MainPID); since=$(cx date +%s)
  cx systemctl restart bypassd || { fail "systemctl restart failed"; return 1; }
  pid1=$(unit_prop MainPID)
  [ "$pid1" != "$pid0" ] && [ "$pid1" != 0 ] || { fail "MainPID did not change ($pid0 -> $pid1)"; return 1; }
  journal_has "$since" 'datapath adopted at' || { fail "the restarted daemon did not adopt the pinned datapath"; return 1; }
  wait_bus || { fail "bypassctl cannot reach the restarted daemon"; return 1; }
  red1=$(stat_of redirected_bytes)
  say "restarted bypassd (pid $pid0 -> $pid1), adopted the pinned datapath; redirected_bytes $red1 (counters kept)"
  finish_held_transfer r4 || return 1
  red2=$(stat_of redirected_bytes)
  say "after release: redirected_bytes $red1 -> $red2"
  [ $((red2 - red1)) -gt 0 ] || { fail "nothing redirected after the restart"; return 1; }
  note "restart during a held transfer (pid $pid0 -> $pid1, datapath adopted); transfer intact; $((red2 - red1)) bytes redirected after the restart"
}

check8_reboot() {
  local t0 out ins0 red0 ins1 red1
  t0=$(now)
  stop_container
  say "powered off in $(secs_since "$t0") s"
  boot || { fail "the container did not boot again"; return 1; }
  check_running_service boot || return 1
  [ "$(unit_prop NRestarts)" = 0 ] || { fail "bypassd restarted $(unit_prop NRestarts) times during boot"; return 1; }
  out=$(cx bypassctl --json status)
  [ "$(json state <<<"$out")" = attached ] || { fail "not attached after boot: $out"; return 1; }
  [ "$(json config_sha256 <<<"$out")" = "$GOOD_SHA" ] || { fail "after boot bypassd runs another config"; return 1; }
  say "after boot: critical chain $(cx systemd-analyze critical-chain bypassd.service --no-pager 2>/dev/null | grep -m1 'bypassd.service' | tr -s ' ')"
  ins0=$(stat_of sockets_inserted); red0=$(stat_of redirected_bytes)
  out=$(xrun /root/e2e/bypass-traffic pair --bind 127.0.0.1 --bytes 8M --seed 5 --timeout-secs 60 2>&1)
  [ "$(json ok <<<"$out")" = true ] || { fail "transfer after boot failed: $out"; return 1; }
  ins1=$(stat_of sockets_inserted); red1=$(stat_of redirected_bytes)
  [ $((ins1 - ins0)) -ge 2 ] && [ $((red1 - red0)) -ge $((8 << 20)) ] ||
    { fail "not accelerated after boot: sockets_inserted +$((ins1 - ins0)), redirected_bytes +$((red1 - red0))"; return 1; }
  note "enabled, active, attached after poweroff and boot; runtime policy kept (8 MiB transfer redirected: +$((red1 - red0)) bytes)"
}

check9_upgrade() {
  local sha0 sha1 pid0 pid1 since out rc red1 red2 v
  sha0=$(cx sha256sum /etc/bypassd/bypassd.toml | cut -d' ' -f1)
  start_held_transfer u6 || return 1
  pid0=$(unit_prop MainPID); since=$(cx date +%s)
  out=$(cx dpkg -i "/root/e2e/pkg2/$(basename "$DEB2")" 2>&1 </dev/null); rc=$?
  echo "$out" > "$LOG/dpkg-upgrade.log"
  [ "$rc" = 0 ] || { fail "dpkg -i (upgrade) failed (exit $rc): $(tail -5 <<<"$out")"; return 1; }
  v=$(cx dpkg-query -W -f='${Version}' bypassd)
  say "upgraded to $v: $(grep -m1 -i 'unpacking' <<<"$out")"
  wait_active 30 || { fail "bypassd is not active after the upgrade"; return 1; }
  pid1=$(unit_prop MainPID)
  [ "$pid1" != "$pid0" ] || { fail "the upgrade did not restart bypassd (MainPID $pid0)"; return 1; }
  journal_has "$since" 'datapath adopted at' || { fail "the upgraded daemon did not adopt the pinned datapath"; return 1; }
  sha1=$(cx sha256sum /etc/bypassd/bypassd.toml | cut -d' ' -f1)
  [ "$sha0" = "$sha1" ] || { fail "the upgrade changed the operator's config"; return 1; }
  cx grep -q 'operator edit (e2e)' /etc/bypassd/bypassd.toml || { fail "the operator's edit is gone"; return 1; }
  out=$(cx sh -c 'ls /etc/bypassd/*.dpkg-* 2>/dev/null')
  [ -z "$out" ] || { fail "dpkg left $out"; return 1; }
  wait_bus || { fail "bypassctl cannot reach the upgraded daemon"; return 1; }
  red1=$(stat_of redirected_bytes)
  finish_held_transfer u6 || return 1
  red2=$(stat_of redirected_bytes)
  [ $((red2 - red1)) -gt 0 ] || { fail "nothing redirected after the upgrade"; return 1; }
  note "upgrade to $v during a held transfer restarted bypassd (pid $pid0 -> $pid1, adopted); edited config kept byte for byte (no .dpkg-* files); transfer intact; $((red2 - red1)) bytes redirected after the upgrade"
}

check10_purge() {
  local out rc f left cg2
  start_held_transfer p7 || return 1
  out=$(cx dpkg -P bypassd 2>&1 </dev/null); rc=$?
  echo "$out" > "$LOG/dpkg-purge.log"
  [ "$rc" = 0 ] || { fail "dpkg -P failed (exit $rc): $(tail -5 <<<"$out")"; return 1; }
  say "dpkg -P: $(grep -m1 unpinned <<<"$out")"
  finish_held_transfer p7 || return 1
  [ "$(cx systemctl show bypassd -p LoadState --value)" = not-found ] || { fail "bypassd.service is still known to systemd"; return 1; }
  out=$(cx systemctl list-unit-files --no-legend 'bypassd*' 2>/dev/null)
  [ -z "$out" ] || { fail "unit files left: $out"; return 1; }
  left=
  for f in /usr/sbin/bypassd /usr/bin/bypassctl /etc/bypassd /var/lib/bypassd /sys/fs/bpf/bypassd \
           /usr/lib/systemd/system/bypassd.service /usr/lib/systemd/system/bypassd-bpffs.service \
           /etc/systemd/system/multi-user.target.wants/bypassd.service /usr/share/dbus-1/system.d/org.bypassd.Bypassd1.conf \
           /usr/share/doc/bypassd /usr/share/man/man8/bypassd.8.gz /var/lib/systemd/deb-systemd-helper-enabled/bypassd.service.dsh-also; do
    cx test -e "$f" && left="$left $f"
  done
  [ -z "$left" ] || { fail "left after purge:$left"; return 1; }
  cx dpkg-query -W bypassd >/dev/null 2>&1 && { fail "dpkg still knows bypassd: $(cx dpkg -l bypassd | tail -1)"; return 1; }
  out=$(cx busctl list --no-legend 2>/dev/null | grep -c org.bypassd)
  [ "$out" = 0 ] || { fail "the bus still has org.bypassd names"; return 1; }
  # The container's cgroup2 root (hybrid hosts: /sys/fs/cgroup/unified) has no
  # programs of ours attached any more.
  cg2=$(cx findmnt -n -t cgroup2 -o TARGET | head -n 1)
  out=$(cx bpftool cgroup show "$cg2" 2>&1)
  grep -Eq 'sock_ops|sock_create|bypass' <<<"$out" && { fail "programs still attached to $cg2: $out"; return 1; }
  note "purge during a held transfer: transfer intact; no unit, no files, no pins, no state, no bus name, no cgroup programs left"
}

check11_rpm() {
  local since out rc f left
  since=$(cx date +%s)
  out=$(cx rpm -i --nodeps --force-debian "/root/e2e/pkg1/$(basename "$RPM")" 2>&1); rc=$?
  echo "$out" > "$LOG/rpm-install.log"
  [ "$rc" = 0 ] || { fail "rpm -i failed (exit $rc): $out"; return 1; }
  check_running_service "$since" || return 1
  for f in /usr/sbin/bypassd /usr/bin/bypassctl /etc/bypassd/bypassd.toml /usr/share/man/man8/bypassd.8.gz \
           /usr/share/dbus-1/system.d/org.bypassd.Bypassd1.conf /usr/lib/systemd/system-preset/80-bypassd.preset; do
    cx test -f "$f" || { fail "rpm did not install $f"; return 1; }
  done
  cx rpm -qc bypassd | grep -qx /etc/bypassd/bypassd.toml || { fail "the rpm does not mark the config %config"; return 1; }
  out=$(cx rpm -e --nodeps bypassd 2>&1); rc=$?
  echo "$out" > "$LOG/rpm-erase.log"
  [ "$rc" = 0 ] || { fail "rpm -e failed (exit $rc): $out"; return 1; }
  [ "$(cx systemctl show bypassd -p LoadState --value)" = not-found ] || { fail "bypassd.service still known after rpm -e"; return 1; }
  left=
  for f in /usr/sbin/bypassd /usr/bin/bypassctl /etc/bypassd /var/lib/bypassd /sys/fs/bpf/bypassd \
           /usr/lib/systemd/system/bypassd.service /etc/systemd/system/multi-user.target.wants/bypassd.service \
           /usr/share/dbus-1/system.d/org.bypassd.Bypassd1.conf; do
    cx test -e "$f" && left="$left $f"
  done
  [ -z "$left" ] || { fail "left after rpm -e:$left"; return 1; }
  out=$(cx busctl list --no-legend 2>/dev/null | grep -c org.bypassd)
  [ "$out" = 0 ] || { fail "the bus still has org.bypassd names after rpm -e"; return 1; }
  note "rpm -i: enabled by preset, started, READY, bypassctl ok, nobody refused; rpm -e: no unit, files, pins, state or bus name left"
}

# ---------------------------------------------------------------- main

echo "e2e: packages $(basename "$DEB1"), $(basename "$DEB2"), $(basename "$RPM"); work dir $WORK"
stop_stale "$PIDFILE" "$ROOT"
remove_empty_cgroups bypassd-e2e-
ensure_rootfs "$WORK" || { echo "e2e: 0 passed, 11 failed"; exit 1; }
unpack_rootfs "$ROOT" || { echo "e2e: unpacking the rootfs failed"; echo "e2e: 0 passed, 11 failed"; exit 1; }
mkdir -p "$ROOT/root/e2e/pkg1" "$ROOT/root/e2e/pkg2"
cp "$DEB1" "$RPM" "$ROOT/root/e2e/pkg1/"
cp "$DEB2" "$ROOT/root/e2e/pkg2/"
install -m 755 "$TRAFFIC" "$ROOT/root/e2e/bypass-traffic"

if ! boot; then
  echo "FAIL boot: the container did not boot"
  echo "e2e: 0 passed, 11 failed"
  exit 1
fi

run_check 1 "install the .deb" check1_install
run_check 2 "accelerated and intact transfer" check2_transfer
run_check 3 "reload: edited config applied, broken config refused" check3_reload
run_check 4 "restart during a transfer" check4_restart
run_check 5 "a [[links]] pair, then a bridge, between two netns" check5_links
run_check 6 "a [[links]] pair inside a service's netns" check6_netns
run_check 7 "send_mode auto: refused by the packaged unit, promoted with its drop-in" check_auto
run_check 8 "poweroff and boot again" check8_reboot
run_check 9 "upgrade during a transfer" check9_upgrade
run_check 10 "purge during a transfer" check10_purge
run_check 11 "rpm install, active, status, remove" check11_rpm

t0=$(now)
stop_container
echo "e2e: container stopped and cgroups removed in $(secs_since "$t0") s; total $(( $(date +%s) - T_START )) s; logs in $LOG"
echo "e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
