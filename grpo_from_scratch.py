# %% [markdown]
# # GRPO from scratch: Qwen2.5-1.5B-Instruct on GSM8K
#
# One linear file: the prompt format, GSM8K, answer extraction, rewards, generation, a hand-written
# GRPO loss with clipping and a KL penalty, a data-parallel training loop, and greedy evaluation on
# the GSM8K test split before and after training. `python grpo_from_scratch.py` trains on every
# visible GPU, one process each. Every flag is a field of `Config`; `--help` lists them.

# %% 1. Config
# Every knob of a run, with its help text. HfArgumentParser turns each field into a --flag and each
# Literal into a choice list. The defaults are the tutorial's recipe (500 steps, 7 prompts x 12
# completions, 400 tokens, beta 0.04, epsilon 0.1, lr 5e-6, clip 0.1), so results compare.
import copy
import hashlib
import importlib.util
import inspect
import json
import logging
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
import tempfile
import threading
import time
import traceback
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Literal, get_args, get_origin

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch._dynamo.utils import counters
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.distributed.optim import ZeroRedundancyOptimizer  # before any process group: see README
from tqdm.auto import tqdm
from transformers import (AttentionInterface, AttentionMaskInterface, AutoConfig,
                          AutoModelForCausalLM, AutoTokenizer, CompileConfig, HfArgumentParser,
                          LogitsProcessor, LogitsProcessorList, StaticCache)
from transformers.masking_utils import sdpa_mask


def option(default, help: str):
    """A Config field. argparse %-formats help texts: write "percent", never the sign."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # Model and data: hub names by default, local paths offline.
    model_name_or_path: str = option("Qwen/Qwen2.5-1.5B-Instruct", "Hub id or local model folder.")
    dataset_name: str = option("openai/gsm8k", "Hub dataset, without --train_file/--eval_file.")
    dataset_config: str = option("main", "Configuration of the hub dataset.")
    train_file: str | None = option(None, "Local jsonl of 'question' and 'answer' ('... #### 7').")
    eval_file: str | None = option(None, "Local jsonl like --train_file, for the test split.")
    num_eval_examples: int = option(0, "Evaluate the first N test questions; 0 = all (1,319).")
    eval_batch_size: int = option(64, "Questions per greedy generate call, per process.")
    eval_max_new_tokens: int = option(512, "Token budget of an evaluation answer.")
    eval_steps: int = option(50, "Evaluate on --eval_subset_size questions every N steps; 0 = off.")
    eval_subset_size: int = option(256, "Questions of the periodic evaluation (always the same).")
    # The GRPO recipe.
    num_iterations: int = option(1, "Iterations; each starts with the policy as the reference.")
    num_steps: int = option(500, "Rollout batches per iteration.")
    batch_size: int = option(7, "Prompts per step, all processes together.")
    num_generations: int = option(12, "Completions per prompt (the GRPO group).")
    max_completion_length: int = option(400, "Token budget of a training completion.")
    temperature: float = option(1.0, "Sampling temperature; the loss divides logits by it too.")
    learning_rate: float = option(5e-6, "AdamW learning rate (constant).")
    max_grad_norm: float = option(0.1, "Gradient clipping norm.")
    beta: float = option(0.04, "KL penalty weight; 0 loads no reference model.")
    epsilon: float = option(0.1, "Lower clip: the ratio is clipped at 1 - epsilon.")
    epsilon_high: float | None = option(None, "Upper clip: 1 + epsilon_high; unset = epsilon.")
    mu: int = option(1, "Optimizer updates per rollout batch; 1 = on-policy.")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = option(
        "grpo", "grpo: mean of sequence means; bnpo, dapo: mean over the step's tokens; dr_grpo: "
        "sum / (sequences x max_completion_length).")
    importance_sampling_level: Literal["token", "sequence"] = option(
        "token", "A ratio per token (GRPO) or per completion (GSPO).")
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "Divide r - group mean by the group's std, the step's std, or nothing.")
    mask_truncated_completions: bool = option(False, "No loss on completions cut by the budget.")
    dynamic_sampling: bool = option(False, "Replace groups of equal rewards by new prompts (DAPO).")
    max_extra_rollouts: int = option(3, "Dynamic sampling: extra rollout calls per step at most.")
    reward_funcs: str = option("correctness,format", "Comma list of REWARD_FUNCS names, "
                               "soft_overlong and path/to/file.py:function entries.")
    reward_weights: str | None = option(None, "Comma list, a weight per reward; unset = 1 each.")
    overlong_buffer: int = option(80, "soft_overlong: its penalty's ramp, in tokens.")
    # Memory and speed.
    micro_batch_size: int = option(12, "Sequences per forward/backward chunk, per process.")
    gradient_checkpointing: bool = option(True, "Recompute activations in the loss pass.")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = option(
        "auto", "The loss pass's attention; auto = flash_attention_2 where it imports on CUDA.")
    dtype: Literal["auto", "bfloat16", "float32"] = option(
        "auto", "auto = bfloat16 where the GPU has it, else float32 (Qwen2.5 overflows in fp16).")
    shard_optimizer: bool = option(True, "N processes keep 1/N of the optimizer state (ZeRO-1).")
    compile_generation: Literal["auto", "true", "false"] = option(
        "auto", "Compiled decoding, checked and timed at start-up: auto keeps it where faster "
        "(CUDA only), true wherever it works.")
    num_processes: int | None = option(None, "Processes, one per GPU; unset = every visible GPU.")
    # Run bookkeeping.
    seed: int = option(42, "Seed of python, numpy and torch, and of the prompt order.")
    output_dir: str = option("outputs", "Parent folder of run folders.")
    run_name: str | None = option(None, "Run folder; unset = <model>-grpo-<date-time>.")
    resume: bool = option(False, "Continue the run --run_name (else the newest) where it stopped.")
    save_steps: int = option(50, "Write a checkpoint every N steps (and when stopped).")
    log_completions_steps: int = option(25, "Log sample completions every N steps.")
    report_to: Literal["wandb", "none"] = option("wandb", "wandb logs offline without a login.")
    wandb_project: str = option("grpo-from-scratch", "wandb project name.")


class ConfigError(Exception):
    """Bad input: main prints it as one line naming the flag or file, and exits with status 2."""


class RewardFunctionError(ConfigError):
    """A reward function returned something other than one real number per completion."""


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


# %% 2. Prompt format and answer parsing
# The model reasons inside <reasoning> tags and puts the final number inside <answer> tags. Prompts
# go through the tokenizer's own chat template (system + user turn, then the assistant header), as
# Qwen2.5-Instruct was trained. Answers are compared as numbers: "1,350", "$1350." and
# "\boxed{1350}" all mean 1350.
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
    return text.split("####")[-1].strip() if "####" in text else None


def extract_answer_from_model_output(text: str) -> str | None:
    """Stripped content of the last complete <answer>...</answer> block, or None."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end != -1 else -1
    if start == -1:
        return None
    end = text.find("</answer>", start)  # a block ends at its first closing tag
    return text[start + len("<answer>"):end].strip()


# A number: an optional minus sign, not glued to a word, on either side of a currency sign ("-$20",
# "$-20"); digits with optional thousands commas; a decimal part; an optional "/denominator". A sign
# must touch the number: "$5 - $20" is a range ending at 20.
_NUMBER = re.compile(r"(?<![\w.])(?:-[$€£]?|[$€£]-)?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
                     r"(?:\s*/\s*\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LATEX_FRACTION = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


def parse_number(text: str | None) -> float | None:
    """The number an answer string denotes (the last one when several appear), or None."""
    if text is None:
        return None
    text = _LATEX_FRACTION.sub(r"\1/\2", text).replace("\u2212", "-")  # U+2212: the typeset minus
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    candidates = [m for m in _NUMBER.findall(text) if any(ch.isdigit() for ch in m)]
    if not candidates:
        return None
    numerator, _, denominator = re.sub(r"[,\s$€£]", "", candidates[-1]).partition("/")
    try:
        value = float(numerator)
        if denominator:
            value = value / float(denominator) if float(denominator) != 0 else None
    except ValueError:
        return None
    return value


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# %% 3. GSM8K
# The train split (7,473 questions) feeds RL; the test split (1,319) is only evaluated. The hub is
# the default; --train_file/--eval_file read local jsonl. Every local row must hold a question and a
# '####' answer whose gold parses as a number (no correctness reward is possible otherwise); a bad
# row is named by file and line.
def load_gsm8k(split: str, tokenizer, dataset_name: str = "openai/gsm8k",
               dataset_config: str = "main", local_file: str | None = None,
               flag: str = "--train_file") -> list[dict]:
    """List of {"question", "prompt", "answer"}; answer is the gold string after '####'."""
    if local_file is not None:
        rows = read_jsonl_rows(local_file, flag)
    else:
        try:
            from datasets import load_dataset
            rows = list(load_dataset(dataset_name, dataset_config, split=split))
        except Exception as error:  # offline, a wrong name, a missing split
            raise ConfigError(f"--dataset_name {dataset_name}: could not load split {split!r} "
                              f"({type(error).__name__}); offline, pass --train_file and "
                              f"--eval_file") from error
    return [{"question": row["question"], "prompt": build_prompt(row["question"], tokenizer),
             "answer": extract_answer_from_dataset(row["answer"])} for row in rows]


def read_jsonl_rows(path: str, flag: str) -> list[dict]:
    rows = []
    with open(path, "rb") as handle:  # bytes, so that a line that is not UTF-8 can be named
        for number, raw in enumerate(handle, start=1):
            where = f"{flag} {path}: line {number}"
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark is not JSON
                row = json.loads(line) if line.strip() else None
            except UnicodeDecodeError:
                raise ConfigError(f"{where} is not UTF-8 text") from None
            except json.JSONDecodeError:
                raise ConfigError(f"{where} is not valid JSON") from None
            if row is None:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) \
                    or not row["question"].strip():
                raise ConfigError(f"{where} has no 'question' string")
            if not isinstance(row.get("answer"), str) or "####" not in row["answer"]:
                raise ConfigError(f"{where} has no 'answer' ending in '#### <number>'")
            gold = extract_answer_from_dataset(row["answer"])
            if parse_number(gold) is None:
                raise ConfigError(f"{where} has no number after the last '####' (found {gold!r})")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{flag} {path}: no rows")
    return rows


def prompt_lengths(examples: list[dict], tokenizer) -> list[int]:
    encoded = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def drop_overlong_prompts(examples: list[dict], tokenizer, context: int, budget: int,
                          name: str) -> list[dict]:
    """Skip (and count) prompts that leave no room for a `budget`-token answer in the context."""
    limit = context - budget
    kept = [ex for ex, n in zip(examples, prompt_lengths(examples, tokenizer)) if n <= limit]
    flag = "--max_completion_length" if name == "train" else "--eval_max_new_tokens"
    if not kept:
        raise ConfigError(f"every {name} prompt is longer than {limit} tokens (context {context} "
                          f"minus {budget} new tokens); lower {flag} ({budget})")
    if len(kept) < len(examples) and is_main_process():
        print(f"warning: skipped {len(examples) - len(kept)} {name} prompts longer than {limit} "
              f"tokens (context {context} minus {budget} new tokens)")
    return kept


# %% 4. Rewards
# Each reward function takes the decoded completions and their gold answers and returns one float
# per completion. The default pair is the tutorial's: correctness (2.0 exact string, 1.5 same
# number) plus format (0.2 per tag that appears exactly once). Five more reproduce TRL's GRPO demo
# (matching multi-line answers that end at the stop token); soft_overlong is DAPO's length penalty;
# `path/to/file.py:function` entries load the user's own. The reward is their weighted sum.
FORMAT_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def correctness_reward(completions: list[str], answers: list[str]) -> list[float]:
    """2.0 if the <answer> text is the gold string, 1.5 if it denotes the same number, else 0."""
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
    return [0.2 * sum(text.count(tag) == 1 for tag in FORMAT_TAGS) for text in completions]


def combined_reward(completions: list[str], answers: list[str]) -> list[float]:
    """correctness + format, the tutorial's single reward, for code that wants one function."""
    pairs = zip(correctness_reward(completions, answers), format_reward(completions))
    return [correct + formatted for correct, formatted in pairs]


def exact_match_reward(completions: list[str], answers: list[str]) -> list[float]:
    """TRL demo: 2.0 when the <answer> text equals the gold string."""
    return [2.0 if extract_answer_from_model_output(c) == gold else 0.0
            for c, gold in zip(completions, answers)]


