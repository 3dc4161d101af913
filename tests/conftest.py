"""Tests run offline on CPU: no hub downloads, no wandb prompts."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Tiny models are overhead-bound: one thread is faster than two fighting over 2 cores, and a fixed
# thread count keeps CPU results bit-reproducible (the kill-and-resume test compares exact weights).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_report_header(config):
    """The versions this run tests against, first in the output: CI installs the newest releases in
    requirements.txt's ranges, so a failure a new release causes is recognised at a glance (README
    records the versions the suite last passed on)."""
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for package in ("torch", "transformers", "datasets", "numpy", "tokenizers", "wandb"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return "versions: " + ", ".join(found)
