"""Generation's grouped-query attention and compiled decoding (--compile_generation).

Generation attends with grouped_query_attention: the tokens of transformers' sdpa, with no key or value
tensor repeated to the query-head count. Compiled decoding (a static KV cache per purpose and a
torch.compile'd decoding step) must give the tokens of eager decoding, see the weights as the optimizer
changes them in place, compile only at start-up, check itself against eager decoding there, and turn any
later compile or error into one warning and eager decoding.

Everything here compiles on a CPU, in inductor's default mode, through transformers' CPU switch
(CompiledDecoding sets it); CUDA graphs never run here. The models are fp32: in bf16, compiled and eager
decoding differ by rounding. The module's compiles share one inductor cache in a fresh temporary folder,
and dynamo forgets its graphs before each test, so every test compiles, and counts, its own.
"""
import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StaticCache

import grpo_from_scratch as grpo
import tiny

REPO = Path(__file__).resolve().parents[1]
GREEDY_STOPS = dict(initializer_range=0.3, stop_bias=(3.0, 4.5))  # greedy rows stop early, on either stop id
OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "lengths", "truncated")
HEADS = dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)  # 3 query heads per key/value head
HEAD_DIM = 8


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


def started(model, tokenizer, rows: int, name: str = "rollout") -> grpo.CompiledDecoding:
    """A CompiledDecoding as start_decoding makes one: compiled, checked against eager, timed."""
    decoding = grpo.CompiledDecoding(model, rows, 160, name)
    decoding.start(tokenizer, [ex["prompt"] for ex in examples(tokenizer, rows, seed=11)], 16)
    assert decoding.enabled and decoding.started and decoding.fallback is None
    assert decoding.figures["eager_ms"] > 0 and decoding.figures["compiled_ms"] > 0
    return decoding


def test_generation_gives_the_tokens_and_log_probs_of_transformers_sdpa(tokenizer):
    """grouped_query_attention against transformers' sdpa on left-padded prompts of different lengths: the same
    greedy tokens from generate(), and next-token log-probs within 1e-5 on the whole padded batch (fp32; two
    kernels' rounding differs, so equality of log-probs is not the claim)."""
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS, **HEADS)
    prompts = [ex["prompt"] for ex in examples(tokenizer, 8, seed=3)]
    ours = grpo.generate_completions(model, tokenizer, prompts, None, 16)
    assert model.config._attn_implementation == "sdpa"  # restored after generation
    with torch.no_grad():
        reference = model.generate(ours["prompt_ids"], attention_mask=ours["prompt_mask"],
                                   **grpo.decoding_kwargs(tokenizer, 16, None))
    width = ours["completion_ids"].shape[1]
    assert torch.equal(reference[:, ours["prompt_ids"].shape[1]:][:, :width], ours["completion_ids"])
    assert len(set(ours["prompt_mask"].sum(1).tolist())) >= 3  # really left-padded

    ids = torch.cat([ours["prompt_ids"], ours["completion_ids"]], 1)
    mask = torch.cat([ours["prompt_mask"], ours["completion_mask"]], 1)
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask).logits.log_softmax(-1)
        with grpo.generation_mode(model):
            grouped = model(ids, attention_mask=mask).logits.log_softmax(-1)
    real = mask.bool()
    assert (grouped[real] - sdpa[real]).abs().max() < 1e-5


