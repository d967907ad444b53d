#!/usr/bin/env bash
# What the benchmark (crate bypass-bench) needs beyond the build and test deps, on
# Debian/Ubuntu. Idempotent; scripts/deps test runs it.
#   qperf              the TCP latency/bandwidth peers
#   bpftool            map memory and cgroup program checks
#   iproute2           network namespaces and the veth pair
#   ethtool            bypass-bench-links turns the guest's TSO/GSO off for one series
#   dbus               a private system bus for bypassctl (policy edit round trip)
#   fonts-dejavu-core  the font the PNG plots are drawn with (plotters + ab_glyph)
#   redis-server, redis-tools, nginx-light, wrk   the "real programs" section
set -euo pipefail
need=()
for p in qperf bpftool iproute2 ethtool dbus fonts-dejavu-core redis-server redis-tools nginx-light wrk; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "bench/deps.sh: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
