"""Issue 11: `python grpo_from_scratch.py` on 2+ GPUs, proven on a CPU by emulation.

tests/emulated_gpus.py makes torch see N CUDA devices that are all the CPU, replacing only the
CUDA-only primitives, so torch's real multi-device nn.DataParallel path (scatter_kwargs, replicate,
parallel_apply's threads, gather, autograd through them) runs, as does the trainer's
ParallelGenerator (a model copy per GPU, torch's parallel_apply). Every result is compared with
the plain single-device call: greedy tokens, log-probs, one grpo_update (loss, gradient norm,
weights), evaluation records, and whole-script runs through main() with chunks smaller than the
GPU count. The second half tests the other branches that only run on CUDA, with recorders in place
of the CUDA calls.
"""
import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import transformers

import grpo_from_scratch as grpo
import tiny
from emulated_gpus import emulated_gpus


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny.tiny_model(tokenizer, hidden_size=32, layers=2, seed=3).eval()


def prompts(tokenizer, count: int, seed: int = 4) -> list[str]:
    return [grpo.build_prompt(row["question"], tokenizer) for row in tiny.word_problems(count, seed=seed)]


def rollout_batch(tokenizer, rows: int, completion: int = 6):
    """input_ids/attention_mask of `rows` left-padded prompts followed by random completion tokens."""
    encoded = tokenizer(prompts(tokenizer, rows), return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False)
    generator = torch.Generator().manual_seed(rows)
    completion_ids = torch.randint(3, len(tokenizer), (rows, completion), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, completion - 2:] = 0  # one completion stopped early
    input_ids = torch.cat([encoded["input_ids"], completion_ids], 1)
    attention_mask = torch.cat([encoded["attention_mask"], completion_mask], 1)
    return input_ids, attention_mask, completion_mask


