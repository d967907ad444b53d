#!/usr/bin/env bash
# The link datapath checks of the packaging end-to-end test (e2e.sh sources this):
# check 5, a [[links]] pair and then a bridge between two netns under the packaged unit, and check 6,
# a pair inside a service's netns (`netns =`) with the netns unit drop-in. They use
# e2e.sh's globals (WORK, LOG, TRAFFIC, CG) and lib.sh's container helpers.

# The container shares the host's network namespace (no --private-network), so the
# link check's devices live there: two netns of its own, each with a veth whose host
# end is one side of the pair. Unique names; removed by the check and by cleanup().
LNS_A="bypassd-e2e-$$-a" LNS_B="bypassd-e2e-$$-b" LDEV_A="bpe$$a" LDEV_B="bpe$$b" LBR="bpe$$br" LINKS_UP=0
LDROP=/etc/bypassd/conf.d/50-e2e-links.toml
links_teardown() {
  [ "$LINKS_UP" = 1 ] || return 0
  ip link del "$LDEV_A" 2>/dev/null; ip link del "$LDEV_B" 2>/dev/null; ip link del "$LBR" 2>/dev/null
  ip netns del "$LNS_A" 2>/dev/null; ip netns del "$LNS_B" 2>/dev/null
  LINKS_UP=0
}
links_setup() {
  local ns dev ip
  LINKS_UP=1
  for x in "$LNS_A $LDEV_A 10.213.0.1" "$LNS_B $LDEV_B 10.213.0.2"; do
    read -r ns dev ip <<<"$x"
    ip netns add "$ns" && ip link add "$dev" type veth peer name eth0 netns "$ns" &&
      ip -n "$ns" addr add "$ip/24" dev eth0 && ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up &&
      ip link set "$dev" up || return 1
  done
}
# TCP A -> B over the pair: BYTES each way, sha256 checked by bypass-traffic. Prints its report.
links_transfer() { # BYTES TIMEOUT
  local pf=$WORK/links-port out rc
  rm -f "$pf"
  ip netns exec "$LNS_B" "$TRAFFIC" serve --listen 10.213.0.2:0 --timeout-secs "$2" --port-file "$pf" >"$LOG/links-serve.json" 2>&1 &
  local srv=$!
  for _ in $(seq 50); do [ -s "$pf" ] && break; sleep 0.1; done
  out=$(ip netns exec "$LNS_A" timeout -k 2 "$(( $2 + 5 ))" "$TRAFFIC" send --connect "10.213.0.2:$(cat "$pf" 2>/dev/null)" --bytes "$1" --timeout-secs "$2" 2>&1); rc=$?
  kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null
  echo "$out"
  return $rc
}
link_stat() { # NAME: one counter of `bypassctl --json stats` whose name has dots
  cx bypassctl --json stats | python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$1"
}
links_json() { cx bypassctl --json status | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin).get("links", [])))'; }
tx_csum() { ethtool -k "$1" | sed -n 's/^tx-checksumming: \([a-z]*\).*/\1/p'; }
# Up to 10 s for the first listed link to be attached. Sets the caller's l (the links'
# JSON) and st (that link's state), which its failure messages print.
wait_first_link_attached() {
  for _ in $(seq 50); do
    l=$(links_json); st=$(python3 -c 'import json,sys; l=json.loads(sys.argv[1]); print(l[0]["state"] if l else "")' "$l")
    [ "$st" = attached ] && return 0; sleep 0.2
  done
  return 1
}
wait_links_gone() { for _ in $(seq 50); do [ "$(links_json)" = "[]" ] && return 0; sleep 0.2; done; return 1; }

# The link check, then (passed or not) its drop-in and devices go, so the later
# checks run on the configuration they expect.
check5_links() {
  local rc
  check5_links_run && check5_bridge_run; rc=$?
  if cx test -e "$LDROP"; then cx rm -f "$LDROP"; cx systemctl reload bypassd; fi
  cx rmdir /etc/bypassd/conf.d 2>/dev/null # ours if empty: purge must find nothing left
  links_teardown
  return $rc
}

