"""Unit tests of the contracts in DESIGN.md: values against hand-written formulas, not just types.

CPU only, offline. Tests that need ../shared/data (real Qwen2.5 tokenizer, real GSM8K) skip when it is absent.
"""
import copy
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grpo_from_scratch as grpo
import tiny

QWEN_TOKENIZER = tiny.SHARED_DATA / "qwen2.5-tokenizer"
GSM8K = tiny.SHARED_DATA / "gsm8k"
needs_qwen_tokenizer = pytest.mark.skipif(not (QWEN_TOKENIZER / "tokenizer.json").is_file(),
                                          reason="../shared/data/qwen2.5-tokenizer is absent")
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file() or not (GSM8K / "test.jsonl").is_file(),
                                 reason="../shared/data/gsm8k is absent")

# A well-formed multi-line completion that ends right at </answer>, as a rollout does (the stop token is not text).
GOOD = "<reasoning>\nAda has 3 pens.\nShe buys 4 more: 3 + 4 = 7.\n</reasoning>\n<answer>\n7\n</answer>"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def qwen_tokenizer():
    if not (QWEN_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("../shared/data/qwen2.5-tokenizer is absent")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


# --------------------------------------------------------------------------------------------
# 2. Prompt format and answer extraction
# --------------------------------------------------------------------------------------------
def test_system_prompt_asks_for_both_tag_blocks():
    text = grpo.SYSTEM_PROMPT
    assert text.index("<reasoning>") < text.index("</reasoning>") < text.index("<answer>") < text.index("</answer>")


@pytest.mark.parametrize("text, expected", [
    ("Ada has 3 + 4 = <<3+4=7>>7 pens.\n#### 7", "7"),
    ("It costs 1,350 dollars.\n####  1,350 \n", "1,350"),
    ("negative\n#### -12", "-12"),
    ("a #### b #### 42", "42"),  # the text after the last marker
    ("no marker here", None),
])
def test_extract_answer_from_dataset(text, expected):
    assert grpo.extract_answer_from_dataset(text) == expected


@pytest.mark.parametrize("text, expected", [
    (GOOD, "7"),
    ("<answer>  42 \n</answer>", "42"),                                      # stripped
    ("<answer>1</answer> then <answer>2</answer>", "2"),                    # the last block
    ("<answer>1</answer> then <answer>2", "1"),                             # the last *complete* block
    ("<answer>\n42\n</answer>\n</answer>", "42"),                           # a stray closing tag is not content
    ("<answer>outer <answer>7</answer></answer>", "7"),                     # nested: the innermost complete block
    ("<answer> \n </answer>", ""),                                          # a complete but empty block
    ("<answer>7", None),                                                    # unclosed
    ("7</answer>", None),                                                   # no opening tag
    ("</answer> 7 <answer>", None),                                         # tags in the wrong order
    ("The answer is 7.", None),                                             # absent
    ("", None),
])
def test_extract_answer_from_model_output(text, expected):
    assert grpo.extract_answer_from_model_output(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1,350", 1350.0),
    ("$108.", 108.0),
    ("50%", 50.0),
    ("The answer is 18 apples.", 18.0),
    ("He pays $1,234.56 in total.", 1234.56),
    ("1,000,000", 1_000_000.0),
    ("12.", 12.0),
    ("\\boxed{1,234}", 1234.0),
    ("\\boxed{\\frac{3}{4}}", 0.75),
    ("\\dfrac{1}{2} of them", 0.5),
    ("so the result is \\boxed{72} (not 5)", 72.0),  # a boxed answer wins over later numbers
    ("-5", -5.0),
    ("the temperature fell to -12 degrees", -12.0),
    ("3.75", 3.75),
    (".5", 0.5),
    ("3/4", 0.75),
    ("-3/4", -0.75),
    ("-$20", -20.0),  # a sign before a currency sign
    ("$-20", -20.0),  # or after it
    ("He lost -$1,234.50.", -1234.5),
    ("\u221220", -20.0),  # U+2212, the typeset minus sign
    ("\u2212$20", -20.0),
    ("$\u221220", -20.0),
    ("\u22123/4", -0.75),
    ("-\u20ac5", -5.0),
    ("\\boxed{-$20}", -20.0),
    ("- $20", 20.0),  # a sign must touch the number, as in "- 20"
    ("$5 - $20", 20.0),  # a range, not -20
    ("x-5", 5.0),  # a minus glued to a word is a hyphen, not a sign
    ("x-$5", 5.0),
    ("x\u22125", 5.0),
    ("-$", None),
    ("60 km/h", 60.0),
    ("3 pens, then 12 more, 15 in all", 15.0),  # the last number
    ("2,3,4", 4.0),  # a list, not the number 234
    ("12,34", 34.0),  # not a thousands group either
    ("no number here", None),
    ("", None),
    (None, None),
    ("1/0", None),
])
def test_parse_number(text, expected):
    value = grpo.parse_number(text)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_numbers_equal():
    assert grpo.numbers_equal(1350.0, 1350.0)
    assert not grpo.numbers_equal(1350.0, 1351.0)
    assert not grpo.numbers_equal(None, None)
    assert not grpo.numbers_equal(None, 0.0)


def test_build_prompt_tiny_tokenizer(tokenizer):
    question = "Ada has 3 pens and buys 4 more. How many pens does Ada have now?"
    prompt = grpo.build_prompt(question, tokenizer)
    assert grpo.SYSTEM_PROMPT in prompt and question in prompt
    assert prompt.index(grpo.SYSTEM_PROMPT) < prompt.index(question)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt == (f"<|im_start|>system\n{grpo.SYSTEM_PROMPT}<|im_end|>\n"
                      f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def test_stop_token_ids_tiny_tokenizer(tokenizer):
    expected = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")})
    assert grpo.stop_token_ids(tokenizer) == expected and len(expected) == 2


def test_stop_token_ids_when_endoftext_is_the_unk_token(tmp_path, tokenizer):
    """Qwen2Tokenizer makes <|endoftext|> the unk token unless told otherwise (as for a tiny model folder
    with a Qwen2 config.json); it is still a stop token."""
    from transformers import Qwen2Config
    tokenizer.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=16, num_hidden_layers=1).save_pretrained(tmp_path)
    loaded = grpo.load_tokenizer(str(tmp_path))
    assert loaded.unk_token == "<|endoftext|>"  # the situation this test is about
    assert grpo.stop_token_ids(loaded) == grpo.stop_token_ids(tokenizer) == [0, 2]


