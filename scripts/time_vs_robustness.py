"""Time against robustness: natural, free, fast (FGSM-RS) and PGD training on one machine.

    python scripts/time_vs_robustness.py                      # every run, the table, the figure
    python scripts/time_vs_robustness.py --budgets=8 --methods=fast,free_m8
    python scripts/time_vs_robustness.py --autoattack_examples=0   # without AutoAttack

Trains each method of METHODS on Fashion-MNIST (the small CNN, ε=0.1 = 25.5/255, batch
128, SGD momentum 0.9, cosine LR from 0.05: `flags/common/fashion_mnist.cfg`, as
`scripts/reproduce_fashion_mnist.py`) at each budget of --budgets natural epochs, given as natural training's iterations (free
training: iterations/m batches of m replays, a partial last pass if need be; fast and PGD
training: one iteration per batch),
plus the catastrophic-overfitting pair of LARGE_ALPHA (fast training with a large FGSM step,
without and with the guard) at the largest budget. Then it attacks each exported model: clean
and PGD-20 accuracy on the 10,000 test images (step 0.01, random start), and the standard
AutoAttack on the first --autoattack_examples for the runs of the largest budget. It writes `time_vs_robustness.json` and `.md`
(a row per run) and `time_vs_robustness.png` (robust accuracy against training minutes, a
point per run, methods coloured) to --out.

Each run's folder is `<runs>/e<budget>/<method>`; a run whose folder has `point.json` is not
trained again (unless --retrain), and a run killed mid-training resumes from its checkpoint.
The table and the figure are rewritten after every run, so nothing is lost to a kill.
Training minutes are the loop's training clock (steps, input and checkpoints, without the
evaluations and the guard's checks), wall-clock on this machine: run it alone.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags, logging

from tf_free import evaluation, experiment, run_folder
from tf_free.config import TrainConfig

# Each method's settings on top of TrainConfig's defaults (flags/common/fashion_mnist.cfg).
METHODS = {
    "natural": dict(method="natural"),
    "free_m2": dict(method="free", m=2),
    "free_m4": dict(method="free", m=4),
    "free_m8": dict(method="free", m=8),
    "fast": dict(method="fast"),  # α = 1.25ε, the guard on (auto)
    "pgd2": dict(method="pgd", pgd_steps=2),
    "pgd7": dict(method="pgd", pgd_steps=7),
}
# FGSM-RS with a large step: catastrophic overfitting without the guard, stopped with it.
# α = 2ε in 0-255 units (ε = 25.5): from any start in the ε-ball, a step of 2ε or more
# lands δ on ε·sign(∇), so no larger α trains anything different.
LARGE_ALPHA_STEP = 51.0
_LARGE_ALPHA = dict(method="fast", fast_step_size=LARGE_ALPHA_STEP, lr_schedule="cyclic", lr=0.2)
LARGE_ALPHA = {
    "fast_large_alpha": dict(**_LARGE_ALPHA, overfit_guard="off"),
    "fast_large_alpha_guard": dict(**_LARGE_ALPHA, overfit_guard="on"),
}
COLORS = {"natural": "tab:gray", "free": "tab:blue", "fast": "tab:orange", "pgd": "tab:green"}

flags.DEFINE_list("budgets", ["8", "4"], "Budgets in natural epochs; the first is the largest.")
flags.DEFINE_list(
    "methods",
    [*METHODS, *LARGE_ALPHA],
    f"Runs to train and evaluate, of {[*METHODS, *LARGE_ALPHA]} (the large-α pair at the "
    "first budget only).",
)
flags.DEFINE_string("runs", "runs/time_vs_robustness", "Folder of the per-run folders.")
flags.DEFINE_string("out", "results", "Where time_vs_robustness.{json,md,png} go.")
flags.DEFINE_integer(
    "autoattack_examples",
    200,
    "Test images for the standard AutoAttack column (APGD-CE, APGD-T, FAB-T, Square), for "
    "the runs of the largest budget (about 2.5 min per robust model on 2 cores at 200); 0 "
    "leaves it out.",
)
flags.DEFINE_integer(
    "train_examples", None, "Train on the first N training images only (a quick try; default all)."
)
flags.DEFINE_integer(
    "test_examples", None, "Clean and PGD-20 accuracy on the first N test images (default all)."
)
flags.DEFINE_boolean("retrain", False, "Train again runs that already have results.")
FLAGS = flags.FLAGS


def runs() -> list[tuple[int, str]]:
    """(budget, method) of every run asked for, in table order."""
    budgets = [int(b) for b in FLAGS.budgets]
    out = [(b, m) for b in budgets for m in METHODS if m in FLAGS.methods]
    return out + [(budgets[0], m) for m in LARGE_ALPHA if m in FLAGS.methods]


def run_config(budget: int, method: str) -> TrainConfig:
    """The run: `budget` natural epochs as an iteration budget (replays count), so that every
    method makes natural training's iterations, free training with a partial last pass
    where ceil(budget/m) whole passes would overshoot (m=8 at 4 epochs)."""
    natural = TrainConfig(method="natural", epochs=budget, train_examples=FLAGS.train_examples)
    iterations = experiment.build_plan(natural, experiment.dataset_info(natural)).total_iterations
    return TrainConfig(
        **{**METHODS, **LARGE_ALPHA}[method],
        epochs=budget,
        iterations=iterations,
        train_examples=FLAGS.train_examples,
        model_dir=os.path.join(FLAGS.runs, f"e{budget}", method),
        eval_examples=1000,  # the end-of-training evaluation; the table's is below
        eval_every=1000,
        verbose=2,
        overwrite=FLAGS.retrain,  # else a killed run resumes from its checkpoint
    )


def train(budget: int, method: str) -> dict:
    """Trains the run (or reads its `point.json`), with clean and PGD-20 accuracy."""
    config = run_config(budget, method)
    done = os.path.join(config.model_dir, "point.json")
    if os.path.exists(done) and not FLAGS.retrain:
        logging.info("%s: already done (%s)", config.model_dir, done)
        with open(done) as f:
            return json.load(f)
    print(f"\n== {budget} epochs, {method}: training ({run_folder.label(config)})", flush=True)
    trained = experiment.train_and_evaluate(config)
    accuracies = experiment.evaluate_export(
        config.model_dir, ["natural", "pgd20"], FLAGS.test_examples
    )
    tested = FLAGS.test_examples or 10_000
    point = {
        "run": method,
        "training": run_folder.label(config),
        "method": config.method,
        "m": config.replays,
        "budget_epochs": budget,
        "natural": round(accuracies["natural"], 4),
        "pgd20": round(accuracies["pgd20"], 4),
        "train_minutes": round(trained["train_minutes"], 2),
        "iterations": trained["iterations"],
        "overfit_guard": "on" if config.guarded else "off",
        # The guard's one line, if it stopped the run (results.json's overfit_guard).
        "overfit_guard_report": trained.get("overfit_guard"),
        "examples": {"natural": tested, "pgd20": tested},
    }
    if config.method == "fast":
        point["fast_step_size_255"] = config.fast_training_step_size
    run_folder.write_json(done, point)
    return point


def add_autoattack(budget: int, method: str, point: dict) -> dict:
    """The standard AutoAttack on the first --autoattack_examples test images (once)."""
    count = FLAGS.autoattack_examples
    if not count or point.get("examples", {}).get("autoattack") == count:
        return point
    config = run_config(budget, method)
    print(f"== {budget} epochs, {method}: AutoAttack on the first {count}", flush=True)
    started = time.time()
    point["autoattack"] = round(
        experiment.evaluate_export(config.model_dir, ["autoattack"], count)["autoattack"], 4
    )
    point["examples"]["autoattack"] = count
    point["autoattack_minutes"] = round((time.time() - started) / 60, 2)
    run_folder.write_json(os.path.join(config.model_dir, "point.json"), point)
    return point


def label(point: dict) -> str:
    text = point["training"]
    if point["run"] in LARGE_ALPHA:
        text += f", α={point['fast_step_size_255'] / 25.5:g}ε, cyclic LR to 0.2"
        text += ", guard on" if point["run"].endswith("_guard") else ", guard off"
    return text


def write_table(points: list[dict]) -> None:
    os.makedirs(FLAGS.out, exist_ok=True)
    run_folder.write_json(os.path.join(FLAGS.out, "time_vs_robustness.json"), points)
    count = FLAGS.autoattack_examples
    columns = ["budget (epochs)", "natural", "PGD-20"]
    if count:
        columns.append(f"AutoAttack (first {count})")
    columns += ["train time (min)", "iterations", "guard"]
    rows = []
    for p in points:
        row = {
            "budget (epochs)": p["budget_epochs"],
            "training": label(p),
            "natural": p["natural"],
            "PGD-20": p["pgd20"],
            "train time (min)": f"{p['train_minutes']:.1f}",
            "iterations": p["iterations"],
            "guard": _guard_text(p),
        }
        if count and "autoattack" in p:
            row[f"AutoAttack (first {count})"] = p["autoattack"]
        rows.append(row)
    table = evaluation.to_markdown(rows, columns)
    note = (
        "\nFashion-MNIST, small CNN, ε=0.1 (25.5/255), batch 128, SGD momentum 0.9, cosine LR "
        "from 0.05 (the large-α pair: cyclic LR to 0.2) and a budget of natural training's "
        "iterations for B epochs (free training: iterations/m batches of m replays; fast and "
        "PGD-K: one iteration per batch; "
        "PGD-K's step 2.5ε/K, fast's α 1.25ε unless stated). Natural and PGD-20 (step 0.01, "
        f"random start) on the first {points[0]['examples']['pgd20']:,} test images"
        + (f", the standard AutoAttack on the first {count} (largest budget)" if count else "")
        + ". Train time: the training loop's clock on 2 CPU cores, without evaluations. "
        "Made by `python scripts/time_vs_robustness.py`.\n"
    )
    with open(os.path.join(FLAGS.out, "time_vs_robustness.md"), "w") as f:
        f.write(table + "\n" + note)
    print(table)


def _guard_text(point: dict) -> str:
    """off; on, did not fire; or "fired at iteration I, restored iteration J"."""
    report = point.get("overfit_guard_report")
    if not report:
        return "on, did not fire" if point["overfit_guard"] == "on" else "off"
    fired, restored = re.search(r"at iteration (\d+).*of iteration (\d+)", report).groups()
    return f"fired at iteration {fired}, restored iteration {restored}"


def write_figure(points: list[dict]) -> None:
    """Robust accuracy (PGD-20; AutoAttack hollow) against training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Left: everything (natural training near 0); right: the robust runs, labelled.
    fig, (full, ax) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1, 2]})
    budgets = sorted({p["budget_epochs"] for p in points}, reverse=True)
    markers = dict(zip(budgets, ["o", "s", "^", "D"]))
    robust = [p for p in points if p["method"] != "natural"]
    low = min([100 * p.get("autoattack", p["pgd20"]) for p in robust] or [0])
    for axes in (full, ax):
        for p in points:
            color = COLORS[p["method"]]
            marker = markers[p["budget_epochs"]]
            if p["run"] in LARGE_ALPHA:
                marker = "X" if p["run"].endswith("_guard") else "v"
            x, y = p["train_minutes"], 100 * p["pgd20"]
            axes.scatter(x, y, color=color, marker=marker, s=60, zorder=3)
            if "autoattack" in p:
                axes.scatter(
                    x,
                    100 * p["autoattack"],
                    facecolors="none",
                    edgecolors=color,
                    marker=marker,
                    s=60,
                    zorder=3,
                )
            if axes is ax and p["method"] != "natural":
                text = p["training"].replace(" (FGSM-RS)", "")
                if p["run"] in LARGE_ALPHA:
                    text = "α=2ε " + ("guard" if p["run"].endswith("_guard") else "no guard")
                axes.annotate(
                    f"{text}, {p['budget_epochs']}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 5 if p["budget_epochs"] == budgets[0] else -10),
                    fontsize=7,
                    rotation=20,
                )
        axes.grid(alpha=0.3)
        axes.set_xlabel("training time (minutes, 2 CPU cores)")
    ax.set_ylim(max(0, low - 3), None)
    full.set_ylabel("robust test accuracy (%), ε=0.1: PGD-20 filled, AutoAttack hollow")
    full.set_title("all runs")
    ax.set_title("robust runs (label: method, budget in epochs)")
    for method, color in COLORS.items():
        ax.scatter([], [], color=color, label=method)
    for budget, marker in markers.items():
        ax.scatter([], [], color="black", marker=marker, label=f"{budget}-epoch budget")
    if any(p["run"] in LARGE_ALPHA for p in points):
        ax.scatter([], [], color="black", marker="v", label="fast, α=2ε, no guard")
        ax.scatter([], [], color="black", marker="X", label="fast, α=2ε, guard")
    ax.scatter([], [], facecolors="none", edgecolors="black", label="AutoAttack (hollow)")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Fashion-MNIST: time against robustness")
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out, "time_vs_robustness.png"), dpi=130)
    plt.close(fig)


def main(argv):
    del argv
    known = [*METHODS, *LARGE_ALPHA]
    unknown = sorted(set(FLAGS.methods) - set(known))
    if unknown:
        sys.exit(f"time_vs_robustness: error: unknown methods {unknown}; choose from {known}")
    bad = [b for b in FLAGS.budgets if not b.isdigit() or int(b) < 1]
    if bad or not FLAGS.budgets:
        sys.exit(f"time_vs_robustness: error: --budgets are natural epochs >= 1, got {bad}")
    points = []
    for budget, method in runs():  # training first: the cheap columns for every run
        points.append(train(budget, method))
        write_table(points)
        write_figure(points)
    for i, (budget, method) in enumerate(runs()):
        if budget == int(FLAGS.budgets[0]):
            points[i] = add_autoattack(budget, method, points[i])
        write_table(points)
        write_figure(points)


if __name__ == "__main__":
    app.run(main)
