#!/usr/bin/env bash
# Install sshconduit into .venv and run conduitd on its embedded default: 127.0.0.1:2222, your user, your keys.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh '.[speed]'
echo "conduitd is starting on 127.0.0.1:2222. In another terminal, for example:"
echo "  .venv/bin/conduit -p 2222 -N -L 1100:localhost:110 localhost"
exec .venv/bin/conduitd -D -e "$@"
