# %% [markdown]
# # GRPO from scratch: Qwen2.5-1.5B-Instruct on GSM8K
#
# One linear file: prompt format, GSM8K, answer extraction, rewards, a hand-written GRPO loss
# with clipping and a KL penalty, a data-parallel training loop, and greedy evaluation on the
# GSM8K test split before and after training. `python grpo_from_scratch.py` trains on every
# visible GPU with one process per GPU (DistributedDataParallel, optimizer state sharded), started
# by torch's own launcher; `torchrun --nproc_per_node N grpo_from_scratch.py` runs the same path.
# Why processes, not threads: decoding a 1.5B model is bound by per-token framework overhead, and
# threads share one GIL; measured, two model copies driven by two threads decoded slower than one
# copy alone (PyTorch, too, recommends DDP over nn.DataParallel even on one machine).
# Every flag is a field of `Config` below; `--help` lists them.

# %% 1. Setup: imports, config, validation, seeding, device, dtype, attention
import copy
import importlib.util
import inspect
import json
import math
import numbers
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch._dynamo.utils import counters
from tqdm.auto import tqdm
from transformers import (AttentionInterface, AttentionMaskInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer,
                          CompileConfig, HfArgumentParser, LogitsProcessor, LogitsProcessorList, PreTrainedModel,
                          StaticCache)
from transformers.masking_utils import sdpa_mask


