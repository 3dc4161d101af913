"""Issue 14: optimizer-state sharding under torchrun (ZeRO-1) and the memory budget.

- On 2 and 3 gloo ranks, each rank's fp32 master weights and AdamW moments are exactly its share of
  the parameters (tensor bytes counted), the shares cover the model once and are balanced;
- one grpo_update with sharding gives the same weights as one without (fp32 tolerance);
- a sharded torchrun run killed after a checkpoint and resumed ends with the same weights as an
  uninterrupted one, and resuming it with another number of processes is refused in one line;
- the memory budget counts the loaded model's bytes, shrinks with sharding, and a run prints it
  (and writes it to config.json) before the first evaluation.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grpo_from_scratch as grpo
import tiny
from test_distributed import SCRIPT, TORCHRUN, subprocess_env

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


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its ranks in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def test_sharded_kill_and_resume_matches_uninterrupted_run(tmp_path, capsys):
    """SIGKILL of a 2-rank sharded run after its first checkpoint, then the same torchrun command plus
    --resume: each rank reloads its own optimizer shard, and the final weights equal an uninterrupted
    run's bit for bit. Resuming with another number of processes is refused in one line."""
    inputs = tiny.write_run_inputs(tmp_path / "inputs", tokenizer=None)

    def args(output_dir):
        return tiny.run_args(inputs, output_dir, num_steps=6, save_steps=2, seed=3, max_completion_length=16,
                             learning_rate=1e-2)

    env = subprocess_env(tmp_path)
    run_dir = tmp_path / "killed" / "tiny"
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("baseline", "killed")}
    baseline, victim = (subprocess.Popen([*TORCHRUN, str(SCRIPT), *args(tmp_path / name)], cwd=REPO, env=env,
                                         stdout=logs[name], stderr=subprocess.STDOUT)
                        for name in logs)
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "checkpoint" / "trainer_state.json").exists()
                   and (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
            assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
            time.sleep(0.005)
        kill_tree(victim.pid)  # torchrun and both ranks at once, like a lost node
        victim.wait(timeout=60)
        baseline.wait(timeout=300)
    finally:
        for process in (victim, baseline):
            if process.poll() is None:
                kill_tree(process.pid)
        for log in logs.values():
            log.close()
    assert baseline.returncode == 0, (tmp_path / "baseline.log").read_text()[-3000:]
    checkpoint = grpo.find_checkpoint(run_dir)
    killed_at = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert killed_at < 6 and not (run_dir / "model").exists(), "the kill came after training ended"
    assert {p.name for p in checkpoint.glob("optimizer*.pt")} == {"optimizer_rank0.pt", "optimizer_rank1.pt"}

    resumed = subprocess.run([*TORCHRUN, str(SCRIPT), *args(tmp_path / "killed"), "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert [r["step"] for r in grpo.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    final, reference = weights(run_dir / "model"), weights(tmp_path / "baseline" / "tiny" / "model")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert any(not torch.equal(reference[k], v) for k, v in weights(Path(inputs["model"])).items())

    # One process cannot take over two ranks' optimizer shards: refused before anything loads.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        grpo.main(args(tmp_path / "killed") + ["--resume"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --resume: the run in {run_dir} was trained by 2 process(es) and this launch has 1; "
        "resume it with torchrun --nproc_per_node 2"]


# %% The memory budget
@pytest.fixture(scope="module")
def bf16_model():
    return tiny.tiny_model(tiny.build_tokenizer(), hidden_size=64, layers=2).to(torch.bfloat16)


def test_memory_budget_counts_the_loaded_model(bf16_model):
    params = sum(p.numel() for p in bf16_model.parameters())
    cfg = grpo.Config(beta=0.04)
    alone = grpo.memory_budget(bf16_model, cfg, world_size=1, devices_per_process=1, prompt_tokens=50)
    assert alone["weights"] == 2 * params == alone["reference_model"]
    assert alone["master_weights"] == 4 * params and alone["optimizer_state"] == 8 * params
    assert alone["gradients"] == 2 * params + 4 * params  # bf16 gradients and their fp32 copy
    # Sharding over 3 ranks divides the master weights and AdamW state (and the fp32 gradients) by 3, nothing else.
    sharded = grpo.memory_budget(bf16_model, cfg, world_size=3, devices_per_process=1, prompt_tokens=50)
    unsharded = grpo.memory_budget(bf16_model, grpo.Config(beta=0.04, shard_optimizer=False), 3, 1, 50)
    assert cfg.shard_optimizer and unsharded == alone
    for key in ("master_weights", "optimizer_state"):
        assert sharded[key] == unsharded[key] // 3
    assert sharded["weights"] == unsharded["weights"] and sharded["peak"] < unsharded["peak"]
    assert grpo.memory_budget(bf16_model, grpo.Config(beta=0.0), 1, 1, 50)["reference_model"] == 0
    # More tokens, more activations and KV cache; fp32 models keep no separate master copy.
    base, longer = (grpo.memory_budget(bf16_model, grpo.Config(max_completion_length=n), 1, 1, 50) for n in (400, 800))
    assert longer["activations"] > base["activations"] and longer["kv_cache"] > base["kv_cache"]
    assert grpo.memory_budget(copy.deepcopy(bf16_model).float(), cfg, 1, 1, 50)["master_weights"] == 0
    # Under nn.DataParallel the other GPUs hold a copy, a per-call replica and their activations only.
    parallel = grpo.memory_budget(bf16_model, cfg, 1, 4, 50)
    assert parallel["other_gpus_peak"] < parallel["peak"]


def test_memory_report_says_whether_it_fits_and_what_to_change(bf16_model):
    budget = {key: int(gb * 1e9) for key, gb in {
        "weights": 3.1, "master_weights": 6.2, "optimizer_state": 12.3, "reference_model": 3.1, "gradients": 9.3,
        "activations": 4.3, "kv_cache": 1.4, "peak": 38.2, "other_gpus_peak": 13.6}.items()}
    assert grpo.memory_report(budget, 80.0).endswith("80 GB GPUs: expected to fit")
    assert grpo.memory_report(budget, 24.0).endswith("24 GB GPUs: expected NOT to fit")
    assert grpo.memory_report(budget, None).endswith("peak 38.20 on cuda:0, 13.60 on each other GPU")
    advice = grpo.memory_advice(bf16_model, grpo.Config(), world_size=1, devices_per_process=8, prompt_tokens=50)
    assert "torchrun --standalone --nproc_per_node 8 grpo_from_scratch.py --batch_size 1" in advice
    assert "--micro_batch_size" in advice
    assert "--shard_optimizer True" in grpo.memory_advice(bf16_model, grpo.Config(shard_optimizer=False), 4, 1, 50)


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