def integer_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.5 when the <answer> text is a bare non-negative integer."""
    return [0.5 if (extract_answer_from_model_output(c) or "").isdigit() else 0.0
            for c in completions]


_STRICT_FORMAT = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\s*",
                            re.DOTALL)
_SOFT_FORMAT = re.compile(r"\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def strict_format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.5 when the whole completion is the newline-separated tag layout."""
    return [0.5 if _STRICT_FORMAT.fullmatch(c) else 0.0 for c in completions]


def soft_format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.5 when the completion starts with a reasoning block, then an answer block."""
    return [0.5 if _SOFT_FORMAT.match(c) else 0.0 for c in completions]


def xml_count_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """TRL demo: 0.125 per newline-delimited tag seen exactly once; each answer-tag term loses
    0.001 per character after "\\n</answer>" (and its optional newline)."""
    rewards = []
    for text in completions:
        reasoning_tags = (text.count("<reasoning>\n") == 1) + (text.count("\n</reasoning>\n") == 1)
        answer_tags = (text.count("\n<answer>\n") == 1) + (text.count("\n</answer>") == 1)
        tail_penalty = 0.001 * len(text.split("\n</answer>")[-1].removeprefix("\n"))
        rewards.append(0.125 * reasoning_tags + (0.125 - tail_penalty) * answer_tags)
    return rewards


REWARD_FUNCS = {"correctness": correctness_reward, "format": format_reward,
                "exact_match": exact_match_reward, "integer": integer_reward,
                "strict_format": strict_format_reward, "soft_format": soft_format_reward,
                "xml_count": xml_count_reward}


# DAPO's soft overlong punishment, with L = max_completion_length and N = overlong_buffer:
#     0 if length <= L - N;   (L - N - length) / N if L - N < length <= L;   -1 beyond L.
# It reads token counts: a function that declares `completion_lengths` gets them.
def soft_overlong_reward(completions: list[str], answers: list[str], completion_lengths: list[int],
                         max_completion_length: int, overlong_buffer: int) -> list[float]:
    start = max_completion_length - overlong_buffer
    return [max(-1.0, min(0.0, (start - length) / overlong_buffer))
            for length in completion_lengths]


def load_reward_funcs(spec: str, weights: str | None, max_completion_length: int,
                      overlong_buffer: int) -> tuple[dict, list[float]]:
    """({name: function}, [weight per function]) from --reward_funcs and --reward_weights."""
    funcs = {}
    for entry in (part.strip() for part in spec.split(",")):
        if ":" in entry:
            name, func = entry.rpartition(":")[2], reward_from_file(entry)
        elif entry == "soft_overlong":
            if not 1 <= overlong_buffer < max_completion_length:
                raise ConfigError(f"--overlong_buffer must be >= 1 and < --max_completion_length "
                                  f"({max_completion_length}) for soft_overlong "
                                  f"(got {overlong_buffer})")
            name, func = entry, partial(soft_overlong_reward, overlong_buffer=overlong_buffer,
                                        max_completion_length=max_completion_length)
        elif entry in REWARD_FUNCS:
            name, func = entry, REWARD_FUNCS[entry]
        else:
            raise ConfigError(f"--reward_funcs: unknown reward {entry!r}; choose from "
                              f"{', '.join(REWARD_FUNCS)}, soft_overlong, or "
                              f"path/to/file.py:function")
        if name in funcs:
            raise ConfigError(f"--reward_funcs {spec!r}: two functions named {name!r}")
        funcs[name] = func
    return funcs, parse_reward_weights(weights, len(funcs))


def parse_reward_weights(weights: str | None, count: int) -> list[float]:
    try:
        values = [1.0] * count if weights is None else [float(w) for w in weights.split(",")]
    except ValueError:
        values = [math.nan]
    if len(values) != count or not all(map(math.isfinite, values)):
        raise ConfigError(f"--reward_weights {weights!r}: needs one finite number per "
                          f"--reward_funcs entry ({count})")
    return values


def reward_from_file(entry: str):
    """The function named by `path/to/file.py:function`."""
    path_text, _, name = entry.rpartition(":")
    path = Path(path_text).expanduser().resolve()
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"--reward_funcs {entry}: {path_text!r} is not an existing .py file")
    module = import_file(str(path))
    if not callable(getattr(module, name, None)):
        raise ConfigError(f"--reward_funcs {entry}: {path_text} defines no function {name!r}")
    return getattr(module, name)


@lru_cache(maxsize=None)  # one import per file, however many of its functions are named
def import_file(path: str):
    module_name = f"reward_file_{secrets.token_hex(8)}"  # two files named rewards.py never collide
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # as an import does: dataclasses and pickle look it up there
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:  # SystemExit: a script parsing its own arguments
        raise ConfigError(f"--reward_funcs {path}: importing it raised {type(error).__name__}: "
                          f"{first_line(error)}") from error
    return module


def score_completions(reward_funcs: dict, completions: list[str], answers: list[str],
                      completion_lengths: list[int] | None = None) -> torch.Tensor:
    """Rewards as a [completions, functions] float32 tensor. Each function must return one real
    number per completion (a list, tuple or 1-d array; NaN and inf pass, the loop skips a step
    whose loss is not finite; a bool is refused: it says whether, not how much)."""
    columns = []
    for name, func in reward_funcs.items():
        extra = {}
        if "completion_lengths" in inspect.signature(func).parameters:
            extra = {"completion_lengths": completion_lengths}
        values = func(completions, answers, **extra)
        values = values.tolist() if hasattr(values, "tolist") else values  # arrays and tensors
        where, count = f"reward function {name} (--reward_funcs)", len(completions)
        if not isinstance(values, (list, tuple)):
            raise RewardFunctionError(f"{where}: returned a {type(values).__name__}, not a list of "
                                      f"{count} numbers")
        if len(values) != count:
            raise RewardFunctionError(f"{where}: returned {len(values)} values for {count} "
                                      f"completions")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RewardFunctionError(f"{where}: value {i} is {value!r:.40} (a "
                                          f"{type(value).__name__}), not a real number")
        columns.append(torch.tensor([float(value) for value in values], dtype=torch.float32))
    return torch.stack(columns, dim=1)


def weighted_reward(rewards_per_func: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Per completion, the sum over functions of weight x reward."""
    weights = torch.tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    return (rewards_per_func * weights).sum(1)


# %% 5. Generation
# Rollouts sample, evaluation is greedy; both batched, left-padded, in eval mode (dropout and
# gradient checkpointing off, the KV cache on), stopping on either of Qwen2.5's stop tokens: a turn
# ends with <|im_end|>, but <|endoftext|> may come instead. Sampling settings are passed every time,
# so the model's generation_config (Qwen's top_k 20, top_p 0.8, repetition penalty) never leaks in:
# tokens are drawn from softmax(logits / temperature), the distribution the loss scores.
def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        # An unknown token maps to the unk id, unless it is the unk token itself (as in Qwen's).
        if isinstance(token_id, int) and (token_id != tokenizer.unk_token_id
                                          or token == tokenizer.unk_token):
            ids.append(token_id)
    return sorted({i for i in ids if i is not None})


def decoding_kwargs(tokenizer, max_new_tokens: int, temperature: float | None) -> dict:
    """generate() settings: greedy when temperature is None, else plain sampling (top_k=0 and
    top_p=1.0 switch those filters off; None would let the model's defaults back in)."""
    common = dict(repetition_penalty=1.0, max_new_tokens=max_new_tokens, use_cache=True,
                  eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if temperature is None:
        return dict(do_sample=False, **common)
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, **common)


# Generation attends with grouped_query_attention, whatever the loss pass uses. Qwen2.5-1.5B has 12
# query heads and 2 key/value heads: query head h attends to key/value head h // G (G = 6, as
# transformers' repeat_kv pairs them), the query [B, H, T, D] viewed as [B, H_kv, G*T, D], in one
# SDPA call, never copying keys and values to 12 heads as transformers' paths do when compiled.
DECODE_ATTENTION = "grouped_query_sdpa"


def grouped_query_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            **kwargs):
    """transformers' attention interface: query [B, H, T, D], key/value [B, H_kv, S, D], a boolean
    mask [B, 1, T, S] (True attends) or None; returns ([B, T, H, D], None)."""
    rows, heads, length, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if attention_mask is None and length > 1:  # no padding: transformers leaves causality to SDPA
        attention_mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril()
        attention_mask = attention_mask[None, None]
    if attention_mask is not None:  # one mask for all heads: a position's G query rows share it
        attention_mask = attention_mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(
            attention_mask.shape[0], 1, group * length, keys)
    query = query.reshape(rows, kv_heads, group * length, head_dim)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=dropout, scale=scaling)
    return out.view(rows, heads, length, head_dim).transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, grouped_query_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # else a custom name gets no mask


