"""Integration tests on a tiny randomly initialised Qwen2ForCausalLM: rollouts, sampling, log-probs,
evaluation, training steps, and the whole script run as a subprocess writing its run record.

CPU only, offline. The real Qwen2.5 tokenizer from ../shared/data is used where present (skipped otherwise).
"""
import copy
import json
import math
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import grpo_from_scratch as grpo
import tiny
from tiny import RecordingLogger, prompts_of_varied_length, stopping_model

REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = tiny.SHARED_DATA / "qwen2.5-tokenizer"
TRL_FUNCS = ["exact_match", "integer", "strict_format", "soft_format", "xml_count"]
ISSUE7_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
               "completions/max_length", "completions/clipped_ratio", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
               "clip_ratio/region_mean", "entropy", "loss", "grad_norm", "learning_rate", "step_time", "rollout_time",
               "tokens_per_second"]
SUMMARY_KEYS = {"accuracy", "strict_accuracy", "format_rate", "truncation_rate", "n"}
PERIODIC_KEYS = {"step", "accuracy", "strict_accuracy", "format_rate", "truncation_rate", "n", "seconds", "indices", "correct"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


# --------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------
def test_generate_completions_shapes_and_masks(tokenizer):
    model = stopping_model(tokenizer)
    prompts = prompts_of_varied_length(tokenizer) * 16  # 48 rows, 3 prompt lengths: stops and cuts are sure
    max_new = 12
    torch.manual_seed(0)
    out = grpo.generate_completions(model, tokenizer, prompts, temperature=1.0, max_new_tokens=max_new)
    stop_ids = grpo.stop_token_ids(tokenizer)
    n = len(prompts)

    # Prompts: left-padded, padding holds the pad id, the rest is exactly the tokenised prompt.
    prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
    assert prompt_ids.shape == prompt_mask.shape and prompt_ids.shape[0] == n
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pad = prompt_ids.shape[1] - len(ids)
        assert prompt_mask[i].tolist() == [0] * pad + [1] * len(ids)
        assert prompt_ids[i, pad:].tolist() == ids
        assert torch.all(prompt_ids[i, :pad] == tokenizer.pad_token_id)
    assert prompt_mask.sum(1).unique().numel() >= 2 and prompt_mask[:, 0].sum() < n  # really ragged

    # Completions: the mask is 1 up to and including the first stop token, trimmed to the longest.
    ids, mask, lengths, truncated = out["completion_ids"], out["completion_mask"], out["lengths"], out["truncated"]
    assert ids.shape == mask.shape == (n, int(lengths.max())) and ids.shape[1] <= max_new
    assert torch.equal(mask, grpo.create_completion_mask(ids, stop_ids))
    assert torch.equal(lengths, mask.sum(1))
    first_stops = set()
    for i in range(n):
        row, length = ids[i].tolist(), int(lengths[i])
        stop_positions = [t for t, token in enumerate(row) if token in stop_ids]
        if truncated[i]:
            assert not stop_positions and length == max_new
            text_ids = row[:length]
        else:
            assert stop_positions and stop_positions[0] == length - 1
            first_stops.add(row[length - 1])
            text_ids = row[:length - 1]
        assert out["completions"][i] == tokenizer.decode(text_ids, skip_special_tokens=True)
    assert truncated.any() and not truncated.all()   # the batch really has both kinds
    assert first_stops == set(stop_ids)                # and stops on either id
    assert len(out["completions"]) == n


def test_rollouts_run_in_eval_mode_with_the_kv_cache(tokenizer):
    """As in training: the model is in train mode with gradient checkpointing on (which turns the cache
    off); a rollout must switch to eval mode, feed one new token per step, and switch back."""
    model = tiny.tiny_model(tokenizer)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen = []

    def record(module, args, kwargs):
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        seen.append((module.training, tokens.shape[1]))

    handle = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prompts = prompts_of_varied_length(tokenizer, 2)
        out = grpo.generate_completions(model, tokenizer, prompts, temperature=1.0, max_new_tokens=6)
    finally:
        handle.remove()
    assert model.training  # restored
    assert all(not training for training, _ in seen)
    prompt_len = out["prompt_ids"].shape[1]
    assert seen[0][1] == prompt_len and [n for _, n in seen[1:]] == [1] * (len(seen) - 1)
    assert len(seen) == out["completion_ids"].shape[1]


def test_rollout_tokens_do_not_depend_on_the_training_mode(tokenizer):
    """Greedy rollouts of a model in train mode with gradient checkpointing (as it sits during training)
    equal those of an eval-mode copy with the same weights, because generate_completions generates in
    eval mode. The model has attention dropout, which is active in train mode only, so the control can
    fail on any transformers version: plain generate() on the same model in train mode gives other tokens.
    (What generate() does about the KV cache in train mode with checkpointing is version-specific, see
    README: 5.23 dropped the cache yet fed one token per step, 5.24 keeps it; this test needs neither.)"""
    prompts = prompts_of_varied_length(tokenizer)
    sensitive = dict(attention_dropout=0.5, initializer_range=0.3)  # wide logits: greedy tokens vary with context
    plain = tiny.tiny_model(tokenizer, **sensitive).eval()
    model = tiny.tiny_model(tokenizer, **sensitive)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    expected = grpo.generate_completions(plain, tokenizer, prompts, temperature=None, max_new_tokens=8)
    got = grpo.generate_completions(model, tokenizer, prompts, temperature=None, max_new_tokens=8)
    assert model.training  # restored
    assert got["completion_ids"].tolist() == expected["completion_ids"].tolist()

    def raw_generate(module):
        torch.manual_seed(0)
        with torch.no_grad():
            return module.generate(input_ids=got["prompt_ids"], attention_mask=got["prompt_mask"],
                                   **grpo.decoding_kwargs(tokenizer, 8, temperature=None)).tolist()
    assert model.training and raw_generate(model) != raw_generate(plain)


def test_sampling_ignores_the_models_generation_config(tokenizer):
    model = tiny.tiny_model(tokenizer).eval()
    model.generation_config.do_sample = True
    model.generation_config.top_k = 1          # if this leaked in, every sample would be the greedy one
    model.generation_config.top_p = 0.01
    prompt = grpo.build_prompt(tiny.word_problems(1, seed=9)[0]["question"], tokenizer)
    prompts = [prompt] * 6
    torch.manual_seed(1)
    sampled = grpo.generate_completions(model, tokenizer, prompts, temperature=1.0, max_new_tokens=8)
    assert len({tuple(row) for row in sampled["completion_ids"].tolist()}) >= 5
    greedy = grpo.generate_completions(model, tokenizer, prompts, temperature=None, max_new_tokens=8)
    assert len({tuple(row) for row in greedy["completion_ids"].tolist()}) == 1
    assert len(set(greedy["completions"])) == 1
    assert model.generation_config.top_k == 1  # not modified either

    # Control: the same call without the explicit settings does pick up top_k=1 (so the test can fail).
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    leaked = model.generate(**encoded, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    assert len({tuple(row) for row in leaked[:, encoded["input_ids"].shape[1]:].tolist()}) == 1


def test_sampled_log_probs_equal_recomputed_log_probs(tokenizer):
    """The distribution sampled from (softmax(logits / T)) is the one compute_log_probs scores."""
    temperature, max_new = 0.7, 10
    model = stopping_model(tokenizer)
    prompts = prompts_of_varied_length(tokenizer) * 2
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    torch.manual_seed(2)
    with torch.no_grad():
        out = model.generate(**encoded, **grpo.decoding_kwargs(tokenizer, max_new, temperature),
                             output_logits=True, return_dict_in_generate=True)
    prompt_len = encoded["input_ids"].shape[1]
    completion_ids = out.sequences[:, prompt_len:]
    raw_logits = torch.stack(out.logits, dim=1).float()  # before any processor
    sampled = torch.log_softmax(raw_logits / temperature, -1).gather(-1, completion_ids[..., None])[..., 0]
    mask = grpo.create_completion_mask(completion_ids, grpo.stop_token_ids(tokenizer))
    assert mask.sum(1).unique().numel() > 1  # ragged: some completions stopped early
    input_ids = torch.cat([encoded["input_ids"], completion_ids], 1)
    attention_mask = torch.cat([encoded["attention_mask"], mask], 1)
    keep = completion_ids.shape[1]
    on = mask.bool()
    with torch.no_grad():
        recomputed = grpo.compute_log_probs(model, input_ids, attention_mask, keep, temperature, micro_batch_size=4)
        wrapped = grpo.compute_log_probs(nn.DataParallel(grpo.PerTokenLogProbs(model)), input_ids, attention_mask, keep,
                                         temperature, micro_batch_size=2)
        untempered = grpo.compute_log_probs(model, input_ids, attention_mask, keep, 1.0, micro_batch_size=4)
    assert recomputed.shape == (len(prompts), keep)
    torch.testing.assert_close(recomputed[on], sampled[on], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wrapped[on], sampled[on], rtol=1e-4, atol=1e-4)
    assert (untempered[on] - sampled[on]).abs().max() > 1e-2  # the temperature matters


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def test_evaluate_model_lenient_vs_strict(monkeypatch, tokenizer):
    examples = [{"question": f"q{i}", "prompt": f"prompt {'x' * i}", "answer": gold}
                for i, gold in enumerate(["7", "1,350", "9", "4", "12"])]
    canned = {
        "prompt ": ("<reasoning>\n3 + 4\n</reasoning>\n<answer>\n7\n</answer>", False),  # right, tagged, formatted
        "prompt x": ("She has $1,350.", False),                                          # right number, no tags
        "prompt xx": ("<answer>3</answer> or maybe 9", False),                           # wrong tag wins
        "prompt xxx": ("I think the answer is", True),                                   # truncated, no number
        "prompt xxxx": ("<reasoning>r</reasoning><answer>12</answer>", False),           # right, tagged, formatted
    }
    calls = []

    def fake_generate(model, tok, prompts, temperature, max_new_tokens, decoding=None):
        calls.append((len(prompts), temperature, max_new_tokens))
        return {"completions": [canned[p][0] for p in prompts],
                "truncated": torch.tensor([canned[p][1] for p in prompts])}

    monkeypatch.setattr(grpo, "generate_completions", fake_generate)
    result = grpo.evaluate_model(None, tokenizer, examples, batch_size=2, max_new_tokens=33)
    assert [c[0] for c in calls] == [2, 2, 1] and all(c[1] is None and c[2] == 33 for c in calls)  # greedy, batched
    assert result["n"] == 5
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["strict_accuracy"] == pytest.approx(2 / 5)
    assert result["format_rate"] == pytest.approx(2 / 5)
    assert result["truncation_rate"] == pytest.approx(1 / 5)
    records = result["records"]
    assert [r["question"] for r in records] == [ex["question"] for ex in examples]  # back in input order
    assert [r["gold"] for r in records] == [ex["answer"] for ex in examples]
    assert [r["correct"] for r in records] == [True, True, False, False, True]
    assert [r["extracted"] for r in records] == ["7", None, "3", None, "12"]
    assert [r["completion"] for r in records] == [canned[ex["prompt"]][0] for ex in examples]


def test_evaluate_model_on_the_tiny_model(tokenizer):
    model = tiny.tiny_model(tokenizer)
    rows = tiny.word_problems(3, seed=4)
    examples = [{"question": r["question"], "prompt": grpo.build_prompt(r["question"], tokenizer),
                 "answer": grpo.extract_answer_from_dataset(r["answer"])} for r in rows]
    model.train()
    result = grpo.evaluate_model(model, tokenizer, examples, batch_size=2, max_new_tokens=6)
    assert model.training  # put back in the mode it was in
    assert SUMMARY_KEYS | {"records"} <= set(result)
    assert result["n"] == 3 and len(result["records"]) == 3
    records = result["records"]
    for key, field in (("accuracy", "correct"), ("strict_accuracy", "strict_correct"), ("format_rate", "formatted"),
                       ("truncation_rate", "truncated")):
        assert result[key] == pytest.approx(sum(r[field] for r in records) / 3)
    for record, example in zip(records, examples):
        assert {"question", "gold", "completion", "extracted", "correct"} <= set(record)
        assert record["question"] == example["question"] and record["gold"] == example["answer"]
        assert record["extracted"] == grpo.extract_answer_from_model_output(record["completion"])
    again = grpo.evaluate_model(model, tokenizer, examples, batch_size=3, max_new_tokens=6)
    assert [r["completion"] for r in again["records"]] == [r["completion"] for r in records]  # greedy: deterministic


# --------------------------------------------------------------------------------------------
# Evaluation during training (--eval_steps)
# --------------------------------------------------------------------------------------------
def global_rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def same_rng_states(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_eval_subset_is_fixed_and_draws_nothing_from_the_global_rng():
    grpo.seed_everything(1)
    states = global_rng_states()
    subset = grpo.eval_subset(1319, 256)
    assert same_rng_states(global_rng_states(), states)  # choosing it perturbs no training randomness
    grpo.seed_everything(2)
    np.random.rand(3), torch.rand(3)
    assert grpo.eval_subset(1319, 256) == subset  # whatever the seed and the state of the global RNGs
    assert subset == sorted(set(subset)) and len(subset) == 256 and 0 <= subset[0] and subset[-1] < 1319
    assert subset != list(range(256)) and subset[-1] > 1000  # spread over the split, not its first questions
    assert grpo.eval_subset(8, 256) == list(range(8))  # a split smaller than the subset: all of it


def test_greedy_evaluation_draws_no_random_numbers(tokenizer):
    """Periodic evaluation runs between training steps: if it drew from the global RNG, the rollouts after
    it would sample other completions than in a run without it."""
    model = stopping_model(tokenizer)
    examples = [{"question": "Q", "prompt": prompt, "answer": "7"} for prompt in prompts_of_varied_length(tokenizer)]
    grpo.seed_everything(3)
    states = global_rng_states()
    result = grpo.evaluate_model(model, tokenizer, examples, batch_size=2, max_new_tokens=8)
    assert result["n"] == 3 and same_rng_states(global_rng_states(), states)
    # Control: sampling does draw from it, so the check can fail.
    grpo.generate_completions(model, tokenizer, [ex["prompt"] for ex in examples], temperature=1.0, max_new_tokens=8)
    assert not same_rng_states(global_rng_states(), states)


def test_run_logger_records_periodic_evaluations(tmp_path):
    """A line of eval_steps.jsonl and eval/* in wandb at the evaluation's step; a resume drops the lines
    after its checkpoint, as for metrics.jsonl."""
    logger = grpo.RunLogger(tmp_path, grpo.Config(report_to="none"), resume_step=None)
    logged = []
    logger.wandb_run = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)))
    for step in (2, 4):
        logger.log_eval({"step": step, "accuracy": step / 10, "strict_accuracy": 0.1, "format_rate": 0.9,
                         "truncation_rate": 0.0, "n": 2, "seconds": 1.5, "indices": [0, 3], "correct": [1, 0]})
    assert [r["step"] for r in grpo.read_jsonl(tmp_path / "eval_steps.jsonl")] == [2, 4]
    assert logged == [(step, {"eval/accuracy": step / 10, "eval/strict_accuracy": 0.1, "eval/format_rate": 0.9,
                              "eval/truncation_rate": 0.0, "eval/seconds": 1.5}) for step in (2, 4)]
    grpo.RunLogger(tmp_path, grpo.Config(report_to="none"), resume_step=3)
    assert [r["step"] for r in grpo.read_jsonl(tmp_path / "eval_steps.jsonl")] == [2]


