"""Issue 6: faults and bad input. Refusals (exit 2, one line naming the flag or file, no traceback),
the non-finite guard, atomic checkpoints, kill-and-resume, Ctrl-C, degenerate data, CUDA OOM message.

CPU only, offline, on the tiny model of tests/tiny.py. Refusals run in-process through
`grpo_from_scratch.main(argv)`; a real process is used where one matters (two refusals, SIGKILL and
resume, SIGINT).
"""
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LogitsProcessor, LogitsProcessorList

import grpo_from_scratch as grpo
import tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "grpo_from_scratch.py"
CPU = torch.device("cpu")


def subprocess_env(tmp_path: Path) -> dict:
    """Offline, one thread per process (two runs can share the 2 cores), no cache of the user's."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
            "HF_HOME": str(tmp_path / "hf-home")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return tiny.write_run_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def signal_inputs(tmp_path_factory) -> dict:
    """Like `inputs`, but the tags survive decoding, so format rewards (and gradients) are not all zero."""
    return tiny.write_run_inputs(tmp_path_factory.mktemp("signal-inputs"), )


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory) -> tuple[list[str], Path]:
    """A completed 2-step in-process run: (its argv, its run folder)."""
    output_dir = tmp_path_factory.mktemp("finished")
    argv = tiny.run_args(inputs, output_dir)
    grpo.main(argv)
    run_dir = output_dir / "tiny"
    assert grpo.find_checkpoint(run_dir) == run_dir / "checkpoint"
    return argv, run_dir


def folder_fingerprint(folder: Path) -> dict:
    """Every file's (size, mtime_ns, sha256) under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(argv: list[str], capsys, code: int = 2) -> str:
    """Run main(argv), expect SystemExit(code) and exactly one 'error: ...' line on stderr; return it."""
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def metric_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in grpo.read_jsonl(run_dir / "metrics.jsonl")]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    common = sorted(set(a) & set(b))
    assert common, "no tensors to compare"
    for key in common:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# %% Refusals: exit 2, one line naming the culprit, no traceback, nothing heavy loaded, nothing written
