#!/usr/bin/env bash
# The README's test command: sets up a fresh machine, lints, runs the tests.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k attacks # extra arguments go to pytest
#   bash scripts/test.sh -m "not slow"  # the inner loop: no subprocess or end-to-end runs
set -euo pipefail
source "$(dirname "$0")/setup.sh"
echo "== ruff"
ruff check .
ruff format --check .
echo "== pytest"
python -m pytest "$@"
