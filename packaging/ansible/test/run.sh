#!/usr/bin/env bash
# Proof of the bypassd Ansible role on three real systemd nodes (systemd-nspawn
# containers booted from the packaging e2e's cached rootfs), reached with the
# community.docker.nsenter connection. Checks, printed as PASS/FAIL n:
#   1 first run: installed, active, attached, config templated, policy applied
#   2 second run: changed=0 on every node
#   3 a policy rule changes: only the policy task changes; a held transfer stays intact
#   4 a config variable changes: reload, not restart (journal, MainPID)
#   6 --check --diff on changed variables: the diff is shown, nothing changes
#   5 rolling upgrade during one held transfer per node: all intact, datapath
#     attached throughout; then a broken package on node 2: the rollout stops there,
#     node 3 is untouched, node 2 gets its previous package back
# Ends with `ansible: N passed, M failed`; tears everything down on any exit.
#
# Run it through `cargo xtask ansible`. Directly:
#   run.sh --work DIR --rootfs-cache DIR --deb1 A.deb --deb2 B.deb --deb3 C.deb --traffic BIN
#          --venv DIR --collections DIR [--keep]
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ANSIBLE_DIR=$(dirname "$HERE")
WORK='' CACHE='' DEB1='' DEB2='' DEB3='' TRAFFIC='' VENV='' COLLECTIONS='' KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --work) WORK=$2; shift 2 ;;
    --rootfs-cache) CACHE=$2; shift 2 ;;
    --deb1) DEB1=$2; shift 2 ;;
    --deb2) DEB2=$2; shift 2 ;;
    --deb3) DEB3=$2; shift 2 ;;
    --traffic) TRAFFIC=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --collections) COLLECTIONS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in DEB1 DEB2 DEB3 TRAFFIC; do
  [ -f "${!v}" ] || { echo "run.sh: --${v,,} is missing or not a file (${!v:-unset})" >&2; exit 2; }
done
for v in WORK CACHE VENV COLLECTIONS; do
  [ -n "${!v}" ] || { echo "run.sh: --${v,,} is missing" >&2; exit 2; }
