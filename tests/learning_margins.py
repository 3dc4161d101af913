"""Measures the learning test's figures over seeds, so its thresholds sit far from what was measured.

    python tests/learning_margins.py --seeds 0 1 2 --out margins.jsonl
    ATEN_CPU_CAPABILITY=default python tests/learning_margins.py --seeds 0 --out margins.jsonl
    python tests/learning_margins.py --summary margins.jsonl    # the table README shows

For each seed: the warm start's held-out accuracy, then from copies of it the GRPO run and its
shuffled-reward controls (VARIANT_SHUFFLES for each variant, one more than the test runs), for the
main recipe and each variant of tests/test_learning.py, with their periodic held-out evaluations:
what the test computes, with its functions and thread count. One JSON line per seed, with the torch
and transformers versions and the CPU kernel path torch dispatched to (set ATEN_CPU_CAPABILITY to
choose another). README's "Does it learn?" gives the figures and the commands that produced them.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as conftest.py; the fixture then sets the test's count
import grpo_from_scratch as grpo  # noqa: E402
import test_learning as learning  # noqa: E402

VARIANT_SHUFFLES = 3  # the test uses the first VARIANT_CONTROL_SHUFFLES of them


def trajectory(logged) -> list[list]:
    return [[r["step"], r["accuracy"]] for r in logged.records]


def measure(seed: int, folder: Path) -> dict:
    began = time.perf_counter()
    torch.set_num_threads(learning.NUM_THREADS)
    grpo.tqdm = learning.QuietTqdm
    started = learning.prepare(seed, folder)
    result = {"seed": seed, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "warm": started["warm"]["accuracy"], "warm_format": started["warm"]["format_rate"], "runs": {}}
    recipes = {"main": (learning.GRPO_CONFIG, learning.CONTROL_SHUFFLES)}
    recipes |= {name: ({**learning.VARIANT_CONFIG, **flags}, VARIANT_SHUFFLES)
                for name, flags in learning.VARIANTS.items()}
    for name, (flags, shuffles) in recipes.items():
        cfg = grpo.Config(seed=seed, **flags)
        logged = learning.run_grpo(copy.deepcopy(started["model"]), started["tokenizer"], started["train"],
                                   started["held_out"], cfg)
        controls = learning.control_runs(started, cfg, shuffles)
        result["runs"][name] = {"grpo": trajectory(logged), "controls": [trajectory(c) for c in controls]}
        print(f"seed {seed} {torch.backends.cpu.get_cpu_capability()} {name}: warm {result['warm']:.3f} "
              f"level {logged.level():.3f} controls {[round(c.level(), 3) for c in controls]}",
              file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - began)
    return result


def level(points: list[list], steps: int) -> float:
    """As PeriodicEvaluations.level for a run of the given steps: the mean accuracy of its last
    LEVEL_POINTS evaluations. A longer measured run holds a shorter one's whole trajectory: the
    learning rate is constant and each step's prompts depend on the step alone."""
    points = [accuracy for step, accuracy in points if step <= steps][-learning.LEVEL_POINTS:]
    return sum(points) / learning.LEVEL_POINTS


def summarize(paths: list[str]) -> None:
    """One table row per measured seed, kernel path and release: the warm start and, per recipe, the
    GRPO gain (level - warm start) and the controls' mean gain as the test computes it (its first
    shuffles), with the gain of every measured shuffle; then the extremes against the test's bounds."""
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
    shuffles = {"main": learning.CONTROL_SHUFFLES}
    shuffles |= dict.fromkeys(learning.VARIANTS, learning.VARIANT_CONTROL_SHUFFLES)
    steps = {"main": learning.GRPO_CONFIG["num_steps"]}
    steps |= dict.fromkeys(learning.VARIANTS, learning.VARIANT_CONFIG["num_steps"])
    distinct = {}  # a repeat with the same figures counts once
    for row in rows:
        distinct.setdefault(json.dumps([row["warm"], row["runs"]]), row)
    print("| seed | CPU kernels | transformers | warm start | " + " | ".join(
        f"{name}, {steps[name]} steps: gain, control gain (each shuffle)" for name in shuffles) + " |")
    print("|---|---|---|---|" + "---|" * len(shuffles))
    gains, control_gains = {"main": [], "variants": []}, {"main": [], "variants": []}
    for row in sorted(rows, key=lambda r: (r["seed"], r["capability"], r["transformers"])):
        counted = distinct.get(json.dumps([row["warm"], row["runs"]])) is row
        cells = []
        for name, count in shuffles.items():
            run, warm = row["runs"][name], row["warm"]
            gain = level(run["grpo"], steps[name]) - warm
            each = [level(control, steps[name]) - warm for control in run["controls"]]
            control_gain = sum(each[:count]) / count
            group = "main" if name == "main" else "variants"
            if counted:
                gains[group].append(gain)
                control_gains[group].append(control_gain)
            cells.append(f"{gain:+.3f}, {control_gain:+.3f} ({', '.join(f'{g:+.3f}' for g in each)})")
        release = row["transformers"] + ("" if counted else " (the same figures, bit for bit)")
        print(f"| {row['seed']} | {row['capability']} | {release} | {row['warm']:.3f} | "
              + " | ".join(cells) + " |")
    warms = [row["warm"] for row in distinct.values()]
    print(f"\nOver the {len(distinct)} distinct runs (a repeat with the same figures counts once), "
          f"each figure's mean, standard deviation and extreme, the test's bound, and the bound's "
          f"distance from the mean in standard deviations:\n")
    low, high = learning.WARM_WINDOW
    claims = [("warm start", warms, min, low), ("warm start", warms, max, high)]
    for group in gains:
        claims += [(f"{group} gain", gains[group], min, learning.MIN_GAIN),
                   (f"{group} control gain", control_gains[group], max, learning.CONTROL_BOUND)]
    for what, values, extreme, bound in claims:
        mean, sd = statistics.mean(values), statistics.stdev(values)
        print(f"- {what}: mean {mean:.3f}, sd {sd:.3f}, {extreme.__name__} {extreme(values):.3f}; "
              f"bound {bound:.2f}, {abs(bound - mean) / sd:.1f} sd away")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", help="jsonl file to append one line per seed to")
    parser.add_argument("--summary", nargs="+", help="jsonl files to summarize instead of measuring")
    args = parser.parse_args()
    if args.summary:
        return summarize(args.summary)
    if not args.out:
        parser.error("--out is required to measure")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as folder:
            line = json.dumps(measure(seed, Path(folder)))
        with open(args.out, "a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