def test_tiny_model_folder_reloads_with_the_same_token_ids(tmp_path, tokenizer):
    """What the whole-script tests and the learning export rely on: a saved tiny model folder loads back
    (as Qwen2Tokenizer, picked by the qwen2 model type) and tokenizes prompts and answers identically."""
    tiny.tiny_model(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = grpo.load_tokenizer(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    for i, row in enumerate(tiny.word_problems(20, seed=3)):
        text = grpo.build_prompt(row["question"], tokenizer) + tiny.solution_text(i % 10, 3 * i % 10) + row["answer"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_stop_token_ids_skip_tokens_the_vocabulary_lacks():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_end|>": 1, "a": 2}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0  # maps to <unk> ...
    assert grpo.stop_token_ids(tokenizer) == [1]                   # ... which is no stop token


@needs_qwen_tokenizer
def test_build_prompt_and_stop_ids_real_qwen_tokenizer(qwen_tokenizer):
    question = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
    prompt = grpo.build_prompt(question, qwen_tokenizer)
    assert prompt == (f"<|im_start|>system\n{grpo.SYSTEM_PROMPT}<|im_end|>\n"
                      f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    assert grpo.stop_token_ids(qwen_tokenizer) == [151643, 151645]
    # The answer tags are ordinary text for Qwen, so decoded completions keep them.
    ids = qwen_tokenizer(GOOD, add_special_tokens=False)["input_ids"]
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == GOOD


# --------------------------------------------------------------------------------------------
# 3. GSM8K
# --------------------------------------------------------------------------------------------
def test_load_gsm8k_local_file(tmp_path, tokenizer):
    rows = tiny.word_problems(5, seed=3)
    path = tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    examples = grpo.load_gsm8k("train", tokenizer, local_file=str(path))
    assert [ex["question"] for ex in examples] == [r["question"] for r in rows]
    assert [ex["answer"] for ex in examples] == [r["answer"].split("####")[-1].strip() for r in rows]
    assert all(ex["prompt"] == grpo.build_prompt(ex["question"], tokenizer) for ex in examples)


def test_load_gsm8k_refuses_bad_rows(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(grpo.ConfigError, match="line 1"):
        grpo.load_gsm8k("train", tokenizer, local_file=str(bad))


@pytest.mark.parametrize("answer, accepted", [
    ("1 + 1 = 2\n#### 2", True),
    ("#### -$20", True),
    ("#### 1,350", True),
    ("#### 12 apples", True),
    ("#### ", False),  # nothing after the marker
    ("one plus one\n####", False),
    ("#### six", False),  # no number after the marker
    ("#### 7 #### seven", False),  # the gold is the text after the last marker
    ("#### 1/0", False),
])
def test_load_gsm8k_gold_must_be_a_number(tmp_path, tokenizer, answer, accepted):
    path = tiny.write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": answer}])
    if accepted:
        assert grpo.parse_number(grpo.load_gsm8k("train", tokenizer, local_file=str(path))[0]["answer"]) is not None
    else:
        with pytest.raises(grpo.ConfigError, match="line 1 has no number after the last '####'"):
            grpo.load_gsm8k("train", tokenizer, local_file=str(path))


def test_load_gsm8k_reads_a_file_with_a_byte_order_mark(tmp_path, tokenizer):
    """Windows editors start UTF-8 files with a byte-order mark; it is not part of the first row."""
    rows = tiny.word_problems(3, seed=4)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))
    examples = grpo.load_gsm8k("train", tokenizer, local_file=str(path))
    assert [ex["question"] for ex in examples] == [row["question"] for row in rows]


@needs_gsm8k
@pytest.mark.parametrize("split, expected_rows, expected_commas", [("train", 7473, 79), ("test", 1319, 14)])
def test_real_gsm8k_golds_all_parse_to_integers(tokenizer, split, expected_rows, expected_commas):
    # Every row loads through the same checks as --train_file/--eval_file (each gold must parse).
    examples = grpo.load_gsm8k(split, tokenizer, local_file=str(GSM8K / f"{split}.jsonl"))
    assert len(examples) == expected_rows
    commas = 0
    for ex in examples:
        value = grpo.parse_number(ex["answer"])
        assert value is not None and value == int(value), ex["answer"]
        digits = ex["answer"].replace(",", "")
        assert value == int(digits), ex["answer"]  # commas are digit groups: "1,080" is 1080
        commas += "," in ex["answer"]
    # DESIGN.md: 93 gold answers are written with commas (79 train + 14 test).
    assert commas == expected_commas


# --------------------------------------------------------------------------------------------
# 4. Evaluation helpers
# --------------------------------------------------------------------------------------------
def test_score_answer_lenient_vs_strict():
    example = {"question": "q", "answer": "1350"}
    tagged = grpo.score_answer(0, example, "<answer>1,350</answer>", False)
    untagged = grpo.score_answer(1, example, "So she has 1,350 in total.", True)
    wrong_tag = grpo.score_answer(2, example, "<answer>12</answer> but really 1350", False)
    assert (tagged["correct"], tagged["strict_correct"], tagged["extracted"]) == (True, True, "1,350")
    assert (untagged["correct"], untagged["strict_correct"], untagged["extracted"]) == (True, False, None)
    assert (wrong_tag["correct"], wrong_tag["strict_correct"]) == (False, False)  # the tag wins over later text
    assert untagged["truncated"] is True and tagged["truncated"] is False
    assert grpo.score_answer(3, example, GOOD, False)["formatted"] is True
    assert tagged["formatted"] is False


@pytest.mark.parametrize("successes, n", [(0, 10), (3, 10), (10, 10), (50, 100), (1, 1319), (1000, 1319)])
def test_wilson_interval(successes, n):
    low, high = grpo.wilson_interval(successes, n)
    p = successes / n
    assert 0.0 <= low <= p <= high <= 1.0
    assert high - low > 0
    if 0 < successes < n:
        assert low < p < high


def test_wilson_interval_known_values():
    low, high = grpo.wilson_interval(50, 100)
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert grpo.wilson_interval(0, 0) == (0.0, 0.0)
    low, high = grpo.wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)


# --------------------------------------------------------------------------------------------
# 5. Rewards
# --------------------------------------------------------------------------------------------
def test_correctness_reward():
    completions = ["<answer>1350</answer>", "<answer>\n1,350\n</answer>", "<reasoning>x</reasoning><answer>$1350.</answer>",
                   "<answer>1351</answer>", "1350", "<answer></answer>", GOOD.replace("\n7\n", "\n1350\n")]
    assert grpo.correctness_reward(completions, ["1350"] * len(completions)) == [2.0, 1.5, 1.5, 0.0, 0.0, 0.0, 2.0]
    assert grpo.correctness_reward(["<answer>1,350</answer>", "<answer>1350</answer>"], ["1,350", "1,350"]) == [2.0, 1.5]


def test_correctness_reward_negative_amounts():
    """A negative amount written with a currency sign or the Unicode minus is the same number as its gold."""
    completions = [GOOD.replace("\n7\n", f"\n{answer}\n") for answer in ("-$20", "$-20", "\u221220", "-20", "$20", "- $20")]
    assert grpo.correctness_reward(completions, ["-20"] * len(completions)) == [1.5, 1.5, 1.5, 2.0, 0.0, 0.0]
    assert grpo.correctness_reward(["<reasoning>\n..\n</reasoning>\n<answer>\n-$20\n</answer>"], ["-20"]) == [1.5]


def test_format_reward():
    completions = [GOOD, "<reasoning>r</reasoning><answer>7</answer>",          # all four once
                   "<reasoning>r</reasoning> 7",                               # two tags
                   "<reasoning>r</reasoning><answer>7</answer><answer>8</answer>",  # duplicated answer tags don't count
                   GOOD + GOOD,                                                # every tag twice
                   "no tags", "</answer>"]
    assert grpo.format_reward(completions) == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.0, 0.0, 0.2])
    assert max(grpo.format_reward(completions)) == 0.8


def test_combined_reward_is_the_sum():
    completions = [GOOD, "<answer>7</answer>", "<answer>7.0</answer>", "7", GOOD + "<answer>7</answer>"]
    answers = ["7"] * len(completions)
    combined = grpo.combined_reward(completions, answers)
    sums = [c + f for c, f in zip(grpo.correctness_reward(completions, answers), grpo.format_reward(completions))]
    assert combined == sums
    assert combined == pytest.approx([2.8, 2.4, 1.9, 0.0, 2.0 + 0.4])


def test_reward_registry_has_both_recipes():
    assert set(grpo.REWARD_FUNCS) == {"correctness", "format", "exact_match", "integer", "strict_format",
                                      "soft_format", "xml_count"}
    assert grpo.REWARD_FUNCS["correctness"] is grpo.correctness_reward
    assert grpo.REWARD_FUNCS["format"] is grpo.format_reward


def test_exact_match_reward():
    completions = [GOOD, "<answer>7.0</answer>", "<answer>07</answer>", "7", "<answer> 7 </answer>"]
    assert grpo.exact_match_reward(completions, ["7"] * 5) == [2.0, 0.0, 0.0, 0.0, 2.0]


