"""A PNG of a TensorBoard page as headless Chromium draws it, for the README.

    python scripts/tensorboard_screenshots.py --logdir=runs/quickstart/logs \
        --out=results/tensorboard_timeseries.png --filter='^(robustness|train)/'
    python scripts/tensorboard_screenshots.py --logdir=runs/quickstart/logs \
        --out=results/tensorboard_hparams.png --page=hparams

Starts `tensorboard` on 127.0.0.1 and a free port, waits until it has loaded the runs and
until the page has drawn its data (every time-series card in view has its lines or image;
the HParams table has its rows), writes the PNG and stops TensorBoard again. Needs Debian's
`chromium` (apt-get install chromium).
"""

import os
import sys

from absl import app, flags

# `import tf_free` imports TensorFlow, whose C++ start-up lines are noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from tf_free import tensorboard_browser as tb  # noqa: E402

flags.DEFINE_string("logdir", None, "TensorBoard's --logdir, e.g. a run folder's logs/.")
flags.DEFINE_string("out", None, "The PNG to write.")
flags.DEFINE_enum("page", "timeseries", ["timeseries", "hparams"], "The dashboard.")
flags.DEFINE_string(
    "filter", None, "Time series: TensorBoard's tag filter (a regex), e.g. '^robustness/'."
)
flags.DEFINE_float("smoothing", None, "Time series: scalar smoothing, 0-0.999 (default 0.6).")
flags.DEFINE_list("window_size", ["1600", "1000"], "The viewport: width,height in pixels.")
flags.DEFINE_float("timeout", 120, "Seconds to wait for TensorBoard and for the page.")
flags.mark_flags_as_required(["logdir", "out"])

FLAGS = flags.FLAGS

DRAWN = {"timeseries": tb.TIMESERIES_DRAWN_JS, "hparams": tb.HPARAMS_TABLE_SHOWN_JS}


def main(argv):
    if len(argv) > 1:
        sys.exit(f"tensorboard_screenshots: error: unexpected arguments {argv[1:]}")
    width, height = (int(v) for v in FLAGS.window_size)
    try:
        tb.find_chromium()  # the install hint before TensorBoard starts
        with tb.TensorBoard(FLAGS.logdir, startup_timeout=FLAGS.timeout) as board:
            runs = board.wait_for_runs(timeout=FLAGS.timeout)
            with tb.Browser(window_size=(width, height), timeout=FLAGS.timeout) as browser:
                browser.set_tensorboard_settings(tb.README_SETTINGS)
                browser.goto(
                    board.url(FLAGS.page, tagFilter=FLAGS.filter, smoothing=FLAGS.smoothing)
                )
                browser.wait_for(DRAWN[FLAGS.page], settle=2.0)
                path = browser.screenshot(FLAGS.out)
    except (tb.BrowserError, tb.TensorBoardError) as e:
        sys.exit(f"tensorboard_screenshots: error: {e}")
    print(f"{path}: {FLAGS.page} of {os.path.abspath(FLAGS.logdir)} (runs: {', '.join(runs)})")


if __name__ == "__main__":
    app.run(main)
