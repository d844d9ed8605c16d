"""Evaluation helpers shared by the CLIs and scripts: attack names, tables, result files.

Accuracies are fractions in [0, 1] in the result files; `evaluate_attacks` and
the Markdown tables use percentages, as the paper's tables do.
"""

from __future__ import annotations

import json
import os

from tf_free import attacks, run_lock
from tf_free.config import ConfigError


def evaluate_attacks(logits_fn, dataset, names, *, epsilon, step_size, seed=0, verbose=True):
    """Accuracy (in %) under each named attack: natural, pgdK, cwK, pgdKxR.

    `pgd20x10` is PGD-20 with 10 random restarts; `cw100` is PGD-100 on the
    Carlini-Wagner margin loss (the paper's CW-100 column).
    """
    results = {}
    for name in names:
        kwargs = attack_from_name(name)
        if kwargs is None:
            acc = attacks.accuracy_under_attack(logits_fn, dataset, verbose=verbose)
        else:
            acc = attacks.accuracy_under_attack(
                logits_fn,
                dataset,
                attacks.pgd,
                verbose=verbose,
                epsilon=epsilon,
                step_size=step_size,
                seed=seed,
                **kwargs,
            )
        results[name] = 100.0 * acc
    return results


def attack_from_name(name: str):
    """'natural' -> None; 'pgd20' / 'cw100' / 'pgd20x10' -> pgd keyword arguments.

    Raises:
      ConfigError: an unknown name, or zero steps or restarts.
    """
    if name == "natural":
        return None
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
        f"unknown attack {name!r}: use natural, pgdK, cwK or pgdKxR (K steps, R restarts)"
    )


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table shaped like the paper's Table 1."""
    header = "| Training | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = [
            f"{row[c]:.2f}%" if isinstance(row.get(c), float) else str(row.get(c, ""))
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
