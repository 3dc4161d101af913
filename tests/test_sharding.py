"""Issue 14: optimizer-state sharding under torchrun (ZeRO-1) and the memory budget.

- On 2 and 3 gloo ranks, each rank's fp32 master weights and AdamW moments are exactly its share of
  the parameters (tensor bytes counted), the shares cover the model once and are balanced;
- one grpo_update with sharding gives the same weights as one without (fp32 tolerance);
- (a sharded run killed and resumed ends with the weights of an uninterrupted one: tests/test_distributed.py);
- the memory budget counts the loaded model's bytes, shrinks with sharding, and a run prints it
  (and writes it to config.json) before the first evaluation.
"""
import copy
import dataclasses
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

import grpo_from_scratch as grpo
import tiny
from test_distributed import TORCHRUN, subprocess_env

REPO = Path(__file__).resolve().parents[1]

SHARD_CHECK = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import grpo_from_scratch as grpo, tiny

    def thread_ids():  # this process's threads (Linux)
        return set(os.listdir("/proc/self/task"))

    before = thread_ids()
    rank, world, device = grpo.setup_distributed()
    group_threads = thread_ids() - before
    assert group_threads  # joining the group started threads of its own, so the check below can fail
    tokenizer = tiny.build_tokenizer()
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own rows
    input_ids = torch.randint(3, len(tokenizer), (4, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.ones(4, 6, dtype=torch.long)
    completion_mask[rank % 4, 3:] = 0
    advantages = torch.randn(4, generator=generator)

    def one_step(dtype, shard):
        cfg = grpo.Config(shard_optimizer=shard, micro_batch_size=2, beta=0.0, learning_rate=1e-2, max_grad_norm=0.5,
                          max_completion_length=6)
        model = tiny.tiny_model(tokenizer, seed=1).to(dtype).train()
        optimizer = grpo.make_optimizer(model, cfg)
        update = grpo.grpo_update(grpo.parallel_policy(model, device), optimizer, cfg, input_ids, attention_mask,
                                  completion_mask, 6, advantages, None, None)
        return model, optimizer, update

    def shares():  # bf16 model: this rank's master weights and AdamW moments, in bytes
        model, optimizer, _ = one_step(torch.bfloat16, shard=True)
        local = optimizer.local
        names = {{id(p): n for n, p in model.named_parameters()}}
        moments = sum(t.numel() * t.element_size() for s in local.optimizer.state.values()
                      for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
        return {{"owned": sorted(names[id(p)] for p in local.params), "owned_numel": sum(p.numel() for p in local.params),
                "master_bytes": sum(m.numel() * m.element_size() for m in local.master), "moment_bytes": moments,
                "master_dtypes": sorted({{str(m.dtype) for m in local.master}}),
                "all": {{n: p.numel() for n, p in model.named_parameters()}}}}

    def same_step():  # fp32 model: one step with and without sharding
        sharded, _, a = one_step(torch.float32, shard=True)
        plain, _, b = one_step(torch.float32, shard=False)
        diff = max((x - y).abs().max().item() for x, y in zip(sharded.parameters(), plain.parameters()))
        moved = max((x - y).abs().max().item() for x, y in zip(plain.parameters(), tiny.tiny_model(tokenizer, seed=1).parameters()))
        return {{"max_weight_diff": diff, "moved": moved, "loss": [a["loss"], b["loss"]],
                "grad_norm": [a["grad_norm"], b["grad_norm"]], "checksum": grpo.parameter_checksum(sharded)}}

    result = {{"shares": shares(), "same_step": same_step()}}
    dist.destroy_process_group()
    # The group's threads must end with it: left running, they race Python's exit and can abort the rank.
    result["group_threads_after_destroy"] = sorted(group_threads & thread_ids())
    with open(sys.argv[1] + f"/rank{{rank}}.json", "w") as handle:
        json.dump(result, handle)
""")


@pytest.mark.parametrize("ranks", [2, 3])
def test_sharded_state_is_each_ranks_share_and_steps_like_unsharded(ranks, tmp_path):
    script = tmp_path / "shard_check.py"
    script.write_text(SHARD_CHECK.format(repo=str(REPO), tests=str(REPO / "tests")))
    result = subprocess.run([*TORCHRUN[:-1], str(ranks), str(script), str(tmp_path)], cwd=REPO,
                            env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    shares = [r["shares"] for r in results]
    sizes = shares[0]["all"]
    total = sum(sizes.values())
    owned = [name for share in shares for name in share["owned"]]
    assert sorted(owned) == sorted(sizes), "every parameter is owned by exactly one rank"
    for share in shares:
        assert share["owned_numel"] == sum(sizes[name] for name in share["owned"])
        assert share["master_bytes"] == 4 * share["owned_numel"] and share["master_dtypes"] == ["torch.float32"]
        assert share["moment_bytes"] == 8 * share["owned_numel"]  # exp_avg and exp_avg_sq, fp32
        assert share["owned_numel"] <= total / ranks + max(sizes.values())  # balanced (largest parameter first)
    assert sum(share["owned_numel"] for share in shares) == total

    steps = [r["same_step"] for r in results]
    for step in steps:
        assert step["moved"] > 1e-3 and step["max_weight_diff"] < 1e-6, step
        assert step["loss"][0] == pytest.approx(step["loss"][1], rel=1e-6)
        assert step["grad_norm"][0] == pytest.approx(step["grad_norm"][1], rel=1e-5)
    assert len({step["checksum"] for step in steps}) == 1  # the owners' broadcasts left every rank the same weights
    assert all(r["group_threads_after_destroy"] == [] for r in results)  # ZeroRedundancyOptimizer left no group behind


# %% The memory budget
@pytest.fixture(scope="module")
def bf16_model():
    return tiny.tiny_model(tiny.build_tokenizer(), hidden_size=64, layers=2).to(torch.bfloat16)


def test_memory_budget_counts_the_loaded_model(bf16_model):
    params = sum(p.numel() for p in bf16_model.parameters())
    cfg = grpo.Config(beta=0.04)
    alone = grpo.memory_budget(bf16_model, cfg, world_size=1, prompt_tokens=50)
    assert alone["weights"] == 2 * params == alone["reference_model"]
    assert alone["master_weights"] == 4 * params and alone["optimizer_state"] == 8 * params
    assert alone["gradients"] == 2 * params + 4 * params  # bf16 gradients and their fp32 copy
    # Sharding over 3 ranks divides the master weights and AdamW state (and the fp32 gradients) by 3, nothing else.
    sharded = grpo.memory_budget(bf16_model, cfg, world_size=3, prompt_tokens=50)
    unsharded = grpo.memory_budget(bf16_model, grpo.Config(beta=0.04, shard_optimizer=False), 3, 50)
    state = ("weights", "master_weights", "optimizer_state", "reference_model", "gradients")
    assert cfg.shard_optimizer and all(unsharded[key] == alone[key] for key in state)
    for key in ("master_weights", "optimizer_state"):
        assert sharded[key] == unsharded[key] // 3
    assert sharded["weights"] == unsharded["weights"] and sharded["peak"] < unsharded["peak"]
    assert grpo.memory_budget(bf16_model, grpo.Config(beta=0.0), 1, 50)["reference_model"] == 0
    # More tokens, more activations and KV cache; fp32 models keep no separate master copy.
    base, longer = (grpo.memory_budget(bf16_model, grpo.Config(max_completion_length=n), 1, 50) for n in (400, 800))
    assert longer["activations"] > base["activations"] and longer["static_kv_cache"] > base["static_kv_cache"]
    # Compiled decoding (a GPU's default) keeps its two static caches for the whole run, resident beside the loss
    # pass, each as long as its purpose needs: 84 rollout rows of 50 + 400 tokens and 64 evaluation rows of the
    # longest eval prompt (50, or 70 when given) + 512; eager decoding holds one cache while generating.
    eager = grpo.memory_budget(bf16_model, grpo.Config(compile_generation="false"), 1, 50)
    kv_per_token = 2 * 2 * 2 * 16 * 2  # K and V, 2 layers, 2 KV heads of 16 dimensions, bf16
    assert base["static_kv_cache"] == kv_per_token * (84 * (50 + 400) + 64 * (50 + 512)) and base["kv_cache"] == 0
    longer_eval = grpo.memory_budget(bf16_model, grpo.Config(), 1, 50, eval_prompt_tokens=70)
    assert longer_eval["static_kv_cache"] - base["static_kv_cache"] == kv_per_token * 64 * 20
    assert eager["static_kv_cache"] == 0 and eager["kv_cache"] == kv_per_token * max(84 * (50 + 400), 64 * (50 + 512))
    assert base["peak"] - eager["peak"] == base["static_kv_cache"]  # the loss pass outweighs the eager cache here
    assert grpo.memory_budget(copy.deepcopy(bf16_model).float(), cfg, 1, 50)["master_weights"] == 0
    # The step's rows are split over the processes, and a process never holds a micro-batch larger than its rows:
    # 84 completions over 8 processes are 11 each, so the default micro-batch of 12 shrinks to 11.
    per_rank = [grpo.memory_budget(bf16_model, cfg, world, 50) for world in (1, 8)]
    assert per_rank[1]["activations"] < per_rank[0]["activations"] and per_rank[1]["kv_cache"] <= per_rank[0]["kv_cache"]
    assert per_rank[1]["activations"] == grpo.memory_budget(bf16_model, grpo.Config(beta=0.04, micro_batch_size=11), 8, 50)["activations"]


def test_memory_report_says_whether_it_fits_and_what_to_change(bf16_model):
    budget = {key: int(gb * 1e9) for key, gb in {
        "weights": 3.1, "master_weights": 6.2, "optimizer_state": 12.3, "reference_model": 3.1, "gradients": 9.3,
        "static_kv_cache": 0.0, "activations": 4.3, "kv_cache": 1.4, "peak": 38.2}.items()}
    assert grpo.memory_report(budget, 80.0).endswith("80 GB GPUs: expected to fit")
    assert grpo.memory_report(budget, 24.0).endswith("24 GB GPUs: expected NOT to fit; lower --micro_batch_size, "
                                                    "use --compile_generation false or more GPUs (README: Memory per GPU)")
    assert grpo.memory_report(budget, None).endswith("peak 38.20")
    static = {**budget, "static_kv_cache": budget["kv_cache"], "kv_cache": 0}  # compiled decoding's caches are resident
    assert "reference model 3.10 + static kv cache 1.40 resident; then the loss pass (gradients 9.30" in grpo.memory_report(static, None)
    # README's table (tests/memory_budget.py): of each kind of change, the first whose own budget fits, with its
    # peak. The tiny model's budget in GB:
    import memory_budget
    gb = lambda cfg, world: grpo.memory_budget(bf16_model, cfg, world, 50)["peak"] / 1e9  # noqa: E731
    cfg = grpo.Config(max_completion_length=4000, eval_max_new_tokens=64)  # activations dominate the peak
    card = gb(dataclasses.replace(cfg, micro_batch_size=6), 1) / 0.9 + 1e-9  # a card that fits micro-batches of 6, not 7
    advice = memory_budget.advice(bf16_model, cfg, 1, 50, card)
    assert advice.startswith("--micro_batch_size 6 (peak ~") and "GPUs (peak ~" in advice
    unsharded = grpo.Config(shard_optimizer=False, max_completion_length=8, eval_max_new_tokens=8, micro_batch_size=1)
    card = gb(dataclasses.replace(unsharded, shard_optimizer=True), 4) / 0.9 + 1e-9  # optimizer state dominates
    assert memory_budget.advice(bf16_model, unsharded, 4, 50, card).startswith("--shard_optimizer True (peak ~")
    assert memory_budget.advice(bf16_model, cfg, 1, 50, 1e-6) == "no single change found"


def test_run_prints_the_budget_before_evaluating(tmp_path, capsys):
    inputs = tiny.write_run_inputs(tmp_path)
    grpo.main(tiny.run_args(inputs, tmp_path / "out", num_steps=1))
    out = capsys.readouterr().out
    assert out.index("memory budget per GPU (GB, estimated)") < out.index("eval before:")
    config = json.loads((tmp_path / "out" / "tiny" / "config.json").read_text())
    budget = config["memory_budget_bytes"]
    assert set(budget) >= {"weights", "master_weights", "optimizer_state", "reference_model", "gradients", "activations",
                           "kv_cache", "peak"} and budget["peak"] > 0
    assert config["longest_train_prompt_tokens"] > 10 and config["gpu_memory_gb"] is None  # no GPU here


def test_first_steps_print_measured_memory_next_to_the_estimate(tmp_path, capsys):
    logger = grpo.RunLogger(tmp_path, grpo.Config(report_to="none"), None, memory_budget_gb=21.5)
    for step in range(1, 6):
        logger.log_step({"step": step, "gpu_memory_gb": 20.0 + step})
    lines = [line for line in capsys.readouterr().out.splitlines() if "peak GPU memory" in line]
    assert lines == [f"step {s}: peak GPU memory {20.0 + s:.1f} GB measured, 21.5 GB estimated" for s in (1, 2, 3)]