def test_integer_reward():
    completions = [GOOD, "<answer>1350</answer>", "<answer>7.5</answer>", "<answer>-7</answer>",
                   "<answer>1,350</answer>", "<answer>seven</answer>", "7", "<answer></answer>"]
    assert grpo.integer_reward(completions, ["7"] * len(completions)) == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_strict_format_reward():
    fires = [GOOD, GOOD + "\n", "<reasoning>\na\n\nb\n</reasoning>\n<answer>\n7\n</answer>"]
    silent = ["Sure. " + GOOD,                                           # text before the reasoning block
              GOOD + "\nextra text",                                     # text after the answer block
              "<reasoning>r</reasoning>\n<answer>\n7\n</answer>",       # no newlines inside the reasoning tags
              "<reasoning>\nr\n</reasoning><answer>\n7\n</answer>",     # no newline between the blocks
              "<answer>\n7\n</answer>", "7", ""]
    assert grpo.strict_format_reward(fires, ["7"] * len(fires)) == [0.5] * len(fires)
    assert grpo.strict_format_reward(silent, ["7"] * len(silent)) == [0.0] * len(silent)


def test_soft_format_reward():
    fires = [GOOD, "<reasoning>r</reasoning><answer>7</answer>", "\n <reasoning>multi\nline</reasoning>\n\n<answer>7</answer> more"]
    silent = ["Sure. " + GOOD, "<answer>7</answer><reasoning>r</reasoning>", "<reasoning>r</reasoning>",
              "<answer>7</answer>", "<reasoning>r</reasoning> then <answer>7</answer>", ""]
    assert grpo.soft_format_reward(fires, ["7"] * len(fires)) == [0.5] * len(fires)
    assert grpo.soft_format_reward(silent, ["7"] * len(silent)) == [0.0] * len(silent)


def test_xml_count_reward():
    completions = [GOOD,                                   # ends at </answer>, as rollouts do: nothing after the answer
                   GOOD + "\n",                            # a trailing newline is not penalised
                   GOOD + "\nextra",                       # 5 characters after the answer, counted by both answer tags
                   "<reasoning>\nr\n</reasoning>\n",       # the reasoning tags only
                   "<reasoning>\nr\n</reasoning>\n<answer>\n7\n</answer>\n<answer>\n8\n</answer>",  # answer tags twice
                   "no tags at all"]
    expected = [0.5, 0.5, 0.5 - 2 * 0.005, 0.25, 0.25, 0.0]
    assert grpo.xml_count_reward(completions, ["7"] * len(completions)) == pytest.approx(expected, abs=1e-12)


def test_xml_count_reward_does_not_depend_on_reasoning_length():
    short = "<reasoning>\nr\n</reasoning>\n<answer>\n7\n</answer>"
    long = "<reasoning>\n" + "step. " * 200 + "\n</reasoning>\n<answer>\n7\n</answer>"
    assert grpo.xml_count_reward([short, long]) == pytest.approx([0.5, 0.5], abs=1e-12)


def test_trl_demo_set_on_one_perfect_completion():
    names = ["exact_match", "integer", "strict_format", "soft_format", "xml_count"]
    values = [grpo.REWARD_FUNCS[name]([GOOD], ["7"])[0] for name in names]
    assert values == pytest.approx([2.0, 0.5, 0.5, 0.5, 0.5])


def test_score_completions_columns_in_order():
    funcs = {"correctness": grpo.correctness_reward, "format": grpo.format_reward}
    completions, answers = [GOOD, "7", "<answer>7.0</answer>"], ["7", "7", "7"]
    table = grpo.score_completions(funcs, completions, answers)
    assert table.shape == (3, 2) and table.dtype == torch.float32
    torch.testing.assert_close(table[:, 0], torch.tensor([2.0, 0.0, 1.5]))
    torch.testing.assert_close(table[:, 1], torch.tensor([0.8, 0.0, 0.4]))


def test_soft_overlong_reward_values():
    # L = 20, N = 4: no penalty up to 16 tokens, then -1/4 per token, -1 at the budget and beyond.
    lengths = [0, 16, 17, 18, 20, 21]
    values = grpo.soft_overlong_reward(["x"] * 6, ["7"] * 6, lengths, max_completion_length=20, overlong_buffer=4)
    assert values == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    # N = 1: only a completion that uses the whole budget is punished.
    assert grpo.soft_overlong_reward(["x"] * 3, ["7"] * 3, [18, 19, 20], 20, 1) == [0.0, 0.0, -1.0]


def test_score_completions_passes_completion_lengths_only_to_functions_that_declare_them():
    seen = {}

    def lengths_as_reward(completions, answers, completion_lengths):
        seen["lengths"] = completion_lengths
        return [float(n) for n in completion_lengths]

    funcs, _ = grpo.load_reward_funcs("correctness,soft_overlong", None, max_completion_length=20, overlong_buffer=4)
    funcs["lengths_as_reward"] = lengths_as_reward  # correctness_reward takes no lengths: passing them would raise
    table = grpo.score_completions(funcs, [GOOD, "7", "8"], ["7"] * 3, completion_lengths=[12, 18, 20])
    torch.testing.assert_close(table, torch.tensor([[2.0, 0.0, 12.0], [0.0, -0.5, 18.0], [0.0, -1.0, 20.0]]))
    assert seen["lengths"] == [12, 18, 20]


REWARD_FILE = '''\
from __future__ import annotations  # string annotations: the dataclass below needs its module in sys.modules

from dataclasses import dataclass

import numpy as np


@dataclass
class Scale:
    factor: float = 0.01


def length_bonus(completions, answers):
    return [Scale().factor * len(c) for c in completions]


def lengths_seen(completions, answers, completion_lengths):
    return np.asarray(completion_lengths, dtype=np.float32) / 10  # a numpy array is one number per completion


def correctness(completions, answers):  # the name of a built-in
    return [1.0] * len(completions)


NOT_CALLABLE = 3
'''


@pytest.fixture
def reward_dir(tmp_path):
    files = {"good.py": REWARD_FILE, "broken.py": "raise RuntimeError('boom\\nsecond line')\n", "syntax.py": "def f(:\n",
             "exits.py": "import sys\nsys.exit(2)\n", "notes.txt": "def f(completions, answers):\n    return []\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_load_reward_funcs_from_a_file_named_and_weighted(reward_dir):
    good = reward_dir / "good.py"
    spec = f"correctness, {good}:length_bonus,soft_overlong,{good}:lengths_seen"
    funcs, weights = grpo.load_reward_funcs(spec, "1, 0.5,-2,3", max_completion_length=20, overlong_buffer=4)
    assert list(funcs) == ["correctness", "length_bonus", "soft_overlong", "lengths_seen"]
    assert funcs["correctness"] is grpo.correctness_reward
    assert funcs["length_bonus"].__module__ == funcs["lengths_seen"].__module__  # one import of the file
    assert weights == [1.0, 0.5, -2.0, 3.0]
    assert grpo.load_reward_funcs(spec, None, 20, 4)[1] == [1.0] * 4

    completions, lengths = [GOOD, "7", "x" * 30], [10, 17, 20]
    table = grpo.score_completions(funcs, completions, ["7"] * 3, completion_lengths=lengths)
    by_hand = [[2.0, 0.01 * len(GOOD), 0.0, 1.0], [0.0, 0.01, -0.25, 1.7], [0.0, 0.3, -1.0, 2.0]]
    torch.testing.assert_close(table, torch.tensor(by_hand))
    weighted = [sum(w * v for w, v in zip(weights, row)) for row in by_hand]
    torch.testing.assert_close(grpo.weighted_reward(table, weights), torch.tensor(weighted))
    # weights of 1 give exactly the plain sum the loop takes today
    assert torch.equal(grpo.weighted_reward(table, [1.0] * 4), table.sum(1))


def test_load_reward_funcs_two_files_with_one_name(tmp_path):
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "rewards.py").write_text(f"def f_{folder}(completions, answers):\n    return [{value}] * len(completions)\n")
    funcs, _ = grpo.load_reward_funcs(f"{tmp_path}/a/rewards.py:f_a,{tmp_path}/b/rewards.py:f_b", None, 20, 4)
    assert grpo.score_completions(funcs, ["x"], ["7"]).tolist() == [[1.0, 2.0]]


