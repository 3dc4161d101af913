"""Speed and memory of grpo_from_scratch.py, measured (a script, not collected by pytest).

    python tests/benchmark.py --device cpu --quick     # tiny model, seconds
    python tests/benchmark.py --device cuda            # Qwen2.5-1.5B architecture, random weights

On CUDA the model is the real Qwen2.5-1.5B-Instruct architecture built from its config with
random weights (nothing is downloaded) at the tutorial's settings: 7 prompts x 12 completions,
400 new tokens. Random weights never emit a stop token, so every completion runs the full 400
tokens: the worst case of a real step. Measured, in one run:
  1. rollout tokens/s with the trainer's path (eval mode, KV cache, one batched generate) and
     with a no-cache baseline (use_cache=False: every step re-runs the whole sequence), same
     prompts and lengths: what the KV cache saves;
  2. log-prob + loss + backward time (grpo_update over micro-batches);
  3. full train_with_grpo steps and their split (rollout, reference, update), peak memory;
  4. peak extra memory of selective_log_softmax vs the naive full log_softmax at 151,936 columns;
  5. one periodic evaluation (--eval_steps) at the default --eval_subset_size 256 and --eval_batch_size
     64, with answers of 512 tokens (on CPU scaled like the rollout's: 512/400 of its new tokens), in
     seconds and in full steps. Random weights never stop here either: every answer runs its budget;
  6. decoding, eager against compiled (--compile_generation), as a run measures it at start-up:
     milliseconds per decoding step of a Qwen2 with Qwen2.5-1.5B's depth and heads (28 layers, 12 query
     and 2 KV heads) at a tiny width, at 12 and 84 rows, with a static cache of the prompt plus 400 new
     tokens, for generation's attention as transformers' sdpa and as the trainer's grouped-query
     attention, with one torch thread. At that width a step does little arithmetic besides attention
     over the cache, so it shows the framework overhead a 1.5B model's step pays on a GPU and the cost
     of copying key/value heads. One line each: `BENCH decode rows=<n> cache=<c> attention=<a>
     eager_ms=<e> compiled_ms=<c> speedup=<e/c> compile_s=<s>`.
The last line is `BENCH cache_speedup=<x> logprob_mem_ratio=<y> step_s=<s> eval_s=<e> peak_mem_gb=<g> device=<name>`.
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_from_scratch as grpo  # noqa: E402
import tiny  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

QWEN_VOCAB = 151936
# Qwen2.5-1.5B-Instruct's config.json, written out so nothing needs downloading.
QWEN25_15B = dict(vocab_size=QWEN_VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB: peak RSS of the process


def build_model(args, tokenizer, device):
    if args.device == "cuda":
        torch.manual_seed(0)
        config = Qwen2Config(**QWEN25_15B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
        return model.to(device)
    return tiny.tiny_model(tokenizer, hidden_size=128, layers=4).to(device)


def bench_rollout(model, tokenizer, prompts, max_new, device, repeats):
    """Tokens/s of the trainer's rollout path vs a no-cache baseline. The baseline is the same generate
    with use_cache=False, run on the model as it sits during training (train mode, checkpointing on),
    so every step re-runs the whole sequence. It is not the tutorial's rollout: on transformers 4.49 the
    tutorial's train-mode generate kept the KV cache (5.23 dropped it, 5.24 keeps it; see README)."""
    kwargs = grpo.decoding_kwargs(tokenizer, max_new, temperature=1.0)
    kwargs["min_new_tokens"] = max_new  # both paths generate exactly the same number of tokens
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def timed(run):
        run()  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            out = run()
        sync(device)
        return (time.perf_counter() - start) / repeats, out

    def ours():
        with torch.no_grad(), grpo.generation_mode(model):
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]

    def no_cache():
        model.train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, **{**kwargs, "use_cache": False})
        finally:
            model.activation_checkpointing_disable()
            model.eval()

    ours_s, out = timed(ours)
    no_cache_s, _ = timed(no_cache)
    tokens = len(prompts) * max_new
    assert out.shape == (len(prompts), max_new)
    return {"tokens": tokens, "ours_s": ours_s, "no_cache_s": no_cache_s,
            "ours_tok_s": tokens / ours_s, "no_cache_tok_s": tokens / no_cache_s}