@contextmanager
def generation_mode(model: nn.Module):
    """Eval mode and grouped_query_attention for the length of a generate() call."""
    was_training, attention = model.training, model.config._attn_implementation
    model.eval()
    model.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(attention)
        model.train(was_training)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], temperature: float | None,
                         max_new_tokens: int, decoding=None) -> dict:
    """prompt_ids/prompt_mask (left-padded), completion_ids/completion_mask (up to and including
    the stop token, trimmed to the longest), completions (text), lengths and truncated (hit the
    budget without a stop token). `decoding`: a CompiledDecoding to decode with."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
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
    rows = [ids[:n] for ids, n in zip(completion_ids.tolist(), lengths.tolist())]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, completions=texts, lengths=lengths,
                truncated=truncated)


# Compiled decoding (--compile_generation). A decoding step is one forward pass over [rows, 1]
# inputs; for a 1.5B model on a GPU its time is framework overhead (Python, hundreds of small
# kernel launches), not arithmetic. With a static KV cache every step has the same shapes, so
# torch.compile makes it one graph, replayed on CUDA as a CUDA graph. generate() compiles the
# decoding step only (the prefill runs eagerly), so a graph depends on the row count and the cache
# length: rollouts and evaluation get one of each, compiled at start-up, checked and timed there.
def compiled_graph_count() -> int:
    """Graphs torch.compile has built in this process (dynamo's counter)."""
    return counters["stats"]["unique_graphs"]


class CompiledDecoding:
    """generate() for one purpose ("rollout" or "eval"): a StaticCache of `rows` x `max_cache_len`
    tokens, kept for the run and reset before each call (a CUDA graph replays on fixed addresses),
    and the CompileConfig of the decoding step. A shorter batch is padded with copies of its last
    row (all-padding rows would attend to nothing: NaN). Once started, a call that would compile
    again, or any other error, is one warning, a failure counted, and eager decoding after it."""

    def __init__(self, model: nn.Module, rows: int, max_cache_len: int, name: str = "rollout"):
        on_cuda = model.device.type == "cuda"
        self.model, self.rows, self.max_cache_len, self.name = model, rows, max_cache_len, name
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.compile_config = CompileConfig(fullgraph=True, dynamic=False,
                                            mode="reduce-overhead" if on_cuda else "default")
        self.compile_config._compile_all_devices = not on_cuda  # else it compiles on GPUs only
        self.enabled, self.started, self.fallback, self.failures = True, False, None, 0
        self.figures = {"eager_ms": None, "compiled_ms": None, "compile_seconds": None}

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """model.generate(ids, attention_mask=mask, **kwargs), compiled while enabled."""
        if ids.shape[1] + kwargs["max_new_tokens"] > self.max_cache_len:  # would fail midway
            raise ValueError(f"prompts of {ids.shape[1]} tokens + {kwargs['max_new_tokens']} new "
                             f"tokens exceed the static KV cache ({self.max_cache_len} tokens)")
        rows, stance = len(ids), "fail_on_recompile" if self.started else "default"
        if self.enabled and rows <= self.rows:
            padded = [torch.cat([t, t[-1:].expand(self.rows - rows, -1)]) for t in (ids, mask)]
            self.cache.reset()
            try:
                with torch.compiler.set_stance(stance), generation_mode(self.model):
                    return self.model.generate(padded[0], attention_mask=padded[1],
                                               cache=self.cache, compile_config=self.compile_config,
                                               **kwargs)[:rows]
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # dynamo's, inductor's and CUDA graphs' errors
                self.disable(f"{type(error).__name__}: {first_line(error)[:200]}")
        with generation_mode(self.model):
            return self.model.generate(ids, attention_mask=mask, **kwargs)

    def disable(self, reason: str) -> None:
        if self.started and self.enabled:
            self.failures += 1
            rank = f"rank {dist.get_rank()}: " if dist.is_initialized() else ""
            tqdm.write(f"{rank}warning: compiled {self.name} decoding failed, decoding eagerly "
                       f"from now on: {reason}")
        self.enabled, self.fallback, self.cache = False, reason, None

    def start(self, tokenizer, prompts: list[str], budget: int) -> None:
        """Compile on `rows` of the purpose's prompts with enough decoding steps that a CUDA graph
        is warmed up, recorded and replayed; check the compiled greedy tokens against eager ones;
        time a decoding step both ways. An error or a mismatch disables it, saying why."""
        encoded = tokenizer((prompts * self.rows)[:self.rows], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False).to(self.model.device)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        new_tokens = min(8, budget)  # at least 4: decoding steps 1, 2, 3 warm up, record, replay
        greedy = dict(decoding_kwargs(tokenizer, new_tokens, None), min_new_tokens=min(4, budget))
        started = time.perf_counter()
        compiled = self.generate(ids, mask, **greedy)[:, ids.shape[1]:]
        self.figures["compile_seconds"] = time.perf_counter() - started
        if not self.enabled:
            return
        with generation_mode(self.model):
            eager = self.model.generate(ids, attention_mask=mask, output_logits=True,
                                        return_dict_in_generate=True, **greedy)
        tolerance = 1e-3 if self.model.dtype == torch.float32 else 1.0
        row = first_disagreement(compiled, eager, ids.shape[1], tolerance, tokenizer.pad_token_id)
        if row is not None:
            return self.disable(f"compiled greedy tokens differ from eager ones (row {row})")
        half = budget // 2  # timed from mid-completion, where eager's growing cache is on average
        ids, mask = (torch.cat([t, t[:, -1:].expand(-1, half)], dim=1) for t in (ids, mask))
        steps = max(1, min(16, budget - half - 1))
        for key, decoding in (("eager_ms", None), ("compiled_ms", self)):
            self.figures[key] = decoding_step_ms(self.model, tokenizer, ids, mask, steps, decoding)
        self.started = True


def first_disagreement(compiled: torch.Tensor, eager, width: int, tolerance: float,
                       pad_id: int) -> int | None:
    """The first row whose compiled greedy tokens are not eager's (`eager`: generate's output
    with logits), or None. Where a row first differs, on the same prefix, eager's logits of the two
    tokens within `tolerance` are a near-tie that two kernels' rounding may flip: it agrees."""
    eager_ids = eager.sequences[:, width:]
    length = max(compiled.shape[1], eager_ids.shape[1])  # finished rows are padded with pad_id
    compiled, eager_ids = (F.pad(t, (0, length - t.shape[1]), value=pad_id)
                           for t in (compiled, eager_ids))
    for row in range(len(compiled)):
        differs = (compiled[row] != eager_ids[row]).nonzero()
        step = int(differs[0]) if len(differs) else None
        if step is None:
            continue
        if step >= len(eager.logits):
            return row
        logits = eager.logits[step][row].float()
        if logits[eager_ids[row, step]] - logits[compiled[row, step]] > tolerance:
            return row
    return None


class StepClock(LogitsProcessor):
    """A logits processor that changes nothing and notes when each token was generated."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def decoding_step_ms(model, tokenizer, ids, mask, steps: int, decoding=None) -> float:
    """Milliseconds per decoding step: the median time between the tokens of a greedy call of
    steps + 1 tokens (the first comes from the prefill), the lower of two calls; eager when no
    CompiledDecoding is given."""
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


def start_decoding(model, tokenizer, cfg: Config, train_examples: list[dict],
                   eval_examples: list[dict]) -> dict:
    """{"rollout": CompiledDecoding, "eval": ...}, started, or {} to decode eagerly. auto keeps a
    purpose's compiled path where it measured faster (on CUDA only), true wherever it works. Every
    process takes the same path: the figures compared are the slowest process's, and one failure
    turns it off everywhere. A cache holds its split's longest prompt plus its budget."""
    if cfg.compile_generation == "false" or (cfg.compile_generation == "auto"
                                             and model.device.type != "cuda"):
        return {}
    if cfg.gradient_checkpointing and not model.is_activation_checkpointing:  # before compiling:
        model.activation_checkpointing_enable(  # the graph guards the flag, even in eval mode
            activation_checkpointing_kwargs={"use_reentrant": False})
    rollout = rows_of_this_process(cfg.batch_size * cfg.num_generations)
    eval_rows = min(cfg.eval_batch_size, math.ceil(len(eval_examples) / rank_and_world()[1]))
    rollout_rows = rollout.stop - rollout.start
    purposes = (("rollout", train_examples, rollout_rows, cfg.max_completion_length),
                ("eval", eval_examples, eval_rows, cfg.eval_max_new_tokens))
    decoders, graphs = {}, compiled_graph_count()
    for name, examples, rows, budget in purposes:
        cache = max(prompt_lengths(examples, tokenizer)) + budget
        decoders[name] = CompiledDecoding(model, rows, cache, name)
        decoders[name].start(tokenizer, [ex["prompt"] for ex in examples[:rows]], budget)
    no_graph = compiled_graph_count() == graphs and all(d.enabled for d in decoders.values())
    if any_rank(no_graph or any(d.fallback for d in decoders.values()), model.device):
        reason = "generate() built no compiled graph (transformers did not compile the model)" \
            if no_graph else "another process could not compile"
        for decoding in decoders.values():
            decoding.started = False
            decoding.disable(decoding.fallback or reason)
    keys = ("eager_ms", "compiled_ms")
    slowest = all_reduce_sum([d.figures[k] or 0.0 for d in decoders.values() for k in keys],
                             model.device, op=dist.ReduceOp.MAX)
    for i, decoding in enumerate(decoders.values()):
        if decoding.enabled:
            decoding.figures.update(eager_ms=slowest[2 * i], compiled_ms=slowest[2 * i + 1])
            if cfg.compile_generation == "auto" and slowest[2 * i + 1] >= slowest[2 * i]:
                decoding.enabled, decoding.cache = False, None  # measured no faster than eager
    return decoders


def decoding_record(decoders: dict) -> dict:
    """Each purpose's rows, cache, figures and choice, for config.json and summary.json."""
    return {name: {"rows": d.rows, "cache_tokens": d.max_cache_len, "compiled": d.enabled,
                   "fallback": d.fallback, "failures": d.failures, **d.figures}
            for name, d in decoders.items()}


def decoding_line(decoders: dict, cfg: Config) -> str:
    """The decoding choice and the figures it was made on, in one line."""
    if not decoders:
        why = "compiles on CUDA only" if cfg.compile_generation == "auto" else "asks for it"
        return f"decoding: eager (--compile_generation {cfg.compile_generation} {why})"
    parts = []
    for name, d in decoders.items():
        eager, compiled = d.figures["eager_ms"], d.figures["compiled_ms"]
        figures = f"eager {eager:.1f} ms/step, compiled {compiled:.1f}" if eager else "not measured"
        parts.append(f"{name} {d.rows} rows, cache {d.max_cache_len} tokens: {figures} -> "
                     f"{'compiled' if d.enabled else 'eager'}")
    seconds = sum(d.figures["compile_seconds"] or 0 for d in decoders.values())
    return (f"decoding (--compile_generation {cfg.compile_generation}): {'; '.join(parts)}; "
            f"compiled in {seconds:.1f} s")


# %% 6. Evaluation
# Greedy decoding on the held-out test split, batched, longest prompts first so that batches carry
# little padding. "accuracy" is lenient (the <answer> block, else the completion's last number);
# "strict_accuracy" counts only an answer inside the tags. With several processes each answers
# every N-th question and the records are gathered. During training the same evaluation runs
# every --eval_steps steps on a fixed subset: a held-out curve beside the reward curves.
def evaluate_model(model, tokenizer, examples: list[dict], batch_size: int = 64,
                   max_new_tokens: int = 512, desc: str = "eval", decoding=None) -> dict:
    rank, world = rank_and_world()
    shard = sorted(range(rank, len(examples), world), key=lambda i: -len(examples[i]["prompt"]))
    records = []
    with tqdm(total=len(shard), desc=desc, disable=rank > 0, leave=False) as progress:
        for start in range(0, len(shard), batch_size):
            batch = shard[start:start + batch_size]
            out = generate_completions(model, tokenizer, [examples[i]["prompt"] for i in batch],
                                       None, max_new_tokens, decoding)
            for i, text, cut in zip(batch, out["completions"], out["truncated"].tolist()):
                records.append(score_answer(i, examples[i], text, cut))
            progress.update(len(batch))
    records = sorted(all_gather_list(records), key=lambda r: r["index"])
    mean = lambda key: sum(r[key] for r in records) / max(len(records), 1)  # noqa: E731
    return {"accuracy": mean("correct"), "strict_accuracy": mean("strict_correct"),
            "format_rate": mean("formatted"), "truncation_rate": mean("truncated"),
            "n": len(records), "records": records}


def score_answer(index: int, example: dict, completion: str, truncated: bool) -> dict:
    tagged = extract_answer_from_model_output(completion)
    gold = parse_number(example["answer"])
    lenient = parse_number(tagged if tagged is not None else completion)
    return {"index": index, "question": example["question"], "gold": example["answer"],
            "completion": completion, "extracted": tagged, "correct": numbers_equal(lenient, gold),
            "strict_correct": numbers_equal(parse_number(tagged), gold),
            "formatted": format_reward([completion])[0] == 0.8, "truncated": bool(truncated)}


EVAL_SUBSET_SEED = 0  # not --seed: every run watches the same questions


def eval_subset(num_examples: int, size: int) -> list[int]:
    """Indices of the periodic evaluation's questions, sorted: the first `size` of a fixed order."""
    order = np.random.default_rng(EVAL_SUBSET_SEED).permutation(num_examples)
    return sorted(int(i) for i in order[:size])


def evaluate_at_step(model, tokenizer, eval_examples: list[dict], indices: list[int], cfg: Config,
                     step: int, logger=None, decoding=None) -> dict:
    """A periodic evaluation, as a line of eval_steps.jsonl: the rates, n, seconds, and per
    question its index in the split and whether it was answered right."""
    start = time.perf_counter()
    result = evaluate_model(model, tokenizer, [eval_examples[i] for i in indices],
                            cfg.eval_batch_size, cfg.eval_max_new_tokens, f"eval step {step}",
                            decoding)
    record = {"step": step, **{key: result[key] for key in SUMMARY_KEYS},
              "seconds": time.perf_counter() - start,
              "indices": [indices[r["index"]] for r in result["records"]],
              "correct": [int(r["correct"]) for r in result["records"]]}
    if logger is not None:
        logger.log_eval(record)
    if is_main_process():
        tqdm.write(f"eval step {step}: accuracy {record['accuracy']:.3f} (strict "
                   f"{record['strict_accuracy']:.3f}) on {record['n']} questions, "
                   f"{record['seconds']:.1f} s")
    return record


SUMMARY_KEYS = ("accuracy", "strict_accuracy", "format_rate", "truncation_rate", "n")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score; sane at 0 and 1)."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# %% 7. The GRPO math: per-token log-probs, masks, group advantages, the clipped loss with KL
# This cell needs only torch and math. For a prompt's group of G completions with rewards r_i, each
# token t of completion i gets the advantage A_i = (r_i - mean(r)) / (std(r) + 1e-4) and the loss
#     -( min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps_high) * A_i) - beta * KL_t ),
# ratio = pi(token) / pi_old(token), KL_t = exp(ref - lp) - (ref - lp) - 1 (the k3 estimator, >= 0,
# zero when the policy equals the reference), averaged over tokens as --loss_type says.
LOGSUMEXP_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of fp32 per chunk