BUILTIN_CHOICES = "correctness, format, exact_match, integer, strict_format, soft_format, xml_count, soft_overlong"
UNKNOWN = "--reward_funcs: unknown reward {!r}; choose from " + BUILTIN_CHOICES + ", or path/to/file.py:function"
BAD_REWARD_SPECS = [  # (--reward_funcs, --reward_weights, message); {dir} is the folder of the files
    ("correctnes", None, UNKNOWN.format("correctnes")),
    ("{dir}/good.py", None, UNKNOWN.format("{dir}/good.py")),
    ("{dir}/missing.py:f", None, "--reward_funcs {dir}/missing.py:f: '{dir}/missing.py' is not an existing .py file"),
    ("{dir}/broken.py:f", None, "--reward_funcs {dir}/broken.py: importing it raised RuntimeError: boom"),
    ("{dir}/exits.py:f", None, "--reward_funcs {dir}/exits.py: importing it raised SystemExit: 2"),
    ("{dir}/notes.txt:f", None, "--reward_funcs {dir}/notes.txt:f: '{dir}/notes.txt' is not an existing .py file"),
    ("{dir}/good.py:nope", None, "--reward_funcs {dir}/good.py:nope: {dir}/good.py defines no function 'nope'"),
    ("{dir}/good.py:NOT_CALLABLE", None,
     "--reward_funcs {dir}/good.py:NOT_CALLABLE: {dir}/good.py defines no function 'NOT_CALLABLE'"),
    ("{dir}/good.py:", None, "--reward_funcs {dir}/good.py:: {dir}/good.py defines no function ''"),
    (":length_bonus", None, "--reward_funcs :length_bonus: '' is not an existing .py file"),
    ("correctness,format,correctness", None,
     "--reward_funcs 'correctness,format,correctness': two functions named 'correctness'"),
    ("correctness,{dir}/good.py:correctness", None,
     "--reward_funcs 'correctness,{dir}/good.py:correctness': two functions named 'correctness'"),
    ("correctness,,format", None, UNKNOWN.format("")),
    ("correctness,", None, UNKNOWN.format("")),
    ("", None, UNKNOWN.format("")),
    *((("correctness,format", weights, f"--reward_weights {weights!r}: needs one finite number per --reward_funcs "
        "entry (2)") for weights in ("1", "1,2,3", "1,abc", "1,", "nan,1", "1,-inf"))),
]


@pytest.mark.parametrize("spec, weights, message", BAD_REWARD_SPECS)
def test_load_reward_funcs_refuses_bad_input_in_one_line_naming_the_flag(reward_dir, spec, weights, message):
    with pytest.raises(grpo.ConfigError) as refused:
        grpo.load_reward_funcs(spec.format(dir=reward_dir), weights, max_completion_length=20, overlong_buffer=4)
    assert str(refused.value) == message.format(dir=reward_dir)


def test_load_reward_funcs_syntax_error_in_one_line(reward_dir):
    with pytest.raises(grpo.ConfigError) as refused:
        grpo.load_reward_funcs(f"{reward_dir}/syntax.py:f", None, 20, 4)
    message = str(refused.value)
    assert message.startswith(f"--reward_funcs {reward_dir.resolve()}/syntax.py: importing it raised SyntaxError: ")
    assert "\n" not in message


@pytest.mark.parametrize("buffer", [0, -1, 20, 25])
def test_soft_overlong_needs_a_buffer_inside_the_budget(buffer):
    with pytest.raises(grpo.ConfigError) as refused:
        grpo.load_reward_funcs("correctness,soft_overlong", None, max_completion_length=20, overlong_buffer=buffer)
    assert str(refused.value) == ("--overlong_buffer must be >= 1 and < --max_completion_length (20) for "
                                  f"soft_overlong (got {buffer})")
    grpo.load_reward_funcs("correctness", None, max_completion_length=20, overlong_buffer=buffer)  # unused: no check


@pytest.mark.parametrize("returned, message", [
    ([1.0, 2.0, 3.0], "returned 3 values for 4 completions"),
    ([1.0] * 5, "returned 5 values for 4 completions"),
    (1.0, "returned a float, not a list of 4 numbers"),
    ({"a": 1.0}, "returned a dict, not a list of 4 numbers"),
    (None, "returned a NoneType, not a list of 4 numbers"),
    ([1.0, "2", 3.0, 4.0], "value 1 is '2' (a str), not a real number"),
    ([1.0, 2.0, None, 4.0], "value 2 is None (a NoneType), not a real number"),
    ([True, 0.0, 0.0, 0.0], "value 0 is True (a bool), not a real number"),
    ([1.0, 2.0, 3.0, 1j], "value 3 is 1j (a complex), not a real number"),
    ([1.0, 2.0, 3.0, torch.tensor(4.0)], "value 3 is tensor(4.) (a Tensor), not a real number"),
    (torch.ones(4, 1), "value 0 is [1.0] (a list), not a real number"),
])
def test_reward_function_returns_are_checked_at_every_call(returned, message):
    def my_fn(completions, answers):
        return returned
    with pytest.raises(grpo.RewardFunctionError) as refused:
        grpo.score_completions({"my_fn": my_fn}, ["a", "b", "c", "d"], ["7"] * 4)
    assert str(refused.value) == f"reward function my_fn (--reward_funcs): {message}"
    assert isinstance(refused.value, grpo.ConfigError)


def test_reward_function_from_a_file_is_named_by_its_function_in_errors(tmp_path):
    (tmp_path / "short.py").write_text("def three(completions, answers):\n    return [0.0] * 3\n")
    funcs, _ = grpo.load_reward_funcs(f"format,{tmp_path}/short.py:three", None, 20, 4)
    assert grpo.score_completions(funcs, ["a", "b", "c"], ["7"] * 3).shape == (3, 2)  # right length: fine
    with pytest.raises(grpo.RewardFunctionError) as refused:
        grpo.score_completions(funcs, ["a", "b", "c", "d"], ["7"] * 4)
    assert str(refused.value) == "reward function three (--reward_funcs): returned 3 values for 4 completions"


def test_reward_function_numbers_of_any_real_type_and_non_finite_values_pass():
    import numpy as np
    funcs = {"numpy": lambda c, a: np.array([1, 2, 3], dtype=np.int64),
             "mixed": lambda c, a: [np.float32(0.5), 2, np.float64(-1.5)],
             "tensor": lambda c, a: torch.tensor([0.25, 0.5, 0.75]),
             "non_finite": lambda c, a: (float("nan"), math.inf, -math.inf)}
    table = grpo.score_completions(funcs, ["a", "b", "c"], ["7"] * 3)
    torch.testing.assert_close(table[:, :3], torch.tensor([[1.0, 0.5, 0.25], [2.0, 2.0, 0.5], [3.0, -1.5, 0.75]]))
    assert math.isnan(table[0, 3]) and table[1, 3] == math.inf and table[2, 3] == -math.inf
    assert math.isnan(grpo.weighted_reward(table, [1.0, 1.0, 1.0, 0.5])[0])  # the loop's non-finite rule takes it from here


# --------------------------------------------------------------------------------------------
# 6. GRPO pieces: advantages, log-probs, masks, loss
# --------------------------------------------------------------------------------------------
def test_group_advantages_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0, 1.0])
    adv = grpo.compute_group_advantages(rewards[:6], num_generations=3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1.0 + 1e-4))
    assert torch.all(adv[3:] == 0)  # zero-variance group: exactly zero, no NaN
    # Unbiased std: for [0, 1] it is sqrt(0.5), not 0.5.
    adv = grpo.compute_group_advantages(rewards[6:8], num_generations=2)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-4))