def bench_update(model, tokenizer, prompts, cfg, device, repeats):
    """log-probs + GRPO loss + backward over micro-batches, then the optimizer step (grpo_update)."""
    rollout = grpo.generate_completions(model, tokenizer, prompts, cfg.temperature, cfg.max_completion_length)
    input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], 1)
    attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], 1)
    keep = rollout["completion_ids"].shape[1]
    advantages = torch.randn(len(prompts), device=device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = grpo.MasterWeightAdamW(model.parameters(), lr=cfg.learning_rate)
    policy = grpo.PerTokenLogProbs(model)
    with torch.no_grad():
        ref = grpo.compute_log_probs(policy, input_ids, attention_mask, keep, cfg.temperature, cfg.micro_batch_size)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        grpo.grpo_update(policy, optimizer, cfg, input_ids, attention_mask, rollout["completion_mask"], keep,
                         advantages, None, ref)
        sync(device)
        times.append(time.perf_counter() - start)
    model.activation_checkpointing_disable()
    return {"update_s": min(times[1:]), "sequences": len(prompts), "completion_tokens": int(rollout["lengths"].sum())}


class CollectMetrics:
    """A stand-in for RunLogger that keeps the per-step metrics in memory."""

    def __init__(self):
        self.steps = []

    def log_step(self, metrics):
        self.steps.append(metrics)

    def log_completions(self, *args, **kwargs):
        pass


def bench_steps(model, tokenizer, examples, cfg, device):
    """Full train_with_grpo steps (rollout, reference, loss, optimizer); the first is a warm-up."""
    logger = CollectMetrics()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    grpo.train_with_grpo(model, tokenizer, examples, cfg, run_dir=None, logger=logger)
    measured = logger.steps[1:] or logger.steps
    mean = lambda key: sum(m[key] for m in measured) / len(measured)  # noqa: E731
    return {key: mean(key) for key in ("step_time", "rollout_time", "reference_time", "update_time", "tokens_per_second")}


def decode_model(tokenizer, device, dtype):
    """Qwen2.5-1.5B's 28 layers and 12 query / 2 KV heads at a tiny width (hidden 192, head_dim 16)."""
    torch.manual_seed(0)
    shape = {**QWEN25_15B, "vocab_size": len(tokenizer), "hidden_size": 192, "intermediate_size": 512,
             "max_position_embeddings": 4096}
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def timed_generate(model, tokenizer, ids, mask, tokens, device, decoding=None) -> float:
    """Seconds of one sampling generate() of exactly `tokens` new tokens per row (min_new_tokens), eager or, with
    a CompiledDecoding, compiled as the trainer decodes."""
    kwargs = dict(grpo.decoding_kwargs(tokenizer, tokens, temperature=1.0), min_new_tokens=tokens)
    sync(device)
    start = time.perf_counter()
    if decoding is None:
        with grpo.generation_mode(model):
            model.generate(ids, attention_mask=mask, **kwargs)
    else:
        decoding.generate(ids, mask, **kwargs)
    sync(device)
    return time.perf_counter() - start


def left_padded(tokenizer, prompts, device):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def bench_decode(model, tokenizer, examples, rows, budget, attention):
    """Milliseconds per decoding step, eager and compiled, as a run measures them at start-up
    (CompiledDecoding.start: a static cache of the longest prompt plus the budget, timed from the middle of
    a completion), with generation's attention set to `attention`: transformers' sdpa (which copies the
    key/value heads under compile) or the trainer's grouped-query attention."""
    saved, grpo.DECODE_ATTENTION = grpo.DECODE_ATTENTION, attention
    try:
        prompts = [examples[i % len(examples)]["prompt"] for i in range(rows)]
        cache = max(grpo.prompt_lengths(examples, tokenizer)) + budget
        decoding = grpo.CompiledDecoding(model, rows, cache)
        decoding.start(tokenizer, prompts, budget)
    finally:
        grpo.DECODE_ATTENTION = saved
    if decoding.fallback:
        sys.exit(f"error: compiled decoding is not possible here: {decoding.fallback}")
    return {"rows": rows, "cache": cache, "attention": attention, **decoding.figures,
            "speedup": decoding.figures["eager_ms"] / decoding.figures["compiled_ms"]}


def bench_periodic_eval(model, tokenizer, cfg, device):
    """One periodic evaluation as train_with_grpo runs it: greedy, on eval_subset_size questions."""
    questions = [r["question"] for r in tiny.word_problems(cfg.eval_subset_size, seed=4)]
    examples = [{"question": q, "prompt": grpo.build_prompt(q, tokenizer), "answer": "0"} for q in questions]
    sync(device)
    start = time.perf_counter()
    result = grpo.evaluate_model(model, tokenizer, examples, cfg.eval_batch_size,
                                 cfg.eval_max_new_tokens, "periodic eval")
    sync(device)
    return {"eval_s": time.perf_counter() - start, "questions": result["n"], "max_new_tokens": cfg.eval_max_new_tokens,
            "truncation_rate": result["truncation_rate"]}


LOGPROB_PROBE = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
import grpo_from_scratch as grpo
rows, vocab, method, device = {rows}, {vocab}, {method!r}, torch.device({device!r})
torch.manual_seed(0)
logits = torch.randn(rows, vocab, dtype=torch.bfloat16, device=device).requires_grad_()
index = torch.randint(0, vocab, (rows,), device=device)
def current():
    if device.type == "cuda":
        torch.cuda.synchronize(); return torch.cuda.memory_allocated()
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
def peak():
    if device.type == "cuda":
        torch.cuda.synchronize(); return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
baseline = current()
if method == "naive":
    out = torch.log_softmax(logits.float(), dim=-1).gather(-1, index[:, None])[:, 0]
else:
    out = grpo.selective_log_softmax(logits, index)
grad, = torch.autograd.grad(out.sum(), logits)
# Extra = peak beyond the logits themselves and their (unavoidable) bf16 gradient.
print(json.dumps({{"extra_bytes": peak() - baseline - grad.numel() * grad.element_size(), "baseline_above_peak": baseline >= peak()}}))
"""


def bench_logprob_memory(device, rows):
    """Each method in a fresh process, so the peak of one cannot hide the other."""
    results = {}
    for method in ("naive", "selective"):
        code = LOGPROB_PROBE.format(root=str(Path(__file__).resolve().parents[1]), rows=rows, vocab=QWEN_VOCAB,
                                    method=method, device=str(device))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"] / 1e9
    results["ratio"] = results["selective"] / results["naive"]
    results["rows"] = rows
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--attn", default="sdpa", help="attention implementation on CUDA (sdpa or flash_attention_2)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")
    device = torch.device(args.device)

    # Tutorial settings on CUDA; scaled down on CPU (a 1.5B model does not fit a CPU step budget).
    if args.device == "cuda":
        batch, generations, max_new, micro, steps, rows = 7, 12, 400, 12, 3, 8192
        if args.quick:
            steps = 2
    elif args.quick:
        batch, generations, max_new, micro, steps, rows = 2, 4, 64, 4, 3, 1024
    else:
        batch, generations, max_new, micro, steps, rows = 7, 12, 128, 12, 3, 2048
    tokenizer = tiny.build_tokenizer()
    if args.device == "cuda" and tiny.SHARED_DATA.joinpath("qwen2.5-tokenizer").is_dir():
        tokenizer = grpo.load_tokenizer(str(tiny.SHARED_DATA / "qwen2.5-tokenizer"))
    model = build_model(args, tokenizer, device)
    examples = [{"question": r["question"], "prompt": grpo.build_prompt(r["question"], tokenizer),
                 "answer": grpo.extract_answer_from_dataset(r["answer"])} for r in tiny.word_problems(64, seed=3)]
    prompts = [ex["prompt"] for ex in examples[:batch] for _ in range(generations)]
    cfg = grpo.Config(batch_size=batch, num_generations=generations, max_completion_length=max_new,
                      micro_batch_size=micro, num_steps=steps, report_to="none", save_steps=10**6,
                      log_completions_steps=10**6, learning_rate=5e-6, eval_max_new_tokens=max_new * 512 // 400)
    params = sum(p.numel() for p in model.parameters())
    repeats = 1 if args.quick or args.device == "cuda" else 2

    rollout = bench_rollout(model, tokenizer, prompts, max_new, device, repeats)
    update = bench_update(model, tokenizer, prompts, cfg, device, repeats)
    step = bench_steps(model, tokenizer, examples, cfg, device)
    periodic = bench_periodic_eval(model, tokenizer, cfg, device)
    peak_gb = peak_memory_gb(device)
    memory = bench_logprob_memory(device, rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one CPU thread drives a GPU's decoding steps; on a CPU, one also keeps the figure steady
    deep = decode_model(tokenizer, device, next(model.parameters()).dtype)
    decode = [bench_decode(deep, tokenizer, examples, n, 32 if args.quick else 400, attention)
              for n in ((12,) if args.quick else (12, 84)) for attention in ("sdpa", grpo.DECODE_ATTENTION)]
    torch.set_num_threads(threads)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    print(f"\ngrpo_from_scratch benchmark | {time.strftime('%Y-%m-%d')} | {name} | torch {torch.__version__}")
    print(f"model: {'Qwen2.5-1.5B architecture, random weights' if args.device == 'cuda' else 'tiny Qwen2 (hidden 128, 4 layers)'},"
          f" {params / 1e6:.1f}M parameters, {str(next(model.parameters()).dtype).removeprefix('torch.')}")
    print(f"shape: {batch} prompts x {generations} completions, {max_new} new tokens, micro_batch_size {micro}")
    print("-" * 72)
    rows_out = [
        ("rollout, ours (eval, KV cache, batched)", f"{rollout['ours_tok_s']:,.0f} tokens/s ({rollout['ours_s']:.2f} s)"),
        ("rollout, no-cache baseline (use_cache=False)", f"{rollout['no_cache_tok_s']:,.0f} tokens/s ({rollout['no_cache_s']:.2f} s)"),
        ("KV cache speedup", f"{rollout['ours_tok_s'] / rollout['no_cache_tok_s']:.1f}x"),
        ("log-probs + loss + backward + optimizer", f"{update['update_s']:.2f} s ({update['sequences']} sequences)"),
        ("full step (train_with_grpo)", f"{step['step_time']:.2f} s"),
        ("  rollout / reference / update", f"{step['rollout_time']:.2f} / {step['reference_time']:.2f} / {step['update_time']:.2f} s"),
        (f"periodic eval, {periodic['questions']} questions x {periodic['max_new_tokens']} tokens",
         f"{periodic['eval_s']:.2f} s = {periodic['eval_s'] / step['step_time']:.1f} steps"),
        ("peak memory" + (" (CUDA allocated)" if device.type == "cuda" else " (process RSS)"), f"{peak_gb:.2f} GB"),
        (f"log-softmax extra memory, {memory['rows']} x {QWEN_VOCAB}, fwd+bwd",
         f"naive {memory['naive']:.3f} GB, selective {memory['selective']:.3f} GB"),
        ("log-softmax memory ratio (selective / naive)", f"{memory['ratio']:.3f}"),
        *((f"decoding step, {d['rows']} rows, {d['attention']}", f"eager {d['eager_ms']:.1f} ms, "
           f"compiled {d['compiled_ms']:.1f} ms") for d in decode),
    ]
    for label, value in rows_out:
        print(f"{label:<52}{value:>20}")
    print("-" * 72)
    results = {"rollout": rollout, "update": update, "step": step, "periodic_eval": periodic, "peak_mem_gb": peak_gb,
               "logprob_memory": memory, "decode": decode, "device": name, "quick": args.quick}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    for d in decode:
        print(f"BENCH decode rows={d['rows']} cache={d['cache']} attention={d['attention']} "
              f"eager_ms={d['eager_ms']:.2f} compiled_ms={d['compiled_ms']:.2f} speedup={d['speedup']:.2f} "
              f"compile_s={d['compile_seconds']:.1f}")
    print(f"BENCH cache_speedup={rollout['ours_tok_s'] / rollout['no_cache_tok_s']:.2f} "
          f"logprob_mem_ratio={memory['ratio']:.3f} step_s={step['step_time']:.2f} eval_s={periodic['eval_s']:.2f} "
          f"peak_mem_gb={peak_gb:.2f} "
          f"device={name.replace(' ', '_')}")


if __name__ == "__main__":
    main()
