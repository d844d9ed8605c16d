"""TensorBoard in a real browser: a tiny training run's summaries, drawn by headless Chromium.

A real `python -m tf_free.train` run on the embedded Fashion-MNIST writes its logs; a real
`tensorboard` serves them on 127.0.0.1; Debian's `chromium --headless=new` (driven over the
DevTools protocol by `tf_free.tensorboard_browser.Browser`) loads the pages; the tests read
the rendered DOM.

What proves a drawn multi-point chart: the time-series page is loaded with `?forceSVG=true`
(TensorBoard's switch from its WebGL <canvas> renderer to its SVG one), so each series of a
scalar card is an SVG <path d="M x,y L x,y ..."> inside the card's
<line-chart><div class="series-view"><svg>, one command per point, in pixels. The test
counts the distinct x positions of a card's path and compares them with the number of
points in the event file: every logged step fetched from the server and drawn. A card still
loading (progress bar) or empty has no path; one with a single point has one x position.
"""

import json
import signal

import pytest
from helpers import TINY, run_module
from tensorboard.backend.event_processing import event_accumulator

from tf_free import tensorboard_browser as tb

LOG_EVERY = 2  # TINY trains 16 iterations: 8 training points per scalar
EVAL_EVERY = 8  # robustness at iterations 8 and 16: 2 points
TRAIN_FLAGS = [f"--{k}={v}" for k, v in TINY.items()] + [
    f"--log_every={LOG_EVERY}",
    f"--eval_every_iterations={EVAL_EVERY}",
]
PGD_TAG = f"robustness/pgd{TINY['eval_pgd_steps']}_accuracy"
ROBUSTNESS_TAGS = ("robustness/clean_accuracy", PGD_TAG)
TRAIN_TAGS = ("train/adv_loss", "train/adv_accuracy", "train/learning_rate")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("runs") / "run"
    result = run_module("tf_free.train", f"--model_dir={model_dir}", *TRAIN_FLAGS, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def logged_steps(run_dir, tag):
    """The steps of a scalar in an event folder (TF2 summaries are tensors)."""
    events = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    return [event.step for event in events.Tensors(tag)]


def numbers(cells):
    values = []
    for cell in cells:
        try:
            values.append(float(cell))
        except ValueError:
            pass
    return values


def load(browser, url, expression=tb.TIMESERIES_DRAWN_JS):
    browser.goto(url)
    browser.wait_for(expression, timeout=90)


@pytest.fixture(scope="module")
def pages(model_dir):
    """The pages as drawn, from `tensorboard --logdir=<model_dir>/logs` (what train prints)."""
    with tb.TensorBoard(model_dir / "logs") as board, tb.Browser() as browser:
        board.wait_for_runs(["train", "robustness"])
        board.wait_for_tags({"train": TRAIN_TAGS, "robustness": ROBUSTNESS_TAGS})
        assert board.running
        doms = {}
        load(browser, board.url("timeseries", tagFilter="^(robustness|x_adv)/"))
        doms["robustness"] = browser.dom()
        doms["image_sizes"] = browser.evaluate(
            "[...document.querySelectorAll('image-card img')]"
            ".map((img) => [img.naturalWidth, img.naturalHeight])"
        )
        load(browser, board.url("timeseries", tagFilter="^train/"))
        doms["train"] = browser.dom()
        load(browser, board.url("hparams"), tb.HPARAMS_TABLE_SHOWN_JS)
        doms["hparams"] = browser.deep_html()  # Polymer: the table is in shadow roots
    return doms, board, browser


def cards_by_title(dom):
    return {card.title: card for card in tb.scalar_cards(dom)}


@pytest.mark.slow
def test_timeseries_page_shows_the_robustness_and_training_tags(pages):
    doms, _, _ = pages
    robustness, train = cards_by_title(doms["robustness"]), cards_by_title(doms["train"])
    assert set(ROBUSTNESS_TAGS) <= set(robustness), sorted(robustness)
    assert set(TRAIN_TAGS) <= set(train), sorted(train)
    # The tag filter from the URL is applied: one group of scalar cards per page.
    assert all(t.startswith("robustness/") for t in robustness), sorted(robustness)
    assert all(t.startswith("train/") for t in train), sorted(train)


@pytest.mark.slow
def test_timeseries_page_draws_every_logged_point(pages, model_dir):
    doms, _, _ = pages
    for run, tags, dom in (
        ("train", TRAIN_TAGS, doms["train"]),
        ("robustness", ROBUSTNESS_TAGS, doms["robustness"]),
    ):
        cards = cards_by_title(dom)
        for tag in tags:
            steps = logged_steps(model_dir / "logs" / run, tag)
            assert len(set(steps)) > 1, (tag, steps)
            card = cards[tag]
            assert not card.loading, tag
            # One drawn x position per logged step: a line through all of them.
            assert card.most_points() == len(set(steps)), (tag, steps, card.lines)
    assert len(logged_steps(model_dir / "logs" / "train", "train/adv_loss")) == 16 // LOG_EVERY


@pytest.mark.slow
def test_timeseries_page_shows_the_adversarial_images(pages):
    doms, _, _ = pages
    root = tb.parse_dom(doms["robustness"])
    images = []
    for card in root.iter("image-card"):
        title = next(card.iter("tb-truncated-path"), None)
        if title is not None and "".join(title.text().split()).startswith("x_adv/"):
            images += [img.attrs.get("src", "") for img in card.iter("img")]
    assert images and all("data/plugin/timeseries/imageData" in src for src in images), images
    # The browser fetched and decoded them: clean | adversarial | perturbation, 28 high.
    sizes = doms["image_sizes"]
    assert sizes and all(w > h >= 28 for w, h in sizes), sizes


@pytest.mark.slow
def test_hparams_page_lists_the_run_with_its_metrics(pages, model_dir):
    """`tensorboard --logdir <model_dir>/logs`, the command tf_free.train prints."""
    doms, _, _ = pages
    headers, cells = tb.hparams_table(doms["hparams"])
    assert "Trial ID" in headers, headers
    assert "run" in cells, cells  # the trial id: the run folder's name
    assert "clean (end of training)" in headers, headers  # a metric column
    # The key hparams are ticked first (tf_free.summaries.KEY_HPARAMS).
    for name in ("method", "m", "epsilon_255"):
        assert name in headers, headers
    assert "free" in cells, cells
    assert any(abs(number - 25.5) < 1e-6 for number in numbers(cells)), cells
    # The metric cells hold the run's results (the session's own run holds them).
    results = json.loads((model_dir / "results.json").read_text())
    for key in ("clean_accuracy", f"pgd{TINY['eval_pgd_steps']}_accuracy"):
        assert any(abs(v - results[key]) < 1e-4 for v in numbers(cells)), (key, results, cells)


@pytest.mark.slow
def test_hparams_page_compares_runs_with_their_metrics(model_dir):
    """With --logdir on the folder of run folders, the metric columns hold the accuracies."""
    with tb.TensorBoard(model_dir.parent) as board, tb.Browser() as browser:
        board.wait_for_runs(["run/logs/robustness"])
        load(browser, board.url("hparams"), tb.HPARAMS_TABLE_SHOWN_JS)
        headers, cells = tb.hparams_table(browser.deep_html())
    results = json.loads((model_dir / "results.json").read_text())
    assert "run" in cells, cells
    for key in ("clean_accuracy", f"pgd{TINY['eval_pgd_steps']}_accuracy"):
        # Shown to 5 significant digits.
        assert any(abs(v - results[key]) < 1e-4 for v in numbers(cells)), (key, results, cells)


@pytest.mark.slow
def test_tensorboard_and_chromium_are_stopped_afterwards(pages):
    _, board, browser = pages
    assert not board.running  # no process of its group is left, not even a zombie
    assert board.process.returncode is not None
    with pytest.raises(OSError):
        board.get("/data/environment", timeout=5)
    assert browser.process.returncode is not None


@pytest.mark.slow
def test_tensorboard_is_stopped_after_an_exception(tmp_path):
    with pytest.raises(KeyError):
        with tb.TensorBoard(tmp_path) as board:
            assert board.running
            raise KeyError("boom")
    assert not board.running
    assert board.process.returncode in (0, -signal.SIGTERM)  # it exits cleanly on SIGTERM


@pytest.mark.slow
def test_missing_chromium_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tb.shutil, "which", lambda name: None)
    with pytest.raises(tb.BrowserError, match="apt-get install chromium"):
        with tb.Browser():
            pass
