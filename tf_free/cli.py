"""What every command line of the project shares: quiet logs by default.

TensorFlow Datasets and absl log INFO lines at every dataset load ("Load
dataset info from ...", "Constructing tf.data.Dataset ..."); a user running
`python -m tf_free.train` wants the progress bar and our own lines. By default
INFO lines from other packages are dropped (warnings and errors always show);
`--verbosity=1` (absl's own flag) or `TF_FREE_LOGS=all` brings them back.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import flags, logging

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SCRIPTS = os.path.join(os.path.dirname(_PACKAGE), "scripts")


class _OwnInfoOnly(std_logging.Filter):
    """Keeps INFO records from tf_free and its scripts, and everything at WARNING or above."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        return record.pathname.startswith((_PACKAGE, _SCRIPTS))


def quiet_logs() -> None:
    """Drops other packages' INFO chatter, unless --verbosity > 0 or TF_FREE_LOGS=all.

    Call it at the start of an absl `main` (after the flags are parsed).
    """
    verbose = flags.FLAGS.is_parsed() and flags.FLAGS.verbosity > 0
    if verbose or os.environ.get("TF_FREE_LOGS", "").lower() == "all":
        return
    # TensorFlow's Python logger has its own handler ("INFO:tensorflow:Assets written to ...").
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())
