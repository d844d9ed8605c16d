"""scripts/setup.sh, sourced: the caller's shell keeps its options, on success and on failure."""

import hashlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(REPO, "scripts", "setup.sh")
VENV = os.path.dirname(os.path.dirname(sys.executable))  # the venv running these tests
FASHION_MNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _ready():
    """Whether setup.sh will only check (no apt-get, no venv, no pip): the test must be quick."""
    digest = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        with open(os.path.join(REPO, name), "rb") as f:
            digest.update(f.read())
    want = digest.hexdigest()
    try:
        with open(os.path.join(VENV, ".requirements.sha256")) as f:
            stamp = f.read().strip()
    except OSError:
        stamp = None
    return stamp == want and os.path.isfile(
        os.path.join(FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")
    )


pytestmark = pytest.mark.skipif(
    not _ready(), reason="setup.sh would install (requirements stamp or Fashion-MNIST missing)"
)


def _bash(script, tmp_path, **env):
    """Runs `script` in a fresh non-interactive bash from tmp_path; returns (rc, stdout, stderr)."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "BASH_ENV", "TF_CPP_MIN_LOG_LEVEL")
    }
    full_env.update(TF_FREE_VENV=VENV, FASHION_MNIST_DIR=FASHION_MNIST_DIR, SETUP=SETUP)
    full_env.update(env)
    p = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return p.returncode, p.stdout, p.stderr


def test_sourcing_leaves_a_shell_without_errexit_alive(tmp_path):
    rc, out, err = _bash(
        'set +e; source "$SETUP"; false; echo still-here; [[ $- != *e* ]]', tmp_path
    )
    assert (rc, out) == (0, "still-here\n"), err


@pytest.mark.parametrize("options", ["", "set -u", "set -o pipefail", "set -euo pipefail"])
def test_sourcing_restores_the_callers_options_and_sets_up_the_environment(tmp_path, options):
    rc, out, err = _bash(
        f"{options}\n"
        'before="$- $(set +o)"\n'
        'source "$SETUP"\n'
        'source "$SETUP"  # idempotent\n'
        '[[ "$- $(set +o)" == "$before" ]] && echo same-options\n'
        'echo "$PWD|$VIRTUAL_ENV|${PYTHONPATH:-}|$TF_CPP_MIN_LOG_LEVEL"\n'
        "set | grep -c '^_tf_free_setup' || true\n",
        tmp_path,
    )
    assert rc == 0, err
    assert out == f"same-options\n{REPO}|{VENV}||2\n0\n"  # no PYTHONPATH: tf_free is installed


def test_a_failing_setup_returns_its_status_and_restores_the_options(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    venv = str(not_a_dir / "venv")  # `python3 -m venv` fails at once: a file is in the way
    rc, out, err = _bash(
        'set +e -u\nbefore="$- $(set +o)"\nsource "$SETUP"\necho "status $?"\n'
        '[[ "$- $(set +o)" == "$before" ]] && echo same-options\necho "$PWD"\n',
        tmp_path,
        TF_FREE_VENV=venv,
    )
    assert rc == 0, err
    assert out == f"status 1\nsame-options\n{tmp_path}\n"  # no cd, no venv, shell alive
    assert err.splitlines()[-1] == "setup: failed (status 1); see the messages above"


def test_a_caller_with_errexit_stops_when_setup_fails(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    rc, out, _ = _bash(
        'set -euo pipefail; source "$SETUP"; echo not-reached',
        tmp_path,
        TF_FREE_VENV=str(not_a_dir / "venv"),
    )
    assert (rc, out) == (1, "")


def test_run_as_a_script_exits_with_the_status(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert _bash('bash "$SETUP"', tmp_path)[0] == 0
    assert _bash('bash "$SETUP"', tmp_path, TF_FREE_VENV=str(not_a_dir / "venv"))[0] == 1