# Help texts go through argparse's %-formatting: write "percent", never a bare percent sign.
@dataclass
class Config:
    # Model and data. Hub names are the defaults; local paths work offline.
    model_name_or_path: str = field(default="Qwen/Qwen2.5-1.5B-Instruct", metadata={"help": "Hub id or local folder of the policy model."})
    dataset_name: str = field(default="openai/gsm8k", metadata={"help": "Hub dataset used when --train_file/--eval_file are not given."})
    dataset_config: str = field(default="main", metadata={"help": "Configuration of the hub dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Local jsonl with 'question' and 'answer' (GSM8K format, '#### <number>'), replacing the hub train split."})
    eval_file: str | None = field(default=None, metadata={"help": "Local jsonl like --train_file, replacing the hub test split."})
    num_eval_examples: int = field(default=0, metadata={"help": "Evaluate on the first N test questions; 0 = the whole test split (1,319)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Questions per greedy generate call, per process (each process evaluates its share of the questions)."})
    eval_max_new_tokens: int = field(default=512, metadata={"help": "Token budget of an evaluation answer."})
    eval_steps: int = field(default=50, metadata={"help": "Evaluate greedily on --eval_subset_size held-out questions every N steps (0 = off). 50: 10 points over the default 500 steps for an estimated 4-10 percent more time on one GPU (README: What periodic evaluation costs)."})
    eval_subset_size: int = field(default=256, metadata={"help": "Questions of the periodic evaluation: the same ones every time, drawn from the eval split by a fixed seed (not --seed); all of them if the split is smaller."})
    # The GRPO recipe. Defaults are the tutorial's, so results compare.
    num_iterations: int = field(default=1, metadata={"help": "Outer iterations; the reference model is refreshed from the policy at the start of each."})
    num_steps: int = field(default=500, metadata={"help": "Rollout batches per iteration."})
    batch_size: int = field(default=7, metadata={"help": "Prompts per step in total, over all processes: the step's work does not depend on the GPU count."})
    num_generations: int = field(default=12, metadata={"help": "Completions sampled per prompt (the GRPO group size)."})
    max_completion_length: int = field(default=400, metadata={"help": "Token budget of a training completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts; training logits are divided by it too."})
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate (constant)."})
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping norm."})
    beta: float = field(default=0.04, metadata={"help": "KL penalty weight; 0 loads no reference model at all."})
    epsilon: float = field(default=0.1, metadata={"help": "Lower clipping range: the ratio is clipped at 1 - epsilon."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (1 + epsilon_high); unset = epsilon."})
    mu: int = field(default=1, metadata={"help": "Optimizer updates per rollout batch; 1 = on-policy, no old-policy forward."})
    loss_type: str = field(default="grpo", metadata={"help": "Token aggregation: grpo (mean of sequence means), bnpo (mean over tokens), dr_grpo (sum / (sequences x max_completion_length)), dapo (the step's token sum / token count; here equal to bnpo, see grpo_loss)."})
    importance_sampling_level: str = field(default="token", metadata={"help": "token (GRPO: a ratio per token) or sequence (GSPO: one ratio per completion, exp of the mean of its tokens' log-ratios, clipped as a whole)."})
    scale_rewards: str = field(default="group", metadata={"help": "Advantage scale: group (divide r - group mean by the group's std), batch (by the std of the whole step's rewards), none (r - group mean, Dr. GRPO)."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Leave completions that hit --max_completion_length without a stop token out of the loss (DAPO's overlong filtering)."})
    dynamic_sampling: bool = field(default=False, metadata={"help": "Drop groups whose rewards are all equal (no gradient) and draw further prompts until the step has --batch_size groups with signal (DAPO), at most --max_extra_rollouts more rollout calls."})
    max_extra_rollouts: int = field(default=3, metadata={"help": "With --dynamic_sampling: extra rollout calls per step at most, each of --batch_size prompts; short groups are then filled with zero-signal ones."})
    reward_funcs: str = field(default="correctness,format", metadata={"help": "Comma list of built-in rewards (REWARD_FUNCS, soft_overlong) and path/to/file.py:function_name entries; the TRL demo set is exact_match,integer,strict_format,soft_format,xml_count."})
    reward_weights: str | None = field(default=None, metadata={"help": "Comma list, one weight per --reward_funcs entry; the reward is the weighted sum. Unset = 1 each."})
    overlong_buffer: int = field(default=80, metadata={"help": "soft_overlong reward: over the last N tokens of --max_completion_length it falls linearly from 0 to -1."})
    # Memory and speed.
    micro_batch_size: int = field(default=12, metadata={"help": "Sequences per forward/backward chunk, per process; gradients accumulate over chunks."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in the loss pass (never during generation)."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto (flash_attention_2 if flash-attn imports on CUDA, else sdpa), flash_attention_2, sdpa or eager."})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPUs that support it, else float32), bfloat16 or float32. float16 is refused: Qwen2.5 overflows in it."})
    shard_optimizer: bool = field(default=True, metadata={"help": "With N processes, each keeps the fp32 master weights and AdamW state of 1/N of the parameters (ZeRO-1); no effect with one."})
    compile_generation: str = field(default="auto", metadata={"help": "auto, true or false: decode rollouts and evaluation with a static KV cache and a torch.compile'd decoding step (CUDA graphs on GPUs), compiled, checked against eager decoding and timed at start-up. auto keeps it, per purpose, only where it measured faster (CUDA only; a CPU decodes eagerly); true wherever it works; any failure decodes eagerly, with one warning."})
    num_processes: int | None = field(default=None, metadata={"help": "Data-parallel processes, one per GPU; unset = every visible GPU (1 on a CPU). Above 1, plain python starts them with torch's launcher (gloo on a CPU). Ignored under torchrun."})
    # Run bookkeeping.
    seed: int = field(default=42, metadata={"help": "Seed of python, numpy and torch, and of the prompt order."})
    output_dir: str = field(default="outputs", metadata={"help": "Parent folder of run folders."})
    run_name: str | None = field(default=None, metadata={"help": "Run folder name; unset = <model>-grpo-<date-time>."})
    resume: bool = field(default=False, metadata={"help": "Continue the run named by --run_name (or the newest run with a checkpoint) from its last checkpoint."})
    save_steps: int = field(default=50, metadata={"help": "Write a checkpoint every N steps (and on interrupt)."})
    log_completions_steps: int = field(default=25, metadata={"help": "Log sample completions every N steps."})
    report_to: str = field(default="wandb", metadata={"help": "wandb or none. Without a wandb login the run logs offline."})
    wandb_project: str = field(default="grpo-from-scratch", metadata={"help": "wandb project name."})


class ConfigError(Exception):
    """Bad input: main prints it as one line and exits with status 2."""


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Flags that may differ between a run and its --resume without changing the result. eval_steps
# only decides when the model is looked at (greedy evaluation draws no random numbers), so a
# resumed run may look more or less often; eval_subset_size may not change: the points before and
# after the resume would measure different questions on one curve.
# num_processes is checked as the run's world size instead (the same count, however it was given).
RESUME_MAY_CHANGE = {"resume", "run_name", "output_dir", "report_to", "wandb_project", "save_steps", "log_completions_steps",
                     "eval_batch_size", "eval_steps", "num_processes"}


def validate_config(cfg: Config) -> None:
    """Refuse impossible settings before anything heavy loads; each message names its flag."""
    positive = ["num_iterations", "num_steps", "batch_size", "max_completion_length", "eval_batch_size",
                "eval_max_new_tokens", "eval_subset_size", "micro_batch_size", "save_steps", "log_completions_steps", "mu"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    checks = [
        (cfg.num_generations >= 2, f"--num_generations must be >= 2: a group of one has no relative advantage (got {cfg.num_generations})"),
        (cfg.num_eval_examples >= 0, f"--num_eval_examples must be >= 0, 0 = all (got {cfg.num_eval_examples})"),
        (cfg.eval_steps >= 0, f"--eval_steps must be >= 0, 0 = off (got {cfg.eval_steps})"),
        (cfg.temperature > 0, f"--temperature must be > 0 (got {cfg.temperature})"),
        (cfg.learning_rate > 0, f"--learning_rate must be > 0 (got {cfg.learning_rate})"),
        (cfg.max_grad_norm > 0, f"--max_grad_norm must be > 0 (got {cfg.max_grad_norm})"),
        (cfg.beta >= 0, f"--beta must be >= 0 (got {cfg.beta})"),
        (cfg.epsilon > 0, f"--epsilon must be > 0 (got {cfg.epsilon})"),
        (cfg.epsilon_high is None or cfg.epsilon_high >= cfg.epsilon,
         f"--epsilon_high must be >= --epsilon ({cfg.epsilon}) (got {cfg.epsilon_high})"),
        (cfg.loss_type in LOSS_TYPES, f"--loss_type must be one of {', '.join(LOSS_TYPES)} (got {cfg.loss_type!r})"),
        (cfg.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, f"--importance_sampling_level must be one of "
         f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)} (got {cfg.importance_sampling_level!r})"),
        (cfg.scale_rewards in SCALE_REWARDS, f"--scale_rewards must be one of {', '.join(SCALE_REWARDS)} (got {cfg.scale_rewards!r})"),
        (cfg.max_extra_rollouts >= 0, f"--max_extra_rollouts must be >= 0 (got {cfg.max_extra_rollouts})"),
        (cfg.attn_implementation in ("auto", "flash_attention_2", "sdpa", "eager"),
         f"--attn_implementation must be auto, flash_attention_2, sdpa or eager (got {cfg.attn_implementation!r})"),
        (cfg.dtype != "float16", "--dtype float16 is refused: Qwen2.5 overflows in fp16 and emits '!!!!'; use bfloat16 or float32"),
        (cfg.dtype in ("auto", "bfloat16", "float32", "float16"), f"--dtype must be auto, bfloat16 or float32 (got {cfg.dtype!r})"),
        (cfg.report_to in ("wandb", "none"), f"--report_to must be wandb or none (got {cfg.report_to!r})"),
        (cfg.compile_generation in ("auto", "true", "false"),
         f"--compile_generation must be auto, true or false (got {cfg.compile_generation!r})"),
        (cfg.run_name is None or (cfg.run_name.strip() and "/" not in cfg.run_name and cfg.run_name not in (".", "..")),
         f"--run_name must be a plain folder name (got {cfg.run_name!r})"),
        (cfg.num_processes is None or cfg.num_processes >= 1, f"--num_processes must be >= 1 (got {cfg.num_processes})"),
        (cfg.num_processes is None or "WORLD_SIZE" in os.environ or not torch.cuda.is_available()
         or cfg.num_processes <= torch.cuda.device_count(),
         f"--num_processes {cfg.num_processes}: only {torch.cuda.device_count()} GPU(s) visible; one process per GPU"),
        (launch_world_size(cfg) <= cfg.batch_size * cfg.num_generations,
         f"--num_processes {launch_world_size(cfg)}: more processes than the step's {cfg.batch_size * cfg.num_generations} "
         f"completions (--batch_size x --num_generations); every process needs at least one"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    load_reward_funcs(cfg.reward_funcs, cfg.reward_weights, cfg.max_completion_length, cfg.overlong_buffer)
    for flag in ("train_file", "eval_file"):
        path = getattr(cfg, flag)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"--{flag} {path}: no such file")
    model_path = Path(cfg.model_name_or_path).expanduser()
    looks_local = model_path.exists() or cfg.model_name_or_path.startswith((".", "/", "~")) or cfg.model_name_or_path.count("/") > 1
    if looks_local and not (model_path / "config.json").is_file():
        raise ConfigError(f"--model_name_or_path {cfg.model_name_or_path}: not a model folder (no config.json) and not a hub id like Qwen/Qwen2.5-1.5B-Instruct")


# Distributed mode comes from the environment, as in nanoGPT: torch's launcher (torchrun, or the
# one `python grpo_from_scratch.py` starts, see section 8) sets RANK, WORLD_SIZE and LOCAL_RANK, and
# each process drives one device: cuda:LOCAL_RANK, or the CPU with gloo. Without them, one process.
def launch_world_size(cfg: Config) -> int:
    """Processes of this run: the launcher's WORLD_SIZE inside a launched process, else --num_processes,
    else one per visible GPU (1 on a CPU)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.num_processes or max(1, torch.cuda.device_count())


def setup_distributed() -> tuple[int, int, torch.device]:
    """Returns (rank, world_size, device) and joins the process group when started by a launcher."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        # Import torch.distributed.optim (ZeroRedundancyOptimizer) before joining the group: it imports
        # torch.distributed.nn, whose functions default to `group=group.WORLD`, read at import. Imported
        # after init_process_group, those defaults hold the group forever, destroy_process_group cannot
        # free it, and its communication threads outlive Python at exit (a rank then dies with SIGABRT,
        # "terminate called without an active exception", in about 1 of 30 2-rank gloo runs measured here).
        from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: F401
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    return rank, world_size, device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (each process passes seed + its rank: processes that sample rows
    of the same prompt, a group can straddle two, must not draw identical completions)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, else fp32; never fp16 (Qwen2.5 overflows in it)."""
    if cfg.dtype == "float32":
        return torch.float32
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def resolve_attention(cfg: Config, device: torch.device) -> str:
    """flash_attention_2 when flash-attn imports and we are on CUDA, else PyTorch SDPA."""
    if cfg.attn_implementation != "auto":
        if cfg.attn_implementation == "flash_attention_2" and (device.type != "cuda" or not flash_attn_available()):
            raise ConfigError("--attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package (see README); use sdpa")
        return cfg.attn_implementation
    return "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# %% 2. Prompt format and answer extraction
# The model is asked to think inside <reasoning> tags and put the final number inside <answer>
# tags. Prompts go through the tokenizer's own chat template (system + user turn, then the
# assistant header), exactly what Qwen2.5-Instruct saw in training. Answers are compared as
# numbers, so "1,350", "$1350." and "\boxed{1350}" all mean 1350.
SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""


def build_prompt(question: str, tokenizer) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def extract_answer_from_dataset(text: str) -> str | None:
    """GSM8K solutions end with '#### <answer>'."""
    if "####" not in text:
        return None
    return text.split("####")[-1].strip()


def extract_answer_from_model_output(text: str) -> str | None:
    """Stripped content of the last complete <answer>...</answer> block, or None."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end != -1 else -1
    if start == -1:
        return None
    end = text.find("</answer>", start)  # the block closes at its first closing tag (a stray extra one is not content)
    return text[start + len("<answer>"):end].strip()


# A number is an optional minus sign (not glued to a word; it may stand on either side of a
# currency sign: "-$20", "$-20"), digits with optional thousands commas, an optional decimal part,
# and an optional "/denominator". A sign must touch the number: "$5 - $20" is a range ending at 20.
_NUMBER = re.compile(r"(?<![\w.])(?:-[$€£]?|[$€£]-)?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s*/\s*\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LATEX_FRACTION = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


def parse_number(text: str | None) -> float | None:
    """The number an answer string denotes (the last one when several appear), or None."""
    if text is None:
        return None
    text = _LATEX_FRACTION.sub(r"\1/\2", text).replace("\u2212", "-")  # U+2212 is the typeset minus sign
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    candidates = [m for m in _NUMBER.findall(text) if any(ch.isdigit() for ch in m)]
    if not candidates:
        return None
    number = re.sub(r"[,\s$€£]", "", candidates[-1])
    numerator, _, denominator = number.partition("/")
    try:
        value = float(numerator)
        if denominator:
            value = value / float(denominator) if float(denominator) != 0 else None
    except ValueError:
        return None
    return value


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# %% 3. GSM8K loading
# The train split (7,473 questions) feeds RL; the test split (1,319) is only ever evaluated.
# Hub loading is the default; --train_file/--eval_file read local jsonl for offline runs, and
# every row is checked for a question and a '####' answer whose gold parses as a number (a row
# whose gold is not a number could never earn a correctness reward), reporting the file and line.
def load_gsm8k(split: str, tokenizer, dataset_name: str = "openai/gsm8k", dataset_config: str = "main",
               local_file: str | None = None, flag: str = "--train_file") -> list[dict]:
    """List of {"question", "prompt", "answer"}; answer is the gold string after '####'."""
    if local_file is not None:
        rows = read_jsonl_rows(local_file, flag)
    else:
        try:
            from datasets import load_dataset
            rows = list(load_dataset(dataset_name, dataset_config, split=split))
        except Exception as error:  # offline, wrong name, missing split
            raise ConfigError(f"--dataset_name {dataset_name}: could not load split {split!r} "
                              f"({type(error).__name__}); offline, pass --train_file and --eval_file") from error
    return [{"question": row["question"], "prompt": build_prompt(row["question"], tokenizer),
             "answer": extract_answer_from_dataset(row["answer"])} for row in rows]


def read_jsonl_rows(path: str, flag: str) -> list[dict]:
    rows = []
    with open(path, "rb") as handle:  # bytes, so a line that is not UTF-8 can be named
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not JSON
            except UnicodeDecodeError:
                raise ConfigError(f"{flag} {path}: line {line_number} is not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{flag} {path}: line {line_number} is not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
                raise ConfigError(f"{flag} {path}: line {line_number} has no 'question' string")
            if not isinstance(row.get("answer"), str) or "####" not in row["answer"]:
                raise ConfigError(f"{flag} {path}: line {line_number} has no 'answer' ending in '#### <number>'")
            gold = extract_answer_from_dataset(row["answer"])
            if parse_number(gold) is None:
                raise ConfigError(f"{flag} {path}: line {line_number} has no number after the last '####' (found {gold!r})")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{flag} {path}: no rows")
    return rows


def prompt_lengths(examples: list[dict], tokenizer) -> list[int]:
    return [len(ids) for ids in tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False)["input_ids"]]


def drop_overlong_prompts(examples: list[dict], tokenizer, max_total_length: int, budget: int, name: str) -> list[dict]:
    """Skip (and count) prompts that leave no room for a `budget`-token answer in the context window."""
    limit = max_total_length - budget
    kept = [ex for ex, length in zip(examples, prompt_lengths(examples, tokenizer)) if length <= limit]
    if len(kept) < len(examples) and is_main_process():
        print(f"warning: skipped {len(examples) - len(kept)} {name} prompts longer than {limit} tokens "
              f"(context {max_total_length} minus {budget} new tokens)")
    if not kept:
        budget_flag = "--max_completion_length" if name == "train" else "--eval_max_new_tokens"
        raise ConfigError(f"every {name} prompt is longer than {limit} tokens (context {max_total_length} minus "
                          f"{budget} new tokens); lower {budget_flag} ({budget})")
    return kept


# %% Shared helpers for generation
# Qwen2.5-Instruct ends a turn with <|im_end|> but may also emit <|endoftext|>; stopping on only
# one lets completions run on into invented turns. Decoding settings are passed explicitly every
# time so the model's generation_config (top_k 20, top_p 0.8, repetition penalty 1.1 for Qwen)
# never leaks in: the sampled distribution must be exactly softmax(logits / temperature).
def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        # An unknown token maps to the unk id; but the token may itself be the unk token (Qwen2Tokenizer's default).
        if isinstance(token_id, int) and (token_id != tokenizer.unk_token_id or token == tokenizer.unk_token):
            ids.append(token_id)
    return sorted({i for i in ids if i is not None})


def decoding_kwargs(tokenizer, max_new_tokens: int, temperature: float | None) -> dict:
    """generate() settings: greedy when temperature is None, else plain sampling at that temperature
    (top_k=0 and top_p=1.0 switch those filters off; None would let the model's defaults back in)."""
    common = dict(repetition_penalty=1.0, max_new_tokens=max_new_tokens, use_cache=True,
                  eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if temperature is None:
        return dict(do_sample=False, **common)
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **common)


# Generation attends with grouped_query_attention, whatever attention the loss pass uses. Qwen2.5-1.5B
# has 12 query heads and 2 key/value heads; transformers' sdpa path copies the key/value heads sixfold
# over the whole cache (repeat_kv) whenever a padding mask is passed under torch.compile, and its
# flash_attention_2 path cannot be compiled whole. Here query head h attends to key/value head
# h // G (G = 6), with query [B, H, T, D] viewed as [B, H_kv, G*T, D]: one SDPA call, no copy.
DECODE_ATTENTION = "grouped_query_sdpa"


def grouped_query_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function interface: query [B, H, T, D], key/value [B, H_kv, S, D] and a
    boolean mask [B, 1, T, S] (True attends) or None; returns ([B, T, H, D], None)."""
    rows, heads, length, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if attention_mask is None and length > 1:  # no padding: transformers leaves causality to the kernel
        attention_mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None:  # one mask for all heads: the G query rows of a position share it
        attention_mask = attention_mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(
            attention_mask.shape[0], 1, group * length, keys)
    out = F.scaled_dot_product_attention(query.reshape(rows, kv_heads, group * length, head_dim), key, value,
                                         attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.view(rows, heads, length, head_dim).transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, grouped_query_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # a custom name gets no mask otherwise


@contextmanager
def generation_mode(model: nn.Module):
    """Eval mode (dropout and gradient checkpointing off, so the KV cache works on every transformers
    version) and grouped_query_attention, for the length of a generate() call."""
    was_training, attention = model.training, model.config._attn_implementation
    model.eval()
    model.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(attention)
        model.train(was_training)


# Compiled decoding (--compile_generation). Decoding a token is one forward pass over [rows, 1]
# inputs; for a 1.5B model on a GPU its time is framework overhead (Python and hundreds of small
# kernel launches), not arithmetic. With a static KV cache every decoding step has the same shapes,
# so torch.compile turns the step into one graph, replayed on CUDA as a CUDA graph. generate()
# compiles only the decoding step (the prefill runs eagerly), so a graph depends on the row count
# and the cache length alone: rollouts and evaluation each get one of each, and compile once.
def compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process (dynamo's counter: internal to torch, but long-stable)."""
    return counters["stats"]["unique_graphs"]


class CompiledDecoding:
    """generate() for one purpose (rollouts or evaluation) with a StaticCache of `rows` x `max_cache_len`
    tokens, kept for the run and reset before each call (a CUDA graph replays on fixed addresses), and
    the CompileConfig under which generate() compiles its decoding step. A batch of fewer rows is padded
    to `rows` with copies of its last row (never all-padding rows: attending to nothing gives NaN).
    After start(), a call that would compile again, or any other error, ends compiled decoding here:
    one warning, counted in `failures`, and every call decodes eagerly."""

    def __init__(self, model: nn.Module, rows: int, max_cache_len: int, name: str = "rollout"):
        on_cuda = model.device.type == "cuda"
        self.model, self.rows, self.max_cache_len, self.name = model, rows, max_cache_len, name
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.compile_config = CompileConfig(fullgraph=True, dynamic=False,
                                            mode="reduce-overhead" if on_cuda else "default")
        # generate() compiles only on accelerators; this switch (transformers' own tests use it) lets
        # it compile on a CPU too, where only --compile_generation true gets: tests and measurements.
        self.compile_config._compile_all_devices = not on_cuda
        self.enabled, self.started, self.fallback, self.failures = True, False, None, 0
        self.figures = {"eager_ms": None, "compiled_ms": None, "compile_seconds": None}

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """model.generate(ids, attention_mask=mask, **kwargs), compiled while enabled; the batch's rows."""
        if ids.shape[1] + kwargs["max_new_tokens"] > self.max_cache_len:  # generate would fail midway
            raise ValueError(f"prompts of {ids.shape[1]} tokens + {kwargs['max_new_tokens']} new tokens "
                             f"exceed the static KV cache ({self.max_cache_len} tokens)")
        rows = len(ids)
        if self.enabled and rows <= self.rows:
            ids, mask = (torch.cat([t, t[-1:].expand(self.rows - rows, -1)]) for t in (ids, mask))
            self.cache.reset()
            try:  # once started, a compile is an error: fail_on_recompile raises before compiling
                with torch.compiler.set_stance("fail_on_recompile" if self.started else "default"):
                    with generation_mode(self.model):
                        return self.model.generate(ids, attention_mask=mask, cache=self.cache,
                                                   compile_config=self.compile_config, **kwargs)[:rows]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # dynamo's, inductor's and CUDA graphs' errors
                self.disable(error)
            ids, mask = ids[:rows], mask[:rows]
        with generation_mode(self.model):
            return self.model.generate(ids, attention_mask=mask, **kwargs)

    def disable(self, error: Exception | str) -> None:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {first_line(error)[:200]}"
        self.enabled, self.fallback, self.cache = False, reason, None
        if self.started:
            self.failures += 1
            rank = f"rank {rank_and_world()[0]}: " if dist.is_initialized() else ""
            tqdm.write(f"{rank}warning: compiled {self.name} decoding failed, decoding eagerly from now on: {reason}")

    def start(self, tokenizer, prompts: list[str], budget: int) -> None:
        """Compile with `rows` of the real prompts, enough decoding steps that CUDA graphs are recorded
        and replayed; check that the compiled greedy tokens are eager's (near-ties aside); then time a
        decoding step both ways. An error or a mismatch disables it, with the reason in `fallback`."""
        encoded = tokenizer((prompts * self.rows)[:self.rows], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False).to(self.model.device)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        new_tokens = min(8, budget)  # min_new_tokens 4: decoding steps 1, 2, 3 warm up, record, replay
        greedy = dict(decoding_kwargs(tokenizer, new_tokens, None), min_new_tokens=min(4, new_tokens))
        started = time.perf_counter()
        compiled = self.generate(ids, mask, **greedy)
        self.figures["compile_seconds"] = time.perf_counter() - started
        if not self.enabled:
            return
        with generation_mode(self.model):
            eager = self.model.generate(ids, attention_mask=mask, output_logits=True,
                                        return_dict_in_generate=True, **greedy)
        tolerance = 1e-3 if self.model.dtype == torch.float32 else 1.0
        row = first_disagreement(compiled[:, ids.shape[1]:], eager, ids.shape[1], tolerance, tokenizer.pad_token_id)
        if row is not None:
            return self.disable(f"compiled greedy tokens differ from eager ones (row {row})")
        # Timed from the middle of a completion, where eager decoding's growing cache is on average.
        half = budget // 2
        ids = torch.cat([ids, ids[:, -1:].expand(-1, half)], dim=1)
        mask = torch.cat([mask, mask[:, -1:].expand(-1, half)], dim=1)
        steps = max(1, min(16, budget - half - 1))
        self.figures["eager_ms"] = decoding_step_ms(tokenizer, ids, mask, steps, self.model, None)
        self.figures["compiled_ms"] = decoding_step_ms(tokenizer, ids, mask, steps, self.model, self)
        self.started = True


def first_disagreement(compiled: torch.Tensor, eager, width: int, tolerance: float, pad_id: int) -> int | None:
    """The first row whose compiled greedy tokens are not eager's (`eager`: generate's output with
    logits), or None. Where a row's tokens first differ, on the same prefix, eager's logits of the
    two tokens within `tolerance` are a near-tie that rounding may flip: the row agrees up to there."""
    eager_ids = eager.sequences[:, width:]
    length = max(compiled.shape[1], eager_ids.shape[1])  # finished rows are padded with pad_id
    compiled, eager_ids = (F.pad(t, (0, length - t.shape[1]), value=pad_id) for t in (compiled, eager_ids))
    for row in range(len(compiled)):
        differs = (compiled[row] != eager_ids[row]).nonzero()
        if len(differs) == 0:
            continue
        step = int(differs[0])
        logits = eager.logits[min(step, len(eager.logits) - 1)][row].float()
        if step >= len(eager.logits) or logits[eager_ids[row, step]] - logits[compiled[row, step]] > tolerance:
            return row
    return None


class StepClock(LogitsProcessor):
    """A logits processor that changes nothing and notes the time of each generated token."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def decoding_step_ms(tokenizer, ids, mask, steps: int, model, decoding: CompiledDecoding | None) -> float:
    """Milliseconds per decoding step: the median time between consecutive tokens of a greedy call of
    steps + 1 tokens (the first token comes from the prefill), the lower of two calls."""
    medians = []
    for _ in range(2):
        clock = StepClock(ids.device)
        kwargs = dict(decoding_kwargs(tokenizer, steps + 1, None), min_new_tokens=steps + 1,
                      logits_processor=LogitsProcessorList([clock]))
        if decoding is None:
            with generation_mode(model):
                model.generate(ids, attention_mask=mask, **kwargs)
        else:
            decoding.generate(ids, mask, **kwargs)
        medians.append(1000 * float(np.median(np.diff(clock.times))))
    return min(medians)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_decoding(model, tokenizer, cfg: Config, train_examples: list[dict],
                   eval_examples: list[dict]) -> dict:
    """{"rollout": CompiledDecoding, "eval": CompiledDecoding} as --compile_generation asks, each started
    (compiled, checked, timed); {} to decode eagerly. auto compiles on CUDA only, and keeps the compiled
    path of a purpose only where it measured faster; true keeps it wherever it works. Every process
    takes the same path: one failure disables it everywhere, and the figures compared are the
    slowest process's. Each cache holds its split's longest prompt plus that purpose's budget."""
    if cfg.compile_generation == "false" or (cfg.compile_generation == "auto" and model.device.type != "cuda"):
        return {}
    if cfg.gradient_checkpointing and not model.is_activation_checkpointing:  # now, not in
        # train_with_grpo: the graph guards the flag (read even in eval mode, where it does nothing)
        # and the hook it adds, so switching it on after compiling would compile again
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    rollout = rows_of_this_process(cfg.batch_size * cfg.num_generations)
    purposes = {"rollout": (train_examples, rollout.stop - rollout.start, cfg.max_completion_length),
                "eval": (eval_examples, min(cfg.eval_batch_size, math.ceil(len(eval_examples) / rank_and_world()[1])),
                         cfg.eval_max_new_tokens)}
    decoders, graphs = {}, compiled_graph_count()
    for name, (examples, rows, budget) in purposes.items():
        decoding = CompiledDecoding(model, rows, max(prompt_lengths(examples, tokenizer)) + budget, name)
        decoding.start(tokenizer, [ex["prompt"] for ex in examples[:rows]], budget)
        decoders[name] = decoding
    if compiled_graph_count() == graphs and all(d.enabled for d in decoders.values()):
        for decoding in decoders.values():
            decoding.started = False
            decoding.disable("generate() built no compiled graph (transformers did not compile the model)")
    if any_rank(any(d.fallback for d in decoders.values()), model.device):
        for decoding in decoders.values():
            decoding.started = False
            decoding.disable(decoding.fallback or "another process could not compile")
    figures = all_reduce_sum([d.figures[key] or 0.0 for d in decoders.values() for key in ("eager_ms", "compiled_ms")],
                             model.device, op=dist.ReduceOp.MAX)
    for i, decoding in enumerate(decoders.values()):
        if decoding.enabled:
            decoding.figures.update(eager_ms=figures[2 * i], compiled_ms=figures[2 * i + 1])
            if cfg.compile_generation == "auto" and figures[2 * i + 1] >= figures[2 * i]:
                decoding.enabled, decoding.cache = False, None  # measured no faster than eager
    return decoders


def decoding_record(decoders: dict) -> dict:
    """What each purpose decodes with and why, for config.json and summary.json."""
    return {name: {"rows": d.rows, "cache_tokens": d.max_cache_len, "compiled": d.enabled,
                   "fallback": d.fallback, "failures": d.failures, **d.figures} for name, d in decoders.items()}


def decoding_line(decoders: dict, cfg: Config) -> str:
    """The run's decoding choice and the figures it was made on, in one line."""
    if not decoders:
        why = "compiles on CUDA only" if cfg.compile_generation == "auto" else "asks for it"
        return f"decoding: eager (--compile_generation {cfg.compile_generation} {why})"
    parts = []
    for name, d in decoders.items():
        figures = (f"eager {d.figures['eager_ms']:.1f} ms/step, compiled {d.figures['compiled_ms']:.1f}"
                   if d.figures["eager_ms"] else "not measured")
        parts.append(f"{name} {d.rows} rows, cache {d.max_cache_len} tokens: {figures} -> "
                     f"{'compiled' if d.enabled else 'eager'}")
    seconds = sum(d.figures["compile_seconds"] or 0 for d in decoders.values())
    return f"decoding (--compile_generation {cfg.compile_generation}): " + "; ".join(parts) + \
        f"; compiled in {seconds:.1f} s"


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], temperature: float | None, max_new_tokens: int,
                         decoding: CompiledDecoding | None = None) -> dict:
    """Batched, left-padded generation on the model's own device. Returns prompt_ids/prompt_mask
    (left-padded), completion_ids/completion_mask (trimmed to the longest completion), completions
    (decoded text), lengths and truncated (hit the budget without a stop token). With `decoding`, it
    decodes compiled."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids, prompt_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    kwargs = decoding_kwargs(tokenizer, max_new_tokens, temperature)
    if decoding is not None:
        output = decoding.generate(prompt_ids, prompt_mask, **kwargs)
    else:
        with generation_mode(model):
            output = model.generate(prompt_ids, attention_mask=prompt_mask, **kwargs)
    completion_ids = output[:, prompt_ids.shape[1]:]
    stop_ids = stop_token_ids(tokenizer)
    completion_mask = create_completion_mask(completion_ids, stop_ids)
    lengths = completion_mask.sum(1)
    truncated = ~torch.isin(completion_ids, torch.tensor(stop_ids, device=device)).any(1)
    width = int(lengths.max())
    completion_ids, completion_mask = completion_ids[:, :width], completion_mask[:, :width]
    texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(completion_ids.tolist(), lengths.tolist())],
                                   skip_special_tokens=True)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, completions=texts, lengths=lengths, truncated=truncated)


# %% 4. Evaluation
# Greedy decoding (do_sample=False, set explicitly) on the held-out test split, batched with left
# padding and prompts sorted by length so batches carry little padding. "accuracy" is lenient
# (the <answer> block, else the last number of the completion); "strict_accuracy" counts only an
# answer inside the tags. With several processes each evaluates every N-th question, batch_size
# at a time, and the records are gathered.
def evaluate_model(model, tokenizer, examples: list[dict], batch_size: int = 64, max_new_tokens: int = 512,
                   desc: str = "eval", decoding: CompiledDecoding | None = None) -> dict:
    rank, world = rank_and_world()
    shard = list(range(rank, len(examples), world))
    shard.sort(key=lambda i: -len(examples[i]["prompt"]))
    records = []
    for start in tqdm(range(0, len(shard), batch_size), desc=desc, disable=not is_main_process(), leave=False):
        batch = [examples[i] for i in shard[start:start + batch_size]]
        out = generate_completions(model, tokenizer, [ex["prompt"] for ex in batch], None, max_new_tokens, decoding)
        for i, ex, completion, truncated in zip(shard[start:], batch, out["completions"], out["truncated"].tolist()):
            records.append(score_answer(i, ex, completion, truncated))
    records = sorted(all_gather_list(records), key=lambda r: r["index"])
    n = len(records)
    mean = lambda key: sum(r[key] for r in records) / max(n, 1)  # noqa: E731
    return {"accuracy": mean("correct"), "strict_accuracy": mean("strict_correct"), "format_rate": mean("formatted"),
            "truncation_rate": mean("truncated"), "n": n, "records": records}


def score_answer(index: int, example: dict, completion: str, truncated: bool) -> dict:
    tagged = extract_answer_from_model_output(completion)
    gold = parse_number(example["answer"])
    return {"index": index, "question": example["question"], "gold": example["answer"], "completion": completion,
            "extracted": tagged, "correct": numbers_equal(parse_number(tagged if tagged is not None else completion), gold),
            "strict_correct": numbers_equal(parse_number(tagged), gold),
            "formatted": format_reward([completion])[0] == 0.8, "truncated": bool(truncated)}


# Evaluation during training: every --eval_steps steps the same greedy evaluation runs on a fixed
# subset of the eval split, so a held-out accuracy curve sits beside the reward curves (reward mixes
# learning the format, which is fast, with learning to solve). The subset comes from a private
# generator with a fixed seed: choosing it draws nothing from the training RNG, and every run (any
# --seed, any recipe) watches the same questions, so their curves compare.
EVAL_SUBSET_SEED = 0


def eval_subset(num_examples: int, size: int) -> list[int]:
    """Indices of the periodic evaluation's questions, sorted: the first `size` of a fixed permutation."""
    return sorted(int(i) for i in np.random.default_rng(EVAL_SUBSET_SEED).permutation(num_examples)[:size])


def evaluate_at_step(model, tokenizer, eval_examples: list[dict], indices: list[int], cfg: Config, step: int,
                     logger=None, decoding: CompiledDecoding | None = None) -> dict:
    """evaluate_model on eval_examples[indices] at a training step; logged and returned as one line of
    eval_steps.jsonl: the step, the rates, n, seconds, and per question its index in the eval split and
    whether it was answered right (lenient), so two steps can be compared question by question."""
    start = time.perf_counter()
    result = evaluate_model(model, tokenizer, [eval_examples[i] for i in indices], cfg.eval_batch_size,
                            cfg.eval_max_new_tokens, f"eval step {step}", decoding)
    record = {"step": step, **{key: result[key] for key in ("accuracy", "strict_accuracy", "format_rate", "truncation_rate", "n")},
              "seconds": time.perf_counter() - start, "indices": [indices[r["index"]] for r in result["records"]],
              "correct": [int(r["correct"]) for r in result["records"]]}
    if logger is not None:
        logger.log_eval(record)
    if is_main_process():
        tqdm.write(f"eval step {step}: accuracy {record['accuracy']:.3f} (strict {record['strict_accuracy']:.3f}) "
                   f"on {record['n']} questions, {record['seconds']:.1f} s")
    return record


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score; sane at 0% and 100%)."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# %% 5. Reward functions
# Each takes the decoded completions and the gold answers (one per completion) and returns one
# float per completion. The default pair is the tutorial's: correctness (2.0 exact string, 1.5
# same number) plus format (0.2 per tag that appears exactly once). Five more reproduce the TRL
# GRPO demo (with DOTALL and optional trailing whitespace, so they fire on multi-line answers that
# end at the stop token); soft_overlong is DAPO's length penalty; user files can add their own.
FORMAT_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def correctness_reward(completions: list[str], answers: list[str]) -> list[float]:
    """2.0 if the <answer> text equals the gold string, 1.5 if it denotes the same number, else 0."""
    rewards = []
    for completion, gold in zip(completions, answers):
        extracted = extract_answer_from_model_output(completion)
        if extracted is not None and extracted == gold:
            rewards.append(2.0)
        elif numbers_equal(parse_number(extracted), parse_number(gold)):
            rewards.append(1.5)
        else:
            rewards.append(0.0)
    return rewards


def format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """0.2 for each of the four tags that appears exactly once (max 0.8)."""
    return [0.2 * sum(completion.count(tag) == 1 for tag in FORMAT_TAGS) for completion in completions]


def combined_reward(completions: list[str], answers: list[str]) -> list[float]:
    return [c + f for c, f in zip(correctness_reward(completions, answers), format_reward(completions))]


def exact_match_reward(completions: list[str], answers: list[str]) -> list[float]:
    """TRL demo: 2.0 when the <answer> text equals the gold string exactly."""
    return [2.0 if extract_answer_from_model_output(c) == gold else 0.0 for c, gold in zip(completions, answers)]


def integer_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.5 when the <answer> text is a bare non-negative integer."""
    return [0.5 if (extract_answer_from_model_output(c) or "").isdigit() else 0.0 for c in completions]


_STRICT_FORMAT = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\s*", re.DOTALL)
_SOFT_FORMAT = re.compile(r"\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def strict_format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.5 when the whole completion is exactly the newline-separated tag layout."""
    return [0.5 if _STRICT_FORMAT.fullmatch(c) else 0.0 for c in completions]


def soft_format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.5 when the completion starts with a reasoning block followed by an answer block."""
    return [0.5 if _SOFT_FORMAT.match(c) else 0.0 for c in completions]


def xml_count_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.125 per newline-delimited tag seen exactly once; each answer-tag term loses 0.001 per character after the answer."""
    rewards = []
    for text in completions:
        score = 0.125 * (text.count("<reasoning>\n") == 1) + 0.125 * (text.count("\n</reasoning>\n") == 1)
        # Characters after "\n</answer>" and its optional newline. TRL split on "\n</answer>\n", which
        # charged a completion ending right at </answer> (every rollout: the stop token is not text) for its
        # whole length; the penalty is for text after the answer only.
        tail_penalty = 0.001 * len(text.split("\n</answer>")[-1].removeprefix("\n"))
        score += (0.125 - tail_penalty) * ((text.count("\n<answer>\n") == 1) + (text.count("\n</answer>") == 1))
        rewards.append(score)
    return rewards


REWARD_FUNCS = {
    "correctness": correctness_reward, "format": format_reward,
    "exact_match": exact_match_reward, "integer": integer_reward, "strict_format": strict_format_reward,
    "soft_format": soft_format_reward, "xml_count": xml_count_reward,
}


# DAPO's soft overlong punishment (Yu et al. 2025). With L = max_completion_length, N = overlong_buffer:
#     0 if length <= L - N,    (L - N - length) / N if L - N < length <= L,    -1 if length > L
# a linear penalty over the last N tokens of the budget, -1 at the budget itself. It reads token counts,
# not text; load_reward_funcs binds L and N (functools.partial).
def soft_overlong_reward(completions: list[str], answers: list[str], completion_lengths: list[int],
                         max_completion_length: int, overlong_buffer: int) -> list[float]:
    start = max_completion_length - overlong_buffer
    return [max(-1.0, min(0.0, (start - length) / overlong_buffer)) for length in completion_lengths]


# --reward_funcs is a comma list of built-in names (REWARD_FUNCS and soft_overlong) and
# `path/to/file.py:function_name` entries, each logged under its name; --reward_weights gives one
# number per function (default 1 each) and the reward is their weighted sum. A function may declare a
# `completion_lengths` parameter: it then also gets each completion's token count, stop token included.
# Bad input is refused when loading, a bad return at every call, each as one line naming the flag.
class RewardFunctionError(ConfigError):
    """A reward function returned something other than one real number per completion."""


def load_reward_funcs(spec: str, weights: str | None, max_completion_length: int,
                      overlong_buffer: int) -> tuple[dict, list[float]]:
    """({logged name: function}, [weight per function]) from --reward_funcs and --reward_weights."""
    funcs, modules = {}, {}  # modules: each file imported once, however many of its functions are named
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            raise ConfigError(f"--reward_funcs {spec!r}: empty entry")
        if ":" in entry:
            name, func = _file_reward_func(entry, modules)
        else:
            name, func = entry, _builtin_reward_func(entry, max_completion_length, overlong_buffer)
        if name in funcs:
            raise ConfigError(f"--reward_funcs {spec!r}: two functions named {name!r} (each name is a rewards/ curve)")
        funcs[name] = func
    return funcs, parse_reward_weights(weights, len(funcs))


def _builtin_reward_func(name: str, max_completion_length: int, overlong_buffer: int):
    if name == "soft_overlong":
        if not 1 <= overlong_buffer < max_completion_length:
            raise ConfigError(f"--overlong_buffer must be >= 1 and < --max_completion_length ({max_completion_length}) "
                              f"for the soft_overlong reward (got {overlong_buffer})")
        return partial(soft_overlong_reward, max_completion_length=max_completion_length, overlong_buffer=overlong_buffer)
    if name not in REWARD_FUNCS:
        raise ConfigError(f"--reward_funcs: unknown reward {name!r}; choose from {', '.join(REWARD_FUNCS)}, "
                          "soft_overlong, or path/to/file.py:function_name")
    return REWARD_FUNCS[name]


def _file_reward_func(entry: str, modules: dict):
    path_text, _, func_name = entry.rpartition(":")
    if not path_text or not func_name:
        raise ConfigError(f"--reward_funcs {entry}: write path/to/file.py:function_name")
    path = Path(path_text).expanduser().resolve()
    if path not in modules:
        modules[path] = _import_reward_file(path, path_text)
    if not hasattr(modules[path], func_name):
        raise ConfigError(f"--reward_funcs {entry}: {path_text} defines no {func_name!r}")
    func = getattr(modules[path], func_name)
    if not callable(func):
        raise ConfigError(f"--reward_funcs {entry}: {func_name!r} is a {type(func).__name__}, not a function")
    return func_name, func


def _import_reward_file(path: Path, path_text: str):
    if not path.is_file():
        raise ConfigError(f"--reward_funcs {path_text}: no such file")
    module_name = f"reward_file_{secrets.token_hex(8)}"  # unique: two files named rewards.py never collide
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None:
        raise ConfigError(f"--reward_funcs {path_text}: not a Python file (the name must end in .py)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # as an import does: dataclasses and pickle look the module up there
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # SystemExit: a script that parses its own arguments on import
        del sys.modules[module_name]
        message = first_line(error)
        raise ConfigError(f"--reward_funcs {path_text}: importing it raised {type(error).__name__}: {message}") from error
    return module


def parse_reward_weights(weights: str | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    entries = [entry.strip() for entry in weights.split(",")]
    if len(entries) != count:
        raise ConfigError(f"--reward_weights {weights!r}: needs one weight per --reward_funcs entry ({count}), got {len(entries)}")
    values = []
    for entry in entries:
        try:
            values.append(float(entry))
        except ValueError:
            values.append(math.nan)
        if not math.isfinite(values[-1]):
            raise ConfigError(f"--reward_weights {weights!r}: {entry!r} is not a finite number")
    return values


def score_completions(reward_funcs: dict, completions: list[str], answers: list[str],
                      completion_lengths: list[int] | None = None) -> torch.Tensor:
    """Rewards as a [completions, functions] float tensor, columns in the order of reward_funcs.
    completion_lengths go to the functions that declare a parameter of that name, and only to them."""
    columns = []
    for name, func in reward_funcs.items():
        extra = {}
        if "completion_lengths" in inspect.signature(func).parameters:
            if completion_lengths is None:
                raise ValueError(f"reward function {name} takes completion_lengths: pass them to score_completions")
            extra = {"completion_lengths": completion_lengths}
        columns.append(checked_rewards(name, func(completions, answers, **extra), len(completions)))
    return torch.stack(columns, dim=1)


def checked_rewards(name: str, values, count: int) -> torch.Tensor:
    """values as float32, once they are `count` real numbers (a list, tuple, or 1-d array/tensor).
    NaN and inf pass: the loop skips a step whose loss is not finite. A bool is refused: True/False
    says whether, not how much, and a reward function returning one has most likely forgotten its scale."""
    where = f"reward function {name} (--reward_funcs)"
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = values.tolist()  # Python numbers; a 0-d array gives a scalar, refused below
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"{where}: returned a {type(values).__name__}, not a list of {count} numbers")
    if len(values) != count:
        raise RewardFunctionError(f"{where}: returned {len(values)} values for {count} completions")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy ints and floats are Real
            raise RewardFunctionError(f"{where}: value {i} is {value!r:.40} (a {type(value).__name__}), not a real number")
    return torch.tensor([float(value) for value in values], dtype=torch.float32)


def weighted_reward(rewards_per_func: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Per completion, sum over functions of weight x reward (with weights of 1, bit for bit .sum(1))."""
    return (rewards_per_func * torch.tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)).sum(1)


# %% 6. GRPO from scratch: log-probs, masks, advantages, loss
# selective_log_softmax gives log p(token) = logit[token] - logsumexp(logits) in fp32, a few rows
# at a time, so no full-vocabulary fp32 copy of the batch ever exists (151,936 columns for Qwen);
# its backward recomputes softmax chunk by chunk from the saved bf16 logits. The entropy metric
# comes out of the same pass over the logits, not a second one.
LOGSUMEXP_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of fp32 per chunk


def _row_chunks(logits: torch.Tensor) -> list[torch.Tensor]:
    rows = logits.reshape(-1, logits.shape[-1])  # a view for contiguous logits
    return rows.split(max(1, LOGSUMEXP_CHUNK_ELEMENTS // rows.shape[1]))


def _logsumexp_and_entropy(chunk: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, in fp32: logsumexp(z) and, on request, the entropy of softmax(z), from one exp pass.
    With m the row max, e = exp(z - m) and s = sum(e): logsumexp = log(s) + m (torch.logsumexp's own
    steps, hence its exact values) and entropy = -sum(p log p) = logsumexp - sum(e * z) / s."""
    z = chunk.float()
    row_max = z.amax(-1, keepdim=True)
    row_max.masked_fill_(row_max.abs() == math.inf, 0)  # as torch.logsumexp: no inf - inf
    exp_shifted = (z - row_max).exp_()
    total = exp_shifted.sum(-1)
    logsumexp = total.log().add_(row_max.squeeze(-1))
    entropy = logsumexp - torch.linalg.vecdot(exp_shifted, z) / total if with_entropy else None
    return logsumexp, entropy


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, with_entropy):
        parts = [_logsumexp_and_entropy(chunk, with_entropy) for chunk in _row_chunks(logits)]
        logsumexp = torch.cat([lse for lse, _ in parts])
        selected = logits.reshape(-1, logits.shape[-1]).gather(1, index.reshape(-1, 1)).squeeze(1).float()
        ctx.save_for_backward(logits, index, logsumexp)
        entropy = torch.cat([ent for _, ent in parts]).view(index.shape) if with_entropy else None
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)  # a metric: no gradient flows through it
        return (selected - logsumexp).view(index.shape), entropy

    @staticmethod
    def backward(ctx, grad_output, grad_entropy):
        # d log p(i) / d logit(j) = 1[j = i] - softmax(j), scaled by the incoming gradient.
        logits, index, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_index, flat_grad = index.reshape(-1, 1), grad_output.reshape(-1, 1).float()
        start = 0
        for chunk, grad_chunk in zip(_row_chunks(logits), _row_chunks(grad_logits)):
            end = start + chunk.shape[0]
            grad = (chunk.float() - logsumexp[start:end, None]).exp_().mul_(-flat_grad[start:end])
            grad.scatter_add_(1, flat_index[start:end], flat_grad[start:end])
            grad_chunk.copy_(grad)
            start = end
        return grad_logits, None, None


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, with_entropy: bool = False):
    """log_softmax(logits.float()).gather(-1, index[..., None])[..., 0], without the full fp32 copy.
    with_entropy=True returns (log_probs, entropy): also each position's softmax entropy (no grad)."""
    log_probs, entropy = _SelectiveLogSoftmax.apply(logits.contiguous(), index, with_entropy)
    return (log_probs, entropy) if with_entropy else log_probs


# The policy's per-token log-probs come from one small module, so that DDP can wrap exactly the
# computation whose gradients it averages over processes, and no caller ever holds [batch, tokens,
# vocab] logits. Only the completion positions get logits (logits_to_keep), and they are divided
# by the sampling temperature, since that is the distribution sampled from.
class PerTokenLogProbs(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, logits_to_keep: int, temperature: float = 1.0, with_entropy: bool = False):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            logits_to_keep=logits_to_keep + 1).logits
        if temperature != 1.0:
            logits.div_(temperature)  # in place: nothing else holds these logits, so no second copy
        # Position t predicts token t+1; the last kept position predicts past the sequence, so its
        # target is a dummy and its log-prob is dropped.
        targets = F.pad(input_ids[:, -logits_to_keep:], (0, 1))
        if with_entropy:
            log_probs, entropy = selective_log_softmax(logits, targets, with_entropy=True)
            return log_probs[:, :-1], entropy[:, :-1]
        return selective_log_softmax(logits, targets)[:, :-1]


def compute_log_probs(model, input_ids, attention_mask, logits_to_keep: int, temperature: float = 1.0,
                      micro_batch_size: int | None = None) -> torch.Tensor:
    """Per-token log-probs [batch, logits_to_keep] of the last logits_to_keep tokens, computed
    `micro_batch_size` sequences at a time. `model` is a causal LM, or a PerTokenLogProbs (wrapped
    in DDP or not)."""
    if isinstance(model, PreTrainedModel):
        model = PerTokenLogProbs(model)
    chunk = micro_batch_size or len(input_ids)
    return torch.cat([model(input_ids[i:i + chunk], attention_mask[i:i + chunk], logits_to_keep, temperature)
                      for i in range(0, len(input_ids), chunk)])


def create_completion_mask(completion_ids: torch.Tensor, eos_token_ids) -> torch.Tensor:
    """1 up to and including the first stop token (any of eos_token_ids), 0 after; all 1 if none."""
    is_stop = torch.isin(completion_ids, torch.as_tensor(eos_token_ids, device=completion_ids.device))
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), completion_ids.shape[1])
    return (positions[None, :] <= first_stop[:, None]).int()


