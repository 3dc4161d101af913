"""The GPU check of compiled decoding (--compile_generation): one command, a few minutes on one GPU.

    python tests/gpu_check.py           # CUDA: Qwen2.5-1.5B's architecture with random weights, 7 x 12 x 400
    python tests/gpu_check.py --tiny    # any device: a tiny Qwen2 and a small shape (what the CPU test runs)

Written and tested on a CPU with --tiny; it has not run on a GPU yet. At the tutorial's shape (7 prompts x 12
completions, 400 new tokens; random weights do not stop, and min_new_tokens makes sure every completion runs its
400 tokens) it measures what a run does, with the trainer's own functions:
  1. decoding at start-up, as a run does it (start_decoding with --compile_generation auto on CUDA,
     true with --tiny on a CPU): compile the 84 rollout rows and the 64-row evaluation batch, check
     compiled greedy tokens against eager ones, time a decoding step both ways, print the choice;
  2. rollout tokens/s of one sampling generate() of the 84 rows, eager and compiled;
  3. a whole training step of train_with_grpo with compiled rollouts, and its split (rollout, reference,
     update): the second of two steps, the first paying the allocator's warm-up;
  4. peak memory (CUDA: torch.cuda.max_memory_allocated during the training steps, static caches included;
     CPU: the process's peak RSS) against memory_budget's estimate of a run's peak.
The last line is `GPUCHECK eager_tok_s=... compiled_tok_s=... speedup=... eager_ms=... compiled_ms=...
rollout_decodes=... step_s=... rollout_s=... reference_s=... update_s=... peak_gb=... budget_gb=... compile_s=...
graphs=... device=...`.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_from_scratch as grpo  # noqa: E402
import tiny  # noqa: E402
from benchmark import QWEN25_15B, CollectMetrics, left_padded, peak_memory_gb, timed_generate  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 and a 2 x 4 x 16 shape, on any device")
    parser.add_argument("--attn", help="attention implementation (default: the trainer's choice, flash_attention_2 "
                                       "where flash-attn imports, else sdpa)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: no CUDA device is visible (on a CPU, --tiny runs the check on a tiny model)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()

    tokenizer = tiny.build_tokenizer()
    if not args.tiny and tiny.SHARED_DATA.joinpath("qwen2.5-tokenizer").is_dir():
        tokenizer = grpo.load_tokenizer(str(tiny.SHARED_DATA / "qwen2.5-tokenizer"))
    if args.tiny:  # one row count for rollouts and evaluation: one graph to compile
        cfg = grpo.Config(batch_size=2, num_generations=4, max_completion_length=16, micro_batch_size=4,
                          eval_batch_size=8, eval_max_new_tokens=16)
        model = tiny.tiny_model(tokenizer).to(device)
    else:
        cfg = grpo.Config(attn_implementation=args.attn or "auto")  # the tutorial's 7 x 12 x 400, micro-batches of 12
        torch.manual_seed(0)
        config = Qwen2Config(**QWEN25_15B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(config, dtype=grpo.resolve_dtype(cfg, device),
                                                 attn_implementation=grpo.resolve_attention(cfg, device)).to(device)
    # auto on CUDA: compile, check and time both paths as a run does, and keep what measured faster. --tiny on a
    # CPU, where auto decodes eagerly: true, which compiles and measures the same way and keeps compiled.
    cfg = replace(cfg, num_steps=2, eval_steps=0, report_to="none", save_steps=10**6, log_completions_steps=10**6,
                  compile_generation="auto" if device.type == "cuda" else "true")
    examples = [{"question": r["question"], "prompt": grpo.build_prompt(r["question"], tokenizer),
                 "answer": grpo.extract_answer_from_dataset(r["answer"])} for r in tiny.word_problems(64, seed=3)]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"{'tiny Qwen2' if args.tiny else 'Qwen2.5-1.5B architecture, random weights'} | {dtype} | "
          f"attention {model.config._attn_implementation} | {device} | torch {torch.__version__}", flush=True)

    graphs = grpo.compiled_graph_count()
    decoding = grpo.start_decoding(model, tokenizer, cfg, examples, examples)
    print(grpo.decoding_line(decoding, cfg), flush=True)
    failed = [f"{name}: {d.fallback}" for name, d in decoding.items() if d.fallback]
    if failed:
        sys.exit(f"error: compiled decoding is not possible here: {'; '.join(failed)}")
    graphs = grpo.compiled_graph_count() - graphs
    rollout = decoding["rollout"]
    print(f"compile: {graphs} graph(s), mode {rollout.compile_config.mode}", flush=True)

    rows, tokens = cfg.batch_size * cfg.num_generations, cfg.max_completion_length
    ids, mask = left_padded(tokenizer, [ex["prompt"] for ex in examples[:cfg.batch_size] for _ in range(cfg.num_generations)],
                            device)
    enabled, rollout.enabled = rollout.enabled, True  # time the compiled path even where auto chose eager
    eager_s, compiled_s = (timed_generate(model, tokenizer, ids, mask, tokens, device, path) for path in (None, rollout))
    rollout.enabled = enabled
    eager_tok_s, compiled_tok_s = rows * tokens / eager_s, rows * tokens / compiled_s
    print(f"rollout, {rows} rows x {tokens} tokens: eager {eager_tok_s:,.0f} tokens/s ({eager_s:.2f} s), compiled "
          f"{compiled_tok_s:,.0f} tokens/s ({compiled_s:.2f} s): {eager_s / compiled_s:.2f}x", flush=True)

    budget_gb = grpo.memory_budget(model, cfg, 1, max(grpo.prompt_lengths(examples, tokenizer)))["peak"] / 1e9
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    logger = CollectMetrics()
    at_start = grpo.compiled_graph_count()
    grpo.train_with_grpo(model, tokenizer, examples, cfg, logger=logger, decoding=decoding)
    step, peak_gb = logger.steps[-1], peak_memory_gb(device)
    new_graphs = grpo.compiled_graph_count() - at_start
    print(f"training step {step['step']}: {step['step_time']:.2f} s = rollout {step['rollout_time']:.2f} + reference "
          f"{step['reference_time']:.2f} + update {step['update_time']:.2f} s (+ the rest); "
          f"{step['tokens_per_second']:,.0f} rollout tokens/s, rollouts {'compiled' if rollout.enabled else 'eager'}")
    print(f"graphs compiled after start-up (0 expected): {new_graphs}; compiled decoding failures: "
          f"{sum(d.failures for d in decoding.values())}")
    print(f"peak memory ({'CUDA allocated, training steps' if device.type == 'cuda' else 'process RSS, whole check'}): "
          f"{peak_gb:.2f} GB; memory_budget's estimate: {budget_gb:.2f} GB")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"check took {time.perf_counter() - started:.0f} s")
    figures = rollout.figures
    print(f"GPUCHECK eager_tok_s={eager_tok_s:.0f} compiled_tok_s={compiled_tok_s:.0f} speedup={eager_s / compiled_s:.2f} "
          f"eager_ms={figures['eager_ms']:.2f} compiled_ms={figures['compiled_ms']:.2f} "
          f"rollout_decodes={'compiled' if rollout.enabled else 'eager'} "
          f"step_s={step['step_time']:.2f} rollout_s={step['rollout_time']:.2f} reference_s={step['reference_time']:.2f} "
          f"update_s={step['update_time']:.2f} peak_gb={peak_gb:.2f} budget_gb={budget_gb:.2f} "
          f"compile_s={figures['compile_seconds']:.1f} graphs={graphs + new_graphs} device={name.replace(' ', '_')}")


if __name__ == "__main__":
    main()