# --------------------------------------------------------------------------------------------
# Training in process
# --------------------------------------------------------------------------------------------
def char_length_reward(completions, answers):
    """Varied rewards even for equal token counts, so advantages are non-zero."""
    return [float(len(c)) for c in completions]


def train_examples(tokenizer, count=6):
    rows = tiny.word_problems(count, seed=1)
    return [{"question": r["question"], "prompt": grpo.build_prompt(r["question"], tokenizer),
             "answer": grpo.extract_answer_from_dataset(r["answer"])} for r in rows]


def test_train_with_grpo_updates_the_weights(monkeypatch, tokenizer):
    model = tiny.tiny_model(tokenizer)
    before = copy.deepcopy(model.state_dict())
    cfg = grpo.Config(num_steps=2, batch_size=2, num_generations=4, max_completion_length=8, micro_batch_size=3,
                      learning_rate=1e-3, beta=0.04, report_to="none", temperature=1.0)
    calls = []
    real_compute_log_probs = grpo.compute_log_probs
    monkeypatch.setattr(grpo, "compute_log_probs", lambda *a, **k: calls.append(1) or real_compute_log_probs(*a, **k))
    logger = RecordingLogger()
    torch.manual_seed(0)
    trained = grpo.train_with_grpo(model, tokenizer, train_examples(tokenizer), cfg,
                                   reward_funcs={"chars": char_length_reward}, logger=logger)
    assert trained is model
    assert len(calls) == 2  # mu == 1: one reference forward per step, no old-policy forward

    assert [m["step"] for m in logger.steps] == [1, 2]
    for metrics in logger.steps:
        assert set(ISSUE7_KEYS) <= set(metrics) and "rewards/chars" in metrics
        assert metrics["grad_norm"] > 0 and math.isfinite(metrics["loss"])
        assert metrics["reward"] == pytest.approx(metrics["rewards/chars"])
        assert metrics["clip_ratio/region_mean"] == 0.0  # on-policy: ratio 1, nothing clipped
    assert logger.steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    assert logger.steps[1]["kl"] > 1e-7                            # after one update it is not

    # The logged rewards are the reward function applied to the decoded completions, and the advantages
    # are group-relative.
    step, completions, rewards, advantages = logger.completions[0]
    torch.testing.assert_close(rewards[:, 0], torch.tensor(char_length_reward(completions, None)))

    changed = max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert changed > 1e-4  # far more than AdamW's weight decay alone (lr * 0.01 * |w| ~ 1e-6)


