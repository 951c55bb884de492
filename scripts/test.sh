#!/usr/bin/env bash
# Install everything the tests need (OpenSSH client and server, the package with its test extras) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ssh >/dev/null || ! [ -x /usr/sbin/sshd ] || ! command -v ssh-agent >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssh-client openssh-server >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,speed]'
# An editable install runs src as it is: byte-compile it once here. Python would at the first import, but
# not where PYTHONDONTWRITEBYTECODE is set, and then every conduit and conduitd start compiles it again.
.venv/bin/python -m compileall -q src >/dev/null

status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
[ "$status" -eq 5 ] && { echo "no tests ran"; exit 1; }
exit "$status"
