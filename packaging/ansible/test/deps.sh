#!/usr/bin/env bash
# Install what the Ansible proof test needs (idempotent), away from the system's
# Python: a venv with ansible-core and ansible-lint, and two collections unpacked
# from the `ansible` wheel on PyPI (ansible-galaxy's server is not reachable):
# community.docker (its nsenter connection reaches the nspawn nodes) and
# ansible.posix (its json callback gives the test a report to check).
#   deps.sh [VENV [COLLECTIONS]]   (default: target/ansible-env/{venv,collections})
# Versions: ansible >= 13 (ansible-core >= 2.20) needs Python >= 3.12; this is 3.11.
set -euo pipefail
cd "$(dirname "$0")/../../.."
ENV_DIR=target/ansible-env
VENV=${1:-$ENV_DIR/venv}
COLLECTIONS=${2:-$ENV_DIR/collections}
ANSIBLE_CORE=2.19.14
ANSIBLE_LINT=25.12.2
ANSIBLE=12.3.0  # the community package whose wheel carries community.docker

# Tools run.sh uses on the host: dpkg-deb builds the broken package.
command -v dpkg-deb >/dev/null || { apt-get update -qq && apt-get install -y -qq dpkg >/dev/null; }
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi

if ! "$VENV/bin/python" -c "import ansible.release as r, sys; sys.exit(r.__version__ != '$ANSIBLE_CORE')" 2>/dev/null ||
   [ "$("$VENV/bin/ansible-lint" --version 2>/dev/null | grep -o "$ANSIBLE_LINT" | head -1)" != "$ANSIBLE_LINT" ]; then
  echo "ansible deps: venv $VENV with ansible-core $ANSIBLE_CORE, ansible-lint $ANSIBLE_LINT"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "ansible-core==$ANSIBLE_CORE" "ansible-lint==$ANSIBLE_LINT"
fi

if [ ! -f "$COLLECTIONS/ansible_collections/community/docker/plugins/connection/nsenter.py" ] ||
   [ ! -f "$COLLECTIONS/ansible_collections/ansible/posix/plugins/callback/json.py" ]; then
  echo "ansible deps: community.docker and ansible.posix from ansible $ANSIBLE into $COLLECTIONS"
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$dl" "ansible==$ANSIBLE"
  "$VENV/bin/python" - "$dl"/ansible-*.whl "$COLLECTIONS" <<'PY'
import os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for prefix in ("ansible_collections/community/docker/", "ansible_collections/ansible/posix/"):
        names = [n for n in z.namelist() if n.startswith(prefix)]
        if not names:
            sys.exit(f"{whl} has no {prefix}")
        for n in names:
            z.extract(n, dest)
        print(f"ansible deps: unpacked {len(names)} files of {prefix}")
PY
fi