def test_group_advantages_grouping_is_consecutive():
    rewards = torch.tensor([0.0, 0.0, 4.0, 4.0])  # prompt A's two completions, then prompt B's
    assert torch.all(grpo.compute_group_advantages(rewards, 2) == 0)
    rewards = torch.tensor([0.0, 4.0, 0.0, 4.0])
    adv = grpo.compute_group_advantages(rewards, 2)
    assert torch.all(adv[[0, 2]] < 0) and torch.all(adv[[1, 3]] > 0)


def test_group_advantages_without_scaling_and_all_equal():
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0])
    torch.testing.assert_close(grpo.compute_group_advantages(rewards, 3, scale_rewards="none"),
                               torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]))
    flat = grpo.compute_group_advantages(torch.full((8,), 0.8), 4)
    assert torch.isfinite(flat).all() and torch.all(flat == 0)


def test_scale_rewards_group_batch_none_by_hand():
    import statistics
    rewards = [1.0, 2.0, 6.0, 3.0, 3.0, 4.0]
    groups = [rewards[:3], rewards[3:]]
    centred = [r - statistics.fmean(g) for g in groups for r in g]
    group_std = [statistics.stdev(g) for g in groups for _ in g]  # stdev: the unbiased (n - 1) one
    by_hand = {"group": [c / (s + 1e-4) for c, s in zip(centred, group_std)],
               "batch": [c / (statistics.stdev(rewards) + 1e-4) for c in centred],
               "none": centred}
    for mode, expected in by_hand.items():
        advantages = grpo.compute_group_advantages(torch.tensor(rewards, dtype=torch.float64), 3, scale_rewards=mode)
        torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert tiny.choices("scale_rewards") == ("group", "batch", "none")
    assert by_hand["group"][0] != pytest.approx(by_hand["batch"][0])  # the three modes really differ here


def test_scale_rewards_default_and_unknown_names():
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 4.0])
    assert torch.equal(grpo.compute_group_advantages(rewards, 3), grpo.compute_group_advantages(rewards, 3, "group"))
    for bad in ("Group", "std", "", None, 1, True):
        with pytest.raises(ValueError, match="scale_rewards must be group, batch or none"):
            grpo.compute_group_advantages(rewards, 3, bad)


def _naive_log_probs(logits, index):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index[..., None])[..., 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 50), (3, 4, 50)])
def test_selective_log_softmax_matches_naive(dtype, shape):
    torch.manual_seed(0)
    logits = (torch.randn(*shape) * 3).to(dtype)
    index = torch.randint(0, shape[-1], shape[:-1])
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours, naive = grpo.selective_log_softmax(a, index), _naive_log_probs(b, index)
    assert ours.shape == index.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(index.shape)
    (ours * upstream).sum().backward()
    (naive * upstream).sum().backward()
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-6)
    assert a.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_many_chunks(monkeypatch, dtype):
    vocab = 1000
    monkeypatch.setattr(grpo, "LOGSUMEXP_CHUNK_ELEMENTS", 3 * vocab)  # 3 rows per chunk: 24 rows -> 8 chunks
    assert len(grpo._row_chunks(torch.zeros(4, 6, vocab))) == 8
    torch.manual_seed(1)
    logits = (torch.randn(4, 6, vocab) * 2).to(dtype)
    index = torch.randint(0, vocab, (4, 6))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, naive = grpo.selective_log_softmax(a, index), _naive_log_probs(b, index)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(4, 6)
    (ours * upstream).sum().backward()
    (naive * upstream).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-6)
    # Chunk size bigger than the whole input still works (one chunk).
    monkeypatch.setattr(grpo, "LOGSUMEXP_CHUNK_ELEMENTS", 10 * 24 * vocab)
    torch.testing.assert_close(grpo.selective_log_softmax(logits, index), naive.detach(), rtol=1e-5, atol=1e-5)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest fp32 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_selective_log_softmax_never_makes_a_full_fp32_copy(monkeypatch):
    vocab, rows = 500, 40
    monkeypatch.setattr(grpo, "LOGSUMEXP_CHUNK_ELEMENTS", 4 * vocab)
    logits = torch.randn(rows, vocab).bfloat16().requires_grad_()
    index = torch.randint(0, vocab, (rows,))
    with _LargestFloat32() as ours:
        grpo.selective_log_softmax(logits, index).sum().backward()
    with _LargestFloat32() as naive:
        _naive_log_probs(logits, index).sum().backward()
    assert naive.largest == rows * vocab  # the detector sees a full copy when there is one
    assert ours.largest <= 4 * vocab


def _entropy(logits):
    """The entropy selective_log_softmax returns alongside the log-probs (any index will do)."""
    index = torch.zeros(logits.shape[:-1], dtype=torch.long)
    return grpo.selective_log_softmax(logits, index, with_entropy=True)[1]


def test_entropy_matches_direct_formula(monkeypatch):
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 40) * 2
    p = torch.softmax(logits, -1)
    direct = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(_entropy(logits), direct, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(grpo, "LOGSUMEXP_CHUNK_ELEMENTS", 2 * 40)
    torch.testing.assert_close(_entropy(logits.bfloat16()), -(torch.softmax(logits.bfloat16().float(), -1) *
                               torch.log_softmax(logits.bfloat16().float(), -1)).sum(-1), rtol=1e-5, atol=1e-5)
    uniform = _entropy(torch.zeros(2, 40))
    torch.testing.assert_close(uniform, torch.full((2,), math.log(40)))
    peaked = torch.full((1, 40), -1e4)
    peaked[0, 3] = 0
    assert _entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_leaves_log_probs_and_gradients_unchanged(monkeypatch, dtype):
    monkeypatch.setattr(grpo, "LOGSUMEXP_CHUNK_ELEMENTS", 3 * 50)  # several chunks
    torch.manual_seed(3)
    logits = (torch.randn(4, 6, 50) * 3).to(dtype)
    index = torch.randint(0, 50, (4, 6))
    upstream = torch.randn(4, 6)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    plain = grpo.selective_log_softmax(a, index)
    with_entropy, entropy = grpo.selective_log_softmax(b, index, with_entropy=True)
    assert torch.equal(plain, with_entropy) and not entropy.requires_grad
    # The one-pass log-sum-exp gives torch.logsumexp's log-probs, within fp32 rounding (their kernels may differ).
    floats = logits.float()
    torch.testing.assert_close(plain, floats.gather(-1, index[..., None])[..., 0] - floats.logsumexp(-1),
                               rtol=1e-6, atol=1e-6)
    (plain * upstream).sum().backward()
    (with_entropy * upstream + entropy.sum()).sum().backward()  # the entropy adds nothing to the gradient
    assert torch.equal(a.grad, b.grad)


def test_create_completion_mask():
    im_end, eot = 2, 0
    ids = torch.tensor([
        [5, 6, im_end, 7, 8],   # stops on <|im_end|>
        [5, eot, 9, 9, 9],      # stops on <|endoftext|>
        [im_end, 5, 6, 7, 8],   # stop at position 0
        [5, 6, 7, 8, 9],        # no stop: all ones
        [5, 6, eot, im_end, eot],  # stop ids after the first don't matter
        [5, 6, 7, 8, im_end],   # stop at the last position
    ])
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
    ])
    assert torch.equal(grpo.create_completion_mask(ids, [eot, im_end]).long(), expected)
    assert torch.equal(grpo.create_completion_mask(ids, torch.tensor([im_end, eot])).long(), expected)
    # With only one stop id, the other id is an ordinary token.
    assert grpo.create_completion_mask(ids[1:2], [im_end]).tolist() == [[1, 1, 1, 1, 1]]


