#!/usr/bin/env bash
# The benchmark in short mode, for CI: about 2-3 minutes, numbers not judged. It fails
# when a section fails or when the bypass runs were not really redirected (or the
# kernel runs were), so the benchmark cannot rot unnoticed. Needs root.
# Results go to target/bench-short/ (never over the published bench/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/deps.sh
cargo build --release -p bypass-bench -p bypassd -p bypassctl -p bypass-testkit
mkdir -p target/bench-short
target/release/bypass-bench-links --short --out target/bench-short/links.md
# The mesh topology (Envoy, nginx, wrk from scripts/deps-mesh): it must run and redirect.
if [ $# -eq 0 ]; then
  target/release/bypass-bench --short mesh
fi
exec target/release/bypass-bench --short "$@"
