#!/usr/bin/env bash
# Sourced by run.sh and test.sh (or by hand: `source scripts/setup.sh`): makes a fresh machine
# ready, from the repo's files only (the venv, the pinned requirements, tf_free installed
# editable), then activates the venv and cds to the repo.
# Idempotent: a second run only checks.
#
# The steps run with `set -euo pipefail` in a subshell, so a failing step ends the setup, not
# the caller's shell. The caller's shell options (`set +o`) are restored at the end, also
# after a failure; the status is the first failing step's (a caller with -e then stops).
# `$(set +o)` reports errexit as off (bash clears -e in command substitutions), so -e is
# kept apart from `$-`: https://www.gnu.org/software/bash/manual/bash.html#Command-Execution-Environment
_tf_free_setup_opts="$(set +o)"
case $- in *e*) _tf_free_setup_opts+=$'\nset -e' ;; esac
set +e
(
  set -euo pipefail
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"

  # 1. Real data: Debian's Fashion-MNIST (the original IDX files).
  if [[ ! -f "$FASHION_MNIST_DIR/t10k-labels-idx1-ubyte.gz" ]]; then
    echo "setup: installing Debian's dataset-fashion-mnist into $FASHION_MNIST_DIR" >&2
    SUDO=""
    [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi

  # 2. Python environment: a venv with the pinned requirements.
  VENV="${TF_FREE_VENV:-$REPO/.venv}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV" >&2
    python3 -m venv "$VENV"
  fi
  STAMP="$VENV/.requirements.sha256"
  WANT="$(cat "$REPO/requirements.txt" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
    echo "setup: installing requirements.txt (a few minutes the first time)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt"
    # 3. The project itself, editable: `import tf_free` works from any folder.
    # (The venv's own setuptools builds it; without one, pip fetches it.)
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO" ||
      "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"
    echo "$WANT" >"$STAMP"
  fi
)
_tf_free_setup_status=$?

# 4. The caller's shell: the venv, TF's C++ logs quiet, the repo as cwd.
if [[ $_tf_free_setup_status == 0 ]]; then
  _tf_free_setup_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" &&
    # shellcheck disable=SC1091
    source "${TF_FREE_VENV:-$_tf_free_setup_repo/.venv}/bin/activate" &&
    export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" &&
    cd "$_tf_free_setup_repo"
  _tf_free_setup_status=$?
  [[ $_tf_free_setup_status == 0 ]] || echo "setup: activating the venv failed" >&2
else
  echo "setup: failed (status $_tf_free_setup_status); see the messages above" >&2
fi

# Restore the caller's options; `return` when sourced, `exit` when run as a script.
eval "$_tf_free_setup_opts"
eval "unset _tf_free_setup_opts _tf_free_setup_status _tf_free_setup_repo
  return $_tf_free_setup_status 2>/dev/null || exit $_tf_free_setup_status"
