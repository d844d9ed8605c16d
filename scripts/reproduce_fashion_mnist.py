"""Reproduces the paper's two claims on real data: Fashion-MNIST on a CPU.

    python scripts/reproduce_fashion_mnist.py            # every row, then the table
    python scripts/reproduce_fashion_mnist.py --rows=natural,free_m8

Trains every row of the table with the same model (the small CNN), the same
ε=0.1 (25.5/255) and the same natural-epoch budget (8 epochs: free training
makes ceil(8/m) passes, PGD training 8), then attacks each exported model and
writes `results/fashion_mnist.json` and `results/fashion_mnist.md`, shaped like
the paper's Table 1. Each row's run folder is `runs/fashion_mnist/<row>`; a
row whose folder already has `reproduce.json` is not retrained (delete it, or
pass --retrain), and a row killed mid-training resumes from its last
checkpoint, so an interrupted run picks up where it stopped.

Evaluation: natural accuracy and PGD-20 on the whole test set (10,000 images);
PGD-100, CW-100 (100 steps on the Carlini-Wagner margin) and 10-restart PGD-20
on the first --expensive_examples test images (default 2,000), step 0.01
(2.55/255) and a random start; the standard AutoAttack on the first
--autoattack_examples.

Training is `tf_free.experiment.train_and_evaluate`, the attacks
`tf_free.evaluation.evaluate_attacks`, the table `tf_free.evaluation.to_markdown`;
this script holds the sweep (its rows and columns). Accuracies in each row's
`reproduce.json` and in `fashion_mnist.json` are fractions rounded to 1e-4, as
`evaluate_attacks` gives them (rows written in percent by tf_free 0.1 are
converted when read); only the Markdown table shows percentages.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

from absl import app, flags, logging

from tf_free import evaluation, experiment, run_folder, summaries
from tf_free.config import TrainConfig

# The sweep: each row's settings on top of TrainConfig's defaults, which are
# those of flags/common/fashion_mnist.cfg.
ROWS = {
    "natural": dict(method="natural"),
    "free_m2": dict(method="free", m=2),
    "free_m4": dict(method="free", m=4),
    "free_m8": dict(method="free", m=8),
    "free_m10": dict(method="free", m=10),
    "pgd7": dict(method="pgd", pgd_steps=7),
    "pgd2": dict(method="pgd", pgd_steps=2),
}
CHEAP, EXPENSIVE = ["natural", "pgd20"], ["pgd100", "cw100", "pgd20x10"]
# Attack name -> (its key in reproduce.json, its column header in the table).
COLUMNS = {
    "natural": ("natural", "natural"),
    "pgd20": ("pgd20", "PGD-20"),
    "pgd100": ("pgd100", "PGD-100"),
    "cw100": ("cw100", "CW-100"),
    "pgd20x10": ("pgd20_restarts10", "10-restart PGD-20"),
}

flags.DEFINE_list("rows", list(ROWS), f"Rows to train and evaluate, of {list(ROWS)}.")
flags.DEFINE_string("runs", "runs/fashion_mnist", "Folder of the per-row run folders.")
flags.DEFINE_string("out", "results", "Where fashion_mnist.{json,md} go.")
flags.DEFINE_integer(
    "expensive_examples",
    2000,
    "Test images for PGD-100, CW-100 and PGD-20x10 (10000: the whole test set).",
)
flags.DEFINE_integer(
    "autoattack_examples",
    1000,
    "Test images for the standard AutoAttack column (APGD-CE, APGD-T, FAB-T, Square); 0 "
    "leaves the column out.",
)
flags.DEFINE_boolean("retrain", False, "Retrain rows that already have results.")
FLAGS = flags.FLAGS


def row_config(row: str) -> TrainConfig:
    """The row's run. Its end-of-training evaluation is on 1,000 images only; the table's
    is `attack`'s."""
    return TrainConfig(
        **ROWS[row],
        model_dir=os.path.join(FLAGS.runs, row),
        eval_examples=1000,
        eval_every=1000,
        verbose=2,
        overwrite=FLAGS.retrain,  # else a killed row resumes from its checkpoint
    )


def attack(model_dir: str, names, num_examples=None) -> dict:
    """Accuracies of the run's exported model on the first `num_examples` test images."""
    return experiment.evaluate_export(model_dir, names, num_examples)