class KeyValueCopies(TorchDispatchMode):
    """Records every op output of shape [rows, query heads, keys, head_dim] with more than one key: a key or
    value tensor repeated to the query-head count (a decoding step's query has one position)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.found = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape:
                self.found.append(str(func))
        return out


def decoding_step_copies(model, tokenizer, attention: str) -> list[str]:
    """Ops that copied key/value heads during one eager decoding step, with generation's attention set to
    `attention` (a dynamic cache holding the prompt and one generated token)."""
    prompts = [ex["prompt"] for ex in examples(tokenizer, 3, seed=3)]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    saved, grpo.DECODE_ATTENTION = grpo.DECODE_ATTENTION, attention
    try:
        with torch.no_grad(), grpo.generation_mode(model):
            out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True,
                                 **grpo.decoding_kwargs(tokenizer, 1, None))
            spy = KeyValueCopies((3, 6, ids.shape[1] + 1, HEAD_DIM))
            with spy:
                model(out.sequences[:, -1:], attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                      cache=out.past_key_values, use_cache=True)
    finally:
        grpo.DECODE_ATTENTION = saved
    return spy.found


def test_a_decoding_step_never_copies_key_value_heads(tokenizer):
    """Traced op by op, eager (TorchDispatchMode) and compiled (the graph dynamo hands its backend): no tensor
    of [rows, 6 query heads, keys, head_dim] exists in a decoding step with grouped_query_attention. The same
    tracers find the copies of transformers' eager attention (eager) and of its sdpa under compile."""
    model = tiny.tiny_model(tokenizer, **HEADS).eval()
    assert decoding_step_copies(model, tokenizer, grpo.DECODE_ATTENTION) == []
    assert len(decoding_step_copies(model, tokenizer, "eager")) >= 2 * model.config.num_hidden_layers

    def compiled_copies(attention: str) -> list:
        graphs = []

        def capture(graph_module, example_inputs):  # a torch.compile backend that runs the graph as traced
            graphs.append(graph_module)
            return graph_module.forward
        saved, grpo.DECODE_ATTENTION = grpo.DECODE_ATTENTION, attention
        try:
            decoding = grpo.CompiledDecoding(model, 3, 128)
            decoding.compile_config.backend = capture
            encoded = tokenizer([ex["prompt"] for ex in examples(tokenizer, 3, seed=3)], return_tensors="pt",
                                padding=True, padding_side="left", add_special_tokens=False)
            decoding.generate(encoded["input_ids"], encoded["attention_mask"], **grpo.decoding_kwargs(tokenizer, 3, None))
        finally:
            grpo.DECODE_ATTENTION = saved
        assert graphs and decoding.enabled, decoding.fallback
        shape = (3, 6, 128, HEAD_DIM)
        return [node for graph in graphs for node in graph.graph.nodes
                if isinstance(node.meta.get("example_value"), torch.Tensor)
                and tuple(node.meta["example_value"].shape) == shape]

    assert compiled_copies(grpo.DECODE_ATTENTION) == []
    assert len(compiled_copies("sdpa")) >= 2 * model.config.num_hidden_layers


@pytest.fixture(scope="module")
def varied_seed(tokenizer) -> int:
    """The first model seed whose greedy rows, on the prompts and questions of the test below, stop early on
    either stop id and are cut at the budget: which rows do depends on the random weights, so on the seed and
    on how a release initialises them (about one seed in four does)."""
    prompts, questions = [ex["prompt"] for ex in examples(tokenizer, 8, seed=3)], examples(tokenizer, 7, seed=4)
    for seed in range(60):
        model = tiny.stopping_model(tokenizer, seed=seed, **GREEDY_STOPS)
        out = grpo.generate_completions(model, tokenizer, prompts, None, 16)
        stops = {int(ids[n - 1]) for ids, n, cut in zip(out["completion_ids"], out["lengths"], out["truncated"]) if not cut}
        rate = grpo.evaluate_model(model, tokenizer, questions, batch_size=4, max_new_tokens=16)["truncation_rate"]
        if stops == set(grpo.stop_token_ids(tokenizer)) and out["truncated"].any() and 0 < rate < 1:
            return seed
    pytest.fail("no model seed in 0-59 gives greedy rows that stop on either id and rows cut at the budget")