def _row_chunks(logits: torch.Tensor) -> list[torch.Tensor]:
    rows = logits.reshape(-1, logits.shape[-1])  # a view for contiguous logits
    return rows.split(max(1, LOGSUMEXP_CHUNK_ELEMENTS // rows.shape[1]))


def _logsumexp_and_entropy(chunk: torch.Tensor, with_entropy: bool):
    """Per row in fp32, from one exp pass: logsumexp(z) = log(s) + m and, on request, the entropy of
    softmax(z) = logsumexp - sum(e * z) / s, with m the row max, e = exp(z - m), s = sum(e)."""
    z = chunk.float()
    row_max = z.amax(-1, keepdim=True)
    row_max.masked_fill_(row_max.abs() == math.inf, 0)  # as torch.logsumexp: no inf - inf
    exp_shifted = (z - row_max).exp_()
    total = exp_shifted.sum(-1)
    logsumexp = total.log().add_(row_max.squeeze(-1))
    entropy = logsumexp - torch.linalg.vecdot(exp_shifted, z) / total if with_entropy else None
    return logsumexp, entropy


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log p(token) = logit[token] - logsumexp(logits) in fp32, a few rows at a time: no fp32 copy
    of the full vocabulary (151,936 columns for Qwen) ever exists, and the backward recomputes
    softmax chunk by chunk from the saved logits."""

    @staticmethod
    def forward(ctx, logits, index, with_entropy):
        parts = [_logsumexp_and_entropy(chunk, with_entropy) for chunk in _row_chunks(logits)]
        logsumexp = torch.cat([lse for lse, _ in parts])
        flat_index = index.reshape(-1, 1)
        selected = logits.reshape(-1, logits.shape[-1]).gather(1, flat_index).squeeze(1).float()
        ctx.save_for_backward(logits, index, logsumexp)
        entropy = torch.cat([ent for _, ent in parts]).view(index.shape) if with_entropy else None
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)  # a metric: no gradient flows through it
        return (selected - logsumexp).view(index.shape), entropy

    @staticmethod
    def backward(ctx, grad_output, grad_entropy):
        # d log p(i) / d logit(j) = 1[j = i] - softmax(j), times the incoming gradient.
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
    """log_softmax(logits.float()).gather(-1, index[..., None])[..., 0], without the fp32 copy;
    with_entropy=True returns (log_probs, entropy of each position's softmax, without grad)."""
    log_probs, entropy = _SelectiveLogSoftmax.apply(logits.contiguous(), index, with_entropy)
    return (log_probs, entropy) if with_entropy else log_probs


class PerTokenLogProbs(torch.nn.Module):
    """The log-probs of a causal LM's last `logits_to_keep` tokens, as one module: DDP wraps exactly
    the computation whose gradients it averages, and no caller holds [batch, tokens, vocab] logits.
    Logits are divided by the sampling temperature: that is the distribution sampled from."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, logits_to_keep: int, temperature: float = 1.0,
                with_entropy: bool = False):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            logits_to_keep=logits_to_keep + 1).logits
        if temperature != 1.0:
            logits.div_(temperature)  # in place: nothing else holds these logits
        # Position t predicts token t + 1; the last kept position predicts past the end: dropped.
        targets = torch.nn.functional.pad(input_ids[:, -logits_to_keep:], (0, 1))
        if with_entropy:
            log_probs, entropy = selective_log_softmax(logits, targets, with_entropy=True)
            return log_probs[:, :-1], entropy[:, :-1]
        return selective_log_softmax(logits, targets)[:, :-1]


def compute_log_probs(model, input_ids, attention_mask, logits_to_keep: int,
                      temperature: float = 1.0, micro_batch_size: int | None = None):
    """Per-token log-probs [batch, logits_to_keep] of the last logits_to_keep tokens, in chunks of
    micro_batch_size sequences. `model`: a causal LM, or a PerTokenLogProbs (in DDP or not)."""
    if hasattr(model, "config"):  # a causal LM
        model = PerTokenLogProbs(model)
    chunk = micro_batch_size or len(input_ids)
    return torch.cat([model(input_ids[i:i + chunk], attention_mask[i:i + chunk], logits_to_keep,
                            temperature) for i in range(0, len(input_ids), chunk)])


def create_completion_mask(completion_ids: torch.Tensor, eos_token_ids) -> torch.Tensor:
    """1 up to and including the first stop token (any of eos_token_ids), 0 after; all 1 if none."""
    stop_ids = torch.as_tensor(eos_token_ids, device=completion_ids.device)
    is_stop = torch.isin(completion_ids, stop_ids)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), completion_ids.shape[1])
    return (positions[None, :] <= first_stop[:, None]).int()


def compute_group_advantages(rewards: torch.Tensor, num_generations: int,
                             scale_rewards: str = "group") -> torch.Tensor:
    """A = r - mean of its group (a prompt's num_generations consecutive completions), divided by
    the group's std + 1e-4 ("group", GRPO), by the std of all rewards passed + 1e-4 ("batch"), or by
    nothing ("none", Dr. GRPO); stds unbiased. A group of equal rewards gets exactly zero."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none (got {scale_rewards!r})")
    return advantages.view(-1)


def grpo_loss(log_probs, old_log_probs, ref_log_probs, advantages, completion_mask, *,
              epsilon: float, beta: float, epsilon_high: float | None = None,
              loss_type: str = "grpo", max_completion_length: int | None = None,
              importance_sampling_level: str = "token"):
    """(loss, metrics) from [B, T] tensors and [B] advantages. old_log_probs=None is on-policy
    (mu = 1): the ratio is 1 but carries the gradient of log_probs, with no extra forward pass.
    "sequence" (GSPO): one ratio per completion, exp of its tokens' mean log-ratio, clipped as a
    whole; KL stays per token. Metrics are detached token means over the mask."""
    if ref_log_probs is None and beta != 0:
        raise ValueError("ref_log_probs is required when beta != 0")
    old_log_probs = log_probs.detach() if old_log_probs is None else old_log_probs
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(log_probs.dtype)
    advantages = advantages[:, None]

    log_ratio = log_probs - old_log_probs  # [B, T]
    if importance_sampling_level == "sequence":  # the masked token mean, [B, 1]
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    elif importance_sampling_level != "token":
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # [B, 1] broadcasts
    if beta != 0:
        log_ratio_to_ref = ref_log_probs - log_probs
        kl = torch.exp(log_ratio_to_ref) - log_ratio_to_ref - 1
        per_token_loss = per_token_loss + beta * kl

    # grpo: the mean over sequences of each one's token mean. bnpo and dapo: masked sum / token
    # count, which grpo_update's micro-batch weights make the whole step's token mean (DAPO's).
    # dr_grpo: masked sum / (sequences x max_completion_length).
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

    def masked_mean(values):  # [B, T] or [B, 1]: a mean over the completion tokens
        return ((values * mask).sum() / mask.sum().clamp(min=1)).detach()

    low_clipped = (ratio < 1 - epsilon) & (advantages < 0)
    high_clipped = (ratio > 1 + epsilon_high) & (advantages > 0)
    metrics = {"kl": masked_mean(kl) if beta != 0 else torch.zeros((), device=loss.device),
               "clip_ratio/low_mean": masked_mean(low_clipped.float()),
               "clip_ratio/high_mean": masked_mean(high_clipped.float()),
               "clip_ratio/region_mean": masked_mean((low_clipped | high_clipped).float())}
    return loss, metrics


def loss_denominator(completion_mask: torch.Tensor, loss_type: str) -> float:
    """What grpo_loss divides by, in units that add up over micro-batches: a micro-batch's loss
    weighted by its share of the step's total gives the gradient of the whole step at once."""
    if loss_type in ("bnpo", "dapo"):
        return float(completion_mask.sum())
    return float(completion_mask.shape[0])


# %% 8. One training step: rollout, update, metrics
# This process generates and scores its rows of the step (batch_size prompts x num_generations, in
# prompt order, split over the processes); the step's rewards are gathered from every process, so
# each group's advantages use all of its completions. Reference log-probs come without grad (old
# ones only for mu > 1: on-policy they equal the current ones), then mu optimizer steps on the GRPO
# loss over micro-batches, and the step's metrics over every process's rows.
def train_step(model, policy, reference_model, optimizer, tokenizer, train_examples: list[dict],
               cfg: Config, step: int, reward_funcs: dict, reward_weights: list[float], state: dict,
               decoding=None) -> dict:
    """One GRPO step (1-based); updates `state`; returns the rollout, its rewards and advantages
    and the step's metrics."""
    device = next(model.parameters()).device
    step_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampled = sample_step(model, tokenizer, train_examples, cfg, step, reward_funcs, reward_weights,
                          device, decoding)
    rollout, rewards_per_func = sampled["rollout"], sampled["rewards_per_func"]
    rollout_time = time.perf_counter() - step_start
    rewards = weighted_reward(rewards_per_func, reward_weights)
    advantages = compute_group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
    advantages = advantages[sampled["rows"]].to(device)
    input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
    attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
    completion_mask, keep = rollout["completion_mask"], rollout["completion_ids"].shape[1]
    if cfg.mask_truncated_completions:  # DAPO: no loss on a completion the budget cut off
        completion_mask = completion_mask * ~rollout["truncated"][:, None]

    reference_start = time.perf_counter()
    with torch.no_grad():
        old_log_probs = None if cfg.mu == 1 else compute_log_probs(
            policy, input_ids, attention_mask, keep, cfg.temperature, cfg.micro_batch_size)
        ref_log_probs = None if cfg.beta == 0 else compute_log_probs(
            reference_model, input_ids, attention_mask, keep, cfg.temperature, cfg.micro_batch_size)
    reference_time = time.perf_counter() - reference_start

    update_start = time.perf_counter()
    for _ in range(cfg.mu):
        update = grpo_update(policy, optimizer, cfg, input_ids, attention_mask, completion_mask,
                             keep, advantages, old_log_probs, ref_log_probs)
        state["skipped_steps"] += update["nonfinite"]
    state["nonfinite_in_a_row"] = state["nonfinite_in_a_row"] + 1 if update["nonfinite"] else 0
    state["step"] = step
    timings = {"step_time": time.perf_counter() - step_start, "rollout_time": rollout_time,
               "reference_time": reference_time, "update_time": time.perf_counter() - update_start}
    metrics = step_metrics(cfg, sampled, rewards, list(reward_funcs), update, state, device,
                           timings)
    return {**sampled, "rewards": rewards, "advantages": advantages, "metrics": metrics}


def sample_step(model, tokenizer, train_examples: list[dict], cfg: Config, step: int,
                reward_funcs: dict, reward_weights: list[float], device: torch.device,
                decoding=None) -> dict:
    """This process's rows of the step: rollout, examples (one per row), rows (its slice of the
    step's rows); the step's rewards_per_func, gathered; extra_rollouts, dropped_groups and every
    process's generated_tokens. With --dynamic_sampling (DAPO), a group of equal rewards has no
    gradient: further calls of batch_size prompts, at most --max_extra_rollouts, draw until
    batch_size groups have signal."""
    def draw(indices: list[int]) -> dict:
        groups = [train_examples[i] for i in indices]
        return rollout_and_rewards(model, tokenizer, groups, cfg, reward_funcs, device, decoding)

    def groups_with_signal() -> int:
        return sum(int(has_signal(d["rewards_per_func"], reward_weights, cfg).sum()) for d in draws)

    draws = [draw(prompt_indices(len(train_examples), step - 1, cfg.batch_size, cfg.seed))]
    while cfg.dynamic_sampling and len(draws) <= cfg.max_extra_rollouts \
            and groups_with_signal() < cfg.batch_size:
        draws.append(draw(extra_prompt_indices(len(train_examples), step, len(draws),
                                               cfg.batch_size, cfg.seed)))
    generated = float(sum(d["rollout"]["lengths"].sum() for d in draws))
    generated = all_reduce_sum([generated], device)[0]
    sampled = draws[0]
    if cfg.dynamic_sampling:
        sampled = keep_groups_with_signal(draws, reward_weights, cfg, tokenizer.pad_token_id,
                                          device)
    return {"dropped_groups": 0, **sampled, "extra_rollouts": len(draws) - 1,
            "generated_tokens": generated}


def rollout_and_rewards(model, tokenizer, groups: list[dict], cfg: Config, reward_funcs: dict,
                        device: torch.device, decoding=None) -> dict:
    """This process's rows of one rollout call of `groups` (prompts); every process's rewards."""
    rows = rows_of_this_process(len(groups) * cfg.num_generations)
    examples = [groups[row // cfg.num_generations] for row in range(rows.start, rows.stop)]
    rollout = generate_completions(model, tokenizer, [ex["prompt"] for ex in examples],
                                   cfg.temperature, cfg.max_completion_length, decoding)
    answers = [ex["answer"] for ex in examples]
    rewards = score_completions(reward_funcs, rollout["completions"], answers,
                                rollout["lengths"].tolist())
    return {"groups": groups, "rollout": rollout, "examples": examples, "rows": rows,
            "rewards_per_func": all_gather_rows(rewards.to(device)).cpu()}


def has_signal(rewards_per_func: torch.Tensor, weights: list[float], cfg: Config) -> torch.Tensor:
    """Per group: whether its completions' rewards differ (else its advantages are all zero)."""
    rewards = weighted_reward(rewards_per_func, weights)
    return rewards.view(-1, cfg.num_generations).std(dim=1) > 1e-6


def prompt_indices(num_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of a 0-based step: the data reshuffled every epoch by (seed, epoch), so they are
    the same in every process, and a resumed run sees the prompts it would have."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [int(_epoch_order(num_examples, seed, p // num_examples)[p % num_examples])
            for p in positions]


@lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def extra_prompt_indices(num_examples: int, step: int, call: int, batch_size: int, seed: int):
    """Dynamic sampling's further prompts, from a generator seeded by (seed, step, call)."""
    rng = np.random.default_rng([seed, step, call])
    chosen = rng.choice(num_examples, size=min(batch_size, num_examples), replace=False)
    return [int(i) for i in chosen]


def keep_groups_with_signal(draws: list[dict], weights: list[float], cfg: Config, pad_id: int,
                            device: torch.device) -> dict:
    """The first batch_size groups with signal (then without, if short), in the order drawn,
    from every process's rows of every draw, split over the processes afresh."""
    rewards_per_func = torch.cat([d["rewards_per_func"] for d in draws])
    groups = [group for d in draws for group in d["groups"]]
    signal = has_signal(rewards_per_func, weights, cfg).tolist()
    ranked = sorted(range(len(groups)), key=lambda g: not signal[g])  # stable: in draw order
    kept = sorted(ranked[:cfg.batch_size])
    kept_rows = [g * cfg.num_generations + j for g in kept for j in range(cfg.num_generations)]
    rows = rows_of_this_process(len(kept_rows))
    every_row = gather_rollouts([d["rollout"] for d in draws], pad_id, device)
    return {"rollout": take_rows(every_row, kept_rows[rows]), "rows": rows,
            "examples": [groups[row // cfg.num_generations] for row in kept_rows[rows]],
            "rewards_per_func": rewards_per_func[kept_rows],
            "dropped_groups": len(groups) - len(kept)}


def gather_rollouts(rollouts: list[dict], pad_id: int, device: torch.device) -> dict:
    """Every row of several rollouts from every process, each rollout in rank order, one after
    the other; prompts left-padded and completions right-padded to common widths."""
    widths = [max(r[key].shape[1] for r in rollouts) for key in ("prompt_ids", "completion_ids")]
    prompt_width, completion_width = map(int, all_reduce_sum(widths, device, op=dist.ReduceOp.MAX))
    parts = []
    for r in rollouts:
        left = prompt_width - r["prompt_ids"].shape[1]
        right = completion_width - r["completion_ids"].shape[1]
        padded = {"prompt_ids": F.pad(r["prompt_ids"], (left, 0), value=pad_id),
                  "prompt_mask": F.pad(r["prompt_mask"], (left, 0)),
                  "completion_ids": F.pad(r["completion_ids"], (0, right), value=pad_id),
                  "completion_mask": F.pad(r["completion_mask"], (0, right)),
                  "lengths": r["lengths"], "truncated": r["truncated"]}
        parts.append({key: all_gather_rows(value) for key, value in padded.items()}
                     | {"completions": all_gather_list(r["completions"])})
    return {key: sum((p[key] for p in parts), []) if key == "completions"
            else torch.cat([p[key] for p in parts]) for key in parts[0]}


def take_rows(rollout: dict, rows: list[int]) -> dict:
    """The given rows of a rollout, completions trimmed to the longest of them."""
    index = torch.tensor(rows, dtype=torch.long, device=rollout["prompt_ids"].device)
    taken = {key: [value[i] for i in rows] if key == "completions" else value[index]
             for key, value in rollout.items()}
    width = int(taken["lengths"].max())
    return {**taken, "completion_ids": taken["completion_ids"][:, :width],
            "completion_mask": taken["completion_mask"][:, :width]}


def grpo_update(policy, optimizer, cfg: Config, input_ids, attention_mask, completion_mask,
                logits_to_keep: int, advantages, old_log_probs, ref_log_probs) -> dict:
    """One optimizer step on the GRPO loss of this process's rows, accumulated over micro-batches
    (and over processes by DDP). A micro-batch's loss is weighted by its share of the whole step's
    denominator, times the process count since DDP averages: the gradient of one process on the
    whole batch. A non-finite loss or gradient norm skips the step, with a warning."""
    optimizer.zero_grad()
    world = rank_and_world()[1]
    # The step's denominator; 1 where no token is left (an all-truncated step, masked).
    total = all_reduce_sum([loss_denominator(completion_mask, cfg.loss_type)], input_ids.device)[0]
    total = total or 1.0
    loss_sum, metric_sums, entropy_sum, tokens = 0.0, {}, 0.0, 0.0
    starts = range(0, len(input_ids), cfg.micro_batch_size)
    for start in starts:
        part = slice(start, start + cfg.micro_batch_size)
        is_ddp = isinstance(policy, nn.parallel.DistributedDataParallel)
        with policy.no_sync() if is_ddp and start != starts[-1] else nullcontext():
            log_probs, entropy = policy(input_ids[part], attention_mask[part], logits_to_keep,
                                        cfg.temperature, True)
            loss, metrics = grpo_loss(
                log_probs, None if old_log_probs is None else old_log_probs[part],
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
    # The loss and token means over every process, as one process would have computed them.
    loss_sum, entropy_sum, tokens, *sums = all_reduce_sum(
        [loss_sum, entropy_sum, tokens, *metric_sums.values()], input_ids.device)
    finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
    nonfinite = any_rank(not finite, input_ids.device)
    if nonfinite:
        optimizer.zero_grad()
        if is_main_process():
            tqdm.write(f"warning: non-finite loss ({loss_sum}) or gradient norm ({grad_norm}); "
                       f"optimizer step skipped")
    else:
        optimizer.step()
    means = {key: value / max(tokens, 1.0) for key, value in zip(metric_sums, sums)}
    return {"loss": loss_sum, "grad_norm": grad_norm, "entropy": entropy_sum / max(tokens, 1.0),
            "nonfinite": int(nonfinite), **means}


def step_metrics(cfg: Config, sampled: dict, rewards: torch.Tensor, func_names: list[str],
                 update: dict, state: dict, device: torch.device, timings: dict) -> dict:
    """The step's curves, named like TRL's, over the whole step's completions (lengths gathered
    here): the same whatever the process count."""
    rollout = sampled["rollout"]
    lengths, truncated = all_gather_rows(torch.stack(
        [rollout["lengths"].float(), rollout["truncated"].float()], dim=1)).cpu().T
    group_std = rewards.view(-1, cfg.num_generations).std(dim=1)
    update_keys = ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                   "clip_ratio/region_mean", "grad_norm")
    metrics = {"step": state["step"], "reward": rewards.mean().item(),
               "reward_std": rewards.std().item(),
               **{f"rewards/{name}": sampled["rewards_per_func"][:, i].mean().item()
                  for i, name in enumerate(func_names)},
               "frac_reward_zero_std": (group_std < 1e-6).float().mean().item(),
               "completions/mean_length": lengths.mean().item(),
               "completions/min_length": lengths.min().item(),
               "completions/max_length": lengths.max().item(),
               "completions/clipped_ratio": truncated.mean().item(),
               **{key: update[key] for key in update_keys}, "learning_rate": cfg.learning_rate,
               "skipped_steps": state["skipped_steps"], **timings,
               "tokens_per_second": sampled["generated_tokens"]
               / max(timings["rollout_time"], 1e-9)}
    if cfg.dynamic_sampling:
        metrics["dynamic_sampling/extra_rollouts"] = sampled["extra_rollouts"]
        metrics["dynamic_sampling/dropped_groups"] = sampled["dropped_groups"]
    if device.type == "cuda":
        metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return metrics


# %% 9. The loop
# Steps up to num_iterations x num_steps, the reference refreshed from the policy as each iteration
# starts. After a step: its metrics logged; every --eval_steps a held-out evaluation (after the
# update, before the checkpoint: a checkpoint at step s implies every evaluation up to s is on
# record); a checkpoint every --save_steps; and a stop when asked or after 3 non-finite steps.
class TrainingStopped(Exception):
    """The run ended early; exit_code is its status (130 stopped, 1 failed)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train_with_grpo(model, tokenizer, train_examples: list[dict], cfg: Config,
                    run_dir: Path | None = None, reward_funcs: dict | None = None, logger=None,
                    reference_model: nn.Module | None = None, resume_state: dict | None = None,
                    eval_examples: list[dict] | None = None, decoding: dict | None = None):
    """GRPO on train_examples; returns the trained model. reward_funcs: {name: function}, default
    --reward_funcs; logger: a RunLogger; resume_state: from load_checkpoint; eval_examples: for
    the periodic evaluation; decoding: start_decoding's {"rollout", "eval"}."""
    if reward_funcs is None:
        reward_funcs, reward_weights = load_reward_funcs(
            cfg.reward_funcs, cfg.reward_weights, cfg.max_completion_length, cfg.overlong_buffer)
    else:
        reward_weights = parse_reward_weights(cfg.reward_weights, len(reward_funcs))
    device, decoding = next(model.parameters()).device, decoding or {}
    eval_indices = eval_subset(len(eval_examples), cfg.eval_subset_size) \
        if eval_examples and cfg.eval_steps else []
    if cfg.gradient_checkpointing and not model.is_activation_checkpointing:  # once: it adds a hook
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer, policy = make_optimizer(model, cfg), parallel_policy(model, device)
    state = {"step": 0, "reference_step": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        state.update(resume_state["trainer_state"], nonfinite_in_a_row=0)  # a fresh allowance
        restore_rng_state(resume_state["rng"])
    if cfg.beta > 0 and reference_model is None:
        reference_model = make_reference(model)
    total_steps = cfg.num_iterations * cfg.num_steps
    bar = tqdm(total=total_steps, initial=state["step"], desc="GRPO", disable=not is_main_process())
    with bar:  # closed before any error is printed: an error is the last thing on the screen
        for step in range(state["step"] + 1, total_steps + 1):
            if cfg.beta > 0 and step > 1 and (step - 1) % cfg.num_steps == 0:  # a new iteration
                reference_model, state["reference_step"] = make_reference(model), step - 1
            done = train_step(model, policy, reference_model, optimizer, tokenizer, train_examples,
                              cfg, step, reward_funcs, reward_weights, state,
                              decoding.get("rollout"))
            metrics = done["metrics"]
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}")
            if logger is not None:
                logger.log_step(metrics)
                if step % cfg.log_completions_steps == 0 or step == 1:
                    logger.log_completions(step, done["examples"][0], done["rollout"],
                                           done["rewards"], done["rewards_per_func"],
                                           list(reward_funcs), done["advantages"])
            if eval_indices and step % cfg.eval_steps == 0:
                evaluate_at_step(model, tokenizer, eval_examples, eval_indices, cfg, step, logger,
                                 decoding.get("eval"))
            stop = None
            if state["nonfinite_in_a_row"] >= 3:
                stop = ("stopped: 3 steps in a row had a non-finite loss or gradient norm (their "
                        "updates were skipped); the checkpoint holds the last good weights", 1)
            elif any_rank(stop_requested(), device):
                signal_name = STOP_SIGNALS[0] if STOP_SIGNALS else "a signal to another process"
                stop = (f"interrupted ({signal_name}) after step {step}", 130)
            if run_dir is not None and (step % cfg.save_steps == 0 or stop or step == total_steps):
                save_checkpoint(run_dir, model, optimizer, state, reference_model, cfg)
                if logger is not None:
                    logger.draw_curves()
            if stop:
                raise TrainingStopped(*stop)
    return model


def make_reference(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if reference.is_activation_checkpointing:
        reference.activation_checkpointing_disable()
    return reference


# %% 10. Data parallel and the optimizer
# One process per GPU, each with a full replica: torch's launcher (torchrun, or the one
# `python grpo_from_scratch.py` starts, cell 14) sets RANK, WORLD_SIZE and LOCAL_RANK, and each
# process drives cuda:LOCAL_RANK over NCCL, or the CPU over gloo; without them, one process. Not
# threads: they share one GIL, and eager decoding is overhead-bound (README: Multi-GPU). A step's
# rows are split as evenly as possible, in prompt order (84 over 8: 11, 11, 11, 11, 10, 10, 10, 10),
# so a group may straddle two processes; what needs whole groups is computed on gathered rows.
def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device), joining the process group when started by a launcher."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        return rank, world_size, torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world_size, torch.device("cpu")


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def seed_everything(seed: int) -> None:
    """Python, numpy and torch. Each process passes seed + its rank: processes sampling rows of
    one prompt (a group may straddle two) must not draw identical completions."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_rows(rows: int, world_size: int) -> list[int]:
    """How many rows each process takes: the first rows % world_size processes one more."""
    return [rows // world_size + (rank < rows % world_size) for rank in range(world_size)]


def rows_of_this_process(rows: int) -> slice:
    rank, world = rank_and_world()
    counts = split_rows(rows, world)
    return slice(sum(counts[:rank]), sum(counts[:rank + 1]))


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensors live: the GPU for NCCL, the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows in rank order (the tensor itself with one process). Row counts may
    differ: each pads to the largest, and the padding is cut."""
    if not dist.is_initialized():
        return tensor
    device = collective_device(tensor.device)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(tensor)], device=device))
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[:len(tensor)] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)


def all_reduce_sum(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """Each value summed (or reduced by `op`) over every process (as they are with one process)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_gather_list(items: list) -> list:
    """Every process's items (picklable objects), concatenated in rank order."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True in every process when the flag is set in any."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallel_policy(model: nn.Module, device: torch.device) -> nn.Module:
    """The policy's PerTokenLogProbs, under DDP with several processes: each computes its own rows,
    and backward averages the gradients. gradient_as_bucket_view: no second copy of them."""
    policy = PerTokenLogProbs(model)
    if not dist.is_initialized():
        return policy
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(policy, device_ids=device_ids,
                                               gradient_as_bucket_view=True)


class MasterWeightAdamW:
    """AdamW on fp32 master copies of bf16 weights: at lr 5e-6 most updates are far below bf16's
    resolution (~1e-4 for a weight of 0.03) and would round away. Rollouts and the loss run on the
    bf16 weights; after each step the master values are copied back. For fp32 weights the master
    is the parameter itself: plain AdamW. sharded=True: one process's share under
    ShardedMasterWeightAdamW, and the gradient norm is summed over processes."""

    def __init__(self, params, lr: float, sharded: bool = False):
        params = list(params)  # parameters, or (from ZeroRedundancyOptimizer) this rank's groups
        is_groups = params and isinstance(params[0], dict)
        groups = params if is_groups else [{"params": params, "lr": lr}]
        self.param_groups = groups
        self.params = [p for group in groups for p in group["params"] if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
                       for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=lr)
        self.sharded = sharded

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Move the gradients to the fp32 masters and clip them there; returns the total norm."""
        for param, master in zip(self.params, self.master):
            if master is not param:
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        grads = [m.grad for m in self.master if m.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else self.master[0].new_zeros(())
        if self.sharded:  # the whole model's norm: every process adds the squares of its share
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
                    master.grad = None  # not needed until the next backward

    def zero_grad(self) -> None:
        for tensor in self.params + self.master:
            tensor.grad = None

    def state_dict(self) -> dict:
        master = [m.detach().clone() if m is not p else None
                  for p, m in zip(self.params, self.master)]
        return {"optimizer": self.optimizer.state_dict(), "master": master}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for param, master, saved in zip(self.params, self.master, state["master"]):
                if saved is not None:
                    master.copy_(saved)
                    param.copy_(saved)


class ShardedMasterWeightAdamW:
    """ZeRO stage 1 with torch's ZeroRedundancyOptimizer: the parameters are split over the
    processes (balanced by size) and each keeps fp32 masters and AdamW moments for its share only.
    After each step each parameter's owner broadcasts its new value. state_dict() is this process's
    share: a checkpoint holds one optimizer file per process."""

    def __init__(self, params, lr: float):
        self.zero = ZeroRedundancyOptimizer(params, optimizer_class=MasterWeightAdamW, lr=lr,
                                            sharded=True)
        self.local = self.zero.optim  # this process's MasterWeightAdamW

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


# %% 11. Checkpoints and resume
# A checkpoint holds what an exact resume needs: weights, optimizer state (with fp32 masters), step
# counters, every process's RNG states and, once it is no longer the starting model, the reference.
# It is written to a temporary folder and renamed into place, so a kill during a save leaves the
# previous checkpoint or the new one, never a broken one.
def save_checkpoint(run_dir: Path, model, optimizer, state: dict, reference_model, cfg: Config):
    final, temporary, previous = (run_dir / f"checkpoint{end}" for end in ("", ".tmp", ".old"))
    rank = rank_and_world()[0]
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    torch.save(capture_rng_state(), temporary / f"rng_rank{rank}.pt")
    sharded = isinstance(optimizer, ShardedMasterWeightAdamW)
    if sharded or rank == 0:  # sharded: each process holds its own share
        torch.save(optimizer.state_dict(), temporary / optimizer_file(rank, sharded))
    if rank == 0:
        model.save_pretrained(temporary / "model")
        if cfg.beta > 0 and state["reference_step"] > 0:
            reference_model.save_pretrained(temporary / "reference_model")
    barrier()
    if rank == 0:
        (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))  # last: complete
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
            "optimizer": torch.load(checkpoint / optimizer_file(rank, sharded), map_location="cpu",
                                    weights_only=False),
            "rng": torch.load(checkpoint / f"rng_rank{rank}.pt", weights_only=False)}


def capture_rng_state() -> dict:
    """Every generator a step draws from: Python's, NumPy's, torch's CPU one and this GPU's."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def restore_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# %% 12. The run record
# What a person reads about a run, written by the main process only: metrics.jsonl (a line per
# step), completions.jsonl (samples with their rewards), eval_steps.jsonl (a line per periodic
# evaluation), wandb (offline when no login is found; it never prompts), curves.png, and the table
# of accuracy before and after that ends the run.
def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file; a torn last line (power lost mid-write) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() \
        else []
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


CURVES_MIN_INTERVAL_S = 600  # curves.png takes about a second: redrawn at a checkpoint this old


class RunLogger:
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None,
                 memory_budget_gb: float | None = None):
        self.run_dir, self.cfg, self.memory_budget_gb = run_dir, cfg, memory_budget_gb
        self.steps_logged, self.last_drawn = 0, None
        if resume_step is not None:  # lines of steps after the checkpoint will be redone
            for name in ("metrics.jsonl", "completions.jsonl", "eval_steps.jsonl"):
                kept = [r for r in read_jsonl(run_dir / name) if r["step"] <= resume_step]
                write_jsonl(run_dir / name, kept)
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
        return wandb.init(project=self.cfg.wandb_project, name=self.run_dir.name,
                          id=id_file.read_text().strip(), resume="allow", dir=str(self.run_dir),
                          config=asdict(self.cfg), mode=mode)

    def log_step(self, metrics: dict) -> None:
        self.steps_logged += 1
        if "gpu_memory_gb" in metrics and self.steps_logged <= 3:  # beside the start-up estimate
            tqdm.write(f"step {metrics['step']}: peak GPU memory {metrics['gpu_memory_gb']:.1f} GB "
                       f"measured, {self.memory_budget_gb:.1f} GB estimated")
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in metrics.items()}  # NaN is not JSON: null
        append_jsonl(self.run_dir / "metrics.jsonl", [finite])
        if self.wandb_run is not None:
            logged = {k: v for k, v in metrics.items() if k != "step"}
            self.wandb_run.log(logged, step=metrics["step"])

    def log_completions(self, step: int, example: dict, rollout: dict, rewards, rewards_per_func,
                        func_names: list[str], advantages, count: int = 4) -> None:
        """A few completions of the step's first prompt: reward, each function's, advantage."""
        rows = [{"step": step, "question": example["question"], "answer": example["answer"],
                 "completion": rollout["completions"][i], "reward": float(rewards[i]),
                 **{f"rewards/{name}": float(rewards_per_func[i, j])
                    for j, name in enumerate(func_names)}, "advantage": float(advantages[i])}
                for i in range(min(count, len(rollout["completions"])))]
        append_jsonl(self.run_dir / "completions.jsonl", rows)
        if self.wandb_run is not None:
            import wandb
            table = wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])
            self.wandb_run.log({"completions": table}, step=step)

    def log_eval(self, record: dict) -> None:
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
        last = self.last_drawn
        if final or last is None or time.monotonic() - last >= CURVES_MIN_INTERVAL_S:
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
    """curves.png: reward (total and per function), held-out accuracy (periodic on the subset;
    before and after on the whole split as squares), KL, completion length, the shares of groups
    without signal and of clipped completions, seconds per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    evaluations = read_jsonl(run_dir / "eval_steps.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    steps = [r["step"] for r in records]
    rewards = ["reward", *sorted({k for r in records for k in r if k.startswith("rewards/")})]
    panels = {"reward (mean per completion)": rewards, "held-out accuracy (greedy)": [],
              "KL to reference": ["kl"], "completion length (tokens)": ["completions/mean_length"],
              "shares": ["frac_reward_zero_std", "completions/clipped_ratio"],
              "seconds per step": ["step_time", "rollout_time"]}
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            ax.plot(steps, [math.nan if r.get(key) is None else r[key] for r in records], label=key)
        ax.set(title=title, xlabel="step")
    accuracy_ax = axes[0, 1]
    full = [(0, summary["before"])] if "before" in summary else []
    full += [(steps[-1], summary["after"])] if "after" in summary and steps else []
    for key, color in (("accuracy", "tab:blue"), ("strict_accuracy", "tab:orange")):
        if evaluations:
            accuracy_ax.plot([e["step"] for e in evaluations], [e[key] for e in evaluations],
                             "o-", color=color, label=f"{key}, {evaluations[0]['n']} questions")
        if full:
            accuracy_ax.plot([s for s, _ in full], [result[key] for _, result in full], "s",
                             color=color, label=f"{key}, all {full[0][1]['n']}, before/after")
    accuracy_ax.set_ylim(-0.02, 1.02)
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run_dir / "curves.png", dpi=80)
    plt.close(figure)


def print_final_table(summary: dict, run_dir: Path, eval_set: str) -> None:
    """Accuracy before and after on the full split, with 95% intervals; with --eval_steps, the best
    and the last periodic evaluation on the subset below them."""
    rows = [(f"{when} (n={summary[when]['n']})", summary[when]) for when in ("before", "after")]
    periodic = summary.get("eval_steps", {})
    rows += [(f"{name}: step {result['step']} (n={result['n']})", result)
             for name, result in periodic.items()]
    print("\n" + "-" * 68)
    print(f"{eval_set + ' (greedy)':<22}{'accuracy [95% CI]':>24}{'strict [95% CI]':>22}")
    for label, result in rows:
        cells = []
        for key in ("accuracy", "strict_accuracy"):
            low, high = wilson_interval(round(result[key] * result["n"]), result["n"])
            cells.append(f"{result[key]:.3f} [{low:.3f}, {high:.3f}]")
        print(f"{label:<22}{cells[0]:>24}{cells[1]:>22}")
    if periodic:
        print("best/last: periodic evaluations on a subset; the best of noisy points reads high")
    print(f"steps {summary['steps']} | training {summary['train_seconds'] / 60:.1f} min | "
          f"rollout {summary['tokens_per_second']:.0f} tokens/s | run folder {run_dir}")
    print("-" * 68)


# %% 13. The memory budget
# What each GPU must hold, estimated before anything runs, so a run says up front whether it fits.
# Resident: weights, fp32 master weights and AdamW's two fp32 moments (1/N of them sharded over N
# processes), the reference model, compiled decoding's two static KV caches. On top, the larger of
# eager generation's KV cache and the loss pass (gradients and one micro-batch's activations: the
# kept logits and their gradient, the checkpointed layer inputs, one layer being recomputed).
def memory_budget(model: nn.Module, cfg: Config, world_size: int, prompt_tokens: int,
                  eval_prompt_tokens: int | None = None) -> dict:
    """Estimated bytes per GPU for the longest train and eval prompts (eval: the train one when not
    given); `model` may live on the meta device. Byte counts are exact, activations estimated."""
    config, dtype = model.config, next(model.parameters()).dtype
    width = torch.finfo(dtype).bits // 8
    params = sum(p.numel() for p in model.parameters())
    shards = world_size if cfg.shard_optimizer and world_size > 1 else 1
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_per_token = 2 * layers * config.num_key_value_heads * head_dim * width
    rollout_rows = math.ceil(cfg.batch_size * cfg.num_generations / world_size)
    rollout_tokens = rollout_rows * (prompt_tokens + cfg.max_completion_length)
    eval_prompt_tokens = eval_prompt_tokens or prompt_tokens
    eval_tokens = cfg.eval_batch_size * (eval_prompt_tokens + cfg.eval_max_new_tokens)
    kv_cache, static_kv_cache = kv_per_token * max(rollout_tokens, eval_tokens), 0
    if cfg.compile_generation != "false":  # a GPU's budget: there auto may compile both
        static_kv_cache, kv_cache = kv_per_token * (rollout_tokens + eval_tokens), 0
    micro_batch = min(cfg.micro_batch_size, rollout_rows)  # never more rows than it generated
    tokens = micro_batch * (prompt_tokens + cfg.max_completion_length)
    layer = tokens * (6 * hidden + 4 * config.intermediate_size) * width
    layer_inputs = layers * tokens * hidden * width
    logits = 2 * micro_batch * (cfg.max_completion_length + 1) * vocab * width
    activations = logits + (layer_inputs + layer if cfg.gradient_checkpointing else layers * layer)
    fp32 = 0 if dtype == torch.float32 else 4 * params / shards  # master weights, their gradients
    budget = {"weights": params * width, "master_weights": fp32,
              "optimizer_state": 8 * params / shards,
              "reference_model": params * width if cfg.beta > 0 else 0,
              "static_kv_cache": static_kv_cache, "gradients": params * width + fp32,
              "activations": activations, "kv_cache": kv_cache}
    loss_pass = budget["gradients"] + activations
    budget["peak"] = sum(budget[k] for k in RESIDENT) + max(kv_cache, loss_pass)
    return {key: int(value) for key, value in budget.items()}


RESIDENT = ("weights", "master_weights", "optimizer_state", "reference_model", "static_kv_cache")


def expected_to_fit(budget: dict, gpu_memory_gb: float) -> bool:
    """Within 90% of the card: the rest for the CUDA context and allocator fragmentation."""
    return budget["peak"] / 1e9 <= 0.9 * gpu_memory_gb


def memory_report(budget: dict, gpu_memory_gb: float | None) -> str:
    """The budget in one line, and whether it fits a GPU of gpu_memory_gb."""
    gb = {key: value / 1e9 for key, value in budget.items()}
    parts = " + ".join(f"{key.replace('_', ' ')} {gb[key]:.2f}" for key in RESIDENT)
    generation = f"the larger of generation (KV cache {gb['kv_cache']:.2f}) and " \
        if budget["kv_cache"] else ""
    line = (f"memory budget per GPU (GB, estimated): {parts} resident; then {generation}the loss "
            f"pass (gradients {gb['gradients']:.2f} + activations {gb['activations']:.2f}): peak "
            f"{gb['peak']:.2f}")
    if gpu_memory_gb is not None and expected_to_fit(budget, gpu_memory_gb):
        line += f" | {gpu_memory_gb:.0f} GB GPUs: expected to fit"
    elif gpu_memory_gb is not None:
        line += (f" | {gpu_memory_gb:.0f} GB GPUs: expected NOT to fit; lower --micro_batch_size, "
                 f"use --compile_generation false or more GPUs (README: Memory per GPU)")
    return line


# %% 14. Main and the launch
# main() checks the flags before anything heavy loads: bad input is one line naming the flag or
# file, exit status 2. One process calls run(): evaluate, train, evaluate, save. With N > 1, plain
# `python grpo_from_scratch.py` re-runs itself N times under torch's elastic launcher (what
# `torchrun --standalone` does) and waits; under torchrun, each process goes straight to run().
# Exit statuses: 0 done, 2 bad input, 130 stopped (a checkpoint and the resume command), 1 failed.
AT_LEAST = {"num_generations": 2, "num_eval_examples": 0, "eval_steps": 0, "max_extra_rollouts": 0,
            "beta": 0, **dict.fromkeys(
                ("num_iterations", "num_steps", "batch_size", "max_completion_length", "mu",
                 "eval_batch_size", "eval_max_new_tokens", "eval_subset_size", "micro_batch_size",
                 "save_steps", "log_completions_steps", "num_processes"), 1)}
ABOVE_ZERO = ("temperature", "learning_rate", "max_grad_norm", "epsilon")
# Flags a --resume may change without changing the result (greedy evaluation draws no random
# numbers); num_processes is checked as the run's world size instead.
RESUME_MAY_CHANGE = {"resume", "run_name", "output_dir", "report_to", "wandb_project", "save_steps",
                     "log_completions_steps", "eval_batch_size", "eval_steps", "num_processes"}


def parse_config(argv: list[str] | None) -> Config:
    parser = HfArgumentParser(Config, description="GRPO from scratch: Qwen2.5-1.5B on GSM8K.")

    def refuse(message: str):
        raise ConfigError(message)

    parser.error = refuse  # one line naming the flag, not argparse's usage
    cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ConfigError(f"unknown argument(s): {' '.join(unknown)} (see --help)")
    return cfg


def validate_config(cfg: Config) -> None:
    """Refuse impossible settings before anything heavy loads; each message names its flag."""
    for f in fields(Config):
        value = getattr(cfg, f.name)
        choices = get_args(f.type) if get_origin(f.type) is Literal else ()
        if choices and value not in choices:
            raise ConfigError(f"--{f.name} must be one of {', '.join(choices)} (got {value!r})")
        if f.name in AT_LEAST and value is not None and value < AT_LEAST[f.name]:
            raise ConfigError(f"--{f.name} must be >= {AT_LEAST[f.name]} (got {value})")
        if f.name in ABOVE_ZERO and not value > 0:
            raise ConfigError(f"--{f.name} must be > 0 (got {value})")
    world, rows = launch_world_size(cfg), cfg.batch_size * cfg.num_generations
    gpus = torch.cuda.device_count()
    if cfg.epsilon_high is not None and cfg.epsilon_high < cfg.epsilon:
        raise ConfigError(f"--epsilon_high must be >= --epsilon ({cfg.epsilon}) "
                          f"(got {cfg.epsilon_high})")
    if cfg.run_name is not None and (not cfg.run_name.strip() or "/" in cfg.run_name
                                     or cfg.run_name in (".", "..")):
        raise ConfigError(f"--run_name must be a plain folder name (got {cfg.run_name!r})")
    if cfg.num_processes and torch.cuda.is_available() and "WORLD_SIZE" not in os.environ \
            and cfg.num_processes > gpus:
        raise ConfigError(f"--num_processes {cfg.num_processes}: only {gpus} GPU(s) visible; one "
                          f"process per GPU")
    if world > rows:
        raise ConfigError(f"--num_processes {world}: more processes than the step's {rows} "
                          f"completions (--batch_size x --num_generations); each needs one")
    load_reward_funcs(cfg.reward_funcs, cfg.reward_weights, cfg.max_completion_length,
                      cfg.overlong_buffer)
    for flag in ("train_file", "eval_file"):
        if getattr(cfg, flag) is not None and not Path(getattr(cfg, flag)).is_file():
            raise ConfigError(f"--{flag} {getattr(cfg, flag)}: no such file")
    name, path = cfg.model_name_or_path, Path(cfg.model_name_or_path).expanduser()
    local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if local and not (path / "config.json").is_file():
        raise ConfigError(f"--model_name_or_path {name}: not a model folder (no config.json) and "
                          f"not a hub id like Qwen/Qwen2.5-1.5B-Instruct")


def launch_world_size(cfg: Config) -> int:
    """The launcher's WORLD_SIZE in a launched process, else --num_processes, else one process
    per visible GPU (1 on a CPU)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return cfg.num_processes or max(1, torch.cuda.device_count())


