#!/usr/bin/env bash
# The README's test command: sets up a fresh machine, lints, runs the tests.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k attacks # extra arguments go to pytest
#   bash scripts/test.sh -m "not slow"  # the inner loop: no subprocess or end-to-end runs
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# Headless Chromium for tests/test_tensorboard_browser.py (TensorBoard in a real browser).
# Only the tests need it, so setup.sh (and run.sh) do not install it. Idempotent; quiet
# unless apt-get fails.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  echo "test: installing Debian's chromium (for tests/test_tensorboard_browser.py)" >&2
  SUDO=""
  [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  apt_log="$(mktemp)"
  if ! { $SUDO apt-get update -qq &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    rm -f "$apt_log"
    echo "test: apt-get install chromium failed" >&2
    exit 1
  fi
  rm -f "$apt_log"
fi
echo "== ruff"
ruff check .
ruff format --check .
echo "== pytest"
python -m pytest "$@"