def test_greedy_tokens_and_evaluation_records_equal_eager(tokenizer, varied_seed):
    """Left-padded prompts of different lengths, rows stopping early on either stop token and rows cut at the
    budget: the same tokens, masks, lengths and texts as eager decoding. An evaluation of 7 questions in batches
    of 4 pads its last batch of 3 to the compiled 4 rows and gives eager's records."""
    model = tiny.stopping_model(tokenizer, seed=varied_seed, **GREEDY_STOPS)
    graphs = grpo.compiled_graph_count()
    rollout, evaluation = started(model, tokenizer, 8), started(model, tokenizer, 4, "eval")
    after_start = grpo.compiled_graph_count()
    graphs = after_start - graphs
    prompts = [ex["prompt"] for ex in examples(tokenizer, 8, seed=3)]
    compiled = grpo.generate_completions(model, tokenizer, prompts, None, 16, rollout)
    eager = grpo.generate_completions(model, tokenizer, prompts, None, 16)
    assert_same_outputs(compiled, eager)
    stops = {int(ids[n - 1]) for ids, n, cut in zip(eager["completion_ids"], eager["lengths"], eager["truncated"]) if not cut}
    assert stops == set(grpo.stop_token_ids(tokenizer)) and eager["truncated"].any()  # both stop ids, and rows cut
    assert len(set(eager["prompt_mask"].sum(1).tolist())) >= 3 and eager["lengths"].min() < 16

    questions = examples(tokenizer, 7, seed=4)
    compiled = grpo.evaluate_model(model, tokenizer, questions, batch_size=4, max_new_tokens=16, decoding=evaluation)
    eager = grpo.evaluate_model(model, tokenizer, questions, batch_size=4, max_new_tokens=16)
    assert compiled == eager and compiled["n"] == 7
    assert 0 < compiled["truncation_rate"] < 1
    assert graphs == 2 and grpo.compiled_graph_count() == after_start  # one graph per row count, none since
    assert rollout.failures == evaluation.failures == 0 and rollout.enabled and evaluation.enabled


def test_sampling_draws_the_same_tokens_under_one_seed(tokenizer):
    """Sampling runs eagerly on torch's global generator after each compiled step, so under one seed compiled and
    eager decoding draw the very same tokens (checked on three seeds), not merely the same distribution."""
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    decoding = started(model, tokenizer, 8)
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
    decoding = started(model, tokenizer, 8)
    graphs = grpo.compiled_graph_count()
    prompts = [ex["prompt"] for ex in examples(tokenizer, 8, seed=6)]
    before = grpo.generate_completions(model, tokenizer, prompts, None, 16, decoding)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    ids = torch.cat([before["prompt_ids"], before["completion_ids"]], 1)
    model(ids, labels=ids).loss.neg().backward()  # away from what it generated: the tokens must change
    optimizer.step()
    after = grpo.generate_completions(model, tokenizer, prompts, None, 16, decoding)
    assert_same_outputs(after, grpo.generate_completions(model, tokenizer, prompts, None, 16))
    assert not torch.equal(after["completion_ids"][:, :4], before["completion_ids"][:, :4])
    assert grpo.compiled_graph_count() == graphs and decoding.enabled


def test_a_compile_after_start_up_is_counted_and_decoding_continues_eagerly(tokenizer, capsys):
    """A started CompiledDecoding asked for a shape it never compiled (here: its rows changed under it) does not
    compile: one warning line, one failure counted, this call and every later one decoded eagerly (the same
    tokens as eager decoding), and no new graph."""
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    decoding = started(model, tokenizer, 4)
    graphs = grpo.compiled_graph_count()
    capsys.readouterr()
    decoding.rows, decoding.cache = 3, StaticCache(config=model.config, max_cache_len=decoding.max_cache_len)
    prompts = [ex["prompt"] for ex in examples(tokenizer, 3, seed=6)]
    first = grpo.generate_completions(model, tokenizer, prompts, None, 16, decoding)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: compiled rollout decoding failed, decoding eagerly "
                                                   "from now on: RuntimeError: "), lines
    assert not decoding.enabled and decoding.failures == 1 and decoding.cache is None
    eager = grpo.generate_completions(model, tokenizer, prompts, None, 16)
    assert_same_outputs(first, eager)
    assert_same_outputs(grpo.generate_completions(model, tokenizer, prompts, None, 16, decoding), eager)
    assert grpo.compiled_graph_count() == graphs and decoding.failures == 1 and capsys.readouterr().out == ""


