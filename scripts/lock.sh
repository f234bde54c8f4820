#!/usr/bin/env bash
# Regenerate requirements.lock, the whole environment kdray is tested on (transitive packages included),
# from pyproject.toml with pip-tools' pip-compile. The pins already in the lock are kept unless asked:
#   scripts/lock.sh                          add what pyproject.toml gained, keep every other pin
#   scripts/lock.sh --upgrade                move every pin to the newest release
#   scripts/lock.sh --upgrade-package optuna move one package (and what it needs)
#   LOCK_FILE=/tmp/x.lock scripts/lock.sh    write another file (scripts/try_latest.sh does)
# Then install it, run the suite and commit (README.md, "Moving the pinned versions").
# The lock is resolved for Linux x86_64 and Python 3.11: CI, the cluster image and this project's machines.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=${LOCK_FILE:-requirements.lock}
tools=${KDRAY_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/kdray/pip-tools}
if [ ! -x "$tools/bin/pip-compile" ]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q --disable-pip-version-check "pip-tools==7.7.0"
fi
if [ "$lock" != requirements.lock ] && [ ! -e "$lock" ] && [ -e requirements.lock ]; then
    cp requirements.lock "$lock"  # start from the tested pins; --upgrade moves them
fi
# kdray[test] names kdray[timm,onnx,cluster]: without --unsafe-package the lock would pin this checkout itself.
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/bin/pip-compile" --quiet --strip-extras --extra test \
    --no-emit-index-url --no-emit-find-links --unsafe-package kdray --output-file "$lock" "$@" pyproject.toml \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "wrote $lock"