def resolve_run_dir(cfg: Config) -> Path:
    """A new run folder (never an existing run's), or the run to resume."""
    output_dir = Path(cfg.output_dir)
    if cfg.resume and cfg.run_name is None:  # the newest run; without a checkpoint, from step 0
        runs = [d for d in output_dir.glob("*") if (d / "config.json").is_file()]
        if not runs:
            raise ConfigError(f"--resume: no run under {output_dir}/")
        return max(runs, key=lambda d: max(entry.stat().st_mtime for entry in d.iterdir()))
    if cfg.resume:
        if not (output_dir / cfg.run_name / "config.json").is_file():
            raise ConfigError(f"--resume: {output_dir / cfg.run_name} holds no run "
                              f"(no config.json)")
        return output_dir / cfg.run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = output_dir / (cfg.run_name or f"{Path(cfg.model_name_or_path).name}-grpo-{stamp}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--run_name {run_dir.name}: {run_dir} already holds a run; add --resume "
                          f"to continue it or choose another --run_name")
    return run_dir


def check_resume_compatible(cfg: Config, run_dir: Path, world_size: int) -> None:
    saved = json.loads((run_dir / "config.json").read_text())
    changed = [f"--{f.name}" for f in fields(Config)
               if f.name not in RESUME_MAY_CHANGE and saved.get(f.name) != getattr(cfg, f.name)]
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {run_dir}; "
                          f"resume with the original values")
    if saved["world_size"] != world_size:  # each process's RNG state and optimizer shard are its
        count = saved["world_size"]
        raise ConfigError(f"--resume: the run in {run_dir} was trained by {count} process(es) and "
                          f"this launch has {world_size}; resume it with --num_processes {count} "
                          f"(under torchrun: --nproc_per_node {count})")


