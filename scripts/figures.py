"""The paper's four figures ("Adversarial Training for Free!", Shafahi et al. 2019) on Fashion-MNIST.

    python scripts/figures.py                                  # all four, a few minutes on 2 cores
    python scripts/figures.py --figures=4 --fig4_examples=10000
    python scripts/figures.py --figures=1 --retrain            # retrain Fig. 1's replay models

Reads the models trained by `python scripts/reproduce_fashion_mnist.py` from `--runs`
(default runs/fashion_mnist/<row>/export, SavedModels whose float endpoint maps images in
[0, 1] to logits) and writes PNGs to `--out` (default results/):

- fig1_replay.png: natural training with minibatch replay (free training at ε=0), clean test
  accuracy against m, every m with the same natural-epoch budget. Trains its own models
  (reduced budget: --fig1_epochs natural epochs of the first --fig1_train_examples training
  images) into <runs>/replay/m{m}/ and reuses them on later runs (--retrain forces training).
- fig2_large_eps.png: 50-step BIM at ε=30/255 (step 2/255, no random start) on the last 9
  test images against the natural, free (m=8) and 7-PGD models.
- fig3_loss_surface.png: cross-entropy of the free (m=8) and 7-PGD models on the first 2
  test images over a plane x + a·d1 + b·d2, a, b ∈ [-ε, ε], d's ±1 sign vectors: (random,
  adversarial = sign of the input gradient) and (random, random).
- fig4_eps_sweep.png and .json: PGD-20 accuracy (step ε/8 = 2.5ε/20, random start) against
  the evaluation ε, for every trained row found, on the first --fig4_examples test images.

Every attack is `tf_free.attacks.pgd` (Fig. 4 through `tf_free.evaluation.evaluate_attacks`);
Fig. 1 trains with `tf_free.experiment.train_and_evaluate`. Row labels and training ε come
from each run's config.json (`tf_free.run_folder`). ε is in [0, 1] image units unless a flag
says 0-255; accuracies are fractions, printed and plotted as percentages. The figures also go
to TensorBoard as images in <runs>/figures_logs (--tensorboard).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time

from absl import app, flags, logging

# Quiet TensorFlow's C++ start-up chatter unless the caller chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_free import attacks, data, evaluation, experiment, export, run_folder  # noqa: E402
from tf_free.config import JIT_CHOICES, ConfigError, TrainConfig, differences  # noqa: E402

REPRODUCE = "python scripts/reproduce_fashion_mnist.py"
# Rows of scripts/reproduce_fashion_mnist.py, in plotting order.
ROWS = ("natural", "free_m2", "free_m4", "free_m8", "free_m10", "pgd2", "pgd7")
CLASSES = data.FASHION_MNIST_CLASSES

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "runs", "runs/fashion_mnist", "Folder of the trained rows (<runs>/<row>/export)."
)
flags.DEFINE_string("out", "results", "Folder for the PNGs (and fig4_eps_sweep.json).")
flags.DEFINE_list("figures", ["1", "2", "3", "4"], "Which figures to make: any of 1,2,3,4.")
flags.DEFINE_integer("seed", 0, "Seed of the random directions (Fig. 3) and PGD starts (Fig. 4).")
flags.DEFINE_bool("tensorboard", True, "Also write each figure as an image to <runs>/figures_logs.")
flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
# Fig. 1
flags.DEFINE_list("fig1_m", ["1", "2", "4", "8", "16"], "Fig. 1: replay parameters m.")
flags.DEFINE_float("fig1_epochs", 4, "Fig. 1: natural-epoch budget, the same for every m.")
flags.DEFINE_integer("fig1_train_examples", 20000, "Fig. 1: train on the first N images.")
flags.DEFINE_bool("retrain", False, "Fig. 1: retrain the replay models even if cached.")
flags.DEFINE_enum(
    "jit_compile", "auto", JIT_CHOICES, "Fig. 1: XLA for training (auto: off on CPU)."
)
# Fig. 2
flags.DEFINE_float("fig2_epsilon", 30, "Fig. 2: BIM ε in 0-255 units.")
flags.DEFINE_float("fig2_step_size", 2, "Fig. 2: BIM step in 0-255 units.")
flags.DEFINE_integer("fig2_steps", 50, "Fig. 2: BIM steps.")
flags.DEFINE_integer("fig2_examples", 9, "Fig. 2: how many of the LAST test images.")
# Fig. 3
flags.DEFINE_integer("fig3_grid", 21, "Fig. 3: grid points per axis.")
flags.DEFINE_integer("fig3_examples", 2, "Fig. 3: how many of the first test images.")
# Fig. 4
flags.DEFINE_list(
    "fig4_eps",
    ["0", "0.025", "0.05", "0.075", "0.1", "0.125", "0.15", "0.2"],
    "Fig. 4: evaluation ε values in [0, 1] units.",
)
flags.DEFINE_integer("fig4_examples", 1000, "Fig. 4: attack the first N test images.")
flags.DEFINE_integer("fig4_steps", 20, "Fig. 4: PGD steps (step size 2.5ε/steps).")


class MissingRunError(RuntimeError):
    """A figure needs a trained row that is not in --runs."""


_START = time.time()


def log(message: str) -> None:
    print(f"[figures {time.time() - _START:6.0f}s] {message}", flush=True)


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


@functools.cache
def row_config(row: str) -> TrainConfig | None:
    """The run in <runs>/<row> (None without a readable config.json).

    Its `model_dir` is where the folder is now, so a moved folder finds its export.
    """
    folder = os.path.join(FLAGS.runs, row)
    try:
        return run_folder.read_config(folder)
    except ConfigError:
        return None


def export_dir(row: str) -> str:
    config = row_config(row)
    return run_folder.export_dir(config) if config else os.path.join(FLAGS.runs, row, "export")


def has_run(row: str) -> bool:
    """The row has a run folder with its SavedModel."""
    saved_model = os.path.join(export_dir(row), "saved_model.pb")
    return row_config(row) is not None and os.path.isfile(saved_model)


def label(row: str) -> str:
    return run_folder.label(row_config(row))


def train_epsilon(rows) -> float:
    """The training ε of `rows`, in [0, 1] units (the reproduction trains all at one ε)."""
    values = sorted({row_config(row).epsilon for row in rows})
    if len(values) > 1:
        log(f"note: {', '.join(rows)} were trained at different ε (0-255): {values}")
    return values[-1] / 255.0


def require_runs(figure: int, rows: list[str]) -> None:
    missing = [row for row in rows if not has_run(row)]
    if missing:
        folders = ", ".join(os.path.join(FLAGS.runs, row) for row in missing)
        raise MissingRunError(
            f"Fig. {figure} needs the trained {', '.join(missing)} model(s), but there is no "
            f"run with a SavedModel in {folders} (config.json and "
            f"{', '.join(export_dir(row) for row in missing)}). Train them with: {REPRODUCE}"
            + ("" if FLAGS.runs == "runs/fashion_mnist" else " (or point --runs elsewhere)")
        )


_MODELS = {}


def load_model(row: str):
    if row not in _MODELS:
        log(f"loading {export_dir(row)}")
        _MODELS[row] = export.load_logits_fn(export_dir(row))
    return _MODELS[row]


_TEST = None


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 Fashion-MNIST test images (float32 [0, 1]) and labels, in file order."""
    global _TEST
    if _TEST is None:
        try:
            images, labels = data.load_fashion_mnist("test")
        except data.DataError as e:
            log(f"Debian's IDX files unavailable ({e}); reading TFDS's fashion_mnist instead")
            ds = data.build_dataset("fashion_mnist", "test", batch_size=10000, training=False)
            images, labels = next(iter(ds))
            images, labels = (images.numpy() * 255).round().astype(np.uint8), labels.numpy()
        _TEST = (images.astype(np.float32) / 255.0, labels.astype(np.int64))
    return _TEST


