#!/usr/bin/env bash
# Install everything the tests need (OpenSSH client and server, the package with its test extras) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ssh >/dev/null || ! [ -x /usr/sbin/sshd ] || ! command -v ssh-agent >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssh-client openssh-server >/dev/null
fi

./scripts/install.sh '.[test,speed]'

status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
[ "$status" -eq 5 ] && { echo "no tests ran"; exit 1; }
exit "$status"
