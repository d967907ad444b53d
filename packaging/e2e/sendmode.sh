#!/usr/bin/env bash
# The send_mode check of the packaging end-to-end test (e2e.sh sources this): check 7,
# `send_mode = "auto"` under the packaged unit, first without and then with the unit
# drop-in docs/packaging.md gives for it. Promotion copies a socket's descriptor out of
# the process that reads it (pidfd_getfd), which the shipped unit's hardening refuses.
# Uses e2e.sh's globals (WORK, LOG) and lib.sh's container helpers.

ADROP=/etc/bypassd/conf.d/50-e2e-auto.toml
AUDROP=/etc/systemd/system/bypassd.service.d/e2e-auto.conf
ABIN=/usr/local/bin/bypass-traffic # /root/e2e is not open to nobody

# 4000 request/response exchanges of 64 B: the server runs as nobody, the client as
# root (with more capabilities than bypassd). Prints the client's report.
auto_exchange() { # TAG
  local pf=/tmp/e2e-rr-$1.port out port
  cx rm -f "$pf"
  cx systemd-run --quiet --collect --service-type=exec --unit="e2e-rrs-$1" -p User=nobody \
    "$ABIN" rr-serve --listen 127.0.0.1:0 --count 1 --port-file "$pf" >/dev/null || { echo "starting rr-serve failed"; return 1; }
  for _ in $(seq 50); do port=$(cx cat "$pf" 2>/dev/null) && [ -n "$port" ] && break; sleep 0.1; done
  [ -n "$port" ] || { echo "rr-serve wrote no port"; return 1; }
  out=$(xrun --unit="e2e-rrc-$1" "$ABIN" rr --connect "127.0.0.1:$port" --size 64 --iters 4000 2>"$LOG/rr-$1.err")
  echo "$out" > "$LOG/rr-$1.json"
  echo "$out"
  [ "$(json ok <<<"$out")" = true ]
}

check_auto() {
  local rc
  check_auto_run; rc=$?
  cx systemctl stop 'e2e-rrs-*' >/dev/null 2>&1
  cx rm -f "$ADROP" "$AUDROP" "$ABIN"
  cx rmdir /etc/bypassd/conf.d /etc/systemd/system/bypassd.service.d 2>/dev/null
  cx systemctl daemon-reload; cx systemctl restart bypassd
  wait_active 30 && wait_bus || { fail "bypassd did not come back on the packaged unit"; rc=1; }
  return $rc
}

check_auto_run() {
  local out since pro0 pro1 pro2 fail0 fail1 fail2 ins0 ins1 red1 red2
  cx install -m 755 /root/e2e/bypass-traffic "$ABIN" || { fail "installing $ABIN"; return 1; }
  cx sh -c "mkdir -p ${ADROP%/*} && printf '[datapath]\nsend_mode = \"auto\"\n' > $ADROP" || { fail "writing $ADROP"; return 1; }
  since=$(cx date +%s)
  cx systemctl restart bypassd && wait_active 30 && wait_bus || { fail "bypassd did not restart with send_mode auto"; return 1; }
  journal_has "$since" 'lacks CAP_SYS_PTRACE' || { fail "no CAP_SYS_PTRACE warning in the journal: $(journal "$since" | grep -i 'auto' | tail -3)"; return 1; }
  pro0=$(stat_of senders_promoted); fail0=$(stat_of promote_failures); ins0=$(stat_of sockets_inserted)
  out=$(auto_exchange plain) || { fail "exchange on the packaged unit: $out $(tail -3 "$LOG/rr-plain.err")"; return 1; }
  sleep 0.2 # the promoter polls every 5 ms
  pro1=$(stat_of senders_promoted); fail1=$(stat_of promote_failures); ins1=$(stat_of sockets_inserted)
  [ $((ins1 - ins0)) -ge 2 ] || { fail "sockets_inserted grew by $((ins1 - ins0)) (expected 2: is loopback accelerated?)"; return 1; }
  [ "$pro1" = "$pro0" ] && [ $((fail1 - fail0)) -ge 1 ] ||
    { fail "packaged unit: senders_promoted $pro0 -> $pro1, promote_failures $fail0 -> $fail1 (expected refused and counted)"; return 1; }
  say "packaged unit, send_mode auto: exchange intact (median $(json median_us <<<"$out") us); promote_failures +$((fail1 - fail0)), senders_promoted +0 (the journal warned: lacks CAP_SYS_PTRACE)"
  cx sh -c "mkdir -p ${AUDROP%/*} && printf '[Service]\nCapabilityBoundingSet=CAP_SYS_PTRACE\nSystemCallFilter=pidfd_getfd\n' > $AUDROP && systemctl daemon-reload" ||
    { fail "writing $AUDROP"; return 1; }
  since=$(cx date +%s)
  cx systemctl restart bypassd && wait_active 30 && wait_bus || { fail "bypassd did not restart with the auto drop-in"; return 1; }
  ! journal_has "$since" 'lacks CAP_SYS_PTRACE' || { fail "the CAP_SYS_PTRACE warning is still logged with the drop-in"; return 1; }
  say "unit with the drop-in: SystemCallFilter has pidfd_getfd: $(cx systemctl show bypassd -p SystemCallFilter --value | tr ' ' '\n' | grep -c '^pidfd_getfd$'), $(cx systemctl show bypassd -p CapabilityBoundingSet --value)"
  red1=$(stat_of redirected_msgs)
  out=$(auto_exchange dropin) || { fail "exchange with the drop-in: $out $(tail -3 "$LOG/rr-dropin.err")"; return 1; }
  sleep 0.2
  pro2=$(stat_of senders_promoted); fail2=$(stat_of promote_failures); red2=$(stat_of redirected_msgs)
  [ $((pro2 - pro1)) = 2 ] && [ "$fail2" = "$fail1" ] ||
    { fail "with the drop-in: senders_promoted $pro1 -> $pro2 (expected +2), promote_failures $fail1 -> $fail2 (expected +0); $(journal "$since" | grep 'promotion failed' | tail -3)"; return 1; }
  [ $((red2 - red1)) -ge 4000 ] || { fail "only $((red2 - red1)) of 8000 messages redirected after promotion"; return 1; }
  note "send_mode auto: the packaged unit refuses promotion (promote_failures +$((fail1 - fail0)), warned); with the drop-in (CAP_SYS_PTRACE, pidfd_getfd) both ends promoted (server as nobody, client as root), $((red2 - red1)) of 8000 messages redirected, every echo compared"
}