def _reference_grpo_loss(lp, old, ref, adv, mask, eps, eps_high, beta, loss_type, max_len):
    """Token by token with the min/clip written out by cases, then each aggregation by hand."""
    eps_high = eps if eps_high is None else eps_high
    per_token = []
    for i in range(len(lp)):
        row = []
        for t in range(len(lp[0])):
            r = math.exp(lp[i][t] - old[i][t])
            a = adv[i]
            # min(r*A, clip(r)*A) = A*min(r, 1+eps_high) for A >= 0, A*max(r, 1-eps) for A < 0.
            surrogate = a * min(r, 1 + eps_high) if a >= 0 else a * max(r, 1 - eps)
            kl = 0.0
            if beta:
                d = ref[i][t] - lp[i][t]
                kl = math.exp(d) - d - 1
            row.append(-surrogate + beta * kl)
        per_token.append(row)
    m = mask.tolist()
    if loss_type == "grpo":
        return sum(sum(x * w for x, w in zip(row, mrow)) / sum(mrow) for row, mrow in zip(per_token, m)) / len(m)
    total = sum(x * w for row, mrow in zip(per_token, m) for x, w in zip(row, mrow))
    if loss_type == "bnpo":
        return total / sum(map(sum, m))
    return total / (len(m) * max_len)


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    old = lp + (torch.rand(4, 6, generator=g, dtype=torch.float64) - 0.5) * 1.2  # ratios in ~[0.55, 1.8]
    ref = lp + (torch.rand(4, 6, generator=g, dtype=torch.float64) - 0.5) * 1.0
    adv = torch.tensor([1.3, -0.7, 0.4, -1.6], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta, eps_high", [(0.04, None), (0.0, None), (0.1, 0.28)])
def test_grpo_loss_matches_direct_formula(loss_type, beta, eps_high):
    lp, old, ref, adv, mask = _loss_inputs()
    loss, metrics = grpo.grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, beta=beta, epsilon_high=eps_high,
                                   loss_type=loss_type, max_completion_length=8)
    expected = _reference_grpo_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask, 0.2, eps_high, beta,
                                    loss_type, 8)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # Metrics: masked token means, by hand.
    eh = 0.2 if eps_high is None else eps_high
    r, m, a = torch.exp(lp - old), mask.bool(), adv[:, None].expand_as(lp)
    low = ((r < 0.8) & (a < 0))[m].double().mean().item()
    high = ((r > 1 + eh) & (a > 0))[m].double().mean().item()
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(low)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(high)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(low + high)
    assert low > 0 and high > 0  # the inputs really exercise both clip regions
    d = (ref - lp)[m]
    assert metrics["kl"].item() == pytest.approx((torch.exp(d) - d - 1).mean().item() if beta else 0.0)


def test_grpo_loss_aggregations_differ_as_documented():
    lp, old, ref, adv, mask = _loss_inputs(1)
    losses = {t: grpo.grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, beta=0.04, loss_type=t, max_completion_length=6)[0]
              for t in ("grpo", "bnpo", "dr_grpo")}
    # dr_grpo = masked sum / (4 x 6); bnpo = masked sum / 15 tokens.
    assert losses["dr_grpo"].item() == pytest.approx(losses["bnpo"].item() * mask.sum().item() / 24)
    assert losses["grpo"].item() != pytest.approx(losses["bnpo"].item())


def test_grpo_loss_requires_max_length_for_dr_grpo_and_a_known_type():
    lp, old, ref, adv, mask = _loss_inputs()
    with pytest.raises(ValueError):
        grpo.grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, beta=0.0, loss_type="dr_grpo")
    with pytest.raises(ValueError):
        grpo.grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, beta=0.0, loss_type="sum")


@pytest.mark.parametrize("loss_type", tiny.choices("loss_type"))
def test_grpo_loss_gradient_sign(loss_type):
    lp = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 2)
    loss, _ = grpo.grpo_loss(lp, None, None, adv, mask, epsilon=0.2, beta=0.0, loss_type=loss_type,
                             max_completion_length=2)
    loss.backward()
    assert torch.all(lp.grad[0] < 0)  # raising a positive-advantage token's log-prob lowers the loss
    assert torch.all(lp.grad[1] > 0)  # raising a negative-advantage token's log-prob raises it
    # The same by finite steps, off-policy from the same point.
    old = lp.detach()

    def loss_at(values):
        return grpo.grpo_loss(values, old, None, adv, mask, epsilon=0.2, beta=0.0, loss_type=loss_type,
                              max_completion_length=2)[0].item()
    base = loss_at(old)
    up_positive, up_negative = old.clone(), old.clone()
    up_positive[0, 0] += 0.05
    up_negative[1, 0] += 0.05
    assert loss_at(up_positive) < base < loss_at(up_negative)