# Group-relative advantages: the num_generations completions of one prompt are consecutive, and
# each is scored against its own group's mean, A = r - mean_group(r), then scale_rewards divides by
#   "group": std_group(r) + 1e-4 (GRPO);  "batch": std(all rewards passed in) + 1e-4 (TRL's "batch":
#   pass the whole step's rewards);  "none": nothing (Dr. GRPO). Stds are unbiased.
# A group whose completions all earned the same reward carries no signal: its advantages are exactly zero.
SCALE_REWARDS = ("group", "batch", "none")


def compute_group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str | bool = "group") -> torch.Tensor:
    """scale_rewards True / False are accepted for "group" / "none" (the earlier bool flag)."""
    if isinstance(scale_rewards, bool):
        scale_rewards = "group" if scale_rewards else "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} or a bool (got {scale_rewards!r})")
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages.view(-1)


# The GRPO objective per completion token, with r the ratio and A the advantage of its sequence:
#     -( min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A) - beta * KL )
# "token" level (GRPO): r_t = exp(lp_t - old_t). "sequence" level (GSPO, Zheng et al. 2025): one ratio
# per sequence, r = exp(mean over its completion tokens of (lp_t - old_t)), clipped as a whole. KL stays
# per token: the k3 estimator exp(ref - lp) - (ref - lp) - 1, unbiased, >= 0, zero when the policy equals
# the reference. old_log_probs=None means on-policy (mu == 1): r is 1 in value but still carries the
# gradient of log_probs, with no extra forward pass.
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def grpo_loss(log_probs, old_log_probs, ref_log_probs, advantages, completion_mask, *, epsilon: float, beta: float,
              epsilon_high: float | None = None, loss_type: str = "grpo", max_completion_length: int | None = None,
              importance_sampling_level: str = "token"):
    """Returns (loss, metrics); metrics are detached masked token means (at the sequence level a
    sequence's clip flag counts once per completion token, so long sequences weigh more)."""
    if ref_log_probs is None and beta != 0:
        raise ValueError("ref_log_probs is required when beta != 0")
    old_log_probs = log_probs.detach() if old_log_probs is None else old_log_probs
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(log_probs.dtype)
    advantages = advantages[:, None]

    log_ratio = log_probs - old_log_probs  # [B, T]
    if importance_sampling_level == "sequence":  # s = masked token mean, [B, 1]
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    elif importance_sampling_level != "token":
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # [B, 1] broadcasts over tokens
    if beta != 0:
        log_ratio_to_ref = ref_log_probs - log_probs
        kl = torch.exp(log_ratio_to_ref) - log_ratio_to_ref - 1
        per_token_loss = per_token_loss + beta * kl

    # grpo: mean over sequences of each one's token mean. bnpo and dapo: masked sum / token count.
    # grpo_update weights each micro-batch by loss_denominator(part) / the step's total (over its
    # micro-batches and, with DDP's gradient mean, its ranks), so here both are the token mean of the
    # whole step, DAPO's token-level normalization: same value, same gradient. In TRL they differ: its
    # bnpo divides each process's micro-batch by that batch's own tokens, its dapo by the global count
    # num_items_in_batch. dr_grpo: masked sum / (sequences x max_completion_length).
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    def masked_mean(values):  # values [B, T] or [B, 1]: a mean over the completion tokens
        return ((values * mask).sum() / mask.sum().clamp(min=1)).detach()

    low_clipped = (ratio < 1 - epsilon) & (advantages < 0)
    high_clipped = (ratio > 1 + epsilon_high) & (advantages > 0)
    metrics = {"kl": masked_mean(kl) if beta != 0 else torch.zeros((), device=loss.device),
               "clip_ratio/low_mean": masked_mean(low_clipped.float()),
               "clip_ratio/high_mean": masked_mean(high_clipped.float()),
               "clip_ratio/region_mean": masked_mean((low_clipped | high_clipped).float())}
    return loss, metrics


