"""Compiled decoding (--compile_generation): a static KV cache and a torch.compile'd decoding step must give the
tokens of eager decoding, see the weights as the optimizer changes them in place, and compile once per row count.

Everything here compiles on a CPU, in inductor's default mode, through transformers' private CPU switch
(CompiledDecoding sets it); CUDA graphs (mode "reduce-overhead") never run here. The models are fp32: in bf16,
compiled and eager decoding differ by rounding. The module's compiles share one inductor cache in a fresh
temporary folder (the first compile of a shape is cold, later ones load it), and dynamo forgets its graphs before
each test, so every test compiles, and counts, its own.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import grpo_from_scratch as grpo
import tiny

REPO = Path(__file__).resolve().parents[1]
GREEDY_STOPS = dict(initializer_range=0.3, stop_bias=(3.0, 4.5))  # greedy rows stop early, on either stop id
OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "lengths", "truncated")


@pytest.fixture(scope="module", autouse=True)
def fresh_inductor_cache(tmp_path_factory):
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor-cache"))  # subprocesses inherit it
    yield
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR") if saved is None else os.environ.__setitem__("TORCHINDUCTOR_CACHE_DIR", saved)


@pytest.fixture(autouse=True)
def forget_compiled_graphs():
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def examples(tokenizer, count: int, seed: int) -> list[dict]:
    """Questions of different token lengths (some asked twice over), so batches are left-padded."""
    rows = tiny.word_problems(count, seed=seed)
    return [{"question": r["question"], "answer": grpo.extract_answer_from_dataset(r["answer"]),
             "prompt": grpo.build_prompt(" ".join([r["question"]] * (1 + i % 3)), tokenizer)} for i, r in enumerate(rows)]


def assert_same_outputs(compiled: dict, eager: dict) -> None:
    for key in OUTPUT_KEYS:
        assert torch.equal(compiled[key], eager[key]), key
    assert compiled["completions"] == eager["completions"]


def warmed_up(model, tokenizer, rows: list[int]) -> tuple[grpo.CompiledDecoding, int]:
    """A CompiledDecoding with a graph per row count, and the process's graph count after its warm-up."""
    decoding = grpo.CompiledDecoding(model, max_cache_len=160)
    decoding.warm_up(tokenizer, grpo.build_prompt("Hi?", tokenizer), rows)
    assert decoding.enabled and decoding.fallback is None and decoding.graphs == len(set(rows))
    return decoding, grpo.compiled_graph_count()


def test_greedy_tokens_and_evaluation_records_equal_eager(tokenizer):
    """Left-padded prompts of different lengths, rows stopping early on either stop token and rows cut at the
    budget: the same tokens, masks, lengths and texts as eager decoding. An evaluation of 7 questions in batches
    of 4 pads its last batch of 3 to the compiled 4 rows and gives eager's records."""
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    decoding, graphs = warmed_up(model, tokenizer, [8, 4])
    prompts = [ex["prompt"] for ex in examples(tokenizer, 8, seed=3)]
    compiled = grpo.generate_completions(model, tokenizer, prompts, None, 16, decoding)
    eager = grpo.generate_completions(model, tokenizer, prompts, None, 16)
    assert_same_outputs(compiled, eager)
    stops = {int(ids[n - 1]) for ids, n, cut in zip(eager["completion_ids"], eager["lengths"], eager["truncated"]) if not cut}
    assert stops == set(grpo.stop_token_ids(tokenizer)) and eager["truncated"].any()  # both stop ids, and rows cut
    assert len(set(eager["prompt_mask"].sum(1).tolist())) >= 3 and eager["lengths"].min() < 16

    questions = examples(tokenizer, 7, seed=4)
    assert decoding.rows_for(3) == 4
    compiled = grpo.evaluate_model(model, tokenizer, questions, batch_size=4, max_new_tokens=16, decoding=decoding)
    eager = grpo.evaluate_model(model, tokenizer, questions, batch_size=4, max_new_tokens=16)
    assert compiled == eager and compiled["n"] == 7
    assert 0 < compiled["truncation_rate"] < 1
    assert grpo.compiled_graph_count() == graphs  # nothing compiled after the warm-up


def test_sampling_draws_the_same_tokens_under_one_seed(tokenizer):
    """Sampling runs eagerly on torch's global generator after each compiled step, so under one seed compiled and
    eager decoding draw the very same tokens (checked on three seeds), not merely the same distribution."""
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    decoding, _ = warmed_up(model, tokenizer, [8])
    prompts = [ex["prompt"] for ex in examples(tokenizer, 2, seed=5) for _ in range(4)]
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        compiled = grpo.generate_completions(model, tokenizer, prompts, 1.0, 16, decoding)
        torch.manual_seed(seed)
        eager = grpo.generate_completions(model, tokenizer, prompts, 1.0, 16)
        assert_same_outputs(compiled, eager)
    assert len(set(eager["completions"][:4])) > 1  # the 4 samples of one prompt really differ