def test_train_with_grpo_evaluates_every_eval_steps(tokenizer):
    """With eval_examples: an evaluation after steps 2 and 4 (not 1 or 3), each on the same 3 of the 5
    questions, and the model back in train mode with gradient checkpointing when training goes on."""
    model = tiny.tiny_model(tokenizer)
    cfg = grpo.Config(num_steps=4, batch_size=2, num_generations=2, max_completion_length=6, micro_batch_size=4,
                      eval_steps=2, eval_subset_size=3, eval_batch_size=2, eval_max_new_tokens=6, report_to="none")
    logger, seen = RecordingLogger(), []
    logger.log_eval = lambda record: seen.append((record, model.training, model.is_activation_checkpointing))
    grpo.train_with_grpo(model, tokenizer, train_examples(tokenizer), cfg, reward_funcs={"chars": char_length_reward},
                         logger=logger, eval_examples=train_examples(tokenizer, 5))
    assert [(record["step"], record["n"], record["indices"]) for record, _, _ in seen] == \
        [(step, 3, grpo.eval_subset(5, 3)) for step in (2, 4)]
    assert all(training and checkpointing for _, training, checkpointing in seen)


def test_train_with_grpo_off_policy_without_reference(monkeypatch, tokenizer):
    """mu = 2: old log-probs are computed once per step; beta = 0: no reference model is ever made."""
    model = tiny.tiny_model(tokenizer)
    before = copy.deepcopy(model.state_dict())
    cfg = grpo.Config(num_steps=1, batch_size=2, num_generations=3, max_completion_length=6, micro_batch_size=4, mu=2,
                      beta=0.0, loss_type="bnpo", learning_rate=1e-3, report_to="none", gradient_checkpointing=False)

    def no_reference(model):
        raise AssertionError("beta == 0 must not build a reference model")

    monkeypatch.setattr(grpo, "make_reference", no_reference)
    calls = []
    real_compute_log_probs = grpo.compute_log_probs
    monkeypatch.setattr(grpo, "compute_log_probs", lambda *a, **k: calls.append(1) or real_compute_log_probs(*a, **k))
    logger = RecordingLogger()
    torch.manual_seed(3)
    grpo.train_with_grpo(model, tokenizer, train_examples(tokenizer), cfg, reward_funcs={"chars": char_length_reward},
                         logger=logger)
    assert len(calls) == 1
    (metrics,) = logger.steps
    assert metrics["kl"] == 0.0 and metrics["grad_norm"] > 0
    changed = max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert changed > 1e-4


