"""Memory per GPU of the default recipe on Qwen2.5-1.5B-Instruct, for both launches and 1-8 GPUs,
computed by grpo_from_scratch.memory_budget, the estimate a run prints at start-up (a script, not a
test, and a computation, not a measurement).

    python tests/memory_budget.py

The model is Qwen2.5-1.5B-Instruct's architecture built from its config on the meta device (no
weights, no memory, nothing downloaded) in bfloat16. Prompts are as long as the longest GSM8K
train prompt through the Qwen2.5 chat template (measured from ../shared/data when it is present).
Under torchrun each rank takes ceil(7 / N) prompts, so the global batch stays near the tutorial's
7. A cell says "fits" when the estimated peak is at most 90% of the card, else the largest
--micro_batch_size that fits, else "no".
"""
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_from_scratch as grpo  # noqa: E402
import tiny  # noqa: E402
from benchmark import QWEN25_15B  # noqa: E402

LONGEST_GSM8K_PROMPT = 247  # tokens, measured with the real tokenizer and train split (see longest_prompt)
GPU_SIZES_GB = (24, 40, 80)


def longest_prompt() -> int:
    tokenizer_dir, train = tiny.SHARED_DATA / "qwen2.5-tokenizer", tiny.SHARED_DATA / "gsm8k" / "train.jsonl"
    if not (tokenizer_dir.is_dir() and train.is_file()):
        return LONGEST_GSM8K_PROMPT
    tokenizer = grpo.load_tokenizer(str(tokenizer_dir))
    return max(grpo.prompt_lengths(grpo.load_gsm8k("train", tokenizer, local_file=str(train)), tokenizer))


def cell(model, cfg, world_size, devices, prompt_tokens, gpu_gb) -> str:
    for micro_batch_size in range(cfg.micro_batch_size, 0, -1):
        budget = grpo.memory_budget(model, replace(cfg, micro_batch_size=micro_batch_size), world_size, devices, prompt_tokens)
        if grpo.expected_to_fit(budget, gpu_gb):
            return "fits" if micro_batch_size == cfg.micro_batch_size else f"`--micro_batch_size {micro_batch_size}`"
    return "no"


def main():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B)).to(torch.bfloat16)
    prompt_tokens = longest_prompt()
    default = grpo.Config()
    print(f"Qwen2.5-1.5B-Instruct ({sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, bf16), default "
          f"recipe, prompts of {prompt_tokens} tokens, estimated peak GB on the fullest GPU\n")
    print("| launch | GPUs | prompts per process | peak GB | " + " | ".join(f"{gb} GB cards" for gb in GPU_SIZES_GB) + " |")
    print("|---|---|---|---|" + "---|" * len(GPU_SIZES_GB))
    launches = [("`python grpo_from_scratch.py`", lambda n: (default, 1, n)),
                ("`torchrun`, `--shard_optimizer True` (default)", lambda n: (replace(default, batch_size=math.ceil(7 / n)), n, 1)),
                ("`torchrun`, `--shard_optimizer False`", lambda n: (replace(default, batch_size=math.ceil(7 / n), shard_optimizer=False), n, 1))]
    for name, setup in launches:
        for gpus in (1, 2, 4, 8):
            if gpus == 1 and name.startswith("`torchrun"):
                continue  # one process: the same as python on one GPU
            cfg, world_size, devices = setup(gpus)
            budget = grpo.memory_budget(model, cfg, world_size, devices, prompt_tokens)
            cells = [cell(model, cfg, world_size, devices, prompt_tokens, gb) for gb in GPU_SIZES_GB]
            print(f"| {name} | {gpus} | {cfg.batch_size} | {budget['peak'] / 1e9:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