def test_the_compiled_graph_sees_weights_updated_in_place(tokenizer):
    """Generate, take an AdamW step (it writes the parameters in place, as the trainer's optimizer does), generate
    again: the compiled tokens change and equal eager decoding on the new weights, with no new graph."""
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    decoding, graphs = warmed_up(model, tokenizer, [8])
    prompts = [ex["prompt"] for ex in examples(tokenizer, 8, seed=6)]
    before = grpo.generate_completions(model, tokenizer, prompts, None, 16, decoding)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    ids = torch.cat([before["prompt_ids"], before["completion_ids"]], 1)
    model(ids, labels=ids).loss.neg().backward()  # away from what it generated: the tokens must change
    optimizer.step()
    after = grpo.generate_completions(model, tokenizer, prompts, None, 16, decoding)
    assert_same_outputs(after, grpo.generate_completions(model, tokenizer, prompts, None, 16))
    assert not torch.equal(after["completion_ids"][:, :4], before["completion_ids"][:, :4])
    assert grpo.compiled_graph_count() == graphs


def test_training_compiles_at_start_up_and_never_again(tokenizer):
    """start_compiled_decoding compiles the rollout's 8 rows and the evaluation's 4 before training; then 4 steps of
    train_with_grpo (gradient checkpointing switched on after the warm-up, as in a run) with an evaluation every 2
    steps run under torch's fail_on_recompile stance: any new graph raises. They log what eager training logs."""
    cfg = grpo.Config(num_steps=4, batch_size=2, num_generations=4, max_completion_length=12, micro_batch_size=4,
                      eval_steps=2, eval_subset_size=6, eval_batch_size=4, eval_max_new_tokens=12, learning_rate=1e-2,
                      beta=0.04, report_to="none", compile_generation="true")
    train, held_out = examples(tokenizer, 16, seed=7), examples(tokenizer, 10, seed=8)

    def train_run(decoding_for):
        model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
        decoding = decoding_for(model)
        logger = tiny.RecordingLogger()
        torch.manual_seed(0)
        grpo.train_with_grpo(model, tokenizer, train, cfg, reward_funcs={"format": grpo.format_reward}, logger=logger,
                             eval_examples=held_out, decoding=decoding)
        return logger, decoding

    def compiled_at_start_up(model):
        decoding = grpo.start_compiled_decoding(model, tokenizer, cfg, train, held_out)
        assert sorted(decoding.caches) == [4, 8] and decoding.graphs == 2 and decoding.seconds > 0
        graphs.append(grpo.compiled_graph_count())
        torch.compiler.set_stance("fail_on_recompile")
        return decoding

    graphs = []
    try:
        compiled, _ = train_run(compiled_at_start_up)
    finally:
        torch.compiler.set_stance("default")
    assert graphs == [grpo.compiled_graph_count()]
    eager, _ = train_run(lambda model: None)
    timing = ("step_time", "rollout_time", "reference_time", "update_time", "tokens_per_second")
    assert [{k: v for k, v in m.items() if k not in timing} for m in compiled.steps] == \
           [{k: v for k, v in m.items() if k not in timing} for m in eager.steps]
    assert [e["correct"] for e in compiled.evaluations] == [e["correct"] for e in eager.evaluations]
    assert [e["step"] for e in compiled.evaluations] == [2, 4]
    assert any(0 < m["completions/clipped_ratio"] < 1 for m in eager.steps)  # early stops and cut rows in training