# %% The emulation itself runs torch's multi-device code
def test_emulated_data_parallel_runs_torchs_multi_device_path(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    inputs = torch.randn(5, 4)
    expected = layer(inputs)
    expected.square().sum().backward()
    expected_grad = layer.weight.grad.clone()
    layer.zero_grad()
    with emulated_gpus(3, monkeypatch) as gpus:
        wrapped = nn.DataParallel(layer)
        assert wrapped.device_ids == [0, 1, 2]
        output = wrapped(inputs)
        output.square().sum().backward()
        # 5 rows on 3 GPUs: torch's chunking gives 2, 2, 1 rows, three replicas in three threads.
        assert gpus.calls == {"data_parallel_forwards": 1, "replicas": 3, "parallel_apply": 1}
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(layer.weight.grad, expected_grad)  # summed back from the replicas


# %% Generation
@pytest.mark.parametrize("gpus_count, rows", [(2, 1), (2, 5), (3, 2), (3, 7)])
def test_parallel_greedy_generation_matches_one_device(model, tokenizer, monkeypatch, gpus_count, rows):
    batch = prompts(tokenizer, rows)
    plain = grpo.generate_completions(model, tokenizer, batch, None, 10)
    with emulated_gpus(gpus_count, monkeypatch) as gpus:
        generator = grpo.ParallelGenerator(model)
        assert generator.num_devices == gpus_count
        parallel = grpo.generate_completions(generator, tokenizer, batch, None, 10)
        assert gpus.calls["parallel_apply"] == (1 if rows > 1 else 0)  # a single row runs on the main GPU alone
    assert torch.equal(parallel["completion_ids"], plain["completion_ids"])
    assert torch.equal(parallel["completion_mask"], plain["completion_mask"])
    assert parallel["completions"] == plain["completions"]


def test_generation_copies_follow_the_trained_weights(tokenizer, monkeypatch):
    """The copies on the other GPUs are refreshed from the model before every call."""
    model = tiny.tiny_model(tokenizer, seed=5).eval()
    batch = prompts(tokenizer, 4)
    with emulated_gpus(2, monkeypatch):
        generator = grpo.ParallelGenerator(model)
        before = grpo.generate_completions(generator, tokenizer, batch, None, 8)["completion_ids"]
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        after = grpo.generate_completions(generator, tokenizer, batch, None, 8)["completion_ids"]
    expected = grpo.generate_completions(model, tokenizer, batch, None, 8)["completion_ids"]
    assert torch.equal(after, expected) and not torch.equal(after, before)


def test_each_gpu_samples_with_its_own_seed(tokenizer, monkeypatch):
    """torch.manual_seed seeds every GPU alike; seed_everything offsets GPUs 1.., so the same prompt
    sampled on two GPUs (a group straddling them) gives two different completions."""
    model = tiny.tiny_model(tokenizer, seed=6).eval()
    same_prompt = prompts(tokenizer, 1) * 4  # rows 0-1 on GPU 0, rows 2-3 on GPU 1

    def sample(seed_gpus: bool):
        grpo.seed_everything(0) if seed_gpus else torch.manual_seed(0)
        return grpo.generate_completions(generator, tokenizer, same_prompt, 1.0, 12)["completion_ids"]

    with emulated_gpus(2, monkeypatch) as gpus:
        generator = grpo.ParallelGenerator(model)
        unseeded = sample(seed_gpus=False)
        seeded, again = sample(seed_gpus=True), sample(seed_gpus=True)
        assert gpus.generators[1].initial_seed() == 1
    assert torch.equal(unseeded[0], unseeded[2])  # the hazard: GPU 1 repeats GPU 0's first sample
    assert not torch.equal(seeded[0], seeded[2])
    assert torch.equal(seeded, again)  # reproducible: each GPU's thread owns its generator


# %% Log-probs and the update
@pytest.mark.parametrize("gpus_count, rows, micro_batch_size", [(2, 1, 1), (3, 7, 1), (3, 7, 2), (2, 5, 4), (4, 3, 2)])
def test_parallel_log_probs_match_one_device(model, tokenizer, monkeypatch, gpus_count, rows, micro_batch_size):
    input_ids, attention_mask, _ = rollout_batch(tokenizer, rows)
    bare = grpo.PerTokenLogProbs(model)
    with torch.no_grad():
        expected, expected_entropy = bare(input_ids, attention_mask, 6, 0.7, True)
    with emulated_gpus(gpus_count, monkeypatch) as gpus, torch.no_grad():
        wrapped = grpo.data_parallel(bare)
        assert isinstance(wrapped, nn.DataParallel)
        log_probs = grpo.compute_log_probs(wrapped, input_ids, attention_mask, 6, 0.7, micro_batch_size)
        # Uneven chunks: the last one may have fewer rows than GPUs.
        chunks = -(-rows // (micro_batch_size * gpus_count))
        assert gpus.calls["data_parallel_forwards"] == chunks and gpus.calls["replicas"] >= min(rows, gpus_count)
        with_entropy = wrapped(input_ids[:1], attention_mask[:1], 6, 0.7, True)  # one row, entropy on
    torch.testing.assert_close(log_probs, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_entropy[0], expected[:1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_entropy[1], expected_entropy[:1], atol=1e-6, rtol=1e-5)


def test_parallel_log_probs_in_bfloat16(tokenizer, monkeypatch):
    model = tiny.tiny_model(tokenizer, seed=7).to(torch.bfloat16).eval()
    input_ids, attention_mask, _ = rollout_batch(tokenizer, 5)
    with torch.no_grad():
        expected = grpo.compute_log_probs(model, input_ids, attention_mask, 6)
        with emulated_gpus(2, monkeypatch):
            parallel = grpo.compute_log_probs(grpo.data_parallel(grpo.PerTokenLogProbs(model)), input_ids, attention_mask, 6,
                                              micro_batch_size=2)
    assert expected.dtype == parallel.dtype == torch.float32
    torch.testing.assert_close(parallel, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type, micro_batch_size", [("grpo", 1), ("bnpo", 2), ("dr_grpo", 3)])
def test_parallel_grpo_update_matches_one_device(tokenizer, monkeypatch, loss_type, micro_batch_size):
    """One optimizer step with gradient checkpointing and a KL term, 8 rows over 3 GPUs in chunks of
    micro_batch_size x 3 rows (3+3+2, 6+2 or 8): the same loss, gradient norm and new weights."""
    cfg = grpo.Config(num_generations=4, micro_batch_size=micro_batch_size, beta=0.04, loss_type=loss_type,
                      max_completion_length=6, learning_rate=1e-3, max_grad_norm=1e9)
    input_ids, attention_mask, completion_mask = rollout_batch(tokenizer, 8)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75, 2.0, -1.0, 0.5, -1.5])
    reference = tiny.tiny_model(tokenizer, seed=9).eval()
    with torch.no_grad():
        ref_log_probs = grpo.compute_log_probs(reference, input_ids, attention_mask, 6)

    def one_update(parallel: bool):
        model = tiny.tiny_model(tokenizer, seed=8)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = grpo.MasterWeightAdamW(model.parameters(), lr=cfg.learning_rate)
        policy = grpo.data_parallel(grpo.PerTokenLogProbs(model)) if parallel else grpo.PerTokenLogProbs(model)
        update = grpo.grpo_update(policy, optimizer, cfg, input_ids, attention_mask, completion_mask, 6, advantages,
                                  None, ref_log_probs)
        return update, model

    plain, plain_model = one_update(parallel=False)
    with emulated_gpus(3, monkeypatch) as gpus:
        parallel, parallel_model = one_update(parallel=True)
        assert gpus.calls["replicas"] > gpus.calls["data_parallel_forwards"] >= 1
    assert plain["grad_norm"] > 0
    for key in ("loss", "grad_norm", "entropy", "kl"):
        assert parallel[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    for (name, a), b in zip(plain_model.named_parameters(), parallel_model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


# %% Evaluation
def test_parallel_evaluation_records_match_one_device(model, tokenizer, monkeypatch):
    examples = [{"question": r["question"], "prompt": grpo.build_prompt(r["question"], tokenizer),
                 "answer": grpo.extract_answer_from_dataset(r["answer"])} for r in tiny.word_problems(7, seed=11)]
    # 2 questions per GPU x 3 GPUs: calls of 6 rows and then 1 (fewer rows than GPUs).
    plain = grpo.evaluate_model(model, tokenizer, examples, batch_size=6, max_new_tokens=8)
    with emulated_gpus(3, monkeypatch) as gpus:
        parallel = grpo.evaluate_model(grpo.ParallelGenerator(model), tokenizer, examples, batch_size=2, max_new_tokens=8)
        assert gpus.calls["parallel_apply"] == 1
    assert parallel == plain and parallel["n"] == 7


# %% The whole script on emulated GPUs
def steady(records: list[dict]) -> list[dict]:
    """Records without their timings, which differ from run to run."""
    return [{k: v for k, v in r.items() if "time" not in k and k not in ("tokens_per_second", "seconds")} for r in records]


def run_script(inputs, output_dir, monkeypatch, gpus_count: int | None, run_name: str, *extra: str) -> tuple[dict, dict]:
    """main() in this process (so the emulation applies): 2 steps of 2 prompts x 4 completions with
    micro_batch_size 1 and eval_batch_size 1, so every chunk has fewer rows than there are GPUs or
    ends uneven (8 rows over 3 GPUs: 3 + 3 + 2), and a periodic evaluation of 4 questions after each step."""
    args = tiny.run_args(inputs, output_dir, run_name=run_name, micro_batch_size=1, eval_batch_size=1, beta=0.04,
                         max_completion_length=12, eval_steps=1, eval_subset_size=4) + list(extra)
    if gpus_count is None:
        return grpo.main(args), {}
    with emulated_gpus(gpus_count, monkeypatch) as gpus:
        summary = grpo.main(args)
    return summary, gpus.calls


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny.write_run_inputs(tmp_path_factory.mktemp("dp-inputs"), n_train=16, n_eval=5)


def test_whole_script_on_three_emulated_gpus(inputs, tmp_path, monkeypatch):
    summary, calls = run_script(inputs, tmp_path, monkeypatch, 3, "three-gpus")
    run_dir = tmp_path / "three-gpus"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["devices_per_process"] == 3 and config["world_size"] == 1
    assert [r["step"] for r in grpo.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert summary["steps"] == 2 and summary["before"]["n"] == summary["after"]["n"] == 5
    periodic = grpo.read_jsonl(run_dir / "eval_steps.jsonl")
    assert [(e["step"], e["n"]) for e in periodic] == [(1, 4), (2, 4)]
    # Rollouts, evaluations (before, after: 5 questions; periodic: 4; 3 per call), log-probs (reference)
    # and the loss all went through the multi-GPU path.
    assert calls["parallel_apply"] >= 2 + 2 * 2 + 2 * 2 and calls["data_parallel_forwards"] >= 2 * (3 + 3)
    assert (run_dir / "checkpoint" / "trainer_state.json").is_file() and (run_dir / "model" / "config.json").is_file()
    metrics = grpo.read_jsonl(run_dir / "metrics.jsonl")
    assert all(m["grad_norm"] > 0 and m["kl"] >= 0 for m in metrics)

    # Greedy evaluation with one question per GPU computes exactly what one device computes (after
    # training the weights differ: three GPUs sample other completions than one).
    run_script(inputs, tmp_path, monkeypatch, None, "one-device")
    assert grpo.read_jsonl(run_dir / "eval_before.jsonl") == grpo.read_jsonl(tmp_path / "one-device" / "eval_before.jsonl")
    # Sampling on three GPUs is reproducible: each GPU's thread draws from its own generator.
    run_script(inputs, tmp_path, monkeypatch, 3, "three-gpus-again")
    again = grpo.read_jsonl(tmp_path / "three-gpus-again" / "metrics.jsonl")
    assert steady(again) == steady(metrics)
    assert steady(grpo.read_jsonl(tmp_path / "three-gpus-again" / "eval_steps.jsonl")) == steady(periodic)
    assert json.loads((tmp_path / "three-gpus-again" / "summary.json").read_text())["after"] == summary["after"]


def test_whole_script_resumes_on_three_emulated_gpus(inputs, tmp_path, monkeypatch):
    """A 3-GPU run that crashes in the save of step 2 resumes from step 1's checkpoint and ends where an
    uninterrupted 3-GPU run ends: each GPU samples its rows with its own generator, so every GPU's
    state must be checkpointed and restored, not only the CPU's."""
    run_script(inputs, tmp_path, monkeypatch, 3, "uninterrupted", "--num_steps", "3")
    with pytest.MonkeyPatch.context() as crash, pytest.raises(tiny.SaveCrash):
        tiny.crash_at_save(crash, 2)
        run_script(inputs, tmp_path, monkeypatch, 3, "resumed", "--num_steps", "3")
    resumed_dir, uninterrupted_dir = tmp_path / "resumed", tmp_path / "uninterrupted"
    assert grpo.load_checkpoint(resumed_dir / "checkpoint")["rng"]["cuda"] is not None  # the GPUs' states were saved
    summary, _ = run_script(inputs, tmp_path, monkeypatch, 3, "resumed", "--num_steps", "3", "--resume")
    assert summary["steps"] == 3
    for name in ("metrics.jsonl", "eval_steps.jsonl"):
        assert steady(grpo.read_jsonl(resumed_dir / name)) == steady(grpo.read_jsonl(uninterrupted_dir / name)), name
    assert summary["after"] == json.loads((uninterrupted_dir / "summary.json").read_text())["after"]
    resumed = transformers.AutoModelForCausalLM.from_pretrained(resumed_dir / "model").state_dict()
    uninterrupted = transformers.AutoModelForCausalLM.from_pretrained(uninterrupted_dir / "model").state_dict()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


# %% Branches that only run on CUDA, with recorders in place of the CUDA calls
def test_one_device_has_no_wrapper_and_no_copies(model):
    assert grpo.gpus_per_process() == 1 and grpo.process_devices(torch.device("cpu")) == [torch.device("cpu")]
    bare = grpo.PerTokenLogProbs(model)
    assert grpo.data_parallel(bare) is bare and grpo.rows_per_call(bare, 4) == 4
    assert grpo.ParallelGenerator(model).copies == []


def test_process_devices_and_batch_scaling(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert grpo.gpus_per_process() == 4
    assert grpo.process_devices(torch.device("cuda", 0)) == [torch.device("cuda", i) for i in range(4)]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # torchrun: one GPU per process
    assert grpo.gpus_per_process() == 1 and grpo.process_devices(torch.device("cuda", 3)) == [torch.device("cuda", 3)]
    assert grpo.data_parallel(nn.Linear(1, 1)).__class__ is nn.Linear


@pytest.mark.parametrize("requested, bf16_supported, device, expected", [
    ("auto", True, "cuda", torch.bfloat16), ("auto", False, "cuda", torch.float32), ("auto", True, "cpu", torch.float32),
    ("bfloat16", False, "cpu", torch.bfloat16), ("float32", True, "cuda", torch.float32)])
def test_resolve_dtype(monkeypatch, requested, bf16_supported, device, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert grpo.resolve_dtype(grpo.Config(dtype=requested), torch.device(device)) == expected


@pytest.mark.parametrize("requested, flash, device, expected", [
    ("auto", True, "cuda", "flash_attention_2"), ("auto", False, "cuda", "sdpa"), ("auto", True, "cpu", "sdpa"),
    ("flash_attention_2", True, "cuda", "flash_attention_2"), ("eager", True, "cuda", "eager"),
    ("flash_attention_2", False, "cuda", grpo.ConfigError), ("flash_attention_2", True, "cpu", grpo.ConfigError)])
def test_resolve_attention(monkeypatch, requested, flash, device, expected):
    monkeypatch.setattr(grpo, "flash_attn_available", lambda: flash)
    cfg = grpo.Config(attn_implementation=requested)
    if expected is grpo.ConfigError:
        with pytest.raises(grpo.ConfigError, match="--attn_implementation"):
            grpo.resolve_attention(cfg, torch.device(device))
    else:
        assert grpo.resolve_attention(cfg, torch.device(device)) == expected


def test_setup_distributed_on_gpus(monkeypatch):
    """torchrun on a GPU box: the process binds its LOCAL_RANK GPU and joins over NCCL."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 6)
    assert grpo.setup_distributed() == (6, 4, torch.device("cuda", 2))
    assert calls == [("set_device", 2), ("init", "nccl")]


def test_ddp_gets_the_local_gpu(monkeypatch, model):
    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda module, **kwargs: made.append(kwargs) or module)
    grpo.parallel_policy(model, torch.device("cuda", 5))
    grpo.parallel_policy(model, torch.device("cpu"))
    assert [m["device_ids"] for m in made] == [[5], None]


def test_peak_gpu_memory_reads_every_gpu(monkeypatch):
    peaks, resets = {0: 9e9, 1: 4e9, 2: 11e9}, []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peaks[device.index])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device.index))
    devices = [torch.device("cuda", i) for i in range(3)]
    grpo.reset_peak_gpu_memory(devices)
    grpo.reset_peak_gpu_memory([torch.device("cpu")])
    assert resets == [0, 1, 2] and grpo.peak_gpu_memory_gb(devices) == 11.0


def test_generation_copies_are_placed_on_each_gpu(model, monkeypatch):
    """ParallelGenerator puts copy i on GPU i (recorded, since .to('cuda:i') needs CUDA)."""
    placed = []
    original_to = nn.Module.to

    def record_to(self, device, *args, **kwargs):
        placed.append(device)
        return original_to(self, "cpu")

    monkeypatch.setattr(grpo, "process_devices", lambda device: [torch.device("cuda", i) for i in range(3)])
    monkeypatch.setattr(nn.Module, "to", record_to)
    generator = grpo.ParallelGenerator(copy.deepcopy(model))
    assert placed == [torch.device("cuda", 1), torch.device("cuda", 2)] and generator.num_devices == 3
    assert all(not p.requires_grad for c in generator.copies for p in c.parameters())


def test_checkpoint_keeps_every_gpus_random_state(monkeypatch):
    """A checkpoint saves the generator state of every GPU (each samples its own rows) and a resume
    restores them all."""
    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new_states: restored.extend(new_states))
    saved = grpo.capture_rng_state()
    states[1].fill_(9)  # the GPU's generator moves on after the save
    grpo.restore_rng_state(saved)
    assert [s.tolist() for s in restored] == [[1, 2], [3, 4]]