def agree_on_rank0(compute):
    """compute() on rank 0; its result, or its ConfigError, in every process."""
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


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def resolve_attention(cfg: Config, device: torch.device) -> str:
    """The loss pass's attention: flash_attention_2 where flash-attn imports on CUDA, else sdpa."""
    flash = device.type == "cuda" and flash_attn_available()
    if cfg.attn_implementation == "flash_attention_2" and not flash:
        raise ConfigError("--attn_implementation flash_attention_2 needs a CUDA GPU and the "
                          "flash-attn package (see README); use sdpa")
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "flash_attention_2" if flash else "sdpa"


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(path: str, dtype: torch.dtype, attn: str, device: torch.device,
               flag: str = "--model_name_or_path"):
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{flag} {path}: could not load the model "
                          f"({first_line(error)})") from error
    return model.to(device)


def load_tokenizer(path: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model_name_or_path {path}: could not load the tokenizer "
                          f"({first_line(error)})") from error
    if tokenizer.pad_token is None:
        has_endoftext = "<|endoftext|>" in tokenizer.get_vocab()
        tokenizer.pad_token = "<|endoftext|>" if has_endoftext else tokenizer.eos_token
    return tokenizer


def parameter_checksum(model: nn.Module) -> str:
    """sha256 of the parameters' bytes: equal in every process while the replicas agree."""
    digest = hashlib.sha256()
    for tensor in model.parameters():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# Stopping cleanly: SIGINT or SIGTERM lets the current step finish, then every process saves its