def loss_denominator(completion_mask: torch.Tensor, loss_type: str) -> float:
    """What grpo_loss divides by for this batch, in units that add up over micro-batches, so a
    micro-batch's loss weighted by its share gives the gradient of the whole batch at once."""
    return float(completion_mask.sum()) if loss_type in ("bnpo", "dapo") else float(completion_mask.shape[0])


# %% 7. Training loop
# Each step: sample num_generations completions for batch_size prompts (eval mode, KV cache on),
# score them, turn rewards into group-relative advantages, get reference log-probs without grad,
# then take mu optimizer steps on the GRPO loss, accumulating gradients over micro-batches
# (gradient checkpointing on). With N processes (one per GPU) each takes 1/N of the step's
# completions and DDP averages the gradients, so the step equals one process on the whole batch.
class MasterWeightAdamW:
    """AdamW on fp32 master copies of bf16 weights. Why: at lr 5e-6 most updates are far below
    bf16's resolution (~1e-4 for a weight of 0.03) and would round away. Rollouts and loss run on
    the fast bf16 weights; after each step the master values are copied back. On fp32 models the
    master copy is the parameter itself and this is plain AdamW. With sharded=True it is one
    rank's share under ShardedMasterWeightAdamW: the gradient norm is then summed over ranks."""

    def __init__(self, params, lr: float, sharded: bool = False):
        params = list(params)  # parameters, or (from ZeroRedundancyOptimizer) this rank's param groups
        self.param_groups = params if params and isinstance(params[0], dict) else [{"params": params, "lr": lr}]
        self.params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=lr)
        self.sharded = sharded

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Move gradients to the fp32 master copies and clip them there; returns the total norm."""
        for param, master in zip(self.params, self.master):
            if master is not param:
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        grads = [m.grad for m in self.master if m.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.master[0].device)
        if self.sharded:  # the norm of the whole model: every rank adds the squares of its share
            squared = norm.square()
            dist.all_reduce(squared)
            norm = squared.sqrt()
        torch.nn.utils.clip_grads_with_norm_(self.master, max_norm, norm)
        return norm

    def step(self) -> None:
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.params, self.master):
                if master is not param:
                    param.copy_(master)
                    master.grad = None  # the fp32 gradient copy is not needed until the next backward

    def zero_grad(self) -> None:
        for tensor in self.params + self.master:
            tensor.grad = None

    def state_dict(self) -> dict:
        master = [m.detach().clone() if m is not p else None for p, m in zip(self.params, self.master)]
        return {"optimizer": self.optimizer.state_dict(), "master": master}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for param, master, saved in zip(self.params, self.master, state["master"]):
                if saved is not None:
                    master.copy_(saved)
                    param.copy_(saved)


class ShardedMasterWeightAdamW:
    """ZeRO stage 1 with several processes, with torch's ZeroRedundancyOptimizer: the parameters are split
    over the ranks (largest first, balanced by size) and each rank keeps fp32 master weights and
    AdamW moments for its share only, so that state shrinks as 1/N. Every rank still holds all
    bf16 weights and (for DDP) all gradients; after each step the owner of each parameter
    broadcasts its new bf16 value to the other ranks. state_dict() is this rank's share: a
    checkpoint holds one optimizer file per rank and resumes on the same number of ranks."""

    def __init__(self, params, lr: float):
        from torch.distributed.optim import ZeroRedundancyOptimizer  # imported by setup_distributed (see there)
        self.zero = ZeroRedundancyOptimizer(params, optimizer_class=MasterWeightAdamW, lr=lr, sharded=True)
        self.local = self.zero.optim  # this rank's MasterWeightAdamW

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.local.clip_grad_norm(max_norm)

    def step(self) -> None:
        self.zero.step()  # the local step, then every parameter broadcast from its owner

    def zero_grad(self) -> None:
        self.zero.zero_grad()
        self.local.zero_grad()

    def state_dict(self) -> dict:
        return self.local.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.local.load_state_dict(state)


def make_optimizer(model: nn.Module, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.shard_optimizer and dist.is_initialized():
        return ShardedMasterWeightAdamW(params, lr=cfg.learning_rate)
    return MasterWeightAdamW(params, lr=cfg.learning_rate)


def prompt_indices(num_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of a 0-based step, the same in every process: a seeded reshuffle of the data every
    epoch, so the order depends only on (seed, step) and a resumed run sees exactly the prompts it would have."""
    start = step * batch_size
    return [int(_epoch_order(num_examples, seed, p // num_examples)[p % num_examples]) for p in range(start, start + batch_size)]


@lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


# A step's completions are rows in prompt order (the num_generations rows of prompt 0, then of
# prompt 1, ...). The processes split them as evenly as possible, in order: 84 over 8 processes
# is 11, 11, 11, 11, 10, 10, 10, 10, so a group may straddle two processes. Each process
# generates, scores and back-propagates only its own rows; what needs whole groups (advantages,
# the logged rewards) is computed from rows gathered from every process.
def split_rows(rows: int, world_size: int) -> list[int]:
    """How many rows each process takes: the first rows % world_size processes one more."""
    return [rows // world_size + (rank < rows % world_size) for rank in range(world_size)]


def rows_of_this_process(rows: int) -> slice:
    rank, world = rank_and_world()
    counts = split_rows(rows, world)
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensors must live: the GPU for NCCL, the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows, concatenated in rank order (the tensor itself with one process). The
    processes may hold different row counts: each pads to the largest, and the padding is cut."""
    if not dist.is_initialized():
        return tensor
    device = collective_device(tensor.device)
    count = torch.tensor([len(tensor)], device=device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[:len(tensor)] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)


def all_reduce_sum(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """Each value summed (or reduced by `op`) over every process (the values themselves with one process)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_gather_list(items: list) -> list:
    """Every process's items (any picklable objects), concatenated in rank order."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True in every process when the flag is set in any."""
    return all_reduce_sum([float(flag)], device)[0] > 0


# The step's rollout. Without --dynamic_sampling: one generate call for the step's batch_size prompts x
# num_generations. With it (DAPO's dynamic sampling): a group whose completions all earned the same
# reward has zero advantages and carries no gradient, so it is dropped, and further calls of batch_size
# new prompts are made, at most --max_extra_rollouts, until batch_size groups have signal; if the bound
# comes first, the step is filled up with dropped groups in the order drawn. Extra prompts come from a
# generator seeded by (seed, step, call), so which prompts a step draws depends only on the seed and the
# step, and a resumed run draws the same. The kept rows are then split over the processes afresh.
def extra_prompt_indices(num_examples: int, step: int, call: int, batch_size: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, step, call])
    return [int(i) for i in rng.choice(num_examples, size=min(batch_size, num_examples), replace=False)]


def sample_step(model, tokenizer, train_examples: list[dict], cfg: Config, step: int, reward_funcs: dict,
                reward_weights: list[float], device: torch.device, decoding=None) -> dict:
    """This process's rows of the step: rollout, examples (one per row) and rows (its slice of the step's
    rows); the whole step's rewards_per_func; extra_rollouts, dropped_groups and generated_tokens."""
    draws, signal_groups = [], 0
    for call in range(1 + (cfg.max_extra_rollouts if cfg.dynamic_sampling else 0)):
        indices = (prompt_indices(len(train_examples), step - 1, cfg.batch_size, cfg.seed) if call == 0 else
                   extra_prompt_indices(len(train_examples), step, call, cfg.batch_size, cfg.seed))
        groups = [train_examples[i] for i in indices]
        rows = rows_of_this_process(len(groups) * cfg.num_generations)
        examples = [groups[row // cfg.num_generations] for row in range(rows.start, rows.stop)]
        rollout = generate_completions(model, tokenizer, [ex["prompt"] for ex in examples], cfg.temperature,
                                       cfg.max_completion_length, decoding)
        rewards_per_func = all_gather_rows(score_completions(reward_funcs, rollout["completions"], [ex["answer"] for ex in examples],
                                                             rollout["lengths"].tolist()).to(device)).cpu()
        draws.append({"groups": groups, "rollout": rollout, "examples": examples, "rows": rows,
                      "rewards_per_func": rewards_per_func})
        group_std = weighted_reward(rewards_per_func, reward_weights).view(-1, cfg.num_generations).std(dim=1)
        signal_groups += int((group_std > 1e-6).sum())
        if signal_groups >= cfg.batch_size:
            break
    generated_tokens = all_reduce_sum([float(sum(d["rollout"]["lengths"].sum() for d in draws))], device)[0]
    if not cfg.dynamic_sampling:
        return {**draws[0], "extra_rollouts": 0, "dropped_groups": 0, "generated_tokens": generated_tokens}
    # Keep the first batch_size groups with signal (then without, if short), in the order drawn.
    rewards_per_func = torch.cat([d["rewards_per_func"] for d in draws])
    groups = [group for d in draws for group in d["groups"]]
    has_signal = (weighted_reward(rewards_per_func, reward_weights).view(-1, cfg.num_generations).std(dim=1) > 1e-6).tolist()
    ranked = sorted(range(len(groups)), key=lambda g: not has_signal[g])  # stable: signal first, each in draw order
    kept = sorted(ranked[:cfg.batch_size])
    kept_rows = [g * cfg.num_generations + j for g in kept for j in range(cfg.num_generations)]
    rows = rows_of_this_process(len(kept_rows))
    every_row = gather_rollouts([d["rollout"] for d in draws], tokenizer.pad_token_id, device)
    return {"rollout": take_rows(every_row, kept_rows[rows]), "rows": rows,
            "examples": [groups[row // cfg.num_generations] for row in kept_rows[rows]],
            "rewards_per_func": rewards_per_func[kept_rows], "extra_rollouts": len(draws) - 1,
            "dropped_groups": len(groups) - len(kept), "generated_tokens": generated_tokens}


def gather_rollouts(rollouts: list[dict], pad_id: int, device: torch.device) -> dict:
    """One rollout of every row of several, from every process: each in rank order, one after the other,
    prompts left-padded and completions right-padded to common widths."""
    prompt_width, completion_width = (int(w) for w in all_reduce_sum(
        [max(r["prompt_ids"].shape[1] for r in rollouts), max(r["completion_ids"].shape[1] for r in rollouts)],
        device, op=dist.ReduceOp.MAX))
    parts = []
    for r in rollouts:
        grow_prompt, grow_completion = prompt_width - r["prompt_ids"].shape[1], completion_width - r["completion_ids"].shape[1]
        padded = {"prompt_ids": F.pad(r["prompt_ids"], (grow_prompt, 0), value=pad_id),
                  "prompt_mask": F.pad(r["prompt_mask"], (grow_prompt, 0)),
                  "completion_ids": F.pad(r["completion_ids"], (0, grow_completion), value=pad_id),
                  "completion_mask": F.pad(r["completion_mask"], (0, grow_completion)),
                  "lengths": r["lengths"], "truncated": r["truncated"]}
        parts.append({key: all_gather_rows(value) for key, value in padded.items()}
                     | {"completions": all_gather_list(r["completions"])})
    return {key: sum((p[key] for p in parts), []) if key == "completions" else torch.cat([p[key] for p in parts])
            for key in parts[0]}


def take_rows(rollout: dict, rows: list[int]) -> dict:
    """The given rows of a rollout, completions trimmed to the longest of them."""
    index = torch.tensor(rows, dtype=torch.long, device=rollout["prompt_ids"].device)
    taken = {key: [value[i] for i in rows] if key == "completions" else value[index] for key, value in rollout.items()}
    width = int(taken["lengths"].max())
    return {**taken, "completion_ids": taken["completion_ids"][:, :width], "completion_mask": taken["completion_mask"][:, :width]}


def make_reference(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if reference.is_activation_checkpointing:
        reference.activation_checkpointing_disable()
    return reference


def parallel_policy(model: nn.Module, device: torch.device) -> nn.Module:
    """The policy's PerTokenLogProbs, under DDP when there are several processes: each computes
    its own rows and the backward pass averages the gradients over processes."""
    policy = PerTokenLogProbs(model)
    if not dist.is_initialized():
        return policy
    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, not in a second copy
    return nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)




class TrainingStopped(Exception):
    """The run ended early (interrupt, repeated non-finite steps, a failed process); exit_code is its status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


STOP_SIGNALS: list[str] = []  # filled by the SIGINT/SIGTERM handler; checked after every step


def train_with_grpo(model, tokenizer, train_examples: list[dict], cfg: Config, run_dir: Path | None = None,
                    reward_funcs: dict | None = None, logger=None, reference_model: nn.Module | None = None,
                    resume_state: dict | None = None, eval_examples: list[dict] | None = None,
                    decoding: dict | None = None) -> nn.Module:
    """GRPO on train_examples; returns the trained model. reward_funcs defaults to cfg.reward_funcs
    from REWARD_FUNCS; logger (a RunLogger) records metrics; resume_state comes from load_checkpoint;
    with eval_examples, every cfg.eval_steps steps the model is evaluated on eval_subset of them;
    decoding ({"rollout", "eval"}: CompiledDecoding, from start_decoding) decodes them compiled."""
    if reward_funcs is None:
        reward_funcs, reward_weights = load_reward_funcs(cfg.reward_funcs, cfg.reward_weights, cfg.max_completion_length,
                                                         cfg.overlong_buffer)
    else:
        reward_weights = parse_reward_weights(cfg.reward_weights, len(reward_funcs))
    device = next(model.parameters()).device
    eval_indices = eval_subset(len(eval_examples), cfg.eval_subset_size) if eval_examples and cfg.eval_steps else []
    if cfg.gradient_checkpointing and not model.is_activation_checkpointing:  # once: each call adds a hook
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = make_optimizer(model, cfg)
    policy = parallel_policy(model, device)
    state = {"step": 0, "reference_step": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        state.update(resume_state["trainer_state"], nonfinite_in_a_row=0)  # a resume gets a fresh allowance
        restore_rng_state(resume_state["rng"])
    if cfg.beta > 0 and reference_model is None:
        reference_model = make_reference(model)
    total_steps = cfg.num_iterations * cfg.num_steps
    progress = tqdm(total=total_steps, initial=state["step"], desc="GRPO", disable=not is_main_process())

    for step in range(state["step"] + 1, total_steps + 1):
        if cfg.beta > 0 and step > 1 and (step - 1) % cfg.num_steps == 0:  # a new iteration starts
            reference_model, state["reference_step"] = make_reference(model), step - 1
        step_start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # Rollout and rewards: this process generates and scores its rows of the step; the rewards of
        # the whole step are gathered, so each group's advantages come from all of its completions.
        sampled = sample_step(model, tokenizer, train_examples, cfg, step, reward_funcs, reward_weights, device,
                              (decoding or {}).get("rollout"))
        rollout, rewards_per_func = sampled["rollout"], sampled["rewards_per_func"]
        rollout_time = time.perf_counter() - step_start
        rewards = weighted_reward(rewards_per_func, reward_weights)
        advantages = compute_group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)[sampled["rows"]].to(device)
        input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
        attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
        completion_mask, logits_to_keep = rollout["completion_mask"], rollout["completion_ids"].shape[1]
        if cfg.mask_truncated_completions:  # DAPO's overlong filtering: no loss on a completion cut off by the budget
            completion_mask = completion_mask * ~rollout["truncated"][:, None]

        # Old and reference log-probs, without grad. mu == 1: old == current, nothing to compute.
        reference_start = time.perf_counter()
        with torch.no_grad():
            old_log_probs = None if cfg.mu == 1 else compute_log_probs(
                policy, input_ids, attention_mask, logits_to_keep, cfg.temperature, cfg.micro_batch_size)
            ref_log_probs = None if cfg.beta == 0 else compute_log_probs(
                reference_model, input_ids, attention_mask, logits_to_keep, cfg.temperature, cfg.micro_batch_size)
        reference_time = time.perf_counter() - reference_start

        update_start = time.perf_counter()
        for _ in range(cfg.mu):
            update = grpo_update(policy, optimizer, cfg, input_ids, attention_mask, completion_mask, logits_to_keep,
                                 advantages, old_log_probs, ref_log_probs)
            state["skipped_steps"] += update.pop("skipped")
        state["nonfinite_in_a_row"] = state["nonfinite_in_a_row"] + 1 if update["nonfinite"] else 0
        update_time = time.perf_counter() - update_start
        state["step"] = step

        metrics = step_metrics(cfg, sampled, rewards, list(reward_funcs), update, state, device,
                               {"step_time": time.perf_counter() - step_start, "rollout_time": rollout_time,
                                "reference_time": reference_time, "update_time": update_time})
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}")
        if logger is not None:
            logger.log_step(metrics)
            if step % cfg.log_completions_steps == 0 or step == 1:
                logger.log_completions(step, sampled["examples"][0], rollout, rewards, rewards_per_func, list(reward_funcs),
                                       advantages)
        # Held-out evaluation after the step's update and before its checkpoint: a checkpoint at step s
        # then implies every evaluation up to s is on record, and a resume from s redoes those after s
        # (RunLogger drops their lines). Greedy decoding draws no random numbers: training is unchanged.
        if eval_indices and step % cfg.eval_steps == 0:
            evaluate_at_step(model, tokenizer, eval_examples, eval_indices, cfg, step, logger, (decoding or {}).get("eval"))

        stop_reason = None
        if state["nonfinite_in_a_row"] >= 3:
            stop_reason = ("stopped: 3 steps in a row had a non-finite loss or gradient norm (their updates were "
                           "skipped); the checkpoint holds the last good weights", 1)
        elif any_rank(stop_requested(), device):
            stop_reason = (f"interrupted ({STOP_SIGNALS[0] if STOP_SIGNALS else 'a signal to another process'}) "
                           f"after step {step}", 130)
        if run_dir is not None and (step % cfg.save_steps == 0 or stop_reason or step == total_steps):
            save_checkpoint(run_dir, model, optimizer, state, reference_model, cfg)
            if logger is not None:
                logger.draw_curves()
        if stop_reason:
            progress.close()
            raise TrainingStopped(*stop_reason)
    progress.close()
    return model


def grpo_update(policy, optimizer, cfg: Config, input_ids, attention_mask, completion_mask, logits_to_keep: int,
                advantages, old_log_probs, ref_log_probs) -> dict:
    """One optimizer step on the GRPO loss of the whole step's rows, accumulated over this process's
    micro-batches (and, under DDP, over processes). Each micro-batch's loss is weighted by its share
    of the whole step's denominator (loss_denominator summed over processes), times the process count
    because DDP averages gradients: the gradient is that of one process on the whole batch at once.
    A non-finite loss or gradient norm skips the step (counted and warned about)."""
    optimizer.zero_grad()
    world = rank_and_world()[1]
    # The whole step's denominator; 1 where it is 0 (no token left: --mask_truncated_completions on an all-truncated step).
    total = all_reduce_sum([loss_denominator(completion_mask, cfg.loss_type)], input_ids.device)[0] or 1.0
    loss_sum, metric_sums, entropy_sum, tokens = 0.0, {}, 0.0, 0.0
    starts = range(0, len(input_ids), cfg.micro_batch_size)
    for start in starts:
        part = slice(start, start + cfg.micro_batch_size)
        is_last = start == starts[-1]
        sync = policy.no_sync() if isinstance(policy, nn.parallel.DistributedDataParallel) and not is_last else nullcontext()
        with sync:
            log_probs, entropy = policy(input_ids[part], attention_mask[part], logits_to_keep, cfg.temperature, True)
            loss, metrics = grpo_loss(log_probs, None if old_log_probs is None else old_log_probs[part],
                                      None if ref_log_probs is None else ref_log_probs[part], advantages[part],
                                      completion_mask[part], epsilon=cfg.epsilon, beta=cfg.beta,
                                      epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                                      max_completion_length=cfg.max_completion_length,
                                      importance_sampling_level=cfg.importance_sampling_level)
            weight = loss_denominator(completion_mask[part], cfg.loss_type) * world / total
            (loss * weight).backward()
        part_tokens = float(completion_mask[part].sum())
        loss_sum += loss.item() * weight / world
        entropy_sum += float((entropy * completion_mask[part]).sum())
        for key, value in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + float(value) * part_tokens
        tokens += part_tokens
    grad_norm = float(optimizer.clip_grad_norm(cfg.max_grad_norm))
    # The step's loss and token means over every process, as one process would have computed them.
    loss_sum, entropy_sum, tokens, *sums = all_reduce_sum([loss_sum, entropy_sum, tokens, *metric_sums.values()],
                                                          input_ids.device)
    nonfinite = any_rank(not (math.isfinite(loss_sum) and math.isfinite(grad_norm)), input_ids.device)
    if nonfinite:
        optimizer.zero_grad()
        if is_main_process():
            tqdm.write(f"warning: non-finite loss ({loss_sum}) or gradient norm ({grad_norm}); optimizer step skipped")
    else:
        optimizer.step()
    return {"loss": loss_sum, "grad_norm": grad_norm, "entropy": entropy_sum / max(tokens, 1.0), "nonfinite": nonfinite,
            "skipped": int(nonfinite), **{key: value / max(tokens, 1.0) for key, value in zip(metric_sums, sums)}}


def step_metrics(cfg: Config, sampled: dict, rewards: torch.Tensor, func_names: list[str], update: dict,
                 state: dict, device: torch.device, timings: dict) -> dict:
    """The step's curves, named like TRL's, over the whole step's completions (the rewards are already
    gathered; lengths are gathered here), so they are the same however many processes ran. rewards is the
    weighted sum of sampled["rewards_per_func"]; tokens_per_second counts every generated token."""
    rewards_per_func = sampled["rewards_per_func"]
    lengths, truncated = all_gather_rows(torch.stack([sampled["rollout"]["lengths"].float(),
                                                      sampled["rollout"]["truncated"].float()], dim=1)).cpu().T
    group_std = rewards.view(-1, cfg.num_generations).std(dim=1)
    metrics = {"step": state["step"], "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
               **{f"rewards/{name}": rewards_per_func[:, i].mean().item() for i, name in enumerate(func_names)},
               "frac_reward_zero_std": (group_std < 1e-6).float().mean().item(),
               "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
               "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated.mean().item(),
               **{key: update[key] for key in ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                                               "clip_ratio/region_mean")},
               "grad_norm": update["grad_norm"], "learning_rate": cfg.learning_rate,
               "skipped_steps": state["skipped_steps"], **timings,
               "tokens_per_second": sampled["generated_tokens"] / max(timings["rollout_time"], 1e-9)}
    if cfg.dynamic_sampling:
        metrics.update({"dynamic_sampling/extra_rollouts": sampled["extra_rollouts"],
                        "dynamic_sampling/dropped_groups": sampled["dropped_groups"]})
    if device.type == "cuda":
        metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return metrics


# %% Checkpoints and the run record
# A checkpoint holds what an exact resume needs: weights, optimizer (with fp32 master weights),
# step counters, every rank's RNG states and, when it is no longer the starting model, the
# reference model. It is written to a temporary folder and renamed into place, so a kill during
# a save leaves either the previous checkpoint or the new one, never a broken one.
def save_checkpoint(run_dir: Path, model, optimizer, state: dict, reference_model, cfg: Config) -> None:
    final, temporary, previous = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    rank = rank_and_world()[0]
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    torch.save(capture_rng_state(), temporary / f"rng_rank{rank}.pt")
    sharded = isinstance(optimizer, ShardedMasterWeightAdamW)
    if sharded or rank == 0:  # sharded: each rank holds the state of its own share of the parameters
        torch.save(optimizer.state_dict(), temporary / optimizer_file(rank, sharded))
    if rank == 0:
        model.save_pretrained(temporary / "model")
        if cfg.beta > 0 and state["reference_step"] > 0:
            reference_model.save_pretrained(temporary / "reference_model")
    barrier()
    if rank == 0:
        (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))  # written last: marks it complete
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        temporary.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    barrier()


def find_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of a run (the previous one if a save was cut off mid-swap)."""
    for candidate in (run_dir / "checkpoint", run_dir / "checkpoint.old"):
        if (candidate / "trainer_state.json").is_file():
            return candidate
    return None


def optimizer_file(rank: int, sharded: bool) -> str:
    return f"optimizer_rank{rank}.pt" if sharded else "optimizer.pt"


def load_checkpoint(checkpoint: Path) -> dict:
    rank = rank_and_world()[0]
    sharded = not (checkpoint / optimizer_file(0, sharded=False)).exists()
    return {"trainer_state": json.loads((checkpoint / "trainer_state.json").read_text()),
            "optimizer": torch.load(checkpoint / optimizer_file(rank, sharded), map_location="cpu", weights_only=False),
            "rng": torch.load(checkpoint / f"rng_rank{rank}.pt", weights_only=False)}


def capture_rng_state() -> dict:
    """Every generator a step draws from: Python, NumPy, torch's CPU one and this process's GPU's."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def restore_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file; a torn last line (power loss mid-write) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def append_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


# Drawing curves.png takes about a second (matplotlib). During training it is drawn at the first checkpoint,
# then at a checkpoint only when the last drawing is this old: a GSM8K run (many minutes between checkpoints)
# still redraws at every one, a short CPU run no longer pays a second per checkpoint. The end of the run (or an
# early stop) always draws it.
CURVES_MIN_INTERVAL_S = 600


class RunLogger:
    """Everything a person reads about a run: metrics.jsonl (one line per step), completions.jsonl
    (samples with their rewards), eval_steps.jsonl (one line per periodic evaluation), wandb (offline
    when no login is found; it never prompts), and curves.png. Only the main process has one."""

    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None, memory_budget_gb: float | None = None):
        self.run_dir, self.cfg = run_dir, cfg
        self.memory_budget_gb, self.steps_logged = memory_budget_gb, 0
        self.last_drawn = None  # time.monotonic() of the last curves.png
        if resume_step is not None:  # drop lines of steps after the checkpoint: they will be redone
            for name in ("metrics.jsonl", "completions.jsonl", "eval_steps.jsonl"):
                write_jsonl(run_dir / name, [r for r in read_jsonl(run_dir / name) if r["step"] <= resume_step])
        self.wandb_run = self._start_wandb() if cfg.report_to == "wandb" else None

    def _start_wandb(self):
        import wandb
        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if wandb_credentials_found() else "offline"
            if mode == "offline":
                print(f"wandb: no API key or login found, logging offline; upload later with: "
                      f"wandb sync {self.run_dir / 'wandb'}/offline-run-*")
        id_file = self.run_dir / "wandb_run_id.txt"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(8))
        return wandb.init(project=self.cfg.wandb_project, name=self.run_dir.name, id=id_file.read_text().strip(),
                          resume="allow", dir=str(self.run_dir), config=asdict(self.cfg), mode=mode)

    def log_step(self, metrics: dict) -> None:
        self.steps_logged += 1
        if "gpu_memory_gb" in metrics and self.steps_logged <= 3:  # measured next to the start-up estimate
            tqdm.write(f"step {metrics['step']}: peak GPU memory {metrics['gpu_memory_gb']:.1f} GB measured, "
                       f"{self.memory_budget_gb:.1f} GB estimated")
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}
        append_jsonl(self.run_dir / "metrics.jsonl", [finite])  # NaN is not JSON: a skipped step logs null
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def log_completions(self, step: int, example: dict, rollout: dict, rewards, rewards_per_func, func_names, advantages,
                        count: int = 4) -> None:
        """A few completions of the step's first prompt, with the reward (the weighted sum), each function's
        reward and the advantage."""
        rows = [{"step": step, "question": example["question"], "answer": example["answer"],
                 "completion": rollout["completions"][i], "reward": float(rewards[i]),
                 **{f"rewards/{name}": float(rewards_per_func[i, j]) for j, name in enumerate(func_names)},
                 "advantage": float(advantages[i])} for i in range(min(count, len(rollout["completions"])))]
        append_jsonl(self.run_dir / "completions.jsonl", rows)
        if self.wandb_run is not None:
            import wandb
            table = wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            self.wandb_run.log({"completions": table}, step=step)

    def log_eval(self, record: dict) -> None:
        """A periodic evaluation (see evaluate_at_step): a line of eval_steps.jsonl, eval/* curves in wandb."""
        append_jsonl(self.run_dir / "eval_steps.jsonl", [record])
        if self.wandb_run is not None:
            keys = ("accuracy", "strict_accuracy", "format_rate", "truncation_rate", "seconds")
            self.wandb_run.log({f"eval/{key}": record[key] for key in keys}, step=record["step"])

    def log_summary(self, summary: dict) -> None:
        if self.wandb_run is not None:
            for when in ("before", "after"):
                for key in ("accuracy", "strict_accuracy", "format_rate", "truncation_rate"):
                    if when in summary:
                        self.wandb_run.summary[f"eval/{when}_{key}"] = summary[when][key]

    def draw_curves(self, final: bool = False) -> None:
        """curves.png now if final, else only when the last drawing is CURVES_MIN_INTERVAL_S old (or none yet)."""
        if not final and self.last_drawn is not None and time.monotonic() - self.last_drawn < CURVES_MIN_INTERVAL_S:
            return
        plot_curves(self.run_dir)
        self.last_drawn = time.monotonic()

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_credentials_found() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def plot_curves(run_dir: Path) -> None:
    """curves.png: reward (total and per function), held-out accuracy (periodic on the subset, before
    and after on the full split), KL, completion length and clipped ratio, share of groups without
    signal, step time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    evaluations = read_jsonl(run_dir / "eval_steps.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    steps = [r["step"] for r in records]
    series = lambda key: [float("nan") if r.get(key) is None else r[key] for r in records]  # noqa: E731
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    (reward_ax, accuracy_ax, kl_ax), (length_ax, signal_ax, time_ax) = axes
    reward_ax.plot(steps, series("reward"), label="total", linewidth=2)
    for key in sorted({k for r in records for k in r if k.startswith("rewards/")}):
        reward_ax.plot(steps, series(key), label=key.split("/", 1)[1], alpha=0.7)
    reward_ax.set_title("reward (mean per completion)")
    reward_ax.legend(fontsize=8)
    # Periodic evaluations as lines; the full split's before (step 0) and after (last step) as squares.
    full = [(0, summary["before"])] if "before" in summary else []
    full += [(steps[-1], summary["after"])] if "after" in summary and steps else []
    for key, color in (("accuracy", "tab:blue"), ("strict_accuracy", "tab:orange")):
        if evaluations:
            accuracy_ax.plot([e["step"] for e in evaluations], [e[key] for e in evaluations], "o-", color=color,
                             markersize=3, label=f"{key}, subset of {evaluations[0]['n']}")
        if full:
            accuracy_ax.plot([step for step, _ in full], [result[key] for _, result in full], "s", color=color, markersize=8,
                             markerfacecolor="none", label=f"{key}, all {full[0][1]['n']}, before/after")
    accuracy_ax.set_ylim(-0.02, 1.02)  # points at 0 and 1 stay visible
    accuracy_ax.set_title("held-out accuracy (greedy)")
    accuracy_ax.legend(fontsize=8)
    kl_ax.plot(steps, series("kl"))
    kl_ax.set_title("KL to reference")
    length_ax.plot(steps, series("completions/mean_length"), label="mean length")
    length_ax.set_title("completion length (tokens)")
    clipped_ax = length_ax.twinx()
    clipped_ax.plot(steps, series("completions/clipped_ratio"), color="tab:red", label="clipped ratio")
    clipped_ax.set_ylim(0, 1)
    length_ax.legend(handles=length_ax.lines + clipped_ax.lines, fontsize=8)
    signal_ax.plot(steps, series("frac_reward_zero_std"))
    signal_ax.set_ylim(0, 1)
    signal_ax.set_title("frac_reward_zero_std (groups with no signal)")
    time_ax.plot(steps, series("step_time"), label="step")
    time_ax.plot(steps, series("rollout_time"), label="rollout")
    time_ax.set_title("seconds per step")
    time_ax.legend(fontsize=8)
    for ax in (reward_ax, accuracy_ax, kl_ax, length_ax, signal_ax, time_ax):
        ax.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(run_dir / "curves.png", dpi=80)
    plt.close(figure)


# %% Memory budget
# What each GPU must hold, estimated before anything runs (from the loaded model, the process count
# and the flags) so a run says up front whether it fits. Always resident: the weights, fp32 master
# weights and AdamW's two fp32 moments (1/N of them with --shard_optimizer over N processes), the
# reference model, and with compiled decoding (on by default on GPUs) its two static KV caches, kept for
# the whole run. On top, the larger of two peaks: generation (eager decoding's KV cache of this
# process's rollout or evaluation rows) and the loss pass (the gradients plus one micro-batch's
# activations: the kept logits and their gradient, the checkpointed layer inputs, one layer being
# recomputed). The activation and cache figures are estimates, not measurements.
def memory_budget(model: nn.Module, cfg: Config, world_size: int, prompt_tokens: int,
                  eval_prompt_tokens: int | None = None) -> dict:
    """Estimated bytes per GPU, one process per GPU, from the longest train and eval prompts (eval: the
    train one when not given); `model` may live on the meta device."""
    model_config, dtype = model.config, next(model.parameters()).dtype
    weight_bytes = torch.finfo(dtype).bits // 8
    params, shards = sum(p.numel() for p in model.parameters()), world_size if cfg.shard_optimizer and world_size > 1 else 1
    hidden, layers, vocab = model_config.hidden_size, model_config.num_hidden_layers, model_config.vocab_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    kv_bytes_per_token = 2 * layers * model_config.num_key_value_heads * head_dim * weight_bytes
    rollout_rows = math.ceil(cfg.batch_size * cfg.num_generations / world_size)
    rollout_tokens = rollout_rows * (prompt_tokens + cfg.max_completion_length)
    eval_tokens = cfg.eval_batch_size * ((eval_prompt_tokens or prompt_tokens) + cfg.eval_max_new_tokens)
    kv_cache = kv_bytes_per_token * max(rollout_tokens, eval_tokens)
    static_kv_cache = 0  # a GPU's budget: there --compile_generation auto may compile both
    if cfg.compile_generation != "false":
        static_kv_cache, kv_cache = kv_bytes_per_token * (rollout_tokens + eval_tokens), 0
    micro_batch = min(cfg.micro_batch_size, rollout_rows)  # a process never holds more rows than it generated
    tokens = micro_batch * (prompt_tokens + cfg.max_completion_length)
    layer_activations = tokens * (6 * hidden + 4 * model_config.intermediate_size) * weight_bytes
    activations = (2 * micro_batch * (cfg.max_completion_length + 1) * vocab * weight_bytes
                   + (layers * tokens * hidden * weight_bytes + layer_activations if cfg.gradient_checkpointing
                      else layers * layer_activations))
    fp32_copies = 0 if dtype == torch.float32 else 4 * params / shards  # master weights, and their gradients
    budget = {"weights": params * weight_bytes, "master_weights": fp32_copies, "optimizer_state": 8 * params / shards,
              "reference_model": params * weight_bytes if cfg.beta > 0 else 0,
              "static_kv_cache": static_kv_cache, "gradients": params * weight_bytes + fp32_copies,
              "activations": activations, "kv_cache": kv_cache}
    resident = sum(budget[k] for k in ("weights", "master_weights", "optimizer_state", "reference_model", "static_kv_cache"))
    budget["peak"] = resident + max(kv_cache, budget["gradients"] + activations)
    return {key: int(value) for key, value in budget.items()}


def memory_advice(model: nn.Module, cfg: Config, world_size: int, prompt_tokens: int, gpu_memory_gb: float) -> str:
    """What to change when the budget does not fit GPUs of gpu_memory_gb, each option with its peak."""
    def option(flag: str, changed: Config, world: int) -> str | None:
        peak = memory_budget(model, changed, world, prompt_tokens)
        return f"{flag} (peak ~{peak['peak'] / 1e9:.1f} GB per GPU)" if expected_to_fit(peak, gpu_memory_gb) else None

    def first(candidates):
        return next((candidate for candidate in candidates if candidate), None)

    options = [
        option("--shard_optimizer True", replace(cfg, shard_optimizer=True), world_size)
        if world_size > 1 and not cfg.shard_optimizer else None,
        first(option(f"--micro_batch_size {m}", replace(cfg, micro_batch_size=m), world_size)  # the largest that fits
              for m in range(cfg.micro_batch_size - 1, 0, -1)),
        option("--compile_generation false", replace(cfg, compile_generation="false"), world_size)
        if cfg.compile_generation != "false" else None,
        first(option(f"{w} GPUs", replace(cfg, shard_optimizer=True), w) for w in (2, 4, 8, 16, 32, 64) if w > world_size),
    ]
    options = [o for o in options if o]
    if not options:
        return "to fit: no single change found; lower --num_generations or --max_completion_length, or use larger GPUs"
    return "to fit: " + "; or ".join(options)


def memory_report(budget: dict, gpu_memory_gb: float | None) -> str:
    """The budget in one line, and whether it fits a GPU of gpu_memory_gb (expected_to_fit keeps 10%
    free for the CUDA context and allocator fragmentation)."""
    gb = {key: value / 1e9 for key, value in budget.items()}
    parts = " + ".join(f"{key.replace('_', ' ')} {gb[key]:.2f}" for key in
                       ("weights", "master_weights", "optimizer_state", "reference_model", "static_kv_cache"))
    generation = f"the larger of generation (KV cache {gb['kv_cache']:.2f}) and " if budget["kv_cache"] else ""
    line = (f"memory budget per GPU (GB, estimated): {parts} resident; then {generation}the loss pass (gradients "
            f"{gb['gradients']:.2f} + activations {gb['activations']:.2f}): peak {gb['peak']:.2f}")
    if gpu_memory_gb is not None:
        line += f" | {gpu_memory_gb:.0f} GB GPUs: " + ("expected to fit" if expected_to_fit(budget, gpu_memory_gb)
                                                      else "expected NOT to fit")
    return line


def expected_to_fit(budget: dict, gpu_memory_gb: float) -> bool:
    return budget["peak"] / 1e9 <= 0.9 * gpu_memory_gb


# %% 8. Main: evaluate before, train, evaluate after, save, write the run record
def parse_config(argv: list[str] | None) -> Config:
    parser = HfArgumentParser(Config, description="GRPO from scratch: Qwen2.5-1.5B-Instruct on GSM8K.")

    def refuse(message: str):
        raise ConfigError(message)

    parser.error = refuse  # argparse would print the whole usage; one line naming the flag is enough
    cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ConfigError(f"unknown argument(s): {' '.join(unknown)} (see --help)")
    return cfg


def resolve_run_dir(cfg: Config) -> Path:
    """The run folder: a new one for a fresh run (never an existing run's), or the run to resume."""
    output_dir = Path(cfg.output_dir)
    if cfg.resume:  # any run folder with a config.json; without a checkpoint yet, training restarts at step 0
        if cfg.run_name is None:
            runs = [d for d in output_dir.glob("*") if (d / "config.json").is_file()] if output_dir.is_dir() else []
            if not runs:
                raise ConfigError(f"--resume: no run under {output_dir}/")
            return max(runs, key=lambda d: max(entry.stat().st_mtime for entry in d.iterdir()))
        if not (output_dir / cfg.run_name / "config.json").is_file():
            raise ConfigError(f"--resume: {output_dir / cfg.run_name} holds no run (no config.json)")
        return output_dir / cfg.run_name
    name = cfg.run_name or f"{Path(cfg.model_name_or_path).name}-grpo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = output_dir / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--run_name {name}: {run_dir} already holds a run; add --resume to continue it or choose another --run_name")
    return run_dir


def check_resume_compatible(cfg: Config, run_dir: Path, world_size: int) -> None:
    saved = json.loads((run_dir / "config.json").read_text())
    changed = [f"--{f.name}" for f in fields(Config)
               if f.name not in RESUME_MAY_CHANGE and saved.get(f.name) != getattr(cfg, f.name)]
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {run_dir}; resume with the original values")
    # Each rank's prompts, RNG state and (sharded) optimizer state belong to its rank number.
    if saved["world_size"] != world_size:
        raise ConfigError(f"--resume: the run in {run_dir} was trained by {saved['world_size']} process(es) and this "
                          f"launch has {world_size}; resume it with --num_processes {saved['world_size']} "
                          f"(under torchrun: --nproc_per_node {saved['world_size']})")


def agree_on_rank0(compute):
    """Run compute() on rank 0 and hand its result (or its ConfigError) to every rank."""
    if not dist.is_initialized():
        return compute()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", compute())]
        except ConfigError as error:
            box = [("error", str(error))]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise ConfigError(value)
    return value


def load_model(path: str, dtype: torch.dtype, attn: str, device: torch.device, flag: str = "--model_name_or_path"):
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{flag} {path}: could not load the model ({first_line(error)})") from error
    return model.to(device)


def load_tokenizer(path: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model_name_or_path {path}: could not load the tokenizer ({first_line(error)})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def parameter_checksum(model: nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on all ranks when DDP kept the replicas in sync."""
    import hashlib
    digest = hashlib.sha256()
    for tensor in model.parameters():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# Stopping cleanly. SIGINT/SIGTERM to a training process let the current step finish, then every
# process saves its part of one checkpoint and exits with status 130; a second signal aborts at once
# (the last checkpoint stays intact, its saves are atomic). Processes started by launch_processes
# below run in sessions of their own, so Ctrl-C reaches only their launcher, which asks them to stop
# by writing the file named by STOP_FILE_ENV; they look for it after every step.
STOP_FILE_ENV = "GRPO_STOP_FILE"


def stop_requested() -> bool:
    stop_file = os.environ.get(STOP_FILE_ENV)
    if not STOP_SIGNALS and stop_file and os.path.exists(stop_file):
        STOP_SIGNALS.append(Path(stop_file).read_text().strip())
    return bool(STOP_SIGNALS)


@contextmanager
def stop_after_step():
    def handler(signum, frame):
        if stop_requested():
            raise KeyboardInterrupt
        STOP_SIGNALS.append(signal.Signals(signum).name)
        if is_main_process() and STOP_FILE_ENV not in os.environ:  # else the launcher said it
            tqdm.write(f"{STOP_SIGNALS[0]}: stopping after this step and saving a checkpoint (Ctrl-C again aborts now)")
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def without_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the given --flags: `--name value`, `--name=value`, or a bare boolean `--name`."""
    kept, i = [], 0
    while i < len(argv):
        name = argv[i].removeprefix("--").split("=", 1)[0]
        if argv[i].startswith("--") and name in names:
            takes_value = "=" not in argv[i] and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i += 2 if takes_value else 1
            continue
        kept.append(argv[i])
        i += 1
    return kept


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The same command with --run_name pointing at this run, plus --resume."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc_per_node", str(world)] if world > 1 and STOP_FILE_ENV not in os.environ else ["python"]
    return shlex.join([*launcher, "grpo_from_scratch.py", *without_flags(argv, ("run_name", "resume")),
                       "--run_name", run_dir.name, "--resume"])


def run(cfg: Config, argv: list[str]) -> dict:
    """The whole run in this process (one of several under a launcher): evaluate, train, evaluate, save."""
    rank, world_size, device = setup_distributed()
    if STOP_FILE_ENV in os.environ:
        exit_with_the_launcher()
    if rank > 0:  # one process draws the progress bars (transformers' loading bars too)
        transformers.utils.logging.disable_progress_bar()
    seed_everything(cfg.seed + rank)
    run_dir = Path(agree_on_rank0(lambda: str(resolve_run_dir(cfg))))
    checkpoint = find_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume:
        check_resume_compatible(cfg, run_dir, world_size)
    resume_state = load_checkpoint(checkpoint) if checkpoint else None

    # Data first (cheap, and bad files are refused before the model loads), then the model.
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    train_examples = load_gsm8k("train", tokenizer, cfg.dataset_name, cfg.dataset_config, cfg.train_file, "--train_file")
    eval_examples = load_gsm8k("test", tokenizer, cfg.dataset_name, cfg.dataset_config, cfg.eval_file, "--eval_file")
    eval_examples = eval_examples[:cfg.num_eval_examples or None]
    context = AutoConfig.from_pretrained(cfg.model_name_or_path).max_position_embeddings
    train_examples = drop_overlong_prompts(train_examples, tokenizer, context, cfg.max_completion_length, "train")
    eval_examples = drop_overlong_prompts(eval_examples, tokenizer, context, cfg.eval_max_new_tokens, "eval")
    dtype, attn = resolve_dtype(cfg, device), resolve_attention(cfg, device)
    model = load_model(str(checkpoint / "model") if checkpoint else cfg.model_name_or_path, dtype, attn, device)
    reference_model = None
    if checkpoint and cfg.beta > 0:  # the reference is the model at the start of the current iteration
        reference_step = resume_state["trainer_state"]["reference_step"]
        source = str(checkpoint / "reference_model") if reference_step > 0 else cfg.model_name_or_path
        reference_model = make_reference(load_model(source, dtype, attn, device))
    prompt_tokens = max(prompt_lengths(train_examples, tokenizer))
    budget = memory_budget(model, cfg, world_size, prompt_tokens, max(prompt_lengths(eval_examples, tokenizer)))
    gpu_memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else None
    is_main = rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"run folder {run_dir} | {world_size} process(es), one {device.type} device each | "
              f"dtype {str(dtype).removeprefix('torch.')} | attention {attn} | "
              f"{len(train_examples)} train / {len(eval_examples)} eval questions"
              + (f" | resuming from {checkpoint or 'step 0 (no checkpoint yet)'}" if cfg.resume else ""))
        print(memory_report(budget, gpu_memory_gb))
        if gpu_memory_gb is not None and not expected_to_fit(budget, gpu_memory_gb):
            print(memory_advice(model, cfg, world_size, prompt_tokens, gpu_memory_gb))
    # Compiled decoding compiles, checks and times itself here, before the first evaluation.
    graphs_at_start = compiled_graph_count()
    decoding = start_decoding(model, tokenizer, cfg, train_examples, eval_examples)
    fallbacks = {d.fallback for d in decoding.values() if d.fallback}
    if fallbacks and fallbacks != {"another process could not compile"}:  # each process that failed says why
        print(f"{f'rank {rank}: ' if world_size > 1 else ''}warning: compiled decoding (--compile_generation "
              f"{cfg.compile_generation}) is not possible here, decoding eagerly: {', '.join(sorted(fallbacks))}")
    if is_main:
        print(decoding_line(decoding, cfg))
    if is_main and not cfg.resume:
        (run_dir / "config.json").write_text(json.dumps(
            {**asdict(cfg), "run_name": run_dir.name, "world_size": world_size,
             "memory_budget_bytes": budget, "gpu_memory_gb": gpu_memory_gb, "longest_train_prompt_tokens": prompt_tokens,
             "resolved_dtype": str(dtype).removeprefix("torch."), "resolved_attn_implementation": attn,
             "decoding": decoding_record(decoding),
             "torch_version": torch.__version__, "transformers_version": transformers.__version__},
            indent=2))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if cfg.resume and summary_path.exists() else {}
    resume_step = resume_state["trainer_state"]["step"] if checkpoint else 0
    logger = RunLogger(run_dir, cfg, resume_step if cfg.resume else None, budget["peak"] / 1e9) if is_main else None
    started = time.perf_counter()

    def evaluate_and_record(when: str) -> None:
        result = evaluate_model(model, tokenizer, eval_examples, cfg.eval_batch_size, cfg.eval_max_new_tokens, f"eval {when}",
                                decoding.get("eval"))
        if is_main:
            write_jsonl(run_dir / f"eval_{when}.jsonl", result.pop("records"))
            summary[when] = result
            summary_path.write_text(json.dumps(summary, indent=2))
            logger.log_summary(summary)
            print(f"eval {when}: accuracy {result['accuracy']:.3f} (strict {result['strict_accuracy']:.3f}), "
                  f"format {result['format_rate']:.3f}, truncated {result['truncation_rate']:.3f}, n={result['n']}")

    if "before" in summary:
        print(f"eval before: reusing {summary_path} (accuracy {summary['before']['accuracy']:.3f})") if is_main else None
    else:
        evaluate_and_record("before")
    with stop_after_step():
        try:
            train_with_grpo(model, tokenizer, train_examples, cfg, run_dir, logger=logger, reference_model=reference_model,
                            resume_state=resume_state, eval_examples=eval_examples, decoding=decoding)
        except TrainingStopped as stopped:
            if is_main:
                logger.draw_curves(final=True)
            raise TrainingStopped(f"{stopped}; checkpoint in {run_dir / 'checkpoint'}; resume with:\n  "
                                  f"{resume_command(argv, run_dir)}", stopped.exit_code) from None
    evaluate_and_record("after")

    checksums = all_gather_list([parameter_checksum(model)])
    if is_main:
        records = read_jsonl(run_dir / "metrics.jsonl")
        rollout_seconds = sum(r["rollout_time"] for r in records)
        tokens = sum(r["tokens_per_second"] * r["rollout_time"] for r in records)
        summary.update({"steps": len(records), "world_size": world_size, "train_seconds": sum(r["step_time"] for r in records),
                        "tokens_per_second": tokens / max(rollout_seconds, 1e-9), "replica_checksums": checksums,
                        "decoding": decoding_record(decoding), "compiled_graphs": compiled_graph_count() - graphs_at_start,
                        "wall_seconds_this_process": time.perf_counter() - started})
        evaluations = read_jsonl(run_dir / "eval_steps.jsonl")
        if evaluations:  # the best periodic evaluation (the earliest on ties) and the last one
            best = max(evaluations, key=lambda e: e["accuracy"])
            summary["eval_steps"] = {name: {key: e[key] for key in ("step", "accuracy", "strict_accuracy", "n")}
                                     for name, e in (("best", best), ("last", evaluations[-1]))}
        summary_path.write_text(json.dumps(summary, indent=2))
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        logger.draw_curves(final=True)
        logger.finish()
        print_final_table(summary, run_dir, "GSM8K test" if cfg.eval_file is None else Path(cfg.eval_file).name)
    return summary


def print_final_table(summary: dict, run_dir: Path, eval_set: str) -> None:
    """Accuracy before and after on the full split; with --eval_steps, the best and the last periodic
    evaluation on the subset below them."""
    rows = [(f"{when} (n={summary[when]['n']})", summary[when]) for when in ("before", "after")]
    periodic = summary.get("eval_steps", {})
    rows += [(f"{name}: step {result['step']} (n={result['n']})", result) for name, result in periodic.items()]
    print("\n" + "-" * 68)
    print(f"{eval_set + ' (greedy)':<22}{'accuracy [95% CI]':>24}{'strict [95% CI]':>22}")
    for label, result in rows:
        cells = []
        for key in ("accuracy", "strict_accuracy"):
            low, high = wilson_interval(round(result[key] * result["n"]), result["n"])
            cells.append(f"{result[key]:.3f} [{low:.3f}, {high:.3f}]")
        print(f"{label:<22}{cells[0]:>24}{cells[1]:>22}")
    if periodic:
        print("best/last: periodic evaluations on a fixed subset; the best of several noisy points reads high")
    print(f"steps {summary['steps']} | training {summary['train_seconds'] / 60:.1f} min | "
          f"rollout {summary['tokens_per_second']:.0f} tokens/s | run folder {run_dir}")
    print("-" * 68)


# %% Launching one process per GPU
# Plain `python grpo_from_scratch.py` with N > 1 processes re-runs this script N times under torch's
# elastic launcher (what `torchrun --standalone --nproc_per_node N` does: a rendezvous on a free
# local port, RANK/WORLD_SIZE/LOCAL_RANK for each process) and waits. Before that it refuses bad
# flags, data files and resumes in one line, without starting anything. It owns the terminal's
# signals (see stop_after_step); when a process fails, the launcher stops the others within seconds
# (SIGTERM, then SIGKILL after LAUNCHER_SHUTDOWN_SECONDS), so no process is left in a collective
# waiting for a peer that is gone. The exit status is the run's: 0, 2 bad input, 130 stopped, 1 failed.
LAUNCHER_SHUTDOWN_SECONDS = 10
# With several processes, one that fails waits this long before saying why: if another process failed
# first, the launcher stops this one (SIGTERM) meanwhile, so the first failure is reported, not the
# "connection closed by peer" errors it caused in the others.
FAILURE_GRACE_SECONDS = 3


def launch_processes(cfg: Config, argv: list[str], world_size: int) -> dict:
    """Runs the training in world_size processes and returns the run's summary."""
    import logging
    import tempfile
    import uuid
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    run_dir = resolve_run_dir(cfg)
    if cfg.resume:
        check_resume_compatible(cfg, run_dir, world_size)
    for flag in ("train_file", "eval_file"):
        if getattr(cfg, flag) is not None:
            read_jsonl_rows(getattr(cfg, flag), f"--{flag}")
    worker_argv = [*without_flags(argv, ("run_name",)), "--run_name", run_dir.name]  # one folder for every process
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          signals_to_handle="SIGHUP,SIGQUIT", shutdown_timeout=LAUNCHER_SHUTDOWN_SECONDS)
    stop_file = Path(tempfile.mkdtemp(prefix="grpo-launcher-")) / "stop"

    def ask_to_stop(signum, frame):
        if stop_file.exists():
            raise KeyboardInterrupt  # the launcher stops every process now (they abort: a second signal)
        stop_file.write_text(f"{signal.Signals(signum).name} to the launcher")
        print(f"{signal.Signals(signum).name}: every process stops after this step and saves a checkpoint "
              f"(Ctrl-C again aborts now)", file=sys.stderr)

    environment = {STOP_FILE_ENV: str(stop_file), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))}  # as torchrun: no oversubscribed CPU
    saved_environment = {key: os.environ.get(key) for key in environment}
    saved_handlers = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    elastic_logger = logging.getLogger("torch.distributed.elastic")
    saved_level = elastic_logger.level
    elastic_logger.setLevel(logging.CRITICAL)  # its per-process failure reports; the outcome is reported below
    os.environ.update(environment)
    try:
        elastic_launch(launch, sys.executable)(str(Path(__file__).resolve()), *worker_argv)
    except ChildFailedError as failed:
        raise TrainingStopped(*launch_outcome(failed.failures, stop_file.exists())) from None
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        for key, value in saved_environment.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
        elastic_logger.setLevel(saved_level)
        shutil.rmtree(stop_file.parent, ignore_errors=True)
    return json.loads((run_dir / "summary.json").read_text())


def launch_outcome(failures: dict, stop_asked: bool) -> tuple[str, int]:
    """(message, exit status) of a launch in which some process did not exit 0. A process that printed
    its own line (an error, a refusal, the resume command) leaves the message empty; only a process
    killed by a signal it did not handle (SIGKILL, the kernel's out-of-memory killer) is named here.
    Processes the launcher itself stopped (SIGTERM) are not the cause."""
    codes = {rank: failure.exitcode for rank, failure in failures.items()}
    killed = {rank: failure for rank, failure in failures.items() if failure.exitcode < 0
              and failure.exitcode != -signal.SIGTERM}
    if killed:
        rank, failure = min(killed.items())
        return (f"error: rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}; the launcher stopped "
                f"every other process. The last checkpoint is intact: resume with --resume", 1)
    if any(code not in (130, -signal.SIGTERM) for code in codes.values()):
        return "", 2 if 2 in codes.values() and 1 not in codes.values() else 1
    return "", 130 if stop_asked or 130 in codes.values() else 1


def exit_with_the_launcher() -> None:
    """A process started by launch_processes ends when its launcher does (killed with SIGKILL, say):
    left running, it would go on writing into the run folder, which a resumed run then writes too."""
    import threading
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-the-launcher").start()


def report_failure(error: Exception, cfg: Config | None) -> None:
    """With several processes, an unexpected exception is one line naming the rank (N tracebacks would
    bury the one that matters); the traceback goes to error_rank<r>.txt in the run folder."""
    import traceback
    time.sleep(FAILURE_GRACE_SECONDS)
    rank = rank_and_world()[0]
    run_dir = Path(cfg.output_dir) / cfg.run_name if cfg is not None and cfg.run_name else None
    detail = ""
    if run_dir is not None and run_dir.is_dir():
        (run_dir / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        detail = f" (traceback in {run_dir / f'error_rank{rank}.txt'})"
    else:
        traceback.print_exc()
    tqdm.write(f"error: rank {rank}: {type(error).__name__}: {first_line(error)}{detail}", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point: bad input exits with status 2 and one line naming the flag or file."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = None  # messages go through tqdm.write: on a line of their own when a progress bar is drawn
    try:
        cfg = parse_config(argv)
        validate_config(cfg)
        world_size = launch_world_size(cfg)
        if world_size > 1 and "WORLD_SIZE" not in os.environ:
            return launch_processes(cfg, argv, world_size)
        return run(cfg, argv)
    except ConfigError as error:
        # Every process refuses the same input, so rank 0's line is enough; a reward function's return is this
        # process's own (its completions), so that one is said by whichever process met it.
        if isinstance(error, RewardFunctionError) and dist.is_initialized():
            time.sleep(FAILURE_GRACE_SECONDS)
            tqdm.write(f"error: rank {rank_and_world()[0]}: {error}", file=sys.stderr)
        elif is_main_process():
            tqdm.write(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as stopped:
        if is_main_process() and str(stopped):
            tqdm.write(str(stopped), file=sys.stderr)
        barrier()  # no process exits before the resume command is printed
        sys.exit(stopped.exit_code)
    except torch.OutOfMemoryError:
        rank = f"rank {rank_and_world()[0]}: " if dist.is_initialized() else ""
        time.sleep(FAILURE_GRACE_SECONDS if dist.is_initialized() else 0)
        tqdm.write(f"error: {rank}CUDA out of memory. Lower --micro_batch_size (now {cfg.micro_batch_size}), --num_generations "
              f"({cfg.num_generations}), --max_completion_length ({cfg.max_completion_length}) or --eval_batch_size "
              f"({cfg.eval_batch_size}); the last checkpoint in {cfg.output_dir}/<run>/checkpoint is intact "
              f"(resume with --resume)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if is_main_process() and STOP_FILE_ENV not in os.environ:  # a launcher's process: the launcher says it
            tqdm.write("aborted; files already written are kept (the last checkpoint is intact; resume with --resume)",
                  file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if not dist.is_initialized():
            raise
        report_failure(error, cfg)
        sys.exit(1)
    finally:
        STOP_SIGNALS.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
