#!/usr/bin/env bash
# The newest releases of everything kdray depends on, tried in a scratch environment: lock them
# (scripts/lock.sh --upgrade into a scratch lock), install, run `pytest -m "not slow"` against that lock,
# and print how the pins would move. With --write, a passing run copies the scratch lock over
# requirements.lock; then run the whole suite and commit (README.md, "Moving the pinned versions").
# Extra arguments go to pytest (e.g. -x, or a test file).
set -euo pipefail
cd "$(dirname "$0")/.."
write=false
if [ "${1:-}" = --write ]; then write=true; shift; fi
scratch=${TRY_LATEST_DIR:-$(mktemp -d)}
mkdir -p "$scratch"
lock="$scratch/requirements.lock"
LOCK_FILE="$lock" scripts/lock.sh --upgrade
echo "== pins that move (current -> newest):"
diff <(grep -E '^[A-Za-z0-9]' requirements.lock) <(grep -E '^[A-Za-z0-9]' "$lock") |
    sed -n 's/^> /  /p' || true
python3 -m venv "$scratch/venv"
. "$scratch/venv/bin/activate"  # tests start `kdray` and `python` as commands: this environment's
pip install -q --disable-pip-version-check -c "$lock" -e ".[test]" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
status=0
KDRAY_LOCK_FILE="$lock" python -m pytest -m "not slow" -p no:cacheprovider "$@" || status=$?
echo "== newest releases: pytest -m 'not slow' exited $status (environment: $scratch/venv, lock: $lock)"
if [ "$status" = 0 ] && $write; then
    cp "$lock" requirements.lock
    echo "requirements.lock moved to the newest releases: run the whole suite, then commit"
fi
exit "$status"
