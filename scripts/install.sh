#!/usr/bin/env bash
# Install sshconduit, editable, into .venv with the extras given (run.sh: '.[speed]', test.sh: '.[test,speed]').
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e "$1"
# An editable install runs src as it is: byte-compile it once here. Python would at the first import, but
# not where PYTHONDONTWRITEBYTECODE is set, and then every conduit and conduitd start compiles it again.
.venv/bin/python -m compileall -q src >/dev/null
