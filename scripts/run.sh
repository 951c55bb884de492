#!/usr/bin/env bash
# Install sshconduit into .venv and run conduitd on its embedded default: 127.0.0.1:2222, your user, your keys.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[speed]'
# An editable install runs src as it is: byte-compile it once here. Python would at the first import, but
# not where PYTHONDONTWRITEBYTECODE is set, and then every conduit and conduitd start compiles it again.
.venv/bin/python -m compileall -q src >/dev/null
echo "conduitd is starting on 127.0.0.1:2222. In another terminal, for example:"
echo "  .venv/bin/conduit -p 2222 -N -L 1100:localhost:110 localhost"
exec .venv/bin/conduitd -D -e "$@"