FLAG_REFUSALS = [
    ({"num_generations": 1}, "--num_generations"),
    ({"num_generations": 0}, "--num_generations"),
    ({"batch_size": 0}, "--batch_size"),
    ({"batch_size": -3}, "--batch_size"),
    ({"num_steps": 0}, "--num_steps"),
    ({"num_iterations": 0}, "--num_iterations"),
    ({"max_completion_length": 0}, "--max_completion_length"),
    ({"micro_batch_size": 0}, "--micro_batch_size"),
    ({"eval_batch_size": 0}, "--eval_batch_size"),
    ({"eval_max_new_tokens": -1}, "--eval_max_new_tokens"),
    ({"save_steps": 0}, "--save_steps"),
    ({"log_completions_steps": 0}, "--log_completions_steps"),
    ({"num_eval_examples": -1}, "--num_eval_examples"),
    ({"eval_steps": -1}, "--eval_steps"),
    ({"eval_subset_size": 0}, "--eval_subset_size"),
    ({"temperature": 0}, "--temperature"),
    ({"learning_rate": 0}, "--learning_rate"),
    ({"max_grad_norm": -1}, "--max_grad_norm"),
    ({"beta": -0.01}, "--beta"),
    ({"epsilon": 0}, "--epsilon"),
    ({"epsilon": -0.2}, "--epsilon"),
    ({"epsilon": 0.2, "epsilon_high": 0.1}, "--epsilon_high"),
    ({"loss_type": "ppo"}, "--loss_type"),
    ({"mu": 0}, "--mu"),
    ({"report_to": "tensorboard"}, "--report_to"),
    ({"attn_implementation": "flash"}, "--attn_implementation"),
    ({"attn_implementation": "flash_attention_2"}, "--attn_implementation"),  # CPU: no flash-attn
    ({"dtype": "float16"}, "--dtype"),
    ({"dtype": "int8"}, "--dtype"),
    ({"reward_funcs": "correctness,bogus"}, "--reward_funcs"),
    ({"reward_funcs": ""}, "--reward_funcs"),
    ({"reward_funcs": "correctness,/nonexistent/rewards.py:fn"}, "--reward_funcs"),
    ({"reward_funcs": "correctness,format", "reward_weights": "1"}, "--reward_weights"),
    ({"reward_funcs": "correctness,format", "reward_weights": "1,heavy"}, "--reward_weights"),
    ({"reward_funcs": "correctness,soft_overlong", "overlong_buffer": 0}, "--overlong_buffer"),
    ({"scale_rewards": "True"}, "--scale_rewards"),
    ({"importance_sampling_level": "batch"}, "--importance_sampling_level"),
    ({"max_extra_rollouts": -1}, "--max_extra_rollouts"),
    ({"num_processes": 0}, "--num_processes"),
    ({"num_processes": 9}, "--num_processes"),  # 2 prompts x 4 completions: more processes than completions
    ({"run_name": "a/b"}, "--run_name"),
    ({"model_name_or_path": "/nonexistent/model-folder"}, "--model_name_or_path"),
    ({"train_file": "/nonexistent/train.jsonl"}, "--train_file"),
    ({"eval_file": "/nonexistent/eval.jsonl"}, "--eval_file"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """A refusal must come before the model loads."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(grpo, "load_model", fail)


@pytest.mark.parametrize("overrides,culprit", FLAG_REFUSALS, ids=[f"{c}={list(o.values())[-1]}" for o, c in FLAG_REFUSALS])
def test_flag_refused(overrides, culprit, inputs, tmp_path, capsys, no_model_load):
    line = refusal(tiny.run_args(inputs, tmp_path / "out", **overrides), capsys)
    assert culprit in line
    if "file" in culprit or "model" in culprit or "/nonexistent/" in str(overrides):
        assert "/nonexistent/" in line  # the path itself is named
    assert not (tmp_path / "out").exists(), "a refused run wrote its run folder"


def test_model_folder_without_config_refused(inputs, tmp_path, capsys, no_model_load):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    line = refusal(tiny.run_args(inputs, tmp_path / "out", model_name_or_path=folder), capsys)
    assert "--model_name_or_path" in line and str(folder) in line and "config.json" in line


@pytest.mark.parametrize("extra,culprit", [
    (["--bogus_flag", "3"], "--bogus_flag"),
    (["--num_steps", "three"], "--num_steps"),
    (["--batch_size", "2.5"], "--batch_size"),
    (["--learning_rate", "fast"], "--learning_rate"),
    (["--train_file"], "--train_file"),  # flag given without its value (last on the line)
], ids=["unknown-flag", "int-not-number", "int-float", "float-not-number", "missing-value"])
def test_command_line_refused(extra, culprit, inputs, tmp_path, capsys, no_model_load):
    line = refusal(tiny.run_args(inputs, tmp_path / "out") + extra, capsys)
    assert culprit in line


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD_ROW = json.dumps(tiny.word_problems(1, seed=3)[0])


@pytest.mark.parametrize("flag,lines,expected", [
    ("train_file", [GOOD_ROW, GOOD_ROW, '{"question": "Ada has 3 pens", "answer": "#### 3"', GOOD_ROW], ["line 3", "JSON"]),
    ("eval_file", [GOOD_ROW, "not json at all"], ["line 2", "JSON"]),
    ("train_file", [GOOD_ROW, json.dumps({"answer": "1 + 1 = 2\n#### 2"})], ["line 2", "'question'"]),
    ("train_file", [GOOD_ROW, json.dumps({"question": "   ", "answer": "#### 2"})], ["line 2", "'question'"]),
    ("eval_file", [GOOD_ROW, "", GOOD_ROW, json.dumps({"question": "What is 1 + 1?", "answer": "it is 2"})], ["line 4", "####"]),
    ("train_file", [GOOD_ROW, json.dumps({"question": "What is 1 + 1?"})], ["line 2", "####"]),
    ("train_file", [json.dumps(["a", "list"])], ["line 1", "'question'"]),
    ("train_file", [GOOD_ROW, json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### "})], ["line 2", "no number after the last '####'", "''"]),
    ("eval_file", [GOOD_ROW, GOOD_ROW, json.dumps({"question": "What is 3 + 3?", "answer": "3 + 3 = 6\n#### six"})], ["line 3", "no number after the last '####'", "'six'"]),
    ("train_file", ["", "  "], ["no rows"]),
], ids=["bad-json-train", "bad-json-eval", "no-question", "blank-question", "no-####", "no-answer", "not-an-object",
        "empty-gold", "gold-not-a-number", "empty"])
def test_bad_data_file_refused(flag, lines, expected, inputs, tmp_path, capsys, no_model_load):
    path = write_lines(tmp_path / f"bad-{flag}.jsonl", lines)
    line = refusal(tiny.run_args(inputs, tmp_path / "out", **{flag: path}), capsys)
    assert f"--{flag}" in line and path in line
    for text in expected:
        assert text in line
    assert not (tmp_path / "out").exists()


def test_data_file_not_utf8_refused(inputs, tmp_path, capsys, no_model_load):
    path = tmp_path / "latin-1.jsonl"
    path.write_bytes((GOOD_ROW + "\n" + json.dumps({"question": "Caf\u00e9 sells 3 pies", "answer": "#### 3"},
                                                     ensure_ascii=False) + "\n").encode("latin-1"))
    line = refusal(tiny.run_args(inputs, tmp_path / "out", train_file=path), capsys)
    assert line == f"error: --train_file {path}: line 2 is not UTF-8 text"


def run_script(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def test_real_process_refusals_print_one_line(inputs, tmp_path):
    """Through `python grpo_from_scratch.py`: a malformed JSON line, and a missing --train_file (the hub
    fallback cannot work offline); exit 2, stderr is the single error line, no traceback."""
    bad = write_lines(tmp_path / "train.jsonl", [GOOD_ROW, "{oops"])
    result = run_script(tiny.run_args(inputs, tmp_path / "out", train_file=bad), tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --train_file {bad}: line 2 is not valid JSON"]

    args = tiny.run_args(inputs, tmp_path / "out")
    at = args.index("--train_file")
    del args[at:at + 2]
    result = run_script(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--train_file" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


BAD_REWARD_FILE = """
def short(completions, answers):
    return [1.0]


def words(completions, answers):
    return ["good"] * len(completions)


def not_a_function(completions, answers):
    return [0.0] * len(completions)


not_callable = 3
"""


@pytest.mark.parametrize("entry,expected", [
    ("nowhere.py:fn", "--reward_funcs {folder}/nowhere.py:fn: '{folder}/nowhere.py' is not an existing .py file"),
    ("rewards.py:missing", "--reward_funcs {folder}/rewards.py:missing: {folder}/rewards.py defines no function 'missing'"),
    ("rewards.py:not_callable",
     "--reward_funcs {folder}/rewards.py:not_callable: {folder}/rewards.py defines no function 'not_callable'"),
    ("broken.py:fn", "--reward_funcs {folder}/broken.py: importing it raised NameError: name 'undefined_name' is not defined"),
], ids=["no-file", "no-function", "not-callable", "import-fails"])
def test_reward_file_refused_before_the_model_loads(entry, expected, inputs, tmp_path, capsys, no_model_load):
    (tmp_path / "rewards.py").write_text(BAD_REWARD_FILE)
    (tmp_path / "broken.py").write_text("x = undefined_name\n")
    line = refusal(tiny.run_args(inputs, tmp_path / "out", reward_funcs=f"correctness,{tmp_path}/{entry}"), capsys)
    assert line == "error: " + expected.format(folder=tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("func,expected", [
    ("short", "error: reward function short (--reward_funcs): returned 1 values for 8 completions"),
    ("words", "error: reward function words (--reward_funcs): value 0 is 'good' (a str), not a real number"),
], ids=["wrong-count", "not-a-number"])
def test_bad_reward_return_stops_the_run_in_one_line(func, expected, inputs, tmp_path):
    """Checked at the first call (in the first rollout): exit 2, the one line naming the function, last on the
    screen, no traceback, and what the run had written (its config and the evaluation before training) is kept."""
    (tmp_path / "rewards.py").write_text(BAD_REWARD_FILE)
    result = run_script(tiny.run_args(inputs, tmp_path / "out", reward_funcs=f"format,{tmp_path}/rewards.py:{func}"),
                        tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line.split("\r")[-1] for line in result.stderr.splitlines()]  # after the progress bar's carriage returns
    assert [line for line in lines if line.startswith("error")] == [expected]
    assert result.stderr.rstrip().endswith(expected)  # the last thing on the screen: no progress bar drawn after it
    assert "Traceback" not in result.stderr
    run_dir = tmp_path / "out" / "tiny"
    assert (run_dir / "config.json").is_file() and len(grpo.read_jsonl(run_dir / "eval_before.jsonl")) == 8


# %% Run folders and --resume refusals
def test_fresh_run_into_existing_folder_refused(finished_run, capsys, no_model_load):
    argv, run_dir = finished_run
    before = folder_fingerprint(run_dir)
    line = refusal(argv, capsys)
    assert "--run_name" in line and str(run_dir) in line and "--resume" in line
    assert folder_fingerprint(run_dir) == before, "the refused run touched the existing run folder"


def test_resume_with_changed_flag_refused(finished_run, capsys, no_model_load):
    argv, run_dir = finished_run
    before = folder_fingerprint(run_dir)
    changed = [*argv, "--learning_rate", "0.5", "--resume"]  # argparse: the last value wins
    line = refusal(changed, capsys)
    assert line.startswith("error: --resume: --learning_rate differ"), line  # that flag, and only it
    assert str(run_dir) in line
    assert folder_fingerprint(run_dir) == before


def test_resume_may_change_eval_steps_not_the_subset(finished_run, capsys, no_model_load):
    """--eval_steps only decides when the model is looked at; --eval_subset_size decides what is measured,
    and the points before and after a resume must measure the same questions."""
    argv, run_dir = finished_run
    line = refusal([*argv, "--eval_subset_size", "3", "--resume"], capsys)
    assert line.startswith("error: --resume: --eval_subset_size differ"), line
    grpo.check_resume_compatible(grpo.parse_config([*argv, "--eval_steps", "7", "--resume"]), run_dir, 1)  # accepted


def test_resume_without_a_run_refused(finished_run, inputs, tmp_path, capsys, no_model_load):
    # A folder that holds no run (no config.json).
    _, run_dir = finished_run
    partial = tmp_path / "out" / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("checkpoint*", "config.json"))
    line = refusal(tiny.run_args(inputs, tmp_path / "out", run_name="partial") + ["--resume"], capsys)
    assert "--resume" in line and str(partial) in line
    # A run name that does not exist, and no run at all under --output_dir.
    line = refusal(tiny.run_args(inputs, tmp_path / "out", run_name="never-ran") + ["--resume"], capsys)
    assert "--resume" in line and "never-ran" in line
    args = tiny.run_args(inputs, tmp_path / "empty")
    at = args.index("--run_name")
    del args[at:at + 2]
    line = refusal(args + ["--resume"], capsys)
    assert "--resume" in line and str(tmp_path / "empty") in line


def test_resume_before_first_checkpoint_restarts_in_place(finished_run, tmp_path):
    """A run stopped before its first checkpoint (say, during training step 1) resumes from step 0
    in its own folder, keeping the before-evaluation it already recorded."""
    argv, run_dir = finished_run
    partial = tmp_path / "out" / "tiny"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("checkpoint*", "model", "eval_after.jsonl"))
    summary = json.loads((partial / "summary.json").read_text())
    (partial / "summary.json").write_text(json.dumps({"before": summary["before"]}))
    grpo.write_jsonl(partial / "metrics.jsonl", grpo.read_jsonl(partial / "metrics.jsonl")[:1])  # a logged step 1, never saved
    before = folder_fingerprint(partial)["eval_before.jsonl"]
    at = argv.index("--output_dir")
    grpo.main(argv[:at] + ["--output_dir", str(tmp_path / "out")] + argv[at + 2:] + ["--resume"])
    assert metric_steps(partial) == [1, 2]
    assert folder_fingerprint(partial)["eval_before.jsonl"] == before
    assert grpo.find_checkpoint(partial) == partial / "checkpoint"


# %% Non-finite guard
class RecordingLogger:
    """Stands in for RunLogger: keeps each step's metrics and a copy of the weights right after the step."""

    def __init__(self, model):
        self.model, self.metrics, self.rollouts = model, [], []
        self.snapshots = [self.snapshot()]  # index k: the weights after step k (0 = before training)

    def snapshot(self) -> dict:
        return {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def log_step(self, metrics):
        self.metrics.append(metrics)
        self.snapshots.append(self.snapshot())

    def log_completions(self, step, example, rollout, *args):
        self.rollouts.append(rollout)

    def draw_curves(self):
        pass


def nan_reward_on(nan_steps: set[int]):
    """A reward with signal (completion length mod 5) that is NaN on the chosen 1-based steps; it is
    called once per step, so its call count is the step."""
    calls = [0]

    def reward(completions, answers):
        calls[0] += 1
        if calls[0] in nan_steps:
            return [float("nan")] * len(completions)
        return [float(len(text) % 5) for text in completions]
    return {"length_mod_5": reward}


def tiny_training(inputs, **overrides):
    cfg = grpo.Config(model_name_or_path=inputs["model"], train_file=inputs["train"], num_steps=4, batch_size=2,
                      num_generations=4, max_completion_length=8, micro_batch_size=4, learning_rate=1e-3,
                      report_to="none", save_steps=1000, log_completions_steps=1, seed=0)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    grpo.seed_everything(cfg.seed)
    tokenizer = grpo.load_tokenizer(inputs["model"])
    model = grpo.load_model(inputs["model"], torch.float32, "sdpa", CPU)
    examples = grpo.load_gsm8k("train", tokenizer, local_file=inputs["train"])
    return cfg, tokenizer, model, examples


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[key], b[key]) for key in a)


def test_nonfinite_step_is_skipped_and_counted(inputs, capsys):
    cfg, tokenizer, model, examples = tiny_training(inputs, num_steps=6)
    logger = RecordingLogger(model)
    grpo.train_with_grpo(model, tokenizer, examples, cfg, reward_funcs=nan_reward_on({2, 3, 5}), logger=logger)
    assert [m["step"] for m in logger.metrics] == [1, 2, 3, 4, 5, 6]  # training went on
    assert [m["skipped_steps"] for m in logger.metrics] == [0, 1, 2, 2, 3, 3]
    assert math.isnan(logger.metrics[1]["loss"]) and math.isfinite(logger.metrics[3]["loss"])
    snaps = logger.snapshots
    for step in (2, 3, 5):  # skipped: the weights did not move (not even by weight decay), and are finite
        assert not changed(snaps[step - 1], snaps[step]), f"step {step} changed the weights"
    for step in (1, 4, 6):  # good steps do move them, so the check above can fail
        assert changed(snaps[step - 1], snaps[step]), f"step {step} did not change the weights"
    assert all(torch.isfinite(value).all() for value in snaps[-1].values())
    assert capsys.readouterr().out.count("non-finite") == 3  # one warning per skipped step


def test_three_nonfinite_steps_in_a_row_stop_with_checkpoint(inputs, tmp_path):
    cfg, tokenizer, model, examples = tiny_training(inputs, num_steps=8)
    logger = RecordingLogger(model)
    with pytest.raises(grpo.TrainingStopped) as stopped:
        grpo.train_with_grpo(model, tokenizer, examples, cfg, run_dir=tmp_path, reward_funcs=nan_reward_on({3, 4, 5}),
                             logger=logger)
    assert stopped.value.exit_code != 0
    assert "3 steps in a row" in str(stopped.value) and "non-finite" in str(stopped.value)
    assert [m["step"] for m in logger.metrics] == [1, 2, 3, 4, 5]  # stopped right after the third
    checkpoint = grpo.find_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoint"
    state = grpo.load_checkpoint(checkpoint)["trainer_state"]
    assert state["step"] == 5 and state["skipped_steps"] == 3
    last_good = logger.snapshots[2]  # the weights after step 2
    assert changed(logger.snapshots[1], last_good)
    assert_same_tensors(weights(checkpoint / "model"), last_good)


def test_main_reports_nonfinite_stop_with_exit_1(inputs, tmp_path, monkeypatch, capsys):
    """Through main: the stop message and the resume command are printed, exit status 1."""
    real_train = grpo.train_with_grpo

    def train(*args, **kwargs):
        return real_train(*args, reward_funcs=nan_reward_on({1, 2, 3}), **kwargs)
    monkeypatch.setattr(grpo, "train_with_grpo", train)
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(tiny.run_args(inputs, tmp_path, num_steps=5, save_steps=100))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "3 steps in a row" in err and "--resume" in err and "Traceback" not in err
    assert grpo.load_checkpoint(tmp_path / "tiny" / "checkpoint")["trainer_state"]["step"] == 3
    # metrics.jsonl stays standard JSON (NaN is not): the skipped steps' non-finite values are null
    lines = (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl")) for line in lines]
    assert [r["skipped_steps"] for r in records] == [1, 2, 3] and all(r["loss"] is None for r in records)


# %% Atomic checkpoints
@pytest.fixture
def saver(inputs, tmp_path):
    """A model, its optimizer and a first complete checkpoint (step 1) in tmp_path."""
    cfg = grpo.Config(model_name_or_path=inputs["model"], beta=0.04)
    model = grpo.load_model(inputs["model"], torch.float32, "sdpa", CPU)
    optimizer = grpo.MasterWeightAdamW(model.parameters(), lr=1e-3)
    state = {"step": 1, "reference_step": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    grpo.save_checkpoint(tmp_path, model, optimizer, state, None, cfg)
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():  # the next save would hold different weights
        for param in model.parameters():
            param.add_(1.0)
    return tmp_path, model, optimizer, cfg, saved


def assert_step1_checkpoint_found(run_dir: Path, saved: dict, where: str = "checkpoint") -> None:
    checkpoint = grpo.find_checkpoint(run_dir)
    assert checkpoint == run_dir / where
    loaded = grpo.load_checkpoint(checkpoint)
    assert loaded["trainer_state"]["step"] == 1
    assert set(loaded["optimizer"]) == {"optimizer", "master"} and loaded["rng"]["torch"] is not None
    assert_same_tensors(weights(checkpoint / "model"), saved)
    reloaded = grpo.load_model(str(checkpoint / "model"), torch.float32, "sdpa", CPU)
    assert_same_tensors(reloaded.state_dict(), saved)


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["rng", "model", "optimizer", "trainer_state"])
def test_save_cut_off_keeps_previous_checkpoint(saver, monkeypatch, where):
    run_dir, model, optimizer, cfg, saved = saver
    real_torch_save, real_write_text = torch.save, Path.write_text

    def torch_save(obj, path, *args, **kwargs):
        if Path(path).name.startswith(where):
            real_torch_save(obj, path, *args, **kwargs)  # a half-written file is left behind
            raise Crash(where)
        return real_torch_save(obj, path, *args, **kwargs)

    def write_text(self, text, *args, **kwargs):
        if self.name == "trainer_state.json" and where == "trainer_state":
            real_write_text(self, text[:len(text) // 2])
            raise Crash(where)
        return real_write_text(self, text, *args, **kwargs)

    def save_pretrained(*args, **kwargs):
        raise Crash(where)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(Path, "write_text", write_text)
    if where == "model":
        monkeypatch.setattr(model, "save_pretrained", save_pretrained)
    state = {"step": 2, "reference_step": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    with pytest.raises(Crash):
        grpo.save_checkpoint(run_dir, model, optimizer, state, None, cfg)
    monkeypatch.undo()
    assert (run_dir / "checkpoint.tmp").exists()  # the half-written folder is there, and not taken
    assert_step1_checkpoint_found(run_dir, saved)
    # The next save clears the debris and replaces the checkpoint.
    grpo.save_checkpoint(run_dir, model, optimizer, state, None, cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint"]
    assert grpo.load_checkpoint(grpo.find_checkpoint(run_dir))["trainer_state"]["step"] == 2


def test_save_cut_off_mid_swap_finds_previous(saver, monkeypatch):
    """Killed between 'checkpoint -> checkpoint.old' and 'checkpoint.tmp -> checkpoint'."""
    run_dir, model, optimizer, cfg, saved = saver
    real_rename = Path.rename

    def rename(self, target):
        if Path(target).name == "checkpoint":
            raise Crash("swap")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    state = {"step": 2, "reference_step": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    with pytest.raises(Crash):
        grpo.save_checkpoint(run_dir, model, optimizer, state, None, cfg)
    monkeypatch.undo()
    assert not (run_dir / "checkpoint").exists() and (run_dir / "checkpoint.old").exists()
    assert_step1_checkpoint_found(run_dir, saved, where="checkpoint.old")
    grpo.save_checkpoint(run_dir, model, optimizer, {**state, "step": 3}, None, cfg)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint"]
    assert grpo.load_checkpoint(grpo.find_checkpoint(run_dir))["trainer_state"]["step"] == 3


def test_resume_after_save_cut_off_mid_swap(inputs, tmp_path, monkeypatch, capsys):
    """A run killed mid-swap at its step-2 save (only checkpoint.old, of step 1, is complete) resumes
    from checkpoint.old with --resume and finishes with every step logged once."""
    real_rename, swaps = Path.rename, [0]

    def rename(self, target):
        if Path(target).name == "checkpoint":
            swaps[0] += 1
            if swaps[0] == 2:
                raise Crash("swap")
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename)
    args = tiny.run_args(inputs, tmp_path, num_steps=3)
    with pytest.raises(Crash):
        grpo.main(args)
    monkeypatch.undo()
    run_dir = tmp_path / "tiny"
    assert grpo.find_checkpoint(run_dir) == run_dir / "checkpoint.old" and metric_steps(run_dir) == [1, 2]
    capsys.readouterr()
    summary = grpo.main(args + ["--resume"])
    assert f"resuming from {run_dir / 'checkpoint.old'}" in capsys.readouterr().out
    assert summary["steps"] == 3 and metric_steps(run_dir) == [1, 2, 3]
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint"]
    assert grpo.load_checkpoint(run_dir / "checkpoint")["trainer_state"]["step"] == 3


def test_resume_keeps_every_periodic_evaluation_once(inputs, tmp_path, monkeypatch):
    """--eval_steps 3 with a checkpoint every 2 steps (not aligned), and a crash in the save of step 6:
    after step 6's evaluation was logged, before its checkpoint. The resume starts from step 4, keeps
    the evaluation of step 3 as written, drops that of step 6 and redoes it: one line per evaluation."""
    tiny.crash_at_save(monkeypatch, 6)
    args = tiny.run_args(inputs, tmp_path, num_steps=6, save_steps=2, eval_steps=3, eval_subset_size=5)
    with pytest.raises(tiny.SaveCrash):
        grpo.main(args)
    monkeypatch.undo()
    run_dir = tmp_path / "tiny"
    crashed = grpo.read_jsonl(run_dir / "eval_steps.jsonl")
    assert [r["step"] for r in crashed] == [3, 6]
    assert grpo.load_checkpoint(grpo.find_checkpoint(run_dir))["trainer_state"]["step"] == 4
    grpo.main(args + ["--resume"])
    resumed = grpo.read_jsonl(run_dir / "eval_steps.jsonl")
    assert [r["step"] for r in resumed] == [3, 6] and metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert resumed[0] == crashed[0]  # kept as written, seconds included
    without_seconds = lambda record: {k: v for k, v in record.items() if k != "seconds"}  # noqa: E731
    assert without_seconds(resumed[1]) == without_seconds(crashed[1])  # step 6 redone from the same weights
    assert resumed[1]["seconds"] != crashed[1]["seconds"]  # and really redone


# %% Kill and resume (real processes)


DETERMINISTIC_KEYS = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                      "loss", "kl", "entropy", "grad_norm", "skipped_steps", "dynamic_sampling/extra_rollouts",
                      "dynamic_sampling/dropped_groups"]


def test_kill_and_resume_matches_uninterrupted_run(signal_inputs, tmp_path):
    """SIGKILL after the first checkpoint (and after a later step was logged), then the same command plus
    --resume: steps 1..6 logged once each, the before-evaluation reused, and final weights and every
    step's metrics bit-identical to an uninterrupted run of the same seed. Bit-equality is expected:
    the checkpoint holds exact fp32 weights, the AdamW state and every RNG state, the prompt order
    depends only on (seed, step), and both processes run the same CPU kernels with the same thread count.
    The killed run also evaluates every 3 steps and the uninterrupted one never: periodic evaluation must
    leave training bit-identical too, and be on record once per due step after the resume. Both runs use
    --dynamic_sampling: the prompts of a step's extra rollout calls must be the same after a resume too."""
    def args(output_dir, **periodic):
        return tiny.run_args(signal_inputs, output_dir, num_steps=6, save_steps=2, seed=7, max_completion_length=24,
                             num_generations=4, batch_size=2, dynamic_sampling=True, **periodic)
    env = subprocess_env(tmp_path)
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("baseline", "killed")}
    periodic = {"baseline": {"eval_steps": 0}, "killed": {"eval_steps": 3, "eval_subset_size": 5}}
    baseline, victim = (subprocess.Popen([sys.executable, str(SCRIPT), *args(tmp_path / name, **periodic[name])], cwd=REPO,
                                         env=env, stdout=logs[name], stderr=subprocess.STDOUT, text=True) for name in logs)
    run_dir = tmp_path / "killed" / "tiny"
    try:
        tiny.wait_for(lambda: (run_dir / "checkpoint" / "trainer_state.json").exists() and tiny.metric_lines(run_dir) >= 3,
                 victim, what="the first checkpoint and step 3")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        baseline.wait(timeout=300)
    finally:
        for process in (victim, baseline):
            if process.poll() is None:
                process.kill()
        for log in logs.values():
            log.close()
    assert victim.returncode == -signal.SIGKILL
    assert baseline.returncode == 0, (tmp_path / "baseline.log").read_text()
    killed_at = json.loads((grpo.find_checkpoint(run_dir) / "trainer_state.json").read_text())["step"]
    assert killed_at < 6 and not (run_dir / "model").exists(), "the kill came after training ended"
    eval_before = run_dir / "eval_before.jsonl"
    eval_before_stamp = (eval_before.stat().st_mtime_ns, eval_before.read_bytes())

    resumed = subprocess.run([sys.executable, str(SCRIPT), *args(tmp_path / "killed", **periodic["killed"]), "--resume"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "eval before: reusing" in resumed.stdout
    assert (eval_before.stat().st_mtime_ns, eval_before.read_bytes()) == eval_before_stamp
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    evaluations = grpo.read_jsonl(run_dir / "eval_steps.jsonl")
    assert [r["step"] for r in evaluations] == [3, 6] and all(r["n"] == 5 for r in evaluations)
    assert not (tmp_path / "baseline" / "tiny" / "eval_steps.jsonl").exists()

    baseline_dir = tmp_path / "baseline" / "tiny"
    reference = grpo.read_jsonl(baseline_dir / "metrics.jsonl")
    assert max(r["grad_norm"] for r in reference) > 0  # the weights really learn, so a wrong resume would show
    for got, want in zip(grpo.read_jsonl(run_dir / "metrics.jsonl"), reference):
        assert {k: got[k] for k in DETERMINISTIC_KEYS} == {k: want[k] for k in DETERMINISTIC_KEYS}, f"step {got['step']}"
    assert_same_tensors(weights(run_dir / "model"), weights(baseline_dir / "model"))
    assert changed(weights(baseline_dir / "model"), weights(Path(signal_inputs["model"])))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["after"] == json.loads((baseline_dir / "summary.json").read_text())["after"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_checkpoint_prints_resume_command(signum, inputs, tmp_path):
    """Ctrl-C (or SIGTERM) during training: the step finishes, a checkpoint is written (save_steps is larger
    than the run, so only the interrupt can have written it), the resume command is printed, exit 130;
    running that command completes the run with every step logged once. No --run_name is given, so
    the printed command must name the time-stamped run folder itself."""
    output_dir = tmp_path / "out"
    args = tiny.run_args(inputs, output_dir, num_steps=6, save_steps=100, max_completion_length=24)
    at = args.index("--run_name")
    del args[at:at + 2]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        tiny.wait_for(lambda: any(tiny.metric_lines(d) >= 1 for d in output_dir.glob("*")), process, what="step 1")
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    [run_dir] = list(output_dir.iterdir())
    stopped_at = json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 6 and metric_steps(run_dir) == list(range(1, stopped_at + 1))
    assert f"interrupted ({signum.name}) after step {stopped_at}" in err and "resume with:" in err
    command = shlex.split(err.split("resume with:")[1].strip().splitlines()[0])
    assert command[:2] == ["python", "grpo_from_scratch.py"] and command[-3:] == ["--run_name", run_dir.name, "--resume"]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=subprocess_env(tmp_path), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert list(output_dir.iterdir()) == [run_dir]
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


# %% Degenerate data inside a run
def test_equal_rewards_give_zero_advantage_and_finite_loss():
    rewards = torch.tensor([1.5, 1.5, 1.5, 1.5, 0.0, 2.0, 0.0, 2.0])
    for scale in tiny.choices("scale_rewards"):
        advantages = grpo.compute_group_advantages(rewards, 4, scale_rewards=scale)
        assert torch.equal(advantages[:4], torch.zeros(4))
        assert torch.isfinite(advantages).all() and (advantages[4:] != 0).all()
    log_probs = torch.randn(8, 5, requires_grad=True)
    ref = log_probs.detach() + 0.1 * torch.randn(8, 5)
    mask = torch.ones(8, 5, dtype=torch.int)
    mask[0, 1:] = 0  # an empty completion: only its stop token
    for loss_type in tiny.choices("loss_type"):
        loss, metrics = grpo.grpo_loss(log_probs, None, ref, torch.zeros(8), mask, epsilon=0.2, beta=0.04,
                                       loss_type=loss_type, max_completion_length=5)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
        assert all(torch.isfinite(value) for value in metrics.values())
        log_probs.grad = None


class EmptyOrEndless(LogitsProcessor):
    """Even rows stop at once (an empty completion), odd rows can never stop."""

    def __init__(self, stop_ids: list[int]):
        self.stop_ids, self.start = stop_ids, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        scores = scores.clone()
        scores[1::2, self.stop_ids] = -math.inf
        if input_ids.shape[1] == self.start:
            scores[0::2] = -math.inf
            scores[0::2, self.stop_ids[0]] = 0.0
        return scores


def test_empty_and_endless_completions_and_equal_rewards(inputs, monkeypatch):
    real_kwargs = grpo.decoding_kwargs

    def decoding_kwargs(tokenizer, max_new_tokens, temperature):
        kwargs = real_kwargs(tokenizer, max_new_tokens, temperature)
        return {**kwargs, "logits_processor": LogitsProcessorList([EmptyOrEndless(grpo.stop_token_ids(tokenizer))])}
    monkeypatch.setattr(grpo, "decoding_kwargs", decoding_kwargs)
    cfg, tokenizer, model, examples = tiny_training(inputs, num_steps=2, max_completion_length=6)
    logger = RecordingLogger(model)
    constant = {"constant": lambda completions, answers: [1.0] * len(completions)}
    grpo.train_with_grpo(model, tokenizer, examples, cfg, reward_funcs=constant, logger=logger)
    for metrics in logger.metrics:
        assert metrics["completions/clipped_ratio"] == 0.5  # exactly the rows that never stopped
        assert metrics["completions/min_length"] == 1 and metrics["completions/max_length"] == 6
        assert metrics["frac_reward_zero_std"] == 1.0 and metrics["reward_std"] == 0.0
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["skipped_steps"] == 0
    rollout = logger.rollouts[0]
    assert rollout["completions"][0] == "" and rollout["lengths"][0] == 1
    assert rollout["truncated"].tolist() == [False, True] * (len(rollout["truncated"]) // 2)
    assert all(torch.isfinite(value).all() for value in logger.snapshots[-1].values())


LONG_QUESTION = "Ada has 3 pens and buys 4 more. " * 120 + "How many pens does Ada have now?"


def test_overlong_prompts_skipped_with_count(inputs, tmp_path, capsys):
    rows = tiny.word_problems(12, seed=5)
    long_row = {"question": LONG_QUESTION, "answer": "3 + 4 = 7\n#### 7"}
    train = tiny.write_jsonl(tmp_path / "train.jsonl", rows[:5] + [long_row] + rows[5:] + [long_row, long_row])
    evaluation = tiny.write_jsonl(tmp_path / "eval.jsonl", rows[:4] + [long_row])
    summary = grpo.main(tiny.run_args(inputs, tmp_path / "out", train_file=train, eval_file=evaluation, num_steps=1))
    out = capsys.readouterr().out
    assert "warning: skipped 3 train prompts" in out and "warning: skipped 1 eval prompts" in out
    assert "12 train / 4 eval questions" in out
    assert summary["steps"] == 1 and summary["before"]["n"] == 4


def test_all_prompts_too_long_refused(inputs, tmp_path, capsys, no_model_load):
    long_rows = [{"question": LONG_QUESTION, "answer": "#### 7"}] * 3
    train = tiny.write_jsonl(tmp_path / "train.jsonl", long_rows)
    line = refusal(tiny.run_args(inputs, tmp_path / "out", train_file=train), capsys)
    assert "--max_completion_length" in line
    # A completion budget as large as the context leaves no room for any prompt.
    line = refusal(tiny.run_args(inputs, tmp_path / "out", eval_max_new_tokens=600), capsys)
    assert "--eval_max_new_tokens" in line
    assert not (tmp_path / "out").exists()


# %% CUDA out of memory
@pytest.mark.parametrize("phase", ["rollout", "loss"])
def test_out_of_memory_names_the_knobs_and_keeps_checkpoint(phase, inputs, tmp_path, monkeypatch, capsys):
    """A CUDA OOM cannot happen on CPU; one is raised from inside training at step 3 (after the step-2
    checkpoint), in the rollout or in the loss pass."""
    name = "generate_completions" if phase == "rollout" else "grpo_update"
    real, calls = getattr(grpo, name), [0]

    def run_out_of_memory(*args, **kwargs):
        if phase == "loss" or args[3] is not None:  # rollouts sample; evaluation (temperature None) is spared
            calls[0] += 1
            if calls[0] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)
    monkeypatch.setattr(grpo, name, run_out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(tiny.run_args(inputs, tmp_path / "out", num_steps=4, save_steps=1))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "out of memory" in err
    for knob in ("--micro_batch_size", "--num_generations", "--max_completion_length", "--eval_batch_size"):
        assert knob in err
    run_dir = tmp_path / "out" / "tiny"
    checkpoint = grpo.find_checkpoint(run_dir)
    assert checkpoint == run_dir / "checkpoint" and not (run_dir / "checkpoint.tmp").exists()
    assert grpo.load_checkpoint(checkpoint)["trainer_state"]["step"] == 2
    grpo.load_model(str(checkpoint / "model"), torch.float32, "sdpa", CPU)
    assert metric_steps(run_dir) == [1, 2]