# part of one checkpoint and the run exits 130; a second signal aborts at once (saves are atomic:
# the last checkpoint stays intact). The launcher's processes run in sessions of their own: Ctrl-C
# reaches the launcher only, which asks them to stop through the file named by STOP_FILE_ENV; its
# SIGTERM means stop now (another process failed), so they leave it to its default: exit at once.
STOP_FILE_ENV = "GRPO_STOP_FILE"
STOP_SIGNALS: list[str] = []  # filled by the signal handler; checked after every step


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
            tqdm.write(f"{STOP_SIGNALS[0]}: stopping after this step and saving a checkpoint "
                       f"(Ctrl-C again aborts now)")
    launched = STOP_FILE_ENV in os.environ
    signals = (signal.SIGINT,) if launched else (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(cfg: Config, argv: list[str]) -> dict:
    """The whole run in this process (one of several under a launcher)."""
    rank, world_size, device = setup_distributed()
    if STOP_FILE_ENV in os.environ:
        exit_with_the_launcher()
    if rank > 0:  # one process draws the progress bars, transformers' too
        transformers.utils.logging.disable_progress_bar()
    seed_everything(cfg.seed + rank)
    run_dir = Path(agree_on_rank0(lambda: str(resolve_run_dir(cfg))))
    checkpoint = find_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume:
        check_resume_compatible(cfg, run_dir, world_size)
    resume_state = load_checkpoint(checkpoint) if checkpoint else None

    # Data first (cheap, and bad files are refused before the model loads), then the model.
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    context = AutoConfig.from_pretrained(cfg.model_name_or_path).max_position_embeddings
    splits = {}
    for split, name, budget in (("train", "train", cfg.max_completion_length),
                                ("test", "eval", cfg.eval_max_new_tokens)):
        examples = load_gsm8k(split, tokenizer, cfg.dataset_name, cfg.dataset_config,
                              getattr(cfg, f"{name}_file"), f"--{name}_file")
        examples = examples[:cfg.num_eval_examples or None] if name == "eval" else examples
        splits[name] = drop_overlong_prompts(examples, tokenizer, context, budget, name)
    train_examples, eval_examples = splits["train"], splits["eval"]
    dtype, attn = resolve_dtype(cfg, device), resolve_attention(cfg, device)
    source = str(checkpoint / "model") if checkpoint else cfg.model_name_or_path
    model, reference_model = load_model(source, dtype, attn, device), None
    if checkpoint and cfg.beta > 0:  # the reference: the model as this iteration started
        later = resume_state["trainer_state"]["reference_step"] > 0
        source = str(checkpoint / "reference_model") if later else cfg.model_name_or_path
        reference_model = make_reference(load_model(source, dtype, attn, device))
    prompt_tokens = max(prompt_lengths(train_examples, tokenizer))
    budget = memory_budget(model, cfg, world_size, prompt_tokens,
                           max(prompt_lengths(eval_examples, tokenizer)))
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 \
        if device.type == "cuda" else None
    is_main, dtype_name = rank == 0, str(dtype).removeprefix("torch.")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resumed = checkpoint or "step 0 (no checkpoint yet)"
        resuming = f" | resuming from {resumed}" if cfg.resume else ""
        print(f"run folder {run_dir} | {world_size} process(es), one {device.type} device each | "
              f"dtype {dtype_name} | attention {attn} | {len(train_examples)} train / "
              f"{len(eval_examples)} eval questions{resuming}")
        print(memory_report(budget, gpu_gb))
    graphs_at_start = compiled_graph_count()
    decoding = start_decoding(model, tokenizer, cfg, train_examples, eval_examples)
    failed = {d.fallback for d in decoding.values() if d.fallback}
    failed -= {"another process could not compile"}
    if failed:  # each process that failed says why
        print(f"{f'rank {rank}: ' if world_size > 1 else ''}warning: compiled decoding "
              f"(--compile_generation {cfg.compile_generation}) is not possible here, decoding "
              f"eagerly: {', '.join(sorted(failed))}")
    if is_main:
        print(decoding_line(decoding, cfg))
    if is_main and not cfg.resume:
        resolved = {"run_name": run_dir.name, "world_size": world_size,
                    "memory_budget_bytes": budget,
                    "gpu_memory_gb": gpu_gb, "longest_train_prompt_tokens": prompt_tokens,
                    "resolved_dtype": dtype_name, "resolved_attn_implementation": attn,
                    "decoding": decoding_record(decoding), "torch_version": torch.__version__,
                    "transformers_version": transformers.__version__}
        (run_dir / "config.json").write_text(json.dumps({**asdict(cfg), **resolved}, indent=2))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if cfg.resume and summary_path.exists() else {}
    resume_step = resume_state["trainer_state"]["step"] if checkpoint else 0
    logger = RunLogger(run_dir, cfg, resume_step if cfg.resume else None, budget["peak"] / 1e9) \
        if is_main else None
    started = time.perf_counter()

    def evaluate_and_record(when: str) -> None:
        result = evaluate_model(model, tokenizer, eval_examples, cfg.eval_batch_size,
                                cfg.eval_max_new_tokens, f"eval {when}", decoding.get("eval"))
        if is_main:
            write_jsonl(run_dir / f"eval_{when}.jsonl", result.pop("records"))
            summary[when] = result
            summary_path.write_text(json.dumps(summary, indent=2))
            logger.log_summary(summary)
            print(f"eval {when}: accuracy {result['accuracy']:.3f} (strict "
                  f"{result['strict_accuracy']:.3f}), format {result['format_rate']:.3f}, "
                  f"truncated {result['truncation_rate']:.3f}, n={result['n']}")

    if "before" not in summary:
        evaluate_and_record("before")
    elif is_main:
        print(f"eval before: reusing {summary_path} (accuracy {summary['before']['accuracy']:.3f})")
    with stop_after_step():
        try:
            train_with_grpo(model, tokenizer, train_examples, cfg, run_dir, logger=logger,
                            reference_model=reference_model, resume_state=resume_state,
                            eval_examples=eval_examples, decoding=decoding)
        except TrainingStopped as stopped:
            if is_main:
                logger.draw_curves(final=True)
            message = (f"{stopped}; checkpoint in {run_dir / 'checkpoint'}; resume with:\n  "
                       f"{resume_command(argv, run_dir)}")
            raise TrainingStopped(message, stopped.exit_code) from None
    evaluate_and_record("after")

    checksums = all_gather_list([parameter_checksum(model)])
    if is_main:
        records = read_jsonl(run_dir / "metrics.jsonl")
        rollout_seconds = sum(r["rollout_time"] for r in records)
        tokens = sum(r["tokens_per_second"] * r["rollout_time"] for r in records)
        summary.update({"steps": len(records), "world_size": world_size,
                        "train_seconds": sum(r["step_time"] for r in records),
                        "tokens_per_second": tokens / max(rollout_seconds, 1e-9),
                        "replica_checksums": checksums, "decoding": decoding_record(decoding),
                        "compiled_graphs": compiled_graph_count() - graphs_at_start,
                        "wall_seconds_this_process": time.perf_counter() - started})
        evaluations = read_jsonl(run_dir / "eval_steps.jsonl")
        if evaluations:  # the best periodic evaluation (the earliest of equals) and the last one
            best = max(evaluations, key=lambda e: e["accuracy"])
            keys = ("step", "accuracy", "strict_accuracy", "n")
            summary["eval_steps"] = {name: {key: e[key] for key in keys}
                                     for name, e in (("best", best), ("last", evaluations[-1]))}
        summary_path.write_text(json.dumps(summary, indent=2))
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        logger.draw_curves(final=True)
        logger.finish()
        eval_set = "GSM8K test" if cfg.eval_file is None else Path(cfg.eval_file).name
        print_final_table(summary, run_dir, eval_set)
    return summary


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The same command pointed at this run (argparse takes the last of a repeated flag)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torchrun = world > 1 and STOP_FILE_ENV not in os.environ
    launcher = ["torchrun", "--nproc_per_node", str(world)] if torchrun else ["python"]
    argv = argv[:-2] if argv[-2:] == ["--run_name", run_dir.name] else argv  # the launcher's own
    return shlex.join([*launcher, "grpo_from_scratch.py", *argv, "--run_name", run_dir.name,
                       "--resume"])


# The launcher refuses bad flags, data files and resumes in one line before starting anything, and
# owns the terminal's signals (stop_after_step). When a process fails it stops the others within
# seconds (SIGTERM, SIGKILL after LAUNCHER_SHUTDOWN_SECONDS), so none waits in a collective for a
# peer that is gone; a failing process waits FAILURE_GRACE_SECONDS before saying why, so that the
# first failure is the one reported, not the "connection closed" errors it caused.
LAUNCHER_SHUTDOWN_SECONDS = 10
FAILURE_GRACE_SECONDS = 3


def launch_processes(cfg: Config, argv: list[str], world_size: int) -> dict:
    """The run in world_size processes under torch's elastic launcher; returns its summary."""
    run_dir = resolve_run_dir(cfg)
    if cfg.resume:
        check_resume_compatible(cfg, run_dir, world_size)
    for flag in ("train_file", "eval_file"):
        if getattr(cfg, flag) is not None:
            read_jsonl_rows(getattr(cfg, flag), f"--{flag}")
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size,
                          run_id=uuid.uuid4().hex, rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                          max_restarts=0, signals_to_handle="SIGHUP,SIGQUIT",
                          shutdown_timeout=LAUNCHER_SHUTDOWN_SECONDS)
    stop_file = Path(tempfile.mkdtemp(prefix="grpo-launcher-")) / "stop"

    def ask_to_stop(signum, frame):
        if stop_file.exists():
            raise KeyboardInterrupt  # the launcher stops every process now
        stop_file.write_text(f"{signal.Signals(signum).name} to the launcher")
        print(f"{signal.Signals(signum).name}: every process stops after this step and saves a "
              f"checkpoint (Ctrl-C again aborts now)", file=sys.stderr)

    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    environment = {STOP_FILE_ENV: str(stop_file), "OMP_NUM_THREADS": threads}  # as torchrun's
    saved_environment = {key: os.environ.get(key) for key in environment}
    saved_handlers = {sig: signal.signal(sig, ask_to_stop)
                      for sig in (signal.SIGINT, signal.SIGTERM)}
    elastic_logger = logging.getLogger("torch.distributed.elastic")
    saved_level = elastic_logger.level
    elastic_logger.setLevel(logging.CRITICAL)  # its per-process reports; the outcome is said below
    os.environ.update(environment)
    try:  # every process writes one run folder: the last --run_name wins
        script = str(Path(__file__).resolve())
        elastic_launch(launch, sys.executable)(script, *argv, "--run_name", run_dir.name)
    except ChildFailedError as failed:
        raise TrainingStopped(*launch_outcome(failed.failures, stop_file.exists())) from None
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        for key, value in saved_environment.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
        elastic_logger.setLevel(saved_level)
        shutil.rmtree(stop_file.parent, ignore_errors=True)
    return json.loads((run_dir / "summary.json").read_text())


