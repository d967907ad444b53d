#!/usr/bin/env bash
# The benchmark in short mode, for CI: about 2-3 minutes, numbers not judged. It fails
# when a section fails or when the bypass runs were not really redirected (or the
# kernel runs were), so the benchmark cannot rot unnoticed. Needs root.
# Results go to target/bench-short/ (never over the published bench/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/deps.sh
cargo build --release -p bypass-bench -p bypassd -p bypassctl -p bypass-testkit
exec target/release/bypass-bench --short "$@"