def test_compiled_tokens_that_are_not_eagers_fall_back_at_start_up(tokenizer, monkeypatch):
    """start() compares the compiled greedy tokens with eager ones on the real prompts: where they differ
    (here the compiled call's last token is altered), compiled decoding is off, with the row named."""
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    real_generate = model.generate

    def altered(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        if "cache" in kwargs and not kwargs.get("return_dict_in_generate"):
            out = out.clone()
            out[0, -1] = (out[0, -1] + 1) % len(tokenizer)
        return out
    monkeypatch.setattr(model, "generate", altered)
    decoding = grpo.CompiledDecoding(model, 4, 160)
    decoding.start(tokenizer, [ex["prompt"] for ex in examples(tokenizer, 4, seed=11)], 16)
    assert not decoding.enabled and decoding.fallback == "compiled greedy tokens differ from eager ones (row 0)"
    assert decoding.figures["eager_ms"] is None and decoding.cache is None


def test_only_near_ties_may_differ():
    """first_disagreement: equal rows agree; a row whose tokens first differ where eager's two logits are within
    the tolerance agrees (rounding may flip a near-tie); a wider gap, or a row one path stopped, does not."""
    pad = 0
    logits = torch.zeros(3, 2, 10)  # 3 steps, 2 rows, 10 tokens
    logits[:, :, 5] = 1.0
    logits[1, 0, 6] = 1.0 - 1e-4  # row 0, step 1: token 6 is a near-tie with 5
    logits[1, 1, 7] = 0.9
    eager = types.SimpleNamespace(sequences=torch.tensor([[9, 5, 5, 5], [9, 5, 5, 5]]), logits=tuple(logits))
    check = lambda compiled, tolerance=1e-3: grpo.first_disagreement(torch.tensor(compiled), eager, 1, tolerance, pad)  # noqa: E731
    assert check([[5, 5, 5], [5, 5, 5]]) is None
    assert check([[5, 6, 1], [5, 5, 5]]) is None  # a near-tie flipped; what follows is a different prefix
    assert check([[5, 5, 5], [5, 7, 5]]) == 1  # a 0.1 gap is not rounding
    assert check([[5, 5, 5], [5, 7, 5]], tolerance=0.2) is None
    assert check([[5, 5], [5, 5]]) == 0  # compiled stopped (padded with pad), eager went on


def test_auto_keeps_the_path_that_measured_faster(tokenizer, monkeypatch):
    """On CUDA (recorded: the device and start() are stand-ins, with the figures they report), auto keeps the
    compiled path of a purpose only where it measured faster than eager, true wherever it works; the figures
    and choices go to decoding_record and the one-line report. With several processes, the figures compared are
    the slowest process's, and one process's failure turns compiled decoding off in all of them."""
    model = tiny.tiny_model(tokenizer)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    measured = {"rollout": (30.0, 10.0), "eval": (8.0, 9.0)}  # (eager, compiled) ms per decoding step

    def start(self, tokenizer, prompts, budget):
        graphs[0] += 1
        self.started = True
        self.figures.update(eager_ms=measured[self.name][0], compiled_ms=measured[self.name][1], compile_seconds=1.0)
    graphs = [0]
    monkeypatch.setattr(grpo, "compiled_graph_count", lambda: graphs[0])
    monkeypatch.setattr(grpo.CompiledDecoding, "start", start)
    train, held_out = examples(tokenizer, 16, seed=7), examples(tokenizer, 10, seed=8)
    cfg = grpo.Config(batch_size=2, num_generations=4, max_completion_length=12, eval_batch_size=4,
                      eval_max_new_tokens=20, gradient_checkpointing=False)
    auto = grpo.start_decoding(model, tokenizer, cfg, train, held_out)
    record = grpo.decoding_record(auto)
    assert record["rollout"]["compiled"] and not record["eval"]["compiled"]
    assert (record["rollout"]["eager_ms"], record["rollout"]["compiled_ms"]) == (30.0, 10.0)
    assert record["eval"]["rows"] == 4 and record["rollout"]["rows"] == 8 and auto["eval"].cache is None
    assert record["rollout"]["cache_tokens"] == max(grpo.prompt_lengths(train, tokenizer)) + 12
    assert record["eval"]["cache_tokens"] == max(grpo.prompt_lengths(held_out, tokenizer)) + 20
    line = grpo.decoding_line(auto, cfg)
    assert "rollout 8 rows" in line and "eager 30.0 ms/step, compiled 10.0 -> compiled" in line
    assert "eager 8.0 ms/step, compiled 9.0 -> eager" in line
    forced = grpo.decoding_record(grpo.start_decoding(model, tokenizer, dataclasses.replace(cfg, compile_generation="true"),
                                                      train, held_out))
    assert forced["rollout"]["compiled"] and forced["eval"]["compiled"] and forced["eval"]["eager_ms"] == 8.0

    # Another process measured a slower compiled evaluation step... and another could not compile at all.
    slowest = {"rollout": (30.0, 40.0), "eval": (8.0, 9.0)}
    monkeypatch.setattr(grpo, "all_reduce_sum", lambda values, device, op=None: [
        max(v, w) for v, w in zip(values, [x for name in ("rollout", "eval") for x in slowest[name]])])
    assert not grpo.start_decoding(model, tokenizer, cfg, train, held_out)["rollout"].enabled
    monkeypatch.setattr(grpo, "any_rank", lambda flag, device: True)
    failed = grpo.decoding_record(grpo.start_decoding(model, tokenizer, cfg, train, held_out))
    assert not failed["rollout"]["compiled"] and failed["rollout"]["fallback"] == "another process could not compile"
    assert grpo.start_decoding(model, tokenizer, dataclasses.replace(cfg, compile_generation="false"), train, held_out) == {}


def test_training_compiles_at_start_up_and_never_again(tokenizer):
    """start_decoding compiles the rollout's 8 rows and the evaluation's 4 before training, each with a cache of
    its split's longest prompt plus its own budget; then 4 steps of train_with_grpo (gradient checkpointing
    switched on before compiling, as in a run) with an evaluation every 2 steps build no graph. They log what
    eager training logs."""
    cfg = grpo.Config(num_steps=4, batch_size=2, num_generations=4, max_completion_length=12, micro_batch_size=4,
                      eval_steps=2, eval_subset_size=6, eval_batch_size=4, eval_max_new_tokens=20, learning_rate=1e-2,
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

    graphs = []

    def compiled_at_start_up(model):
        decoding = grpo.start_decoding(model, tokenizer, cfg, train, held_out)
        record = grpo.decoding_record(decoding)
        assert record["rollout"]["rows"] == 8 and record["eval"]["rows"] == 4
        assert record["rollout"]["cache_tokens"] == max(grpo.prompt_lengths(train, tokenizer)) + 12
        assert record["eval"]["cache_tokens"] == max(grpo.prompt_lengths(held_out, tokenizer)) + 20
        assert record["rollout"]["compiled"] and record["eval"]["compiled"]
        graphs.append(grpo.compiled_graph_count())
        return decoding

    compiled, decoding = train_run(compiled_at_start_up)
    assert graphs == [grpo.compiled_graph_count()]
    assert all(d.enabled and d.failures == 0 for d in decoding.values())
    eager, _ = train_run(lambda model: None)
    timing = ("step_time", "rollout_time", "reference_time", "update_time", "tokens_per_second")
    assert [{k: v for k, v in m.items() if k not in timing} for m in compiled.steps] == \
           [{k: v for k, v in m.items() if k not in timing} for m in eager.steps]
    assert [e["correct"] for e in compiled.evaluations] == [e["correct"] for e in eager.evaluations]
    assert [e["step"] for e in compiled.evaluations] == [2, 4]
    assert any(0 < m["completions/clipped_ratio"] < 1 for m in eager.steps)  # early stops and cut rows in training


def test_a_two_process_run_compiles_and_records_what_eager_records(tmp_path, tokenizer):
    """python grpo_from_scratch.py --num_processes 2 (gloo), --compile_generation true against false: the
    processes compile at start-up, print their figures and choice on one line, keep them in config.json and
    summary.json, and the run's evaluations and final weights equal the eager run's (greedy and sampled tokens
    alike)."""
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
    lines = [line for line in stdout.splitlines() if line.startswith("decoding (--compile_generation true): ")]
    assert len(lines) == 1 and "rollout 4 rows" in lines[0] and "eval 4 rows" in lines[0], stdout
    assert "decoding: eager (--compile_generation false asks for it)" in eager_stdout
    record = summary["decoding"]
    assert record == json.loads((compiled_dir / "config.json").read_text())["decoding"] | {
        name: {**record[name], "failures": 0} for name in record}
    assert all(r["compiled"] and r["eager_ms"] > 0 and r["compiled_ms"] > 0 and r["fallback"] is None
               for r in record.values())
    shapes = {(r["rows"], r["cache_tokens"]) for r in record.values()}
    assert summary["compiled_graphs"] == len(shapes)
    assert eager_summary["decoding"] == {} and eager_summary["compiled_graphs"] == 0
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
    assert not any(r["compiled"] for r in summary["decoding"].values())
    config = json.loads((tmp_path / "out" / "tiny" / "config.json").read_text())
    assert not any(r["compiled"] for r in config["decoding"].values())

    def refuse(function, **options):
        raise RuntimeError("no working C++ compiler\nmore detail")
    monkeypatch.setattr(torch, "compile", refuse)
    model = tiny.stopping_model(tokenizer, **GREEDY_STOPS)
    decoding = grpo.CompiledDecoding(model, 4, 160)
    decoding.start(tokenizer, [grpo.build_prompt("Hi?", tokenizer)], 16)
    assert not decoding.enabled and decoding.fallback == "RuntimeError: no working C++ compiler" and decoding.cache is None
    prompts = [ex["prompt"] for ex in examples(tokenizer, 3, seed=9)]
    assert_same_outputs(grpo.generate_completions(model, tokenizer, prompts, None, 8, decoding),
                        grpo.generate_completions(model, tokenizer, prompts, None, 8))


def test_the_gpu_check_runs_on_a_tiny_model(tmp_path):
    """tests/gpu_check.py --tiny, as a session with a GPU would run it without --tiny: every figure is printed."""
    result = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_check.py"), "--tiny"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = dict(item.split("=", 1) for item in result.stdout.splitlines()[-1].removeprefix("GPUCHECK ").split())
    assert list(figures) == ["eager_tok_s", "compiled_tok_s", "speedup", "eager_ms", "compiled_ms", "rollout_decodes",
                             "step_s", "rollout_s", "reference_s", "update_s", "peak_gb", "budget_gb", "compile_s",
                             "graphs", "device"]
    assert all(float(figures[key]) > 0 for key in ("eager_tok_s", "compiled_tok_s", "step_s", "rollout_s", "peak_gb",
                                                   "compile_s", "eager_ms", "compiled_ms"))
    assert figures["rollout_decodes"] == "compiled" and figures["graphs"] == "1"
    assert "decoding (--compile_generation true): rollout 8 rows" in result.stdout
    assert "graphs compiled after start-up (0 expected): 0; compiled decoding failures: 0" in result.stdout


def test_the_flag_its_devices_and_the_cache_length(tokenizer):
    """auto compiles on CUDA only (CUDA graphs there, inductor's default mode elsewhere); a bad value is one line
    naming the flag; a call longer than the static cache is refused before generate() would fail midway."""
    model = tiny.tiny_model(tokenizer)
    for flag in ("auto", "false"):
        assert grpo.start_decoding(model, tokenizer, grpo.Config(compile_generation=flag), [], []) == {}
    with pytest.raises(grpo.ConfigError, match=r"^--compile_generation must be one of auto, true, false \(got 'yes'\)$"):
        grpo.validate_config(grpo.Config(compile_generation="yes"))
    on_gpu = grpo.CompiledDecoding(types.SimpleNamespace(device=torch.device("cuda"), config=model.config), 4, 100)
    config = on_gpu.compile_config
    assert config.mode == "reduce-overhead" and config.fullgraph and config.dynamic is False and not config._compile_all_devices
    on_cpu = grpo.CompiledDecoding(model, 4, 100)
    assert on_cpu.compile_config.mode == "default" and on_cpu.compile_config._compile_all_devices
    ids = torch.ones(4, 90, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the static KV cache"):
        on_cpu.generate(ids, ids, **grpo.decoding_kwargs(tokenizer, 11, None))