def launch_outcome(failures: dict, stop_asked: bool) -> tuple[str, int]:
    """(message, exit status) of a launch in which a process failed. A process that said why (an
    error, a refusal, the resume command) leaves the message empty; one killed by a signal it
    could not handle (SIGKILL, the out-of-memory killer) is named. SIGTERM is the launcher's own."""
    codes = [failure.exitcode for failure in failures.values()]
    killed = {rank: failure for rank, failure in failures.items()
              if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM}
    if killed:
        rank, failure = min(killed.items())
        return (f"error: rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}; "
                f"the launcher stopped every other process. The last checkpoint is intact: resume "
                f"with --resume", 1)
    if any(code not in (130, -signal.SIGTERM) for code in codes):
        return "", 2 if 2 in codes and 1 not in codes else 1
    return "", 130 if stop_asked or 130 in codes else 1


def exit_with_the_launcher() -> None:
    """A launched process ends when its launcher does (a SIGKILL, say): left running, it would go
    on writing into the run folder that a resumed run then writes too."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-the-launcher").start()


def report_failure(error: Exception, cfg: Config | None) -> None:
    """With several processes an unexpected exception is one line naming the rank (N tracebacks
    would bury the one that matters); the traceback goes to error_rank<r>.txt in the run folder."""
    time.sleep(FAILURE_GRACE_SECONDS)
    rank = rank_and_world()[0]
    run_dir = Path(cfg.output_dir) / cfg.run_name if cfg is not None and cfg.run_name else None
    detail = ""
    if run_dir is not None and run_dir.is_dir():
        (run_dir / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        detail = f" (traceback in {run_dir / f'error_rank{rank}.txt'})"
    else:
        traceback.print_exc()
    tqdm.write(f"error: rank {rank}: {type(error).__name__}: {first_line(error)}{detail}",
               file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    """The command line: bad input exits 2 with one line naming the flag or file."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg = parse_config(argv)
        validate_config(cfg)
        world_size = launch_world_size(cfg)
        if world_size > 1 and "WORLD_SIZE" not in os.environ:
            return launch_processes(cfg, argv, world_size)
        return run(cfg, argv)
    except ConfigError as error:
        # Every process refuses the same input: rank 0's line is enough. A reward function's return
        # is one process's own (its completions): whichever process met it says so.
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
        tqdm.write(f"error: {rank}CUDA out of memory. Lower --micro_batch_size (now "
                   f"{cfg.micro_batch_size}), --num_generations ({cfg.num_generations}), "
                   f"--max_completion_length ({cfg.max_completion_length}) or --eval_batch_size "
                   f"({cfg.eval_batch_size}); the last checkpoint in "
                   f"{cfg.output_dir}/<run>/checkpoint is intact (resume with --resume)",
                   file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if is_main_process() and STOP_FILE_ENV not in os.environ:  # else the launcher says it
            tqdm.write("aborted; files already written are kept (the last checkpoint is intact; "
                       "resume with --resume)", file=sys.stderr)
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