def test_mask_truncated_completions_leaves_cut_off_completions_out_of_the_loss(monkeypatch, tokenizer):
    """--mask_truncated_completions: the loss mask of a completion that hit the budget without a stop token is
    all zero; every other completion keeps its mask. Without the flag the masks are the rollout's."""
    seen = []
    real_update, real_generate = grpo.grpo_update, grpo.generate_completions
    monkeypatch.setattr(grpo, "generate_completions", lambda *a, **k: seen.append(real_generate(*a, **k)) or seen[-1])
    monkeypatch.setattr(grpo, "grpo_update", lambda policy, optimizer, cfg, ids, attention, mask, *rest:
                        seen.append(mask.clone()) or real_update(policy, optimizer, cfg, ids, attention, mask, *rest))
    for masked in (True, False):
        seen.clear()
        cfg = grpo.Config(num_steps=1, batch_size=4, num_generations=8, max_completion_length=12, micro_batch_size=8,
                          beta=0.0, report_to="none", mask_truncated_completions=masked, gradient_checkpointing=False)
        torch.manual_seed(0)
        grpo.train_with_grpo(stopping_model(tokenizer, stop_bias=(3.0, 3.0)).train(), tokenizer, train_examples(tokenizer), cfg,
                             reward_funcs={"chars": char_length_reward}, logger=RecordingLogger())
        rollout, mask = seen
        truncated = rollout["truncated"]
        assert truncated.any() and not truncated.all()  # both kinds in the batch
        if masked:
            assert (mask[truncated] == 0).all()
            assert torch.equal(mask[~truncated], rollout["completion_mask"][~truncated])
        else:
            assert torch.equal(mask, rollout["completion_mask"])