check5_links_run() {
  local id out st red0 red1 fr0 fr1 pid0 tx0 l since pa pb
  command -v ip >/dev/null && command -v ethtool >/dev/null || { fail "ip and ethtool are needed on the host (bash packaging/ci-deps.sh)"; return 1; }
  links_setup || { fail "creating the test's netns and veths failed"; return 1; }
  id="$LDEV_A+$LDEV_B"
  # Baseline: nothing joins the two host ends, so B is unreachable from A.
  out=$(links_transfer 4096 3) && { fail "traffic crossed before the link existed: $out"; return 1; }
  tx0=$(tx_csum "$LDEV_A")
  [ "$tx0" = on ] || { fail "setup: $LDEV_A has tx-checksumming $tx0 (veth default is on)"; return 1; }
  # The operator's drop-in; the packaged unit is unchanged (no drop-in of the unit).
  [ -z "$(unit_prop DropInPaths)" ] || { fail "bypassd.service has drop-ins: $(unit_prop DropInPaths)"; return 1; }
  cx sh -c "mkdir -p /etc/bypassd/conf.d && printf '[[links]]\npair = [\"%s\", \"%s\"]\nchecksum_offload = { tx = \"off\" }\n' '$LDEV_A' '$LDEV_B' > $LDROP" ||
    { fail "writing $LDROP failed"; return 1; }
  out=$(cx bypassd --check-config /etc/bypassd/bypassd.toml 2>&1) || { fail "the config with $LDROP does not check: $out"; return 1; }
  cx systemctl reload bypassd || { fail "systemctl reload failed"; return 1; }
  wait_first_link_attached
  [ "$st" = attached ] || { fail "link $id is '${st:-absent}' after reload: $l"; return 1; }
  out=$(python3 -c '
import json, sys
l = json.loads(sys.argv[1])[0]
ifs = l["interfaces"]
assert l["mode"] == "pair" and l["name"] == sys.argv[2], l
assert len(ifs) == 2 and all(i["attached"] and i["ifindex"] > 0 for i in ifs), ifs
assert all("tx-checksum off" in i["offloads"] and "tso off" in i["offloads"] for i in ifs), ifs
print("; ".join("%s ifindex %s: %s" % (i["name"], i["ifindex"], i["offloads"]) for i in ifs))' "$l" "$id" 2>&1) ||
    { fail "bypassctl status --json: $out"; return 1; }
  say "bypassctl status: link $id attached; $out"
  out=$(cx bypassctl status) # not `| grep -q`: under pipefail an early exit fails the pipe
  grep -q "^Link: *pair $id attached" <<<"$out" || { fail "bypassctl status lacks 'Link: pair $id attached': $(grep -A2 Link <<<"$out")"; return 1; }
  [ "$(tx_csum "$LDEV_A")" = off ] && [ "$(tx_csum "$LDEV_B")" = off ] || { fail "ethtool on the host does not show tx-checksumming off"; return 1; }
  red0=$(link_stat "link.$id.redirected_bytes"); fr0=$(link_stat "link.$id.redirected_frames")
  [ -n "$red0" ] && [ -n "$fr0" ] || { fail "bypassctl stats has no link.$id.* counters: $(cx bypassctl stats | grep link)"; return 1; }
  out=$(links_transfer $((16 << 20)) 60) || { fail "transfer over the link failed: $out"; return 1; }
  [ "$(json ok <<<"$out")" = true ] && [ "$(json bytes_received <<<"$out")" = $((16 << 20)) ] ||
    { fail "transfer over the link not intact: $out"; return 1; }
  red1=$(link_stat "link.$id.redirected_bytes"); fr1=$(link_stat "link.$id.redirected_frames")
  say "transfer A -> B over the link: $(json bytes_sent <<<"$out") bytes each way, ok, sha256_sent $(json sha256_sent <<<"$out" | cut -c1-16)…; link.$id.redirected_frames $fr0 -> $fr1, redirected_bytes $red0 -> $red1"
  [ $((red1 - red0)) -ge $((32 << 20)) ] || { fail "the link redirected only $((red1 - red0)) bytes of 2 x 16 MiB"; return 1; }
  # Per port: each side counts the frames arriving on it, one direction's 16 MiB each.
  pa=$(link_stat "link.$id.port.$LDEV_A.redirected_bytes"); pb=$(link_stat "link.$id.port.$LDEV_B.redirected_bytes")
  [ "${pa:-0}" -ge $((16 << 20)) ] && [ "${pb:-0}" -ge $((16 << 20)) ] ||
    { fail "per-port redirected_bytes: $LDEV_A ${pa:-none}, $LDEV_B ${pb:-none} (expected >= 16 MiB each)"; return 1; }
  say "per port: $LDEV_A redirected_bytes $pa, $LDEV_B redirected_bytes $pb"
  # Restart: the pinned links are adopted; frames flowed meanwhile.
  pid0=$(unit_prop MainPID); since=$(cx date +%s)
  cx systemctl restart bypassd && wait_active 30 && wait_bus || { fail "restart with the link failed"; return 1; }
  l=$(links_json)
  python3 -c 'import json,sys; l=json.loads(sys.argv[1]); assert l and l[0]["state"] == "attached", l' "$l" 2>/dev/null ||
    { fail "after restart: $l"; return 1; }
  journal_has "$since" "link $id adopted" || { fail "the restarted daemon did not adopt the link pins"; return 1; }
  # The link leaves the config: detached, pins gone, offloads restored, A and B apart again.
  cx rm -f "$LDROP"
  cx systemctl reload bypassd || { fail "systemctl reload (link removed) failed"; return 1; }
  wait_links_gone
  [ "$(links_json)" = "[]" ] || { fail "the link is still listed after its drop-in was removed"; return 1; }
  cx test -e /sys/fs/bpf/bypassd/links && { fail "link pins left: $(cx ls -R /sys/fs/bpf/bypassd/links)"; return 1; }
  [ "$(tx_csum "$LDEV_A")" = on ] && [ "$(tx_csum "$LDEV_B")" = on ] || { fail "tx-checksumming not restored on the host ends"; return 1; }
  out=$(links_transfer 4096 3) && { fail "traffic still crosses after the link was removed: $out"; return 1; }
  links_teardown
  note "pair $id between two netns via a conf.d drop-in under the packaged unit's hardening (pid $pid0 -> $(unit_prop MainPID) on restart, adopted): status attached with tx-checksum/tso off, 16 MiB each way intact, link.$id.redirected_bytes +$((red1 - red0)) frames +$((fr1 - fr0)); removed: no pins, offloads restored, A and B apart"
}

# Bridge mode: the same two host ends become ports of a bridge. The bridge joins A and B
# before bypassd does anything; with the entry, known unicast skips it (link counters),
# and without it the bridge still carries the traffic.
check5_bridge_run() {
  local l st out red0 red1
  links_setup || { fail "creating the test's netns and veths failed (bridge)"; return 1; }
  ip link add "$LBR" type bridge && ip link set "$LDEV_A" master "$LBR" && ip link set "$LDEV_B" master "$LBR" &&
    ip link set "$LBR" up || { fail "creating bridge $LBR with ports $LDEV_A, $LDEV_B"; return 1; }
  out=$(links_transfer 65536 10) || { fail "no traffic across bridge $LBR before the entry: $out"; return 1; }
  cx sh -c "mkdir -p /etc/bypassd/conf.d && printf '[[links]]\nbridge = \"%s\"\n' '$LBR' > $LDROP" || { fail "writing $LDROP (bridge) failed"; return 1; }
  cx systemctl reload bypassd || { fail "systemctl reload (bridge) failed"; return 1; }
  wait_first_link_attached
  [ "$st" = attached ] || { fail "bridge $LBR is '${st:-absent}' after reload: $l"; return 1; }
  out=$(python3 -c '
import json, sys
l = json.loads(sys.argv[1])[0]
ports = {i["name"]: i for i in l["interfaces"]}
assert l["mode"] == "bridge" and l["name"] == sys.argv[2], l
assert all(p in ports and ports[p]["attached"] for p in sys.argv[3:]), ports
print(", ".join(sorted(ports)))' "$l" "$LBR" "$LDEV_A" "$LDEV_B" 2>&1) || { fail "bypassctl status --json (bridge): $out"; return 1; }
  say "bypassctl status: bridge $LBR attached, ports $out"
  red0=$(link_stat "link.$LBR.redirected_bytes")
  [ -n "$red0" ] || { fail "bypassctl stats has no link.$LBR.* counters: $(cx bypassctl stats | grep link)"; return 1; }
  out=$(links_transfer $((16 << 20)) 60) || { fail "transfer across the bridge entry failed: $out"; return 1; }
  [ "$(json ok <<<"$out")" = true ] && [ "$(json bytes_received <<<"$out")" = $((16 << 20)) ] ||
    { fail "transfer across the bridge entry not intact: $out"; return 1; }
  red1=$(link_stat "link.$LBR.redirected_bytes")
  # Known unicast both ways: the MACs were learned by the baseline transfer and dumped at attach.
  [ $((red1 - red0)) -ge $((32 << 20)) ] || { fail "bridge mode redirected only $((red1 - red0)) bytes of 2 x 16 MiB"; return 1; }
  cx rm -f "$LDROP"
  cx systemctl reload bypassd || { fail "systemctl reload (bridge removed) failed"; return 1; }
  wait_links_gone
  [ "$(links_json)" = "[]" ] || { fail "bridge $LBR still listed after its drop-in was removed"; return 1; }
  cx test -e /sys/fs/bpf/bypassd/links && { fail "link pins left (bridge): $(cx ls -R /sys/fs/bpf/bypassd/links)"; return 1; }
  out=$(links_transfer 65536 10) || { fail "the bridge no longer joins A and B after the entry was removed: $out"; return 1; }
  links_teardown
  note "bridge $LBR with ports $LDEV_A, $LDEV_B under the packaged unit: attached, 16 MiB each way intact, link.$LBR.redirected_bytes +$((red1 - red0)); removed: no pins, the bridge carries A <-> B again"
}

# A pod's netns: a transient service of the container with PrivateNetwork=yes holds
# it (bypassd reaches it as /proc/PID/ns/net); the two host ends of check 5's veths
# are moved into it. netns entries need CAP_SYS_ADMIN for setns(2): a unit drop-in.
UDROP=/etc/systemd/system/bypassd.service.d/e2e-netns.conf
check6_netns() {
  local rc
  check6_netns_run; rc=$?
  cx systemctl stop e2e-podns >/dev/null 2>&1
  if cx test -e "$LDROP" || cx test -e "$UDROP"; then
    cx rm -f "$LDROP" "$UDROP"; cx rmdir /etc/systemd/system/bypassd.service.d 2>/dev/null
    cx systemctl daemon-reload; cx systemctl restart bypassd
  fi
  cx rmdir /etc/bypassd/conf.d 2>/dev/null
  links_teardown
  return $rc
}

check6_netns_run() {
  local cpid hpid f id l st out red0 red1 exp d
  links_setup || { fail "creating the test's netns and veths failed"; return 1; }
  # Like a pod's processes, the holder has no capability bypassd lacks: opening the ns
  # file of a more privileged process would need CAP_SYS_PTRACE (ptrace access mode).
  cx systemd-run --unit=e2e-podns -p PrivateNetwork=yes -p CapabilityBoundingSet=CAP_NET_ADMIN --service-type=exec /bin/sleep 600 >/dev/null ||
    { fail "starting the pod netns holder (systemd-run -p PrivateNetwork=yes)"; return 1; }
  cpid=$(cx systemctl show e2e-podns -p MainPID --value)
  f=$(for r in $(cgroup_roots); do find "$r/$CG" -path '*e2e-podns.service/cgroup.procs'; done 2>/dev/null | head -n 1)
  hpid=$(head -n 1 "$f" 2>/dev/null)
  [ -n "$cpid" ] && [ "$cpid" != 0 ] && [ -n "$hpid" ] || { fail "no pid for the pod netns holder (container $cpid, host ${hpid:-none})"; return 1; }
  for d in "$LDEV_A" "$LDEV_B"; do
    ip link set "$d" netns "$hpid" && nsenter -t "$hpid" -n ip link set "$d" up || { fail "moving $d into the pod netns"; return 1; }
  done
  cx sh -c "mkdir -p ${UDROP%/*} && printf '[Service]\nCapabilityBoundingSet=CAP_SYS_ADMIN\nRestrictNamespaces=net\n' > $UDROP && systemctl daemon-reload" ||
    { fail "writing $UDROP"; return 1; }
  exp=$(cx systemd-analyze security bypassd.service --no-pager 2>&1 | sed -n 's/.*Overall exposure level for bypassd.service: \([0-9.]*\).*/\1/p')
  cx sh -c "mkdir -p /etc/bypassd/conf.d && printf '[[links]]\npair = [\"%s\", \"%s\"]\nnetns = \"/proc/%s/ns/net\"\n' '$LDEV_A' '$LDEV_B' '$cpid' > $LDROP" ||
    { fail "writing $LDROP failed"; return 1; }
  cx systemctl restart bypassd && wait_active 30 && wait_bus || { fail "bypassd did not restart with the netns drop-ins"; return 1; }
  id="$LDEV_A+$LDEV_B@_proc_${cpid}_ns_net"
  wait_first_link_attached
  [ "$st" = attached ] || { fail "netns link is '${st:-absent}': $l $(journal "$(cx date -d '-60 sec' +%s)" | grep -i 'link\|netns' | tail -5)"; return 1; }
  out=$(python3 -c 'import json,sys; l=json.loads(sys.argv[1])[0]; assert l["name"] == sys.argv[2] and l["netns"] == sys.argv[3], l; print(l["netns"])' "$l" "$id" "/proc/$cpid/ns/net" 2>&1) ||
    { fail "status of the netns link: $out"; return 1; }
  say "bypassctl status: link $id attached in netns $out (unit drop-in: CAP_SYS_ADMIN, RestrictNamespaces=net; exposure ${exp:-?})"
  red0=$(link_stat "link.$id.redirected_bytes")
  out=$(links_transfer $((8 << 20)) 60) || { fail "transfer over the netns link failed: $out"; return 1; }
  [ "$(json ok <<<"$out")" = true ] && [ "$(json bytes_received <<<"$out")" = $((8 << 20)) ] || { fail "transfer not intact: $out"; return 1; }
  red1=$(link_stat "link.$id.redirected_bytes")
  [ $((red1 - ${red0:-0})) -ge $((16 << 20)) ] || { fail "the netns link redirected only $((red1 - ${red0:-0})) bytes of 2 x 8 MiB"; return 1; }
  note "pair $id inside a PrivateNetwork=yes service's netns (/proc/$cpid/ns/net) with the unit drop-in (exposure ${exp:-?}): attached, 8 MiB each way intact, redirected_bytes +$((red1 - red0))"
}

