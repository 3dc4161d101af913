"""Memory per GPU of the default recipe on Qwen2.5-1.5B-Instruct at 1, 2, 4 and 8 GPUs (one process
each), computed by grpo_from_scratch.memory_budget, the estimate a run prints at start-up (a script,
not a test, and a computation, not a measurement).

    python tests/memory_budget.py

The model is Qwen2.5-1.5B-Instruct's architecture built from its config on the meta device (no
weights, no memory, nothing downloaded) in bfloat16. Prompts are as long as the longest GSM8K
train prompt through the Qwen2.5 chat template (measured from ../shared/data when it is present).
The step is the tutorial's 7 x 12 = 84 completions whatever the GPU count, split over the
processes. A cell says "fits" when the estimated peak is at most 90% of the card, else, of each kind
of change (sharding, a smaller micro-batch, eager decoding, more GPUs), the first that fits.
"""
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


def advice(model, cfg, world_size: int, prompt_tokens: int, gpu_gb: float) -> str:
    """What to change when the budget does not fit: of each kind of change, the first that fits."""
    kinds = [[("--shard_optimizer True", replace(cfg, shard_optimizer=True), world_size)]
             if world_size > 1 and not cfg.shard_optimizer else [],
             [(f"--micro_batch_size {m}", replace(cfg, micro_batch_size=m), world_size)
              for m in range(cfg.micro_batch_size - 1, 0, -1)],
             [("--compile_generation false", replace(cfg, compile_generation="false"), world_size)]
             if cfg.compile_generation != "false" else [],
             [(f"{w} GPUs", replace(cfg, shard_optimizer=True), w) for w in (2, 4, 8, 16, 32, 64) if w > world_size]]
    options = []
    for changes in kinds:
        for change, changed, world in changes:
            peak = grpo.memory_budget(model, changed, world, prompt_tokens)
            if grpo.expected_to_fit(peak, gpu_gb):
                options.append(f"{change} (peak ~{peak['peak'] / 1e9:.1f} GB per GPU)")
                break
    return "; or ".join(options) or "no single change found"


def cell(model, cfg, world_size, prompt_tokens, gpu_gb) -> str:
    if grpo.expected_to_fit(grpo.memory_budget(model, cfg, world_size, prompt_tokens), gpu_gb):
        return "fits"
    return "no; " + advice(model, cfg, world_size, prompt_tokens, gpu_gb)


def main():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B)).to(torch.bfloat16)
    prompt_tokens = longest_prompt()
    default = grpo.Config()
    print(f"Qwen2.5-1.5B-Instruct ({sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, bf16), default "
          f"recipe, prompts of {prompt_tokens} tokens, estimated peak GB per GPU\n")
    print("| `python grpo_from_scratch.py` | GPUs | completions per GPU | peak GB | "
          + " | ".join(f"{gb} GB cards" for gb in GPU_SIZES_GB) + " |")
    print("|---|---|---|---|" + "---|" * len(GPU_SIZES_GB))
    for name, cfg in (("default", default), ("`--compile_generation false`", replace(default, compile_generation="false")),
                      ("`--shard_optimizer False`", replace(default, shard_optimizer=False))):
        for gpus in (1, 2, 4, 8):
            if gpus == 1 and not cfg.shard_optimizer:
                continue  # one process: nothing to shard
            budget = grpo.memory_budget(model, cfg, gpus, prompt_tokens)
            rows = max(grpo.split_rows(cfg.batch_size * cfg.num_generations, gpus))
            cells = [cell(model, cfg, gpus, prompt_tokens, gb) for gb in GPU_SIZES_GB]
            print(f"| {name} | {gpus} | {rows} | {budget['peak'] / 1e9:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