# --------------------------------------------------------------------------------------------
# The whole script, as a person runs it
# --------------------------------------------------------------------------------------------
def script_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # one thread: 3x faster for a tiny model on a busy CPU
    env.pop("NETRC", None)
    return env


def run_script(args: list[str], home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    home.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, str(REPO / "grpo_from_scratch.py"), *args], cwd=REPO, env=script_env(home),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_run_record(run_dir: Path, paths: dict, steps: int, funcs: list[str], tokenizer, max_completion_length: int = 16):
    """Everything issue 2 and issue 7 ask of the run folder, with values cross-checked."""
    n_eval = len(read_jsonl(Path(paths["eval"])))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 1 and config["num_steps"] == steps and config["run_name"] == run_dir.name
    assert config["reward_funcs"] == ",".join(funcs) and config["model_name_or_path"] == paths["model"]
    assert config["resolved_dtype"] == "float32"

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        missing = [k for k in ISSUE7_KEYS + [f"rewards/{f}" for f in funcs] if k not in m]
        assert not missing, missing
        assert all(math.isfinite(m[k]) for k in ISSUE7_KEYS)
        assert m["reward"] == pytest.approx(sum(m[f"rewards/{f}"] for f in funcs), abs=1e-5)
        assert m["reward_std"] >= 0 and 0 <= m["frac_reward_zero_std"] <= 1
        assert 1 <= m["completions/min_length"] <= m["completions/mean_length"] <= m["completions/max_length"] \
            <= max_completion_length
        assert 0 <= m["completions/clipped_ratio"] <= 1
        assert m["kl"] >= 0 and m["entropy"] > 0 and m["grad_norm"] >= 0
        assert m["clip_ratio/low_mean"] == m["clip_ratio/high_mean"] == m["clip_ratio/region_mean"] == 0.0  # mu == 1
        assert m["learning_rate"] == 1e-3
        assert m["step_time"] >= m["rollout_time"] > 0
        assert m["tokens_per_second"] == pytest.approx(m["completions/mean_length"] * 8 / m["rollout_time"], rel=1e-6)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)

    samples = read_jsonl(run_dir / "completions.jsonl")
    assert [s["step"] for s in samples] == [step for step in range(1, steps + 1) for _ in range(4)]
    for s in samples:
        assert {"question", "answer", "completion", "reward", "advantage"} <= set(s)
        for f in funcs:  # the logged reward is the registry's function applied to the logged text
            assert s[f"rewards/{f}"] == pytest.approx(grpo.REWARD_FUNCS[f]([s["completion"]], [s["answer"]])[0])
        assert s["reward"] == pytest.approx(sum(s[f"rewards/{f}"] for f in funcs))

    eval_rows = read_jsonl(Path(paths["eval"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    for when in ("before", "after"):
        records = read_jsonl(run_dir / f"eval_{when}.jsonl")
        assert len(records) == n_eval
        for record, row in zip(records, eval_rows):
            assert {"question", "gold", "completion", "extracted", "correct"} <= set(record)
            assert record["question"] == row["question"]
            assert record["gold"] == grpo.extract_answer_from_dataset(row["answer"])
            assert record["extracted"] == grpo.extract_answer_from_model_output(record["completion"])
        assert SUMMARY_KEYS <= set(summary[when]) and summary[when]["n"] == n_eval
        assert summary[when]["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / n_eval)
        assert summary[when]["truncation_rate"] == pytest.approx(sum(r["truncated"] for r in records) / n_eval)
        assert all(0 <= summary[when][k] <= 1 for k in SUMMARY_KEYS - {"n"})
    assert summary["steps"] == steps

    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image
    image = matplotlib.image.imread(run_dir / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01

    from transformers import AutoModelForCausalLM, AutoTokenizer
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    start = AutoModelForCausalLM.from_pretrained(paths["model"])
    assert saved.config.vocab_size == start.config.vocab_size
    assert any(not torch.equal(a, b) for a, b in zip(saved.parameters(), start.parameters()))  # it trained
    saved_tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert grpo.build_prompt("Q?", saved_tokenizer) == grpo.build_prompt("Q?", tokenizer)
    assert grpo.stop_token_ids(saved_tokenizer) == grpo.stop_token_ids(tokenizer)
    assert len(grpo.stop_token_ids(saved_tokenizer)) == 2  # <|im_end|> and <|endoftext|>
    state = json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == steps


def check_periodic_evaluations(run_dir: Path, steps: list[int], subset_size: int, n_eval: int, stdout: str):
    """eval_steps.jsonl: one line per due step, each on the same subset_size questions of the eval split,
    its rates in [0, 1]; the step, accuracy and seconds printed; the best and the last in the summary and
    the final table."""
    evaluations = read_jsonl(run_dir / "eval_steps.jsonl")
    assert [e["step"] for e in evaluations] == steps
    subset = evaluations[0]["indices"]
    assert len(set(subset)) == subset_size < n_eval and all(0 <= i < n_eval for i in subset)
    assert subset == grpo.eval_subset(n_eval, subset_size)
    for e in evaluations:
        assert set(e) == PERIODIC_KEYS and e["n"] == subset_size and e["indices"] == subset  # the same questions
        assert all(0 <= e[key] <= 1 for key in SUMMARY_KEYS - {"n"})
        assert len(e["correct"]) == subset_size and e["accuracy"] == pytest.approx(sum(e["correct"]) / subset_size)
        assert e["seconds"] > 0
        assert f"eval step {e['step']}: accuracy {e['accuracy']:.3f} (strict {e['strict_accuracy']:.3f}) " \
               f"on {subset_size} questions, {e['seconds']:.1f} s" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())["eval_steps"]
    best = max(evaluations, key=lambda e: e["accuracy"])
    assert summary == {name: {key: e[key] for key in ("step", "accuracy", "strict_accuracy", "n")}
                       for name, e in (("best", best), ("last", evaluations[-1]))}
    assert f"best: step {best['step']} (n={subset_size})" in stdout and f"last: step {steps[-1]} (n={subset_size})" in stdout


def test_script_run_writes_the_full_record_trl_rewards_and_offline_wandb(tmp_path, tokenizer):
    """One subprocess: 4 steps, the TRL demo's five rewards, an evaluation of 5 of the 8 eval questions
    every 2 steps, --report_to wandb with no login anywhere (a fresh HOME, no WANDB_* variables, stdin
    closed): it must log offline and never prompt."""
    paths = tiny.write_run_inputs(tmp_path, tokenizer=tokenizer)
    out = tmp_path / "outputs"
    args = tiny.run_args(paths, out, num_steps=4, reward_funcs=",".join(TRL_FUNCS), report_to="wandb", eval_steps=2,
                         eval_subset_size=5)
    result = run_script(args, tmp_path / "home")
    run_dir = out / "tiny"
    check_run_record(run_dir, paths, steps=4, funcs=TRL_FUNCS, tokenizer=tokenizer)
    check_periodic_evaluations(run_dir, steps=[2, 4], subset_size=5, n_eval=8, stdout=result.stdout)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert "wandb sync" in result.stdout + result.stderr  # it says how to upload later
    assert "eval after" in result.stdout


def qwen_model_inputs(folder: Path) -> tuple[dict, object]:
    """A tiny random Qwen2ForCausalLM with Qwen2.5's vocabulary size, saved with the real tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643)
    model_dir = folder / "tiny-qwen"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model": str(model_dir),
            "train": str(tiny.write_jsonl(folder / "train.jsonl", tiny.word_problems(32, seed=1))),
            "eval": str(tiny.write_jsonl(folder / "eval.jsonl", tiny.word_problems(8, seed=2)))}, tokenizer


@pytest.mark.skipif(not (QWEN_TOKENIZER / "tokenizer.json").is_file(), reason="../shared/data/qwen2.5-tokenizer is absent")
def test_script_run_with_the_real_qwen_tokenizer(tmp_path):
    """Default rewards (correctness, format), 2 steps, the real Qwen2.5 tokenizer and its 151,936-row vocabulary."""
    paths, tokenizer = qwen_model_inputs(tmp_path)
    out = tmp_path / "outputs"
    run_script(tiny.run_args(paths, out), tmp_path / "home")
    run_dir = out / "tiny"
    check_run_record(run_dir, paths, steps=2, funcs=["correctness", "format"], tokenizer=tokenizer)
    assert grpo.stop_token_ids(tokenizer) == [151643, 151645]
    assert not (run_dir / "wandb").exists()  # --report_to none


REWARD_FILE = '''
def letters(completions, answers):
    return [sum(ch.isalpha() for ch in completion) / 10 for completion in completions]


def tokens(completions, answers, completion_lengths):
    return [float(length) for length in completion_lengths]
'''


def test_script_run_with_rewards_from_a_file_weighted(tmp_path, tokenizer):
    """--reward_funcs mixing built-ins, two functions of the user's file (one reading completion_lengths)
    and soft_overlong, weighted by --reward_weights: each logged as rewards/<name> in metrics.jsonl and
    completions.jsonl, the reward their weighted sum, soft_overlong consistent with the token counts."""
    paths = tiny.write_run_inputs(tmp_path, tokenizer=tokenizer)
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(REWARD_FILE)
    funcs, weights = ["format", "letters", "tokens", "soft_overlong"], [1.0, 0.5, 0.01, 2.0]
    out = tmp_path / "outputs"
    args = tiny.run_args(paths, out, num_steps=2, eval_steps=0, overlong_buffer=4,
                         reward_funcs=f"format,{reward_file}:letters,{reward_file}:tokens,soft_overlong",
                         reward_weights=",".join(map(str, weights)))
    run_script(args, tmp_path / "home")
    metrics = read_jsonl(out / "tiny" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["reward"] == pytest.approx(sum(w * m[f"rewards/{f}"] for f, w in zip(funcs, weights)), abs=1e-5)
    samples = read_jsonl(out / "tiny" / "completions.jsonl")
    assert len(samples) == 8
    for s in samples:
        assert s["rewards/letters"] == pytest.approx(sum(ch.isalpha() for ch in s["completion"]) / 10)
        assert 1 <= s["rewards/tokens"] <= 16  # the completion's token count, within the 16-token budget
        assert s["rewards/soft_overlong"] == pytest.approx(max(-1.0, min(0.0, (16 - 4 - s["rewards/tokens"]) / 4)))
        assert s["reward"] == pytest.approx(sum(w * s[f"rewards/{f}"] for f, w in zip(funcs, weights)), abs=1e-5)
    assert any(s["rewards/soft_overlong"] < 0 for s in samples)  # the random model runs to the budget: punished