def test_kl_is_zero_when_policy_equals_reference():
    lp, _, _, adv, mask = _loss_inputs()
    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    with_kl, metrics = grpo.grpo_loss(a, None, lp.clone(), adv, mask, epsilon=0.2, beta=0.5)
    without, _ = grpo.grpo_loss(b, None, None, adv, mask, epsilon=0.2, beta=0.0)
    assert metrics["kl"].item() == 0.0
    assert with_kl.item() == pytest.approx(without.item(), abs=1e-15)
    with_kl.backward()
    without.backward()
    torch.testing.assert_close(a.grad, b.grad)  # the k3 term has zero gradient at equality too
    # And the KL is positive as soon as they differ.
    _, metrics = grpo.grpo_loss(lp, None, lp + 0.3, adv, mask, epsilon=0.2, beta=0.5)
    assert metrics["kl"].item() == pytest.approx(math.exp(0.3) - 0.3 - 1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_clipping_inactive_at_ratio_one(loss_type):
    lp, _, _, adv, mask = _loss_inputs()
    lp = lp.clone().requires_grad_()
    loss, metrics = grpo.grpo_loss(lp, lp.detach().clone(), None, adv, mask, epsilon=0.2, beta=0.0, loss_type=loss_type,
                                   max_completion_length=6)
    assert all(metrics[k].item() == 0.0 for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"))
    per_token = -adv[:, None].expand(4, 6) * mask  # -A * ratio, ratio = 1
    if loss_type == "grpo":
        expected = (per_token.sum(1) / mask.sum(1)).mean()
    elif loss_type == "bnpo":
        expected = per_token.sum() / mask.sum()
    else:
        expected = per_token.sum() / (4 * 6)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert torch.all(lp.grad[mask == 0] == 0)
    assert torch.all(torch.sign(lp.grad[mask == 1]) == -torch.sign(adv[:, None].expand(4, 6)[mask == 1]))


def test_epsilon_high_changes_only_the_upper_clip():
    # Token 0: ratio 1.25 with A > 0 (upper side); token 1: ratio 0.5 with A < 0 (lower side).
    old = torch.log(torch.tensor([[1.0], [1.0]], dtype=torch.float64))
    lp_values = torch.log(torch.tensor([[1.25], [0.5]], dtype=torch.float64))
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 1)
    results = {}
    for eps_high in (None, 0.3):
        lp = lp_values.clone().requires_grad_()
        loss, metrics = grpo.grpo_loss(lp, old, None, adv, mask, epsilon=0.2, beta=0.0, epsilon_high=eps_high,
                                       loss_type="bnpo")
        loss.backward()
        results[eps_high] = (loss.item(), {k: v.item() for k, v in metrics.items()}, lp.grad.clone())
    (loss_sym, m_sym, g_sym), (loss_asym, m_asym, g_asym) = results[None], results[0.3]
    assert loss_sym == pytest.approx((-1.2 + 0.8) / 2)    # both clipped: -(1.2 * 1) and -(0.8 * -1)
    assert loss_asym == pytest.approx((-1.25 + 0.8) / 2)  # the upper clip moved to 1.3, the lower stayed at 0.8
    assert (m_sym["clip_ratio/high_mean"], m_asym["clip_ratio/high_mean"]) == (0.5, 0.0)
    assert m_sym["clip_ratio/low_mean"] == m_asym["clip_ratio/low_mean"] == 0.5
    assert g_sym[0, 0] == 0 and g_asym[0, 0] < 0   # the upper token gets a gradient once unclipped
    assert g_sym[1, 0] == g_asym[1, 0] == 0         # the lower token stays clipped either way


@pytest.mark.parametrize("loss_type", tiny.choices("loss_type"))
def test_on_policy_shortcut_equals_detached_old_log_probs(loss_type):
    lp0, _, ref, adv, mask = _loss_inputs(2)
    a, b = lp0.clone().requires_grad_(), lp0.clone().requires_grad_()
    kwargs = dict(epsilon=0.2, beta=0.04, loss_type=loss_type, max_completion_length=6)
    loss_a, metrics_a = grpo.grpo_loss(a, None, ref, adv, mask, **kwargs)
    loss_b, metrics_b = grpo.grpo_loss(b, b.detach(), ref, adv, mask, **kwargs)
    assert loss_a.item() == loss_b.item()
    assert all(metrics_a[k].item() == metrics_b[k].item() for k in metrics_a)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(a.grad, b.grad) and a.grad.abs().sum() > 0


def test_reference_needed_only_with_beta():
    lp, old, _, adv, mask = _loss_inputs()
    loss, metrics = grpo.grpo_loss(lp, old, None, adv, mask, epsilon=0.2, beta=0.0)
    assert torch.isfinite(loss) and metrics["kl"].item() == 0.0
    with pytest.raises(ValueError):
        grpo.grpo_loss(lp, old, None, adv, mask, epsilon=0.2, beta=0.04)


def _reference_gspo_loss(lp, old, ref, adv, mask, eps, eps_high, beta, loss_type, max_len):
    """Sequence by sequence (GSPO): one ratio r = exp(mean log-ratio over the sequence's tokens), the
    min/clip written out by the sign of A, the k3 KL per token, then each aggregation by hand."""
    eps_high = eps if eps_high is None else eps_high
    sums, counts = [], []
    for i in range(lp.shape[0]):
        tokens = [t for t in range(lp.shape[1]) if mask[i][t]]
        r = torch.exp(sum(lp[i, t] - old[i, t] for t in tokens) / len(tokens))
        a = float(adv[i])
        surrogate = a * torch.clamp(r, max=1 + eps_high) if a >= 0 else a * torch.clamp(r, min=1 - eps)
        total = 0.0
        for t in tokens:
            d = ref[i, t] - lp[i, t]
            total = total - surrogate + beta * (torch.exp(d) - d - 1)
        sums.append(total)
        counts.append(len(tokens))
    if loss_type == "grpo":
        return sum(s / n for s, n in zip(sums, counts)) / len(sums)
    if loss_type in ("bnpo", "dapo"):
        return sum(sums) / sum(counts)
    return sum(sums) / (len(sums) * max_len)


def _gspo_inputs():
    """Six sequences of uneven length whose sequence ratios are set exactly: high-clipped (A > 0),
    low-clipped (A < 0), and four inside or on the unclipped side. Token log-ratios vary around
    each sequence's mean; padding positions carry junk that must not count."""
    g = torch.Generator().manual_seed(5)
    lengths = [6, 3, 5, 1, 4, 2]
    mask = (torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]).int()
    seq_log_ratio = torch.tensor([0.4, -0.5, -0.3, 0.1, 0.05, 0.3], dtype=torch.float64)  # r = 1.49, 0.61, 0.74, ...
    adv = torch.tensor([1.2, -0.8, 0.6, -1.1, 0.9, -0.4], dtype=torch.float64)
    noise = (torch.rand(6, 6, generator=g, dtype=torch.float64) - 0.5) * mask
    noise = noise - (noise.sum(1, keepdim=True) / mask.sum(1, keepdim=True)) * mask  # zero mean over each sequence
    lp = -torch.rand(6, 6, generator=g, dtype=torch.float64) * 3
    old = lp - seq_log_ratio[:, None] - noise + 7.0 * (1 - mask)  # junk at the padding
    ref = lp + (torch.rand(6, 6, generator=g, dtype=torch.float64) - 0.5)
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta, eps_high", [(0.04, None), (0.0, 0.28)])
def test_gspo_loss_and_gradient_match_a_sequence_by_sequence_reference(loss_type, beta, eps_high):
    lp, old, ref, adv, mask = _gspo_inputs()
    kwargs = dict(epsilon=0.2, beta=beta, epsilon_high=eps_high, loss_type=loss_type, max_completion_length=8)
    ours_lp, ref_lp = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    loss, metrics = grpo.grpo_loss(ours_lp, old, ref, adv, mask, importance_sampling_level="sequence", **kwargs)
    expected = _reference_gspo_loss(ref_lp, old, ref, adv, mask.tolist(), 0.2, eps_high, beta, loss_type, 8)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (ours_grad,) = torch.autograd.grad(loss, ours_lp)
    (expected_grad,) = torch.autograd.grad(expected, ref_lp)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert torch.all(ours_grad[0] == 0) == (beta == 0)  # sequence 0 is clipped: only its KL term has a gradient
    # The inputs exercise both clip sides; the metrics are token-weighted shares of clipped sequences.
    high = 1 + (0.2 if eps_high is None else eps_high)
    r = [math.exp(x) for x in (0.4, -0.5, -0.3, 0.1, 0.05, 0.3)]
    lengths, a = [6, 3, 5, 1, 4, 2], adv.tolist()
    low_by_hand = sum(n for n, ri, ai in zip(lengths, r, a) if ri < 0.8 and ai < 0) / sum(lengths)
    high_by_hand = sum(n for n, ri, ai in zip(lengths, r, a) if ri > high and ai > 0) / sum(lengths)
    assert low_by_hand == 3 / 21 and high_by_hand == 6 / 21
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(low_by_hand)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(high_by_hand)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(low_by_hand + high_by_hand)
    # and the sequence level is not the token level on these inputs
    token_loss, _ = grpo.grpo_loss(lp, old, ref, adv, mask, **kwargs)
    assert token_loss.item() != pytest.approx(loss.item(), rel=1e-3)


@pytest.mark.parametrize("loss_type", tiny.choices("loss_type"))
def test_gspo_on_policy_equals_token_level(loss_type):
    lp, _, ref, adv, mask = _gspo_inputs()
    kwargs = dict(epsilon=0.2, beta=0.04, loss_type=loss_type, max_completion_length=8)
    results = {}
    for level in tiny.choices("importance_sampling_level"):
        leaf = lp.clone().requires_grad_()
        loss, metrics = grpo.grpo_loss(leaf, None, ref, adv, mask, importance_sampling_level=level, **kwargs)
        results[level] = (loss, torch.autograd.grad(loss, leaf)[0], metrics)
    (token_loss, token_grad, token_metrics), (seq_loss, seq_grad, seq_metrics) = results["token"], results["sequence"]
    assert seq_loss.item() == pytest.approx(token_loss.item(), rel=1e-12)
    torch.testing.assert_close(seq_grad, token_grad, rtol=1e-12, atol=1e-15)
    assert token_grad.abs().sum() > 0
    assert all(seq_metrics[k].item() == token_metrics[k].item() for k in token_metrics)


def test_grpo_loss_refuses_an_unknown_importance_sampling_level():
    lp, old, ref, adv, mask = _loss_inputs()
    assert tiny.choices("importance_sampling_level") == ("token", "sequence")
    with pytest.raises(ValueError, match="unknown importance_sampling_level 'seq'"):
        grpo.grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, beta=0.04, importance_sampling_level="seq")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dapo_is_the_plain_token_mean_and_equals_bnpo(level):
    lp, old, ref, adv, mask = _loss_inputs(4)
    kwargs = dict(epsilon=0.2, beta=0.04, importance_sampling_level=level)
    grads = {}
    for loss_type in ("dapo", "bnpo"):
        leaf = lp.clone().requires_grad_()
        loss, _ = grpo.grpo_loss(leaf, old, ref, adv, mask, loss_type=loss_type, **kwargs)
        grads[loss_type] = (loss, torch.autograd.grad(loss, leaf)[0])
    assert grads["dapo"][0].item() == grads["bnpo"][0].item()
    assert torch.equal(grads["dapo"][1], grads["bnpo"][1])
    # Against the plain whole-batch mean of the per-token terms, token by token.
    leaf = lp.clone().requires_grad_()
    terms = []
    for i in range(4):
        if level == "sequence":
            n = int(mask[i].sum())
            r = torch.exp(sum(leaf[i, t] - old[i, t] for t in range(n)) / n)
        for t in range(int(mask[i].sum())):  # the masks here are left-aligned runs of ones
            if level == "token":
                r = torch.exp(leaf[i, t] - old[i, t])
            a = float(adv[i])
            surrogate = a * torch.clamp(r, max=1.2) if a >= 0 else a * torch.clamp(r, min=0.8)
            d = ref[i, t] - leaf[i, t]
            terms.append(-surrogate + 0.04 * (torch.exp(d) - d - 1))
    plain = sum(terms) / len(terms)
    assert grads["dapo"][0].item() == pytest.approx(plain.item(), rel=1e-12)
    torch.testing.assert_close(grads["dapo"][1], torch.autograd.grad(plain, leaf)[0], rtol=1e-10, atol=1e-14)