def test_a_two_process_run_compiles_and_records_what_eager_records(tmp_path, tokenizer):
    """python grpo_from_scratch.py --num_processes 2 (gloo), --compile_generation true against false: each process
    compiles its own 4-row graph at start-up, says how long it took, and the run's evaluations and final weights
    equal the eager run's (greedy and sampled tokens alike)."""
    paths = tiny.write_run_inputs(tmp_path, tokenizer=tokenizer)
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        result = subprocess.run([sys.executable, str(REPO / "grpo_from_scratch.py"),
                                 *tiny.run_args(paths, out, num_steps=2, num_processes=2, compile_generation=flag)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HOME": str(tmp_path / "home")})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[flag] = (out / "tiny", result.stdout)
    (compiled_dir, stdout), (eager_dir, eager_stdout) = runs["true"], runs["false"]
    summary, eager_summary = (json.loads((d / "summary.json").read_text()) for d in (compiled_dir, eager_dir))
    assert "compiled decoding: 1 graph(s) for rows [4], a static KV cache of" in stdout
    assert "decoding compiled |" in stdout and "decoding eager |" in eager_stdout
    assert summary["compile_generation"] is True and summary["compile_seconds"] > 0 and summary["compiled_graphs"] == 1
    assert eager_summary["compile_generation"] is False and eager_summary["compiled_graphs"] == 0
    assert json.loads((compiled_dir / "config.json").read_text())["resolved_compile_generation"] is True
    for when in ("before", "after"):
        assert (compiled_dir / f"eval_{when}.jsonl").read_text() == (eager_dir / f"eval_{when}.jsonl").read_text()
    assert summary["replica_checksums"] == eager_summary["replica_checksums"]
    assert len(set(summary["replica_checksums"])) == 1


def test_a_run_that_cannot_compile_says_so_and_decodes_eagerly(tmp_path, monkeypatch, capsys, tokenizer):
    """Where torch builds no graph (here torch.compile returns the function itself), the run prints one line,
    records that it decoded eagerly, and completes; where compiling raises, the reason is kept."""
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    paths = tiny.write_run_inputs(tmp_path, tokenizer=tokenizer)
    summary = grpo.main(tiny.run_args(paths, tmp_path / "out", num_steps=1, compile_generation="true"))
    lines = [line for line in capsys.readouterr().out.splitlines() if "compiled decoding" in line]
    assert lines == ["warning: compiled decoding (--compile_generation true) is not possible here, decoding eagerly: "
                     "generate() built no compiled graph (transformers did not compile the model)"]
    assert summary["compile_generation"] is False and summary["compile_seconds"] is None
    assert json.loads((tmp_path / "out" / "tiny" / "config.json").read_text())["resolved_compile_generation"] is False

    def refuse(function, **options):
        raise RuntimeError("no working C++ compiler\nmore detail")
    monkeypatch.setattr(torch, "compile", refuse)
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    decoding = grpo.CompiledDecoding(model, 160)
    decoding.warm_up(tokenizer, grpo.build_prompt("Hi?", tokenizer), [4])
    assert not decoding.enabled and decoding.fallback == "RuntimeError: no working C++ compiler" and not decoding.caches
    prompts = [ex["prompt"] for ex in examples(tokenizer, 3, seed=9)]
    assert decoding.rows_for(3) == 3 and decoding.generate_kwargs(3, 50, 16) == {}
    assert_same_outputs(grpo.generate_completions(model, tokenizer, prompts, None, 8, decoding),
                        grpo.generate_completions(model, tokenizer, prompts, None, 8))


def test_the_gpu_check_runs_on_a_tiny_model(tmp_path):
    """tests/gpu_check.py --tiny, as a session with a GPU would run it without --tiny: every figure is printed."""
    result = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_check.py"), "--tiny"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = dict(item.split("=", 1) for item in result.stdout.splitlines()[-1].removeprefix("GPUCHECK ").split())
    assert list(figures) == ["eager_tok_s", "compiled_tok_s", "speedup", "step_s", "rollout_s", "reference_s",
                             "update_s", "peak_gb", "budget_gb", "compile_s", "graphs", "device"]
    assert all(float(figures[key]) > 0 for key in ("eager_tok_s", "compiled_tok_s", "step_s", "rollout_s", "peak_gb",
                                                   "compile_s"))
    assert figures["graphs"] == "1" and "graphs compiled after start-up (0 expected): 0" in result.stdout


def test_the_flag_its_devices_and_the_cache_length(tokenizer):
    """auto compiles on CUDA only (CUDA graphs there, inductor's default mode elsewhere); a bad value is one line
    naming the flag; a call longer than the static cache is refused before generate() would fail midway."""
    for flag, device, expected in [("auto", "cuda", True), ("auto", "cpu", False), ("true", "cpu", True),
                                   ("false", "cuda", False)]:
        assert grpo.use_compiled_decoding(grpo.Config(compile_generation=flag), torch.device(device)) is expected
    with pytest.raises(grpo.ConfigError, match=r"^--compile_generation must be auto, true or false \(got 'yes'\)$"):
        grpo.validate_config(grpo.Config(compile_generation="yes"))
    on_gpu = grpo.CompiledDecoding(types.SimpleNamespace(device=torch.device("cuda")), 100).compile_config
    assert on_gpu.mode == "reduce-overhead" and on_gpu.fullgraph and on_gpu.dynamic is False and not on_gpu._compile_all_devices
    on_cpu = grpo.CompiledDecoding(tiny.tiny_model(tokenizer), 100)
    assert on_cpu.compile_config.mode == "default" and on_cpu.compile_config._compile_all_devices
    with pytest.raises(ValueError, match="exceed the static KV cache"):
        on_cpu.generate_kwargs(4, 90, 11)
