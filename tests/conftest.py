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