def run_row(row: str) -> dict:
    """Trains and attacks the row, or reads its `reproduce.json`; fills in missing columns."""
    config = row_config(row)
    model_dir = config.model_dir
    done = os.path.join(model_dir, "reproduce.json")
    if os.path.exists(done) and not FLAGS.retrain:
        with open(done) as f:
            logging.info("%s: already done (%s)", row, done)
            # A 0.1 row (in percent) is read as fractions, and left as it is on disk
            # unless a column is added.
            result = _as_fractions(json.load(f))
        saved = copy.deepcopy(result)
    else:
        print(f"\n== {row}: training ({run_folder.label(config)})", flush=True)
        trained = experiment.train_and_evaluate(config)
        start = time.time()
        print(f"== {row}: attacking the exported model", flush=True)
        accuracies = attack(model_dir, CHEAP)
        accuracies.update(attack(model_dir, EXPENSIVE, FLAGS.expensive_examples))
        result = {
            "training": run_folder.label(config),
            "method": config.method,
            "m": config.replays,
            **{COLUMNS[k][0]: round(v, 4) for k, v in accuracies.items()},
            "train_minutes": round(trained["train_minutes"], 2),
            "eval_minutes": round((time.time() - start) / 60, 2),
            "iterations": trained["iterations"],
            "accuracy_unit": "fraction",
        }
        if config.method == "pgd":
            result["pgd_steps"] = config.pgd_steps
        saved = None
    subset = FLAGS.expensive_examples
    if result.get("examples", {}).get("pgd100") != subset or "pgd20_subset" not in result:
        # PGD-20 on the same images as the expensive attacks, so that the
        # gradient-masking check compares like with like.
        result["pgd20_subset"] = round(attack(model_dir, ["pgd20"], subset)["pgd20"], 4)
        result["examples"] = {
            **dict.fromkeys(CHEAP, 10_000),
            **dict.fromkeys(EXPENSIVE + ["pgd20_subset"], subset),
        }
    aa = FLAGS.autoattack_examples
    if aa and result.get("examples", {}).get("autoattack") != aa:
        # Filled in for finished rows too: the column came after the table.
        print(f"== {row}: AutoAttack (standard) on the first {aa} test images", flush=True)
        accuracies = attack(model_dir, ["autoattack"], aa)
        result["autoattack"] = round(accuracies["autoattack"], 4)
        result["autoattack_after"] = {
            k[len("autoattack[") : -1]: round(v, 4) for k, v in accuracies.items() if "[" in k
        }
        result["examples"]["autoattack"] = aa
    if result != saved:
        run_folder.write_json(done, result)
    write_tensorboard(config, result)
    return result


def write_tensorboard(config: TrainConfig, result: dict) -> None:
    """The row's HParams session (if its training did not write one: an older row) and its
    table columns as `logs/evaluation` scalars, so that TensorBoard's HParams table over
    `--runs` compares the rows."""
    log_dir = run_folder.log_dir(config.model_dir)
    if not summaries.has_header(log_dir):
        summaries.write_run_header(
            config, log_dir, command="trained by an earlier tf_free (command not recorded)"
        )
    trained = os.path.join(config.model_dir, "results.json")
    if os.path.exists(trained):  # the end-of-training evaluation (rewritten: merged)
        with open(trained) as f:
            summaries.write_final(
                log_dir, json.load(f), f"the first {config.eval_examples} test examples"
            )
    examples = result.get("examples", {})
    names = {key: name for name, (key, _) in COLUMNS.items()}
    values = {}
    for key, value in result.items():
        name = "autoattack" if key == "autoattack" else names.get(key)
        if name is None or not isinstance(value, float):
            continue
        count = examples.get(name, 10_000)
        values[name] = (
            value,
            f"{'Clean' if name == 'natural' else name} accuracy of the exported model on "
            f"the first {count} test images (scripts/reproduce_fashion_mnist.py).",
        )
    summaries.write_evaluation(log_dir, values, result.get("iterations", 0))


def _as_fractions(result: dict) -> dict:
    """A row of tf_free 0.1 (accuracies in percent) in this version's fractions."""
    if result.get("accuracy_unit") == "fraction":
        return result
    keys = [key for key, _ in COLUMNS.values()] + ["pgd20_subset", "autoattack"]
    result = {**result, **{k: round(result[k] / 100, 4) for k in keys if k in result}}
    if "autoattack_after" in result:
        result["autoattack_after"] = {
            k: round(v / 100, 4) for k, v in result["autoattack_after"].items()
        }
    return {**result, "accuracy_unit": "fraction"}


def write_table(results: list[dict]) -> None:
    os.makedirs(FLAGS.out, exist_ok=True)
    run_folder.write_json(os.path.join(FLAGS.out, "fashion_mnist.json"), results)
    examples, aa = FLAGS.expensive_examples, FLAGS.autoattack_examples
    headers = dict(COLUMNS.values())
    headers["pgd20_subset"] = f"PGD-20 (first {examples})"
    if aa:
        headers["autoattack"] = f"AutoAttack (first {aa})"
    minutes = "train time (min)"
    rows = [
        {
            "training": r["training"],
            **{header: float(r[key]) for key, header in headers.items() if key in r},
            minutes: f"{r['train_minutes']:.1f}",
        }
        for r in results
    ]
    table = evaluation.to_markdown(rows, [*headers.values(), minutes])
    note = (
        "\nFashion-MNIST, small CNN (conv32-conv64-dense256), ε=0.1 (25.5/255), batch 128, SGD "
        "momentum 0.9, cosine LR from 0.05, a budget of 8 natural epochs for every row (free "
        "training: ceil(8/m) passes; PGD-K: 8 passes, step 2.5ε/K, random start). Attacks: step "
        "0.01 (2.55/255), random start; natural and PGD-20 on the 10,000 test images, PGD-100, "
        f"CW-100, 10-restart PGD-20 and the second PGD-20 column on the first {examples}"
        + (
            f"; the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square, tf_free.attacks) on "
            f"the first {aa}"
            if aa
            else ""
        )
        + ". Train time on 2 CPU cores "
        "(this project's machine), no XLA. Made by `python scripts/reproduce_fashion_mnist.py`.\n"
    )
    with open(os.path.join(FLAGS.out, "fashion_mnist.md"), "w") as f:
        f.write(table + "\n" + note)
    print(table)


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.rows) - set(ROWS))
    if unknown:
        sys.exit(
            f"reproduce_fashion_mnist: error: unknown rows {unknown}; choose from {list(ROWS)}"
        )
    results = []
    for row in ROWS:  # table order
        if row in FLAGS.rows:
            results.append(run_row(row))
            write_table(results)  # after every row: nothing is lost if the run is killed


if __name__ == "__main__":
    app.run(main)