def test_loss_denominator():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    assert grpo.loss_denominator(mask, "bnpo") == 6.0
    assert grpo.loss_denominator(mask, "grpo") == 3.0
    assert grpo.loss_denominator(mask, "dr_grpo") == 3.0
    assert grpo.loss_denominator(mask, "dapo") == 6.0
    assert tiny.choices("loss_type") == ("grpo", "bnpo", "dr_grpo", "dapo")


@pytest.mark.parametrize("level", tiny.choices("importance_sampling_level"))
@pytest.mark.parametrize("loss_type", tiny.choices("loss_type"))
def test_micro_batches_weighted_by_loss_denominator_add_up_to_the_full_batch(loss_type, level):
    """What grpo_update relies on: sum over chunks of loss(chunk) * denom(chunk) / denom(all) == loss(all)."""
    lp, old, ref, adv, mask = _loss_inputs(3)
    kwargs = dict(epsilon=0.2, beta=0.04, loss_type=loss_type, max_completion_length=6, importance_sampling_level=level)
    full = lp.clone().requires_grad_()
    full_loss, _ = grpo.grpo_loss(full, old, ref, adv, mask, **kwargs)
    full_loss.backward()
    parts = lp.clone().requires_grad_()
    total, accumulated = grpo.loss_denominator(mask, loss_type), 0.0
    for chunk in (slice(0, 1), slice(1, 3), slice(3, 4)):
        loss, _ = grpo.grpo_loss(parts[chunk], old[chunk], ref[chunk], adv[chunk], mask[chunk], **kwargs)
        weighted = loss * grpo.loss_denominator(mask[chunk], loss_type) / total
        weighted.backward()
        accumulated += weighted.item()
    assert accumulated == pytest.approx(full_loss.item(), rel=1e-12)
    torch.testing.assert_close(parts.grad, full.grad)


# --------------------------------------------------------------------------------------------
# 7. Training-loop pieces
# --------------------------------------------------------------------------------------------
def _bf16_param(seed=0, n=4096):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((0.02 + 0.02 * torch.rand(n, generator=g)).bfloat16())  # weights in [0.02, 0.04]


def test_master_weight_adamw_keeps_small_updates_that_bf16_adamw_loses():
    lr, steps = 5e-6, 60
    param = _bf16_param()
    start = param.detach().clone()
    optimizer = grpo.MasterWeightAdamW([param], lr=lr)
    master = optimizer.master[0]
    assert master.dtype == torch.float32 and master is not param
    for step in range(steps):
        param.grad = torch.ones_like(param)  # the same direction every step: Adam moves each weight ~lr down
        optimizer.clip_grad_norm(1e9)
        assert param.grad is None and master.grad.dtype == torch.float32
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            moved = (start.float() - master.detach())
            assert torch.all(moved > 0.5 * lr) and torch.all(moved < 2 * lr)  # the master copy moved by ~lr
        assert torch.equal(param.detach(), master.detach().bfloat16())       # the bf16 weights follow it
    drift = start.float() - master.detach()
    assert drift.mean().item() == pytest.approx(steps * lr, rel=0.1)
    assert (param.detach() != start).float().mean() > 0.5  # ~3e-4 of drift: most bf16 weights changed

    # Plain AdamW on the same bf16 tensor: each 5e-6 update rounds away.
    plain = _bf16_param()
    torch_adamw = torch.optim.AdamW([plain], lr=lr)
    for _ in range(steps):
        plain.grad = torch.ones_like(plain)
        torch_adamw.step()
    assert (plain.detach() != start).float().mean() < 0.05


def test_master_weight_adamw_fp32_is_plain_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = grpo.MasterWeightAdamW([a], lr=1e-2), torch.optim.AdamW([b], lr=1e-2)
    assert ours.master[0] is a
    for _ in range(3):
        grad = torch.randn(64)
        a.grad, b.grad = grad.clone(), grad.clone()
        norm = ours.clip_grad_norm(1e9)
        assert norm.item() == pytest.approx(grad.norm().item(), rel=1e-5)
        ours.step()
        theirs.step()
    torch.testing.assert_close(a.detach(), b.detach())


def test_master_weight_adamw_clip_grad_norm_clips():
    param = _bf16_param(n=16)
    optimizer = grpo.MasterWeightAdamW([param], lr=1e-3)
    param.grad = torch.full((16,), 3.0).bfloat16()
    norm = optimizer.clip_grad_norm(0.1)
    assert norm.item() == pytest.approx(12.0)
    assert optimizer.master[0].grad.norm().item() == pytest.approx(0.1, rel=1e-3)


def test_master_weight_adamw_state_dict_round_trip():
    lr = 5e-6

    def take_step(optimizer, param, value):
        param.grad = torch.full_like(param, value)
        optimizer.clip_grad_norm(1e9)
        optimizer.step()
        optimizer.zero_grad()

    param = _bf16_param(1)
    optimizer = grpo.MasterWeightAdamW([param], lr=lr)
    for value in (1.0, -0.5, 2.0):
        take_step(optimizer, param, value)
    saved = copy.deepcopy(optimizer.state_dict())
    saved_master = optimizer.master[0].detach().clone()
    assert not torch.equal(saved_master.bfloat16().float(), saved_master)  # master holds more than bf16 can
    take_step(optimizer, param, 1.0)
    after_one_more = optimizer.master[0].detach().clone()
    for value in (3.0, 3.0):  # wander off
        take_step(optimizer, param, value)

    # A fresh optimizer on a fresh bf16 tensor, loaded from the state dict, is where the first one was.
    other = torch.nn.Parameter(torch.zeros_like(param))
    restored = grpo.MasterWeightAdamW([other], lr=lr)
    restored.load_state_dict(saved)
    assert torch.equal(restored.master[0].detach(), saved_master)
    assert torch.equal(other.detach(), saved_master.bfloat16())
    take_step(restored, other, 1.0)  # and the Adam moments came back too: the next step is identical
    assert torch.equal(restored.master[0].detach(), after_one_more)


def test_prompt_indices():
    n, batch = 10, 4
    first = [grpo.prompt_indices(n, step, batch, seed=7) for step in range(5)]
    assert first == [grpo.prompt_indices(n, step, batch, seed=7) for step in range(5)]  # deterministic
    flat = [i for step in first for i in step]
    assert len(flat) == 20 and all(0 <= i < n for i in flat)
    assert sorted(flat[:10]) == list(range(n)) and sorted(flat[10:]) == list(range(n))  # a permutation per epoch
    assert flat[:10] != flat[10:]  # reshuffled each epoch
    other = [i for step in range(5) for i in grpo.prompt_indices(n, step, batch, seed=8)]
    assert other != flat
    assert grpo.prompt_indices(n, 3, batch, seed=7) == first[3]  # depends only on (seed, step): a resume sees the same


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    assert grpo.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage before the last line is an error, not silently skipped
    with pytest.raises(json.JSONDecodeError):
        grpo.read_jsonl(path)
    assert grpo.read_jsonl(tmp_path / "absent.jsonl") == []