done
[ -x "$VENV/bin/ansible-playbook" ] || { echo "run.sh: no ansible-playbook in $VENV; run packaging/ansible/test/deps.sh" >&2; exit 2; }
for c in community/docker ansible/posix; do
  [ -d "$COLLECTIONS/ansible_collections/$c" ] || { echo "run.sh: ${c/\//.} is not in $COLLECTIONS; run packaging/ansible/test/deps.sh" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run.sh: run as root (nspawn, cgroups, BPF)" >&2; exit 2; }

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
LOG=$WORK/log
rm -rf "$LOG"; mkdir -p "$LOG"
# shellcheck source=packaging/e2e/lib.sh
. "$ANSIBLE_DIR/../e2e/lib.sh"
HELD_BYTES=$((16 << 20))
NODES=(1 2 3)
declare -A N_PID=() N_CPID=()
PASSED=0 FAILED=0 NOTES='' REASON='' T_START=$(date +%s)
export ANSIBLE_COLLECTIONS_PATH=$COLLECTIONS ANSIBLE_CONFIG=$ANSIBLE_DIR/ansible.cfg
export ANSIBLE_STDOUT_CALLBACK=ansible.posix.json ANSIBLE_NOCOLOR=1 ANSIBLE_HOST_KEY_CHECKING=0
export ANSIBLE_LOCAL_TEMP=$WORK/tmp ANSIBLE_HOME=$WORK/ansible-home
INV=$WORK/inventory

on() { # on N: make node N the container the lib's functions act on
  NAME=bypassd-fleet-$1 ROOT=$WORK/node$1 CG=bypassd-fleet-$$-$1 PIDFILE=$WORK/node$1.pid
  NSPAWN_PID=${N_PID[$1]:-} CPID=${N_CPID[$1]:-}
}

stop_nodes() { # all at once: ask each to power off, then make sure of each
  local n
  for n in "${NODES[@]}"; do
    on "$n"; [ -n "$CPID" ] && alive "$NSPAWN_PID" && CX_TIMEOUT=5 cx systemctl poweroff --no-block >/dev/null 2>&1
  done
  for n in "${NODES[@]}"; do on "$n"; stop_container; N_PID[$n]='' N_CPID[$n]=''; done
}

cleanup() {
  local rc=$? n
  trap - EXIT INT TERM
  [ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null
  kill_transfers
  stop_nodes
  for n in "${NODES[@]}"; do
    on "$n"; [ "$KEEP" = 0 ] && rm -rf "$ROOT"
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "ansible: interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- nodes and runs

deb_version() { dpkg-deb -f "$1" Version; }
V1=$(deb_version "$DEB1") V2=$(deb_version "$DEB2") V3=$(deb_version "$DEB3")

# A package of the newest version whose daemon cannot start: the rollout must stop.
BROKEN=$WORK/$(basename "${DEB3%.deb}").broken.deb
rm -rf "$WORK/broken" && dpkg-deb -R "$DEB3" "$WORK/broken" &&
  printf '#!/bin/sh\necho "bypassd: deliberately broken build" >&2\nexit 1\n' > "$WORK/broken/usr/sbin/bypassd" &&
  dpkg-deb --root-owner-group -b "$WORK/broken" "$BROKEN" >/dev/null || { echo "run.sh: cannot build the broken package" >&2; exit 1; }

# The variables every run starts from; each check changes some (vars KEY=YAML ...).
BASE_VARS="bypassd_package_source: file
bypassd_package_file: $DEB1
bypassd_version: \"$V1\"
# Held transfers need redirected data waiting at a receiver that has not read yet,
# which the recvmsg-first splice gate would keep on TCP.
bypassd_splice_safety: \"off\"
bypassd_log_level: info
bypassd_policy_default: kernel
bypassd_config_rules:
  - name: config ipv6 loopback
    action: accelerate
    local_cidr: ::1/128
    remote_cidr: ::1/128
bypassd_policy_rules:
  - name: reserved
    action: kernel
    local_ports: 9000-9099
  - name: loopback
    action: accelerate
    local_cidr: 127.0.0.0/8
    remote_cidr: 127.0.0.0/8"
VARS=$BASE_VARS

# set_var KEY YAML: replace (or add) one top-level variable of VARS.
SET_VAR_PY='
import os, sys
key, val = os.environ["KEY"], os.environ["VAL"]
out, skip = [], False
for l in sys.stdin.read().splitlines():
    if l.startswith(key + ":"):
        skip = True
        continue
    if skip and l.startswith((" ", "-")):
        continue
    skip = False
    out.append(l)
out.append(key + (":\n" if val.startswith((" ", "-")) or "\n" in val else ": ") + val)
print("\n".join(out))'
set_var() {
  VARS=$(KEY=$1 VAL=$2 python3 -c "$SET_VAR_PY" <<<"$VARS")
}

write_inventory() {
  local n
  rm -rf "$INV"; mkdir -p "$INV/group_vars" "$INV/host_vars"
  {
    echo "[bypassd_nodes]"
    for n in "${NODES[@]}"; do echo "node$n ansible_nsenter_pid=${N_CPID[$n]}"; done
    echo "[bypassd_nodes:vars]"
    echo "ansible_connection=community.docker.nsenter"
    echo "ansible_python_interpreter=/usr/bin/python3"
  } > "$INV/hosts.ini"
  printf -- '---\n%s\n' "$VARS" > "$INV/group_vars/bypassd_nodes.yml"
}

RUNS=0
# play NAME [ansible-playbook args]: run the rollout playbook with the current
# variables; its JSON report is $LOG/NAME.json, its exit status PLAY_RC.
play() {
  local name=$1 t0; shift
  RUNS=$((RUNS + 1))
  write_inventory
  [ -n "${HOST2_VARS:-}" ] && printf -- '---\n%s\n' "$HOST2_VARS" > "$INV/host_vars/node2.yml"
  t0=$(now)
  timeout -k 10 300 "$VENV/bin/ansible-playbook" -i "$INV/hosts.ini" "$ANSIBLE_DIR/rollout.yml" "$@" \
    >"$LOG/$name.json" 2>"$LOG/$name.err"
  PLAY_RC=$?
  PLAY_SECS=$(secs_since "$t0")
  say "ansible-playbook ($name${*:+ $*}): exit $PLAY_RC in $PLAY_SECS s"
  python3 "$HERE/recap.py" "$LOG/$name.json" summary 2>&1 | sed 's/^/     /'
}
recap() { python3 "$HERE/recap.py" "$LOG/$1.json" "${@:2}"; }

# Every node: the version installed, active, attached on the rendered config.
node_healthy() { # N VERSION
  local n=$1 v=$2 out sha
  on "$n"
  [ "$(cx dpkg-query -W -f='${Version}' bypassd 2>/dev/null)" = "$v" ] || { fail "node$n has bypassd $(cx dpkg-query -W -f='${Version}' bypassd 2>&1), expected $v"; return 1; }
  [ "$(cx systemctl is-active bypassd)" = active ] || { fail "bypassd is $(cx systemctl is-active bypassd) on node$n"; return 1; }
  out=$(cx bypassctl --json status)
  [ "$(json state <<<"$out")" = attached ] || { fail "node$n: not attached: $out"; return 1; }
  sha=$(cx sha256sum /etc/bypassd/bypassd.toml | cut -d' ' -f1)
  [ "$(json config_sha256 <<<"$out")" = "$sha" ] || { fail "node$n runs config $(json config_sha256 <<<"$out"), the file is $sha"; return 1; }
}

main_pid() { on "$1"; cx systemctl show bypassd -p MainPID --value; }

run_check() { # N TITLE FUNCTION
  local n=$1 title=$2 fn=$3 t0
  NOTES='' REASON=''
  echo "== check $n: $title"
  t0=$(now)
  if "$fn"; then
    PASSED=$((PASSED + 1)); echo "PASS $n $title ($(secs_since "$t0") s): $NOTES"
  else
    FAILED=$((FAILED + 1)); echo "FAIL $n $title ($(secs_since "$t0") s): $REASON"
    [ -f "$LOG/$LAST.err" ] && tail -5 "$LOG/$LAST.err" | sed 's/^/   | /'
  fi
}

# ---------------------------------------------------------------- the checks

check1_first_run() {
  local n rules
  LAST=first; play first
  [ "$PLAY_RC" = 0 ] || { fail "the first run failed (exit $PLAY_RC)"; return 1; }
  for n in "${NODES[@]}"; do
    node_healthy "$n" "$V1" || return 1
    cx grep -q '^splice_safety = "off"' /etc/bypassd/bypassd.toml || { fail "node$n: the config is not the templated one"; return 1; }
    rules=$(cx bypassctl --json policy list)
    [ "$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(",".join(r["source"]+":"+(r["name"] or "") for r in d["rules"]))' <<<"$rules")" = \
      "runtime:reserved,runtime:loopback,config:config ipv6 loopback" ] || { fail "node$n: policy is $rules"; return 1; }
    [ "$(cx systemctl is-enabled bypassd)" = enabled ] || { fail "node$n: not enabled"; return 1; }
    FIRST_SECS[$n]=$(recap first seconds "node$n")
  done
  note "3 nodes: bypassd $V1 installed, enabled, active, attached on the templated config (config_sha256 = sha256 of the file), runtime rules applied; per node ${FIRST_SECS[1]} s, ${FIRST_SECS[2]} s, ${FIRST_SECS[3]} s (run $PLAY_SECS s)"
}

check2_noop() {
  local n c
  LAST=noop; play noop
  [ "$PLAY_RC" = 0 ] || { fail "the second run failed (exit $PLAY_RC)"; return 1; }
  for n in "${NODES[@]}"; do
    c=$(recap noop stat "node$n" changed)
    [ "$c" = 0 ] || { fail "node$n: changed=$c on the second run: $(recap noop changed "node$n" | paste -sd,)"; return 1; }
    NOOP_SECS[$n]=$(recap noop seconds "node$n")
  done
  note "changed=0 on every node; per node ${NOOP_SECS[1]} s, ${NOOP_SECS[2]} s, ${NOOP_SECS[3]} s (run $PLAY_SECS s)"
}

check3_policy() {
  local n c pid0
  on 1; start_held_transfer p3 || return 1
  pid0=$(main_pid 1)
  set_var bypassd_policy_rules "  - name: reserved
    action: kernel
    local_ports: 9100-9199
  - name: loopback
    action: accelerate
    local_cidr: 127.0.0.0/8
    remote_cidr: 127.0.0.0/8"
  LAST=policy; play policy -e bypassd_rollout_serial=3
  [ "$PLAY_RC" = 0 ] || { fail "the run failed (exit $PLAY_RC)"; return 1; }
  for n in "${NODES[@]}"; do
    c=$(recap policy changed "node$n" | paste -sd,)
    [ "$c" = "Apply the runtime policy" ] || { fail "node$n: changed tasks: '$c' (expected only the policy task)"; return 1; }
    # Output first, then grep: under pipefail a `| grep -q` that exits early fails the pipe.
    on "$n"; out=$(cx bypassctl policy list)
    grep -q 'kernel local_ports=9100-9199' <<<"$out" || { fail "node$n: the new rule is not in force"; return 1; }
  done
  [ "$(main_pid 1)" = "$pid0" ] || { fail "node1's bypassd restarted"; return 1; }
  on 1; finish_held_transfer p3 || return 1
  note "only 'Apply the runtime policy' changed, on each node; node1's held $HELD_BYTES-byte transfer, open and accelerated during the run, intact (sha256)"
}

check4_reload() {
  local n c since pid0
  declare -A pid0=()
  since=$(date +%s)
  for n in "${NODES[@]}"; do pid0[$n]=$(main_pid "$n"); done
  set_var bypassd_log_level debug
  LAST=reload; play reload -e bypassd_rollout_serial=3
  [ "$PLAY_RC" = 0 ] || { fail "the run failed (exit $PLAY_RC)"; return 1; }
  for n in "${NODES[@]}"; do
    c=$(recap reload changed "node$n" | paste -sd,)
    [ "$c" = "Render the config file,Reload bypassd" ] || { fail "node$n: changed tasks: '$c' (expected the config and the reload handler)"; return 1; }
    [ "$(main_pid "$n")" = "${pid0[$n]}" ] || { fail "node$n: MainPID ${pid0[$n]} -> $(main_pid "$n"): restarted"; return 1; }
    on "$n"
    journal_has "$since" 'configuration reloaded' || { fail "node$n: the journal has no 'configuration reloaded'"; return 1; }
    journal "$since" | grep -q 'datapath \(attached\|adopted\) at' && { fail "node$n: the journal shows a start"; return 1; }
    node_healthy "$n" "$V1" || return 1
    cx grep -q '^log_level = "debug"' /etc/bypassd/bypassd.toml || { fail "node$n: log_level not templated"; return 1; }
  done
  note "changed: the config file and the reload handler only; journal 'configuration reloaded', no start; MainPID unchanged (${pid0[1]}, ${pid0[2]}, ${pid0[3]}); config_sha256 = the new file's"
}

snapshot() { # what --check must not change, for every node
  local n
  for n in "${NODES[@]}"; do
    on "$n"
    echo "node$n $(cx sha256sum /etc/bypassd/bypassd.toml) $(cx bypassctl --json policy list | sha256sum) $(main_pid "$n") $(cx dpkg-query -W -f='${Version}' bypassd)"
  done
}

check6_check_mode() {
  local before after d saved=$VARS
  before=$(snapshot)
  set_var bypassd_log_level warn
  set_var bypassd_policy_rules "  - name: reserved
    action: kernel
    local_ports: 9200-9299
  - name: loopback
    action: accelerate
    local_cidr: 127.0.0.0/8
    remote_cidr: 127.0.0.0/8"
  LAST=check; play check --check --diff -e bypassd_rollout_serial=3
  VARS=$saved
  [ "$PLAY_RC" = 0 ] || { fail "the check run failed (exit $PLAY_RC)"; return 1; }
  d=$(recap check diff node2)
  printf '%s\n' "$d" | sed 's/^/   | /'
  grep -q '^-log_level = "debug"' <<<"$d" && grep -q '^+log_level = "warn"' <<<"$d" || { fail "no config diff for log_level"; return 1; }
  grep -q '^-1 (reserved): kernel local_ports=9100-9199' <<<"$d" && grep -q '^+1 (reserved): kernel local_ports=9200-9299' <<<"$d" ||
    { fail "no policy diff"; return 1; }
  [ "$(recap check changed node2 | paste -sd,)" = "Render the config file,Reload bypassd,Apply the runtime policy" ] ||
    { fail "check mode reports changed: $(recap check changed node2 | paste -sd,)"; return 1; }
  after=$(snapshot)
  [ "$before" = "$after" ] || { fail "check mode changed a node: $before // $after"; return 1; }
  note "diff shown (config: log_level debug -> warn; runtime rule 1: 9100-9199 -> 9200-9299), reported as would-change, and config hash, policy, MainPID and package unchanged on all nodes"
}

# Every 0.2 s, on every node: are bypassd's programs on the container's cgroup?
sample_attached() {
  local n cg out
  while :; do
    for n in "${NODES[@]}"; do
      on "$n"
      cg=$(CX_TIMEOUT=5 cx findmnt -n -t cgroup2 -o TARGET | head -n 1)
      # The listing itself, whatever bpftool's exit status: under pipefail, a `| grep -q`
      # read a non-zero exit (an attach type it cannot name, or SIGPIPE) as "not attached".
      out=$(CX_TIMEOUT=5 cx bpftool cgroup show "$cg" 2>&1; echo "rc=$?")
      if grep -q sock_ops <<<"$out"; then echo "node$n 1"; else echo "node$n 0 cgroup=$cg: $(tr '\n' ' ' <<<"$out" | cut -c1-200)"; fi
    done
    sleep 0.2
  done
}

check5_rolling_upgrade() {
  local n samples misses pid0 pid3 c
  declare -A pid0=()
  for n in "${NODES[@]}"; do on "$n"; start_held_transfer "u$n" || return 1; pid0[$n]=$(main_pid "$n"); done
  sample_attached > "$LOG/attached.samples" 2>/dev/null &
  SAMPLER=$!
  set_var bypassd_package_file "$DEB2"; set_var bypassd_version "\"$V2\""
  LAST=upgrade; play upgrade
  kill "$SAMPLER"; wait "$SAMPLER" 2>/dev/null; SAMPLER=
  [ "$PLAY_RC" = 0 ] || { fail "the rolling upgrade failed (exit $PLAY_RC)"; return 1; }
  samples=$(wc -l < "$LOG/attached.samples"); misses=$(awk '$2 == 0' "$LOG/attached.samples" | wc -l)
  [ "$samples" -ge 30 ] && [ "$misses" = 0 ] || { fail "datapath samples: $samples, not attached in $misses (first: $(awk '$2 == 0' "$LOG/attached.samples" | head -1))"; return 1; }
  for n in "${NODES[@]}"; do
    node_healthy "$n" "$V2" || return 1
    [ "$(main_pid "$n")" != "${pid0[$n]}" ] || { fail "node$n was not restarted on the new package"; return 1; }
    on "$n"; finish_held_transfer "u$n" || return 1
  done
  note "rolling upgrade $V1 -> $V2 node by node (run $PLAY_SECS s): restarted on the new package, a held transfer per node intact (sha256), programs attached in all $samples samples"

  # A broken build on node 2: node 1 upgrades, node 2 fails and is restored, node 3 untouched.
  pid3=$(main_pid 3)
  set_var bypassd_package_file "$DEB3"; set_var bypassd_version "\"$V3\""
  HOST2_VARS="bypassd_package_file: $BROKEN"
  LAST=broken; play broken
  HOST2_VARS=
  [ "$PLAY_RC" != 0 ] || { fail "the rollout with a broken package on node2 succeeded"; return 1; }
  node_healthy 1 "$V3" || return 1
  [ "$(recap broken stat node2 rescued)" = 1 ] || { fail "node2 was not rescued: $(recap broken summary)"; return 1; }
  node_healthy 2 "$V2" || { REASON="after the rescue: $REASON"; return 1; }
  recap broken touched | grep -qx node3 && { fail "the rollout touched node3"; return 1; }
  node_healthy 3 "$V2" || return 1
  [ "$(main_pid 3)" = "$pid3" ] || { fail "node3's bypassd restarted"; return 1; }
  c=$(recap broken changed node2 | paste -sd,)
  note "broken $V3 on node2: node1 at $V3, node2 failed ($(grep -o 'bypassd failed on node2[^"]*' "$LOG/broken.json" | head -1 | cut -c1-120)...) and is back on $V2, active and attached; node3 untouched ($V2, MainPID $pid3 unchanged); node2's changed tasks: $c"
}

# ---------------------------------------------------------------- main

echo "ansible: packages $(basename "$DEB1") $(basename "$DEB2") $(basename "$DEB3") (+ broken), work dir $WORK"
declare -A FIRST_SECS=() NOOP_SECS=()
ensure_rootfs "$CACHE" || { echo "ansible: 0 passed, 6 failed"; exit 1; }
remove_empty_cgroups bypassd-fleet-
for n in "${NODES[@]}"; do
  on "$n"
  stop_stale "$PIDFILE" "$ROOT"
  unpack_rootfs "$ROOT" || { echo "ansible: unpacking the rootfs failed"; exit 1; }
  mkdir -p "$ROOT/root/e2e" && install -m 755 "$TRAFFIC" "$ROOT/root/e2e/bypass-traffic"
  boot || { echo "FAIL boot: node$n did not boot"; echo "ansible: 0 passed, 6 failed"; exit 1; }
  N_PID[$n]=$NSPAWN_PID N_CPID[$n]=$CPID
done

run_check 1 "first run: installed, active, attached, configured, policy applied" check1_first_run
run_check 2 "second run changes nothing" check2_noop
run_check 3 "a policy rule changes: only the policy task, transfer intact" check3_policy
run_check 4 "a config variable changes: reload, not restart" check4_reload
run_check 6 "--check --diff shows the change and changes nothing" check6_check_mode
run_check 5 "rolling upgrade during transfers; a broken package stops the rollout" check5_rolling_upgrade

t0=$(now)
stop_nodes
echo "ansible: $RUNS playbook runs; containers stopped and cgroups removed in $(secs_since "$t0") s; total $(( $(date +%s) - T_START )) s; logs in $LOG"
echo "ansible: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