def predict(model, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate(
        [model(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
    )


_WRITER = None


def save(fig, name: str, step_name: str) -> str:
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    log(f"wrote {path}")
    if FLAGS.tensorboard:
        global _WRITER
        if _WRITER is None:
            _WRITER = tf.summary.create_file_writer(os.path.join(FLAGS.runs, "figures_logs"))
        writer = _WRITER
        with writer.as_default():
            png = tf.io.decode_png(tf.io.read_file(path), channels=4)
            tf.summary.image(step_name, png[None], step=0)
        writer.flush()
    return path


def eps255(eps: float) -> str:
    return f"{eps * 255:g}/255"


# --------------------------------------------------------------------------
# Fig. 1: natural training with minibatch replay
# --------------------------------------------------------------------------


def replay_config(m: int) -> TrainConfig:
    """Free training at ε=0 with m replays, on a natural-epoch budget of --fig1_epochs.

    m replays make budget/m passes over the data. When that is less than one pass, the
    run makes one pass over the first N·budget/m images instead, so that every m gets the
    same number of SGD iterations (the paper's equal-cost comparison).
    """
    epochs, n = FLAGS.fig1_epochs, FLAGS.fig1_train_examples
    passes = epochs / m
    if passes < 1:
        n = max(1, int(round(n * passes)))
    elif passes != int(passes):
        log(f"m={m}: {epochs:g} epochs / m is not whole; the run makes {math.ceil(passes)} passes")
    return TrainConfig(
        method="free",
        epsilon=0.0,
        m=m,
        epochs=epochs,
        train_examples=n,
        eval_examples=10000,  # clean accuracy on the whole test set, at the end
        eval_every=10**6,
        eval_pgd_steps=1,  # ε=0: the callback's "PGD" is the clean image again; cheap
        jit_compile=FLAGS.jit_compile,
        model_dir=os.path.join(FLAGS.runs, "replay", f"m{m}"),
        seed=FLAGS.seed,
        verbose=2,
    )


def cached_result(config: TrainConfig) -> dict | None:
    """results.json of a finished run of `config` in its folder, else None."""
    results = os.path.join(config.model_dir, "results.json")
    if not os.path.isfile(results):
        return None
    try:
        found = differences(run_folder.read_config(config.model_dir), config)
    except ConfigError as e:
        found = [str(e)]
    if found:
        log(f"{config.model_dir}: the cached run differs ({'; '.join(found)}); retraining")
        return None
    with open(results) as f:
        return json.load(f)


def figure1() -> None:
    ms = sorted(int(m) for m in FLAGS.fig1_m)
    points = []
    for m in ms:
        config = replay_config(m)
        result = None if FLAGS.retrain else cached_result(config)
        if result is None:
            log(
                f"Fig. 1: training m={m} (ε=0) into {config.model_dir}: {config.passes} pass(es) "
                f"over {config.train_examples} images x {m} replays"
            )
            # Our own cache folder: a run there is replaced (fresh logs).
            result = experiment.train_and_evaluate(dataclasses.replace(config, overwrite=True))
        else:
            log(f"Fig. 1: m={m} cached in {config.model_dir} (--retrain to train again)")
        points.append((m, result, config))
        log(
            f"Fig. 1: m={m}: clean {100 * result['clean_accuracy']:.2f}% on "
            f"{result['eval_examples']} test images, {result['iterations']} iterations, "
            f"{result['train_minutes']:.1f} min"
        )

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    acc = [100 * r["clean_accuracy"] for _, r, _ in points]
    ax.plot(ms, acc, "o-", color="tab:blue", lw=2, ms=7, label="natural training with replay")
    for m, a, (_, _, c) in zip(ms, acc, points):
        note = f"{a:.1f}%"
        if c.train_examples < FLAGS.fig1_train_examples:
            note += f"\n(1 pass, {c.train_examples:,} imgs)"
        ax.annotate(
            note, (m, a), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlim(ms[0] / 1.4, ms[-1] * 1.4)
    ax.set_xlabel("minibatch replays m (log2 scale; m=1 is natural training)")
    ax.set_ylabel("clean test accuracy (%), 10,000 test images")
    lo = min(acc)
    ax.set_ylim(max(0, lo - 8), min(100, max(acc) + 5))
    ax.grid(alpha=0.3, which="both")
    iterations = points[0][1]["iterations"]
    ax.set_title(
        "Fig. 1: natural training with minibatch replay (Fashion-MNIST, small CNN)\n"
        f"same budget for every m: {FLAGS.fig1_epochs:g} natural epochs of "
        f"{FLAGS.fig1_train_examples:,} training images (~{iterations} SGD iterations)",
        fontsize=10,
    )
    ax.legend(loc="lower left", fontsize=9)
    fig.text(
        0.01,
        -0.04,
        f"Each m makes {FLAGS.fig1_epochs:g}/m passes, each minibatch replayed m times in a row "
        "(free training at ε=0); fewer than 1 pass = one pass over the first N·budget/m images. "
        "Reduced budget (the rows of Table 1 use 8 epochs of 60,000).",
        fontsize=7.5,
        wrap=True,
    )
    save(fig, "fig1_replay.png", "fig1_replay")


# --------------------------------------------------------------------------
# Fig. 2: large-ε BIM images
# --------------------------------------------------------------------------


def figure2() -> None:
    rows = FIGURES[2][1]
    images, labels = test_set()
    n = FLAGS.fig2_examples
    x, y = images[-n:], labels[-n:]
    index0 = len(images) - n
    eps, step = FLAGS.fig2_epsilon / 255.0, FLAGS.fig2_step_size / 255.0
    attacked = {}
    for row in rows:
        model = load_model(row)
        log(f"Fig. 2: BIM-{FLAGS.fig2_steps} (ε={eps255(eps)}, step {eps255(step)}) on {row}")
        # Every image takes all its steps (early_stop=False), whatever the others do.
        adv = attacks.pgd(
            model,
            x,
            y,
            epsilon=eps,
            step_size=step,
            steps=FLAGS.fig2_steps,
            random_start=False,
            early_stop=False,
        ).numpy()
        probs = tf.nn.softmax(model(adv)).numpy()
        clean_pred = predict(model, x).argmax(-1)
        attacked[row] = (adv, probs, clean_pred)
        log(
            f"Fig. 2: {row}: clean {int((clean_pred == y).sum())}/{n} correct, "
            f"after BIM {int((probs.argmax(-1) == y).sum())}/{n} correct; "
            f"max |δ| = {np.abs(adv - x).max() * 255:.1f}/255"
        )

    columns = [("clean", None)] + [(f"{label(row)} model", row) for row in rows]
    head = 1.25  # inches above the grid for the title and the column headers
    height = 2.2 * n + head
    fig, axes = plt.subplots(n, len(columns), figsize=(2.1 * len(columns), height), squeeze=False)
    for i in range(n):
        for j, (_, row) in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if row is None:
                ax.imshow(x[i, ..., 0], cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"#{index0 + i}: {CLASSES[y[i]]}", fontsize=9)
                continue
            adv, probs, _ = attacked[row]
            pred = int(probs[i].argmax())
            ax.imshow(adv[i, ..., 0], cmap="gray", vmin=0, vmax=1)
            color = "tab:green" if pred == y[i] else "tab:red"
            ax.set_title(
                f"→ {CLASSES[pred]} ({100 * probs[i, pred]:.0f}%)", fontsize=9, color=color
            )
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2)
    fig.tight_layout(rect=(0, 0, 1, 1 - head / height), h_pad=0.6)
    for j, (title, _) in enumerate(columns):
        box = axes[0, j].get_position()
        fig.text(
            (box.x0 + box.x1) / 2,
            box.y1 + 0.3 / height,
            title,
            ha="center",
            va="bottom",
            fontsize=10.5,
            fontweight="bold",
        )
    fig.suptitle(
        f"Fig. 2: {FLAGS.fig2_steps}-step BIM (tf_free.attacks.pgd, no random start),\n"
        f"ε={eps255(eps)} (={eps:.3f}), step {eps255(step)}, on the last {n} Fashion-MNIST "
        f"test images;\nmodels trained at ε={eps255(train_epsilon(rows))}. Titles: the model's "
        "prediction on\nthe attacked image (green: still correct, red: fooled)",
        fontsize=9.5,
        y=1 - 0.04 / height,
        va="top",
    )
    save(fig, "fig2_large_eps.png", "fig2_large_eps")


# --------------------------------------------------------------------------
# Fig. 3: loss surfaces
# --------------------------------------------------------------------------


def input_gradient(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(attacks.cross_entropy_loss(y, model(x)))
    return tape.gradient(loss, x).numpy()


def loss_surface(model, x, y, d1, d2, grid):
    """Cross-entropy of model(clip(x + a·d1 + b·d2)) for a (rows) and b (columns) in grid."""
    a, b = np.meshgrid(grid, grid, indexing="ij")
    batch = x[None] + a.reshape(-1, 1, 1, 1) * d1[None] + b.reshape(-1, 1, 1, 1) * d2[None]
    batch = np.clip(batch, 0.0, 1.0).astype(np.float32)
    labels = np.full([len(batch)], y, np.int64)
    losses = attacks.cross_entropy_loss(labels, predict(model, batch)).numpy()
    return losses.reshape(a.shape)


def figure3() -> None:
    rows = [(row, label(row)) for row in FIGURES[3][1]]
    images, labels = test_set()
    k = FLAGS.fig3_examples
    eps = train_epsilon(FIGURES[3][1])
    grid = np.linspace(-eps, eps, FLAGS.fig3_grid)
    rng = np.random.default_rng(FLAGS.seed)
    # The same random directions for both models; one pair per image.
    rand = [
        (rng.choice([-1.0, 1.0], images.shape[1:]), rng.choice([-1.0, 1.0], images.shape[1:]))
        for _ in range(k)
    ]
    pairs = [("random", "adversarial"), ("random", "random #2")]
    surfaces = {}  # (pair, image, row) -> loss grid
    for row, name in rows:
        model = load_model(row)
        grads = input_gradient(model, images[:k], labels[:k])
        for i in range(k):
            d_adv = np.sign(grads[i])
            for p, (d1, d2) in enumerate([(rand[i][0], d_adv), (rand[i][0], rand[i][1])]):
                s = loss_surface(model, images[i], labels[i], d1, d2, grid)
                surfaces[p, i, row] = s
                c = len(grid) // 2
                log(
                    f"Fig. 3: {name}, image #{i}, ({pairs[p][0]}, {pairs[p][1]}): loss at x "
                    f"{s[c, c]:.3f}, at +ε along {pairs[p][1]} {s[c, -1]:.3f}, along "
                    f"{pairs[p][0]} {s[-1, c]:.3f}, max {s.max():.3f}"
                )

    nm = len(rows)
    fig = plt.figure(figsize=(4.2 * nm * k + 0.8 * k, 4.4 * len(pairs) + 0.8))
    # Per image: one column per model, then a narrow one for the colour bar.
    gs = fig.add_gridspec(len(pairs), (nm + 1) * k, width_ratios=([1] * nm + [0.05]) * k)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    c = len(grid) // 2
    for p, (n1, n2) in enumerate(pairs):
        for i in range(k):
            # One scale per (direction pair, image), shared by the models, which then compare.
            zmax = max(surfaces[p, i, row].max() for row, _ in rows)
            zmin = min(surfaces[p, i, row].min() for row, _ in rows)
            zmax = max(zmax, zmin + 1e-3)
            norm = matplotlib.colors.Normalize(vmin=zmin, vmax=zmax)
            floor = zmin - 0.2 * (zmax - zmin)
            for r, (row, name) in enumerate(rows):
                ax = fig.add_subplot(gs[p, (nm + 1) * i + r], projection="3d")
                s = surfaces[p, i, row]
                ax.plot_surface(a, b, s, cmap="viridis", norm=norm, linewidth=0, antialiased=True)
                # The same surface as filled contours on the floor, easier to read.
                ax.contourf(a, b, s, levels=12, zdir="z", offset=floor, cmap="viridis", norm=norm)
                ax.contour(a, b, s, levels=12, zdir="z", offset=floor, colors="k", linewidths=0.3)
                ax.set_zlim(floor, zmax)
                ax.set_xlabel(f"a: {n1}", fontsize=8, labelpad=1)
                ax.set_ylabel(f"b: {n2}", fontsize=8, labelpad=1)
                ax.set_zlabel("cross-entropy", fontsize=8, labelpad=4)
                ax.set_box_aspect(None, zoom=0.86)
                ax.tick_params(labelsize=7, pad=0)
                ax.set_xticks([-eps, 0, eps])
                ax.set_yticks([-eps, 0, eps])
                ax.view_init(elev=28, azim=-50)
                ax.set_title(
                    f"{name} model, test image #{i} ({CLASSES[labels[i]]})\n"
                    f"({n1}, {n2}): loss at x {s[c, c]:.2f}, max {s.max():.2f}",
                    fontsize=9,
                )
            cell = gs[p, (nm + 1) * i + nm].subgridspec(3, 1, height_ratios=[0.2, 0.6, 0.2])
            cbar = fig.colorbar(
                matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"),
                cax=fig.add_subplot(cell[1]),
            )
            cbar.ax.tick_params(labelsize=7)
    fig.suptitle(
        f"Fig. 3: loss surfaces of the {' and '.join(name for _, name in rows)} models on the first "
        f"{k} Fashion-MNIST test images: cross-entropy of model(clip(x + a·d1 + b·d2, 0, 1)),\n"
        f"a, b ∈ [-ε, ε] in 0-1 pixel units, ε={eps:g} ({eps255(eps)}); "
        "d1, d2 are ±1 sign vectors: random (Rademacher; the same for both models) or "
        "adversarial (sign of the model's input gradient at x).\n"
        "Top row: (random, adversarial); bottom row: (random, random). (0, 0) is the clean "
        "image. Floor: the same surface as contours. Each image's pair of panels shares "
        "its z axis and colours, so the models compare.",
        fontsize=10.5,
    )
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.03, top=0.87, wspace=0.12, hspace=0.2)
    save(fig, "fig3_loss_surface.png", "fig3_loss_surface")


# --------------------------------------------------------------------------
# Fig. 4: accuracy against the evaluation ε
# --------------------------------------------------------------------------


def figure4() -> None:
    present = [row for row in ROWS if has_run(row)]
    missing = [row for row in ROWS if row not in present]
    if not present:
        require_runs(4, list(ROWS))  # raises: names every row and the command
    if missing:
        log(
            f"Fig. 4: no run with a SavedModel for {', '.join(missing)} in {FLAGS.runs}; plotting the "
            f"{len(present)} rows found (train the rest with: {REPRODUCE})"
        )
    epsilons = [float(e) for e in FLAGS.fig4_eps]
    images, labels = test_set()
    n = min(FLAGS.fig4_examples, len(images))
    dataset = tf.data.Dataset.from_tensor_slices((images[:n], labels[:n])).batch(FLAGS.batch_size)
    steps = FLAGS.fig4_steps
    accuracy = {}  # fractions
    for row in present:
        model = load_model(row)
        accuracy[row] = []
        for eps in epsilons:
            t = time.time()
            name = "natural" if eps == 0 else f"pgd{steps}"
            acc = evaluation.evaluate_attacks(
                model,
                dataset,
                [name],
                epsilon=eps,
                step_size=2.5 * eps / steps,
                seed=FLAGS.seed,
                verbose=False,
            )[name]
            accuracy[row].append(acc)
            log(
                f"Fig. 4: {label(row):>9}, ε={eps:<5g} ({eps255(eps)}): "
                f"{100 * acc:6.2f}%  ({time.time() - t:.1f}s)"
            )
        rises = np.diff(accuracy[row])
        if (rises > 0.005).any():
            log(f"Fig. 4: note: {row}'s accuracy RISES with ε somewhere: {accuracy[row]}")

    train_eps = train_epsilon(present)
    percents = {row: [100 * a for a in accuracy[row]] for row in present}
    os.makedirs(FLAGS.out, exist_ok=True)
    record = {
        "epsilons": epsilons,
        "epsilons_255": [e * 255 for e in epsilons],
        "attack": (
            f"tf_free.attacks.pgd: PGD-{steps} on the cross-entropy, step 2.5ε/{steps} "
            f"(= ε/8 for 20 steps), random start, seed {FLAGS.seed}; ε=0 is clean accuracy"
        ),
        "num_examples": n,
        "examples": f"the first {n} Fashion-MNIST test images (file order)",
        "train_epsilon": train_eps,
        "accuracy_percent": percents,
        "runs": {row: os.path.abspath(export_dir(row)) for row in present},
        "missing_rows": missing,
    }
    path = os.path.join(FLAGS.out, "fig4_eps_sweep.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    log(f"wrote {path}")

    fig, ax = plt.subplots(figsize=(7.4, 5.0))
    free_rows = [r for r in present if row_config(r).method == "free"]
    pgd_rows = [r for r in present if row_config(r).method == "pgd"]
    blues = plt.get_cmap("Blues")(np.linspace(0.45, 0.95, max(1, len(free_rows))))
    reds = plt.get_cmap("Oranges")(np.linspace(0.55, 0.9, max(1, len(pgd_rows))))
    styles = {r: dict(color="black", marker="s", ls="-") for r in present}
    styles.update({r: dict(color=c, marker="o", ls="-") for r, c in zip(free_rows, blues)})
    styles.update({r: dict(color=c, marker="^", ls="--") for r, c in zip(pgd_rows, reds)})
    for row in present:
        ax.plot(epsilons, percents[row], lw=1.8, ms=5, label=label(row), **styles[row])
    ax.axvline(train_eps, color="gray", ls=":", lw=1)
    ax.text(train_eps, 1, f" training ε={train_eps:g}", color="gray", fontsize=8, va="bottom")
    ax.set_xlabel("evaluation ε (L∞, 0-1 pixel units)")
    ax.set_ylabel(f"accuracy under PGD-{steps} (%)")
    ax.set_ylim(-2, 100)
    ax.set_xlim(min(epsilons) - 0.005, max(epsilons) + 0.005)
    top = ax.secondary_xaxis("top", functions=(lambda e: e * 255, lambda p: p / 255))
    top.set_xlabel("evaluation ε (0-255 pixel units)")
    ax.grid(alpha=0.3)
    ax.legend(title="training", fontsize=9, loc="upper right")
    ax.set_title(
        f"Fig. 4: robustness against the attack's ε (Fashion-MNIST, small CNN, trained at "
        f"ε={train_eps:g})\nPGD-{steps}, step 2.5ε/{steps}, random start, first {n:,} "
        "test images; ε=0 is clean accuracy",
        fontsize=10,
    )
    save(fig, "fig4_eps_sweep.png", "fig4_eps_sweep")


# --------------------------------------------------------------------------


FIGURES = {
    1: (figure1, []),
    2: (figure2, ["natural", "pgd7", "free_m8"]),
    3: (figure3, ["free_m8", "pgd7"]),
    4: (figure4, []),
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        chosen = sorted({int(f) for f in FLAGS.figures})
    except ValueError:
        chosen = [0]
    if not chosen or any(f not in FIGURES for f in chosen):
        raise app.UsageError(f"--figures takes numbers among 1,2,3,4, got {FLAGS.figures}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFDS/export INFO lines; progress is ours
    tf.get_logger().setLevel("ERROR")  # retracing notices from the per-ε attack functions
    tf.autograph.set_verbosity(0)
    try:
        # Check every needed model before any work.
        for f in chosen:
            require_runs(f, FIGURES[f][1])
        if 4 in chosen and not any(has_run(row) for row in ROWS):
            raise MissingRunError(
                f"Fig. 4 found no trained model in {FLAGS.runs}: it plots every row among "
                f"{', '.join(ROWS)} that has a run with a SavedModel in {FLAGS.runs}/<row>, and "
                f"there is none. Train them with: {REPRODUCE}"
            )
        timings = {}
        for f in chosen:
            t = time.time()
            log(f"Fig. {f} ...")
            FIGURES[f][0]()
            timings[f] = time.time() - t
            log(f"Fig. {f} done in {timings[f]:.0f}s")
    except MissingRunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    log("runtime: " + ", ".join(f"Fig. {f} {s:.0f}s" for f, s in timings.items()))


if __name__ == "__main__":
    app.run(main)
