"""Mutation check: break the code on purpose and show that the most important tests fail.

Each mutation replaces one line of ``core/`` in a temporary copy of the checkout's tracked files and
runs the tests meant to guard it there; the check passes when every mutation makes its tests fail
(and the unmutated copy passes them). The working tree is never touched.

    python bench/mutation_check.py [--out bench/results/mutation_check.txt]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("STOC: a majority of detectors, not any one, removes a sample", "core/refine.py",
             "flagged = judged[vote.votes > 0]", "flagged = judged[vote.votes > ensemble // 2]",
             ("tests/test_refine.py::test_the_stoc_rule_by_hand",)),
    Mutation("STOC: thresholds at half the gamma-quantile", "core/refine.py",
             "np.quantile(scores[k, unseen[k]], chosen_gamma,", "np.quantile(scores[k, unseen[k]], chosen_gamma / 2,",
             ("tests/test_refine.py::test_the_stoc_rule_by_hand",)),
    Mutation("STOC: removed samples never come back (only the kept are re-judged)", "core/refine.py",
             "        now_kept = pinned != 1\n", "        now_kept = kept.copy()\n",
             ("tests/test_refine.py::test_the_stoc_rule_by_hand",)),
    Mutation("STOC: held-out references not weighted to mirror the whole set", "core/refine.py",
             "1.0 / np.maximum(held_out_share, 1e-12)[:, None], 1.0)", "1.0, 1.0)",
             ("tests/test_refine.py::test_the_stoc_rule_by_hand",)),
    Mutation("npz files may hold pickles", "core/data/tables.py",
             "np.load(path, allow_pickle=False)", "np.load(path, allow_pickle=True)",
             ("tests/test_hostile_input.py::test_pickled_npz_is_never_unpickled",)),
    Mutation("zip entries may climb out with '..'", "core/data/archive.py",
             '    if ".." in parts:\n', "    if False:\n",
             ("tests/test_hostile_input.py", "tests/test_data_archive.py")),
    Mutation("anomaly_score flips direction (higher = more normal)", "core/engine.py",
             "train_score = -compute.score([detector], final)[0]", "train_score = compute.score([detector], final)[0]",
             ("tests/test_engine.py",)),
    Mutation("labels train: known anomalies are removed as if an expert confirmed them", "core/engine.py",
             "    pinned = check_pinned(pinned, len(embeddings))\n",
             "    pinned = check_pinned(pinned if labels is None else np.where(labels == 1, 1, -1), len(embeddings))\n",
             ("tests/test_engine.py::test_labels_do_not_change_an_unsupervised_table_fit",)),
    Mutation("an ETA paced from the job's start, not the stage's", "core/jobs.py",
             "            self._stage, self._stage_started = event.stage, self._last_event\n",
             "            self._stage = event.stage\n",
             ("tests/test_jobs.py",)),
    Mutation("a row counter is encoded as a feature", "core/models/tabular.py",
             "    return bool(np.all(np.diff(np.sort(values)) == 1))", "    return False",
             ("tests/test_models.py",)),
]


def tracked_copy(destination: Path) -> None:
    """Copy the checkout's tracked files (as they are in the working tree) into ``destination``."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout.split(b"\0")
    for name in filter(None, names):
        source = REPO / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """Run ``tests`` in ``copy`` (its own ``core`` first on the path); True when they pass."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "-o", "addopts=", *tests], cwd=copy, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else done.stderr[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = ["| mutation | tests | unmutated | mutated |", "|---|---|---|---|"]
    all_caught = True
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "repo"
        tracked_copy(copy)
        origin = subprocess.run([sys.executable, "-c", "import core; print(core.__file__)"], cwd=copy,
                                capture_output=True, text=True).stdout.strip()
        if not origin.startswith(str(copy)):
            raise SystemExit(f"the copy's tests would import core from {origin}, not from the copy")
        for mutation in MUTATIONS:
            path = copy / mutation.path
            source = path.read_text()
            if source.count(mutation.original) != 1:
                raise SystemExit(f"{mutation.path}: the line to mutate is not there once: {mutation.original!r}")
            passed_before, before = run_tests(copy, mutation.tests)
            path.write_text(source.replace(mutation.original, mutation.mutated))
            passed_after, after = run_tests(copy, mutation.tests)
            path.write_text(source)
            caught = passed_before and not passed_after
            all_caught &= caught
            report.append(f"| {mutation.name} (`{mutation.path}`) | {', '.join(mutation.tests)} | {before} | "
                          f"{after} {'(caught)' if caught else '(NOT caught)'} |")
            print(report[-1], flush=True)
    text = "\n".join(report) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
