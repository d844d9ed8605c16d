"""Evaluation helpers shared by the CLIs and scripts: attack names, tables, result files.

`without_autotune` is also how `tf_free` keeps tf.data's autotuning from holding up
the end of a `fit`, a pass or an evaluation (see scripts/fit_stall.py).

Accuracies are fractions in [0, 1] everywhere in the code and the result
files; only the printed Markdown tables show percentages, as the paper's do.
"""

from __future__ import annotations

import json
import os
import time

import tensorflow as tf

from tf_free import attacks, run_lock
from tf_free.config import ConfigError

# AutoAttack (tf_free.attacks.ensemble) by name: the ensembles and each attack alone.
AUTOATTACK_NAMES = ("autoattack", "autoattack-fast", *attacks.ensemble.ATTACKS)


def without_autotune(dataset):
    """`dataset` with tf.data's autotuning off, unless its options set it.

    Deleting an iterator of an autotuned dataset (at the end of a `fit`, a pass
    or an evaluation) can wait until tf.data's autotuning thread next wakes:
    about half the time on a busy machine, and up to 60 s. Without autotuning,
    AUTOTUNE parallelism stays at its start value, min(16, CPU cores), and
    prefetch buffers grow as they need. A dataset whose options set
    `autotune.enabled` (True keeps autotuning, and the wait), and anything that
    is not a `tf.data.Dataset` (a `tf.distribute.DistributedDataset`), is
    returned as it is.
    """
    if not isinstance(dataset, tf.data.Dataset) or dataset.options().autotune.enabled is not None:
        return dataset
    # The wait: a lost wake-up in Model::OptimizeLoop (https://github.com/tensorflow/tensorflow/blob/v2.21.0/tensorflow/core/framework/model.cc); scripts/fit_stall.py.
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def evaluate_attacks(
    logits_fn, dataset, names, *, epsilon, step_size, seed=0, verbose=True, details=None
):
    """Accuracy (a fraction in [0, 1]) under each named attack.

    Names: natural; pgdK, cwK, pgdKxR (`pgd20x10` is PGD-20 with 10 random
    restarts, `cw100` PGD-100 on the Carlini-Wagner margin, the paper's CW-100
    column); autoattack (the standard version: APGD-CE, APGD-T, FAB-T, Square,
    the worst case per example), autoattack-fast (APGD-CE, APGD-T), and each of
    its attacks alone: apgd-ce, apgd-t, fab-t, square (AutoAttack's settings;
    `step_size` is not used by them).

    For an ensemble, the result also holds the robust accuracy after each of
    its attacks, as `autoattack[apgd-ce]`, ... (cumulative, as AutoAttack
    prints it). If `details` is a dict, it receives {name: {"seconds": ...}}
    and, for AutoAttack names, {"autoattack": the `autoattack_accuracy` result}.
    `dataset` is read without tf.data's autotuning unless its options set it
    (`without_autotune`).
    """
    # tf.data autotuning's lost wake-up would hold up each attack's end (Model::OptimizeLoop in https://github.com/tensorflow/tensorflow/blob/v2.21.0/tensorflow/core/framework/model.cc).
    dataset = without_autotune(dataset)
    results = {}
    for name in names:
        started = time.time()
        kwargs = attack_from_name(name)
        if name in AUTOATTACK_NAMES:
            if verbose:
                print(f"{name} (ε={epsilon:.4g}):", flush=True)
            version = {"autoattack": "standard", "autoattack-fast": "fast"}.get(name)
            outcome = attacks.autoattack_accuracy(
                logits_fn,
                dataset,
                epsilon=epsilon,
                version=version or "standard",
                attacks=None if version else (name,),
                verbose=verbose,
                seed=seed,
            )
            if version:  # the robust accuracy after each attack, then the final one
                for attack, accuracy in outcome["robust"].items():
                    results[f"{name}[{attack}]"] = accuracy
            results[name] = outcome["final"]
            if details is not None:
                details[name] = {"autoattack": outcome}
        elif kwargs is None:
            results[name] = attacks.accuracy_under_attack(logits_fn, dataset, verbose=verbose)
        else:
            results[name] = attacks.accuracy_under_attack(
                logits_fn,
                dataset,
                attacks.pgd,
                verbose=verbose,
                epsilon=epsilon,
                step_size=step_size,
                seed=seed,
                **kwargs,
            )
        if details is not None:
            details.setdefault(name, {})["seconds"] = time.time() - started
    return results


def attack_from_name(name: str):
    """'natural' -> None; 'pgd20' / 'cw100' / 'pgd20x10' -> pgd keyword arguments.

    AutoAttack names (`AUTOATTACK_NAMES`) give {} (they take no PGD settings).

    Raises:
      ConfigError: an unknown name, or zero steps or restarts.
    """
    if name == "natural":
        return None
    if name in AUTOATTACK_NAMES:
        return {}
    for prefix, loss in (("pgd", "ce"), ("cw", "cw")):
        if name.startswith(prefix):
            steps, _, restarts = name[len(prefix) :].partition("x")
            if steps.isdigit() and (restarts.isdigit() or not restarts):
                if int(steps) < 1 or (restarts and int(restarts) < 1):
                    raise ConfigError(
                        f"attack {name!r} has no steps or no restarts: K and R must be >= 1"
                    )
                return {"steps": int(steps), "restarts": int(restarts or 1), "loss": loss}
    raise ConfigError(
        f"unknown attack {name!r}: use natural, pgdK, cwK, pgdKxR (K steps, R restarts), "
        f"or {', '.join(AUTOATTACK_NAMES)}"
    )


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table shaped like the paper's Table 1: accuracies (fractions) as percentages."""
    header = "| Training | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [
            f"{100 * row[c]:.2f}%" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns
        ]
        lines.append(f"| {row['training']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(entry: dict) -> tuple:
    return entry["attack"], str(entry["examples"]), float(entry["epsilon_255"])


def merge_results(path: str, entries: list[dict], header: dict) -> dict:
    """Merges `entries` into the JSON file at `path`, atomically, under a lock.

    An entry replaces the one with the same attack, number of examples and ε;
    the others are kept. The file is written next to `path` and renamed into
    place, so a crash leaves the old file or the new one, never half of one.
    """
    with run_lock.file_lock(path):
        merged = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
                if not isinstance(old.get("evaluations"), list):
                    raise ValueError("no evaluations")
                merged = {_key(e): e for e in old["evaluations"]}
            except (ValueError, KeyError, TypeError, AttributeError):
                # Not ours, or from before merging: keep it beside the new one.
                os.replace(path, path + ".old")
        merged.update({_key(e): e for e in entries})
        document = {**header, "evaluations": list(merged.values())}
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w") as f:
                json.dump(document, f, indent=2)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    return document
