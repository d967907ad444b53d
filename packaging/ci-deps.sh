#!/usr/bin/env bash
# Install what `cargo xtask package` and `cargo xtask e2e` need on a Debian 12 host
# (CI or a developer's machine), as root. Idempotent: anything already present is skipped.
#
#   bash packaging/ci-deps.sh            # package + e2e tools
#   bash packaging/ci-deps.sh --package  # only what building/linting the packages needs
set -euo pipefail

want_e2e=1
[ "${1:-}" = "--package" ] && want_e2e=0

# command -> Debian package
declare -A apt_for=(
  [clang]=clang            # compiles the BPF object (ebpf/build.rs)
  [rpmbuild]=rpm           # builds the .rpm from the generated spec
  [rpm]=rpm
  [lintian]=lintian
  [rpmlint]=rpmlint
  [dpkg-deb]=dpkg
  [strip]=binutils         # strips the binaries in the .rpm
  [gzip]=gzip              # compresses the generated man pages
)
if [ "$want_e2e" = 1 ]; then
  apt_for[systemd-nspawn]=systemd-container
  apt_for[mmdebstrap]=mmdebstrap
  apt_for[nsenter]=util-linux
  apt_for[python3]=python3-minimal   # reads the JSON reports in packaging/e2e/e2e.sh
  apt_for[ip]=iproute2               # the link checks' netns and veths (packaging/e2e/links.sh)
  apt_for[ethtool]=ethtool           # reads their offloads back
fi

missing=()
for cmd in "${!apt_for[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${apt_for[$cmd]}")
done
# libbpf headers are a file, not a command.
[ -e /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
[ -e /usr/include/linux/bpf.h ] || missing+=(linux-libc-dev)

if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "ci-deps: apt-get install ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
else
  echo "ci-deps: Debian packages present"
fi

# cargo-deb turns [package.metadata.deb] into the .deb.
if ! command -v cargo-deb >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo-deb" ]; then
  # Pinned: the version the packaging was written and tested with (~1.5 min to build).
  echo "ci-deps: cargo install --locked cargo-deb@3.8.0"
  cargo install --locked --quiet cargo-deb@3.8.0
else
  echo "ci-deps: cargo-deb present"
fi
