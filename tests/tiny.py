"""Tiny offline stand-ins for Qwen2.5 and GSM8K, built inside the tests (nothing is downloaded).

- `build_tokenizer`: a byte-level BPE trained on a small corpus with Qwen2's own normalizer and
  pre-tokenizer, Qwen's special tokens (<|endoftext|> as pad, <|im_start|>, <|im_end|> as eos), the
  answer tags as single tokens and a Qwen-style chat template. Decoding is exact, so newlines and tags
  survive round trips, and a saved copy loads back (as Qwen2Tokenizer) with the same ids.
- `tiny_model`: a randomly initialised Qwen2ForCausalLM sized for a CPU; `stopping_model`, one that often
  emits either stop token, so a short rollout has early stops and truncated rows.
- `word_problems`: GSM8K-format rows ("... #### 7") from a seeded generator.
- `write_run_inputs`: a model folder plus train/eval jsonl, what `python grpo_from_scratch.py` needs offline.
"""
import json
import random
import time
import typing
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

import grpo_from_scratch as grpo

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea"]
ITEMS = ["pens", "apples", "books", "cards", "shells", "coins", "stamps", "marbles"]


def word_problems(count: int, seed: int, max_operand: int = 9) -> list[dict]:
    """GSM8K-format addition problems: 'Ada has 3 pens and buys 4 more...' with '#### 7'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        rows.append({"question": f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
                     "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}"})
    return rows


def solution_text(a: int, b: int) -> str:
    """The completion the tiny model is taught: the tag layout of SYSTEM_PROMPT."""
    return f"<reasoning>\n{a} + {b} = {a + b}\n</reasoning>\n<answer>\n{a + b}\n</answer>"


def build_tokenizer(extra_corpus: list[str] = (), vocab_size: int = 400) -> PreTrainedTokenizerFast:
    corpus = [grpo.SYSTEM_PROMPT, *extra_corpus, *(r["question"] for r in word_problems(200, seed=0)),
              *(solution_text(a, b) for a in range(10) for b in range(10)), "0 1 2 3 4 5 6 7 8 9 10 , . $ % / -"]
    backend = Tokenizer(models.BPE())
    # Qwen2's normalizer and pre-tokenizer: AutoTokenizer reloads a saved copy as Qwen2Tokenizer (the model
    # type says qwen2), which applies them whatever tokenizer.json says; trained with others, ids would change.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    backend.add_tokens(TAG_TOKENS)  # single tokens, but not "special": decoding must keep them
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_model(tokenizer, hidden_size: int = 32, layers: int = 2, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    settings = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, **overrides}
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **settings)
    return Qwen2ForCausalLM(config).float()


def stopping_model(tokenizer, stop_bias=(2.5, 2.5), tag_bias=2.0, **overrides):
    """The tiny model (overrides go to tiny_model) with an output bias towards the stop tokens <|im_end|> and
    <|endoftext|> (stop_bias, in that order) and the answer tags, so a short rollout has completions that stop
    on either id and completions that hit the length limit. Greedy decoding needs larger logits for that:
    initializer_range=0.3 and stop_bias=(3.0, 4.5) (<|endoftext|> is the padding token, whose embedding row
    starts at zero: its logit is its bias alone)."""
    model = tiny_model(tokenizer, **overrides).eval()
    bias = torch.zeros(len(tokenizer))
    for token, value in zip(("<|im_end|>", "<|endoftext|>"), stop_bias):
        bias[tokenizer.convert_tokens_to_ids(token)] = value
    for token in TAG_TOKENS:
        bias[tokenizer.convert_tokens_to_ids(token)] = tag_bias
    model.lm_head.bias = nn.Parameter(bias, requires_grad=False)
    return model


def prompts_of_varied_length(tokenizer, count=3):
    questions = [row["question"] for row in word_problems(count - 1, seed=5)] + ["Hi?"]
    return [grpo.build_prompt(q, tokenizer) for q in questions]


class RecordingLogger:
    """A stand-in for RunLogger that keeps what train_with_grpo logs in memory."""

    def __init__(self):
        self.steps, self.completions, self.evaluations = [], [], []

    def log_step(self, metrics):
        self.steps.append(metrics)

    def log_completions(self, step, example, rollout, rewards, rewards_per_func, func_names, advantages):
        self.completions.append((step, list(rollout["completions"]), rewards_per_func.clone(), advantages.clone()))

    def log_eval(self, record):
        self.evaluations.append(record)


def choices(flag: str) -> tuple:
    """The values a Literal field of grpo.Config allows, e.g. choices("loss_type")."""
    return typing.get_args(grpo.Config.__annotations__[flag])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_run_inputs(folder: Path, n_train: int = 32, n_eval: int = 8, tokenizer=None) -> dict:
    """A saved tiny model + tokenizer and GSM8K-format train/eval files; returns their paths."""
    tokenizer = tokenizer or build_tokenizer()
    model_dir = folder / "tiny-model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model": str(model_dir),
            "train": str(write_jsonl(folder / "train.jsonl", word_problems(n_train, seed=1))),
            "eval": str(write_jsonl(folder / "eval.jsonl", word_problems(n_eval, seed=2)))}


def run_args(paths: dict, output_dir: Path, **overrides) -> list[str]:
    """Command-line flags for a short offline CPU run of grpo_from_scratch.py."""
    flags = {"model_name_or_path": paths["model"], "train_file": paths["train"], "eval_file": paths["eval"],
             "output_dir": str(output_dir), "run_name": "tiny", "num_steps": 2, "batch_size": 2, "num_generations": 4,
             "max_completion_length": 16, "eval_max_new_tokens": 16, "eval_batch_size": 4, "micro_batch_size": 4,
             "report_to": "none", "learning_rate": 1e-3, "save_steps": 1, "log_completions_steps": 1}
    flags.update(overrides)
    args = []
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    return args


class SaveCrash(Exception):
    """Raised by crash_at_save: the run died while writing a checkpoint."""


def crash_at_save(monkeypatch, step: int) -> None:
    """Make grpo.save_checkpoint raise SaveCrash instead of writing the checkpoint of `step`."""
    real_save = grpo.save_checkpoint

    def save_checkpoint(run_dir, model, optimizer, state, *args):
        if state["step"] == step:
            raise SaveCrash(f"crash in the save of step {step}")
        return real_save(run_dir, model, optimizer, state, *args)
    monkeypatch.setattr(grpo, "save_checkpoint", save_checkpoint)


def wait_for(condition, process, timeout: float = 240.0, what: str = "") -> None:
    """Poll condition() until it holds; fail if the process (a subprocess.Popen) ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def metric_lines(run_dir: Path) -> int:
    """Steps logged so far in a run folder's metrics.jsonl."""
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0
