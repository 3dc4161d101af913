"""Issue 5: multi-process and multi-GPU paths, tested on CPU.

- `torchrun --standalone --nproc_per_node 2 grpo_from_scratch.py ...` on gloo runs the tiny model to
  completion: one run folder, world_size 2 in config.json, only rank 0 logs, the evaluation is sharded
  and gathered, and after the steps both replicas hold identical parameters.
- The metrics of a step are gathered across ranks before logging (checked under torchrun with rank-specific
  rewards, since the real run's completions are not exposed per rank).
- A refusal under torchrun reaches every rank (no rank hangs in a collective) and exits 2.
The nn.DataParallel path (plain `python` on several GPUs) is tested in test_data_parallel.py.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import grpo_from_scratch as grpo
import tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "grpo_from_scratch.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def subprocess_env(tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU even on a GPU box
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return tiny.write_run_inputs(tmp_path_factory.mktemp("dist-inputs"))


def without_run_name(args: list[str]) -> list[str]:
    at = args.index("--run_name")
    return args[:at] + args[at + 2:]


def torchrun(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def two_rank_run(inputs, tmp_path_factory):
    """`torchrun --standalone --nproc_per_node 2 grpo_from_scratch.py <tiny args> --num_steps 2`, with no
    --run_name, so the ranks must agree on the time-stamped folder name, and a periodic evaluation of 5
    of the 8 eval questions after each step."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    output_dir = tmp_path / "out"
    args = without_run_name(tiny.run_args(inputs, output_dir, max_completion_length=24, eval_steps=1, eval_subset_size=5))
    args += ["--num_steps", "2"]
    result = torchrun([str(SCRIPT), *args], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result, output_dir, tmp_path


def test_torchrun_two_ranks_run_to_completion(two_rank_run, inputs):
    result, output_dir, _ = two_rank_run
    runs = [p for p in output_dir.iterdir()]
    assert len(runs) == 1 and runs[0].is_dir(), runs
    run_dir = runs[0]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and config["run_name"] == run_dir.name
    assert [r["step"] for r in grpo.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]  # only rank 0 logs
    # Only rank 0 prints.
    assert sum(line.startswith("run folder ") for line in result.stdout.splitlines()) == 1
    assert "world size 2" in result.stdout and result.stdout.count("eval before: accuracy") == 1
    # The evaluation was split across the ranks and gathered: all 8 questions, each once.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["before"]["n"] == summary["after"]["n"] == 8
    assert [r["index"] for r in grpo.read_jsonl(run_dir / "eval_after.jsonl")] == list(range(8))
    # So was each periodic evaluation: all 5 questions of the subset, each once, logged and printed once.
    evaluations = grpo.read_jsonl(run_dir / "eval_steps.jsonl")
    assert [(e["step"], e["n"], e["indices"]) for e in evaluations] == [(step, 5, grpo.eval_subset(8, 5)) for step in (1, 2)]
    assert result.stdout.count("eval step 1: accuracy") == 1
    # Every rank saved its RNG state; only rank 0 saved the weights.
    checkpoint = run_dir / "checkpoint"
    assert {p.name for p in checkpoint.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2


def test_torchrun_replicas_identical_after_training(two_rank_run, inputs):
    _, output_dir, _ = two_rank_run
    run_dir = next(output_dir.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    checksums = summary["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], checksums
    # The equality is not trivial: the ranks had (different) non-zero gradients and the weights moved.
    metrics = grpo.read_jsonl(run_dir / "metrics.jsonl")
    assert any(r["grad_norm"] > 0 and r["reward_std"] > 0 for r in metrics), metrics
    final, initial = load_file(str(run_dir / "model" / "model.safetensors")), load_file(str(Path(inputs["model"]) / "model.safetensors"))
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    # The checksum of the saved weights is rank 0's, so the summary describes the model on disk.
    model = grpo.load_model(str(run_dir / "model"), torch.float32, "sdpa", torch.device("cpu"))
    assert grpo.parameter_checksum(model) == checksums[0]


GATHER_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {repo!r})
    import grpo_from_scratch as grpo

    rank, world, device = grpo.setup_distributed()
    assert world == 2 and grpo.gpus_per_process() == 1 and not isinstance(grpo.data_parallel(torch.nn.Linear(1, 1)), torch.nn.DataParallel)
    cfg = grpo.Config(num_generations=2)
    # Rank 0's four completions all earned 0, rank 1's all earned 1 per function (two functions).
    rewards = torch.full((4, 2), float(rank))
    rollout = {{"lengths": torch.arange(1, 5) + 4 * rank, "truncated": torch.tensor([bool(rank)] * 4)}}
    update = {{"loss": float(rank), "kl": 0.1 * rank, "entropy": 1.0, "clip_ratio/low_mean": 0.0,
               "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0, "grad_norm": 0.5}}
    timings = {{"step_time": 1.0, "rollout_time": 1.0, "reference_time": 0.0, "update_time": 0.0}}
    metrics = grpo.step_metrics(cfg, rollout, rewards, ["a", "b"], update, {{"step": 1, "skipped_steps": 0}}, device, timings)
    # agree_on_rank0: rank 0 computes (the run folder name, in run()); its value, or its refusal, reaches every rank.
    agreed = grpo.agree_on_rank0(lambda: f"computed on rank {{rank}}")

    def refuse():
        raise grpo.ConfigError(f"refused on rank {{rank}}")
    try:
        grpo.agree_on_rank0(refuse)
        refusal = None
    except grpo.ConfigError as error:
        refusal = str(error)
    # grpo_update under DDP gives the gradient of the whole two-rank batch at once, for every loss_type,
    # although rank 1's completions have three times rank 0's tokens (bnpo divides by all tokens).
    class TokenPolicy(torch.nn.Module):  # the log-prob of each completion token is a learned score
        def __init__(self):
            super().__init__()
            self.scores = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 7))

        def forward(self, input_ids, attention_mask, logits_to_keep, temperature, with_entropy=False):
            log_probs = torch.log_softmax(self.scores, 0)[input_ids[:, -logits_to_keep:]]
            return log_probs, torch.zeros_like(log_probs)

    input_ids = torch.arange(24).remainder(7).view(2, 4, 3)  # [rank, sequence, position]
    masks = torch.tensor([[[1, 0, 0]] * 4, [[1, 1, 1]] * 4])
    advantages = torch.tensor([[1.0, -1.0, 0.5, -0.5], [2.0, -2.0, 1.0, -1.0]])

    def ddp_matches_one_batch(loss_type):  # a function, so its DDP wrapper is gone before the process group
        cfg = grpo.Config(num_generations=2, micro_batch_size=2, beta=0.0, max_grad_norm=1e9, loss_type=loss_type,
                          max_completion_length=3)
        policy = TokenPolicy()
        grpo.grpo_update(torch.nn.parallel.DistributedDataParallel(policy), grpo.MasterWeightAdamW(policy.parameters(), lr=0.0),
                         cfg, input_ids[rank], torch.ones(4, 3), masks[rank], 3, advantages[rank], None, None)
        reference = TokenPolicy()
        loss, _ = grpo.grpo_loss(reference(input_ids.view(8, 3), None, 3, 1.0)[0], None, None, advantages.view(8),
                                 masks.view(8, 3), epsilon=cfg.epsilon, beta=0.0, loss_type=loss_type, max_completion_length=3)
        loss.backward()
        return torch.allclose(policy.scores.grad, reference.scores.grad, atol=1e-6)
    result = {{"metrics": metrics, "prompts": grpo.prompt_indices(32, 0, 3, 5), "any": grpo.any_rank(rank == 1, device),
               "ddp_matches_one_batch": {{loss_type: ddp_matches_one_batch(loss_type) for loss_type in grpo.LOSS_TYPES}},
               "gathered": grpo.all_gather_cat(torch.tensor([rank, 10 + rank])).tolist(), "agreed": agreed, "refusal": refusal}}
    with open(sys.argv[1] + f"/rank{{rank}}.json", "w") as handle:
        json.dump(result, handle)
    torch.distributed.destroy_process_group()
""")


def test_torchrun_gathers_across_ranks(tmp_path):
    script = tmp_path / "gather_check.py"
    script.write_text(GATHER_CHECK.format(repo=str(REPO)))
    result = torchrun([str(script), str(tmp_path)], tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    metrics = ranks[0]["metrics"]
    assert ranks[1]["metrics"] == metrics  # every rank computes the same figures
    assert metrics["reward"] == 1.0 and metrics["rewards/a"] == 0.5 and metrics["rewards/b"] == 0.5  # 8 completions
    assert metrics["reward_std"] == pytest.approx(torch.tensor([0.0] * 4 + [2.0] * 4).std().item())
    assert metrics["frac_reward_zero_std"] == 1.0  # 4 groups, each constant within its rank
    assert (metrics["completions/mean_length"], metrics["completions/min_length"], metrics["completions/max_length"]) == (4.5, 1.0, 8.0)
    assert metrics["completions/clipped_ratio"] == 0.5
    assert metrics["loss"] == 0.5 and metrics["kl"] == pytest.approx(0.05)  # averaged over ranks
    assert metrics["tokens_per_second"] == 36.0  # all 36 tokens of both ranks, over the rollout second
    # Each rank takes its own prompts: disjoint, and together the first 6 of the seeded order.
    prompts = [r["prompts"] for r in ranks]
    assert not set(prompts[0]) & set(prompts[1])
    assert prompts[0] + prompts[1] == [int(i) for i in grpo._epoch_order(32, 5, 0)[:6]]
    assert all(r["any"] is True for r in ranks)
    assert all(r["gathered"] == [0, 10, 1, 11] for r in ranks)
    assert [r["agreed"] for r in ranks] == ["computed on rank 0"] * 2
    assert [r["refusal"] for r in ranks] == ["refused on rank 0"] * 2
    assert all(r["ddp_matches_one_batch"] == {"grpo": True, "bnpo": True, "dr_grpo": True, "dapo": True} for r in ranks)


def test_torchrun_refusal_reaches_every_rank(two_rank_run, inputs):
    """A fresh run into an existing run folder is refused; every rank exits with the one-line error (none
    hangs in a collective), torchrun reports the failure, and the existing run is untouched."""
    _, output_dir, tmp_path = two_rank_run
    run_dir = next(output_dir.iterdir())
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    args = tiny.run_args(inputs, output_dir, run_name=run_dir.name)
    result = torchrun([str(SCRIPT), *args], tmp_path, timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("--run_name" in line and "already holds a run" in line for line in errors), result.stderr[-3000:]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before
