"""Issue 19: data parallelism by processes, one per GPU, tested on a CPU with gloo.

- `python grpo_from_scratch.py --num_processes 3` (no --run_name): torch's launcher starts 3 processes, which
  split the step's 8 completions 3, 3, 2 (the second group straddles two processes); one run folder, world_size 3,
  only rank 0 logs and prints, the evaluations are split and gathered, the replicas end identical.
- `torchrun --standalone --nproc_per_node 2 grpo_from_scratch.py` runs the same path; a refusal under it is one line.
- On one fixed rollout batch, 2 and 3 processes (uneven splits) give the loss, the metrics and the gradient of one
  process on the whole batch, for every loss type; step metrics are gathered over the processes' rows.
- Faults: the launcher SIGKILLed (its processes exit by themselves) and the run resumed ends bit-identical to an
  uninterrupted one; another process count is refused in one line; a process killed with SIGKILL ends the run within
  seconds with one line; SIGINT to the process group (Ctrl-C) or SIGTERM to the launcher stops every process after
  its step with one checkpoint, one resume command and exit status 130, and that command finishes the run.
"""
import json
import os
import re
import shlex
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

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "grpo_from_scratch.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def subprocess_env(tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU even on a GPU box
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", grpo.STOP_FILE_ENV):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return tiny.write_run_inputs(tmp_path_factory.mktemp("dist-inputs"))


def without_run_name(args: list[str]) -> list[str]:
    at = args.index("--run_name")
    return args[:at] + args[at + 2:]


def launch(command: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every living descendant of a process (the launcher starts its processes in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie is dead, only not yet reaped
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass




def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


# %% The whole script on 3 processes, and under torchrun
@pytest.fixture(scope="module")
def three_process_run(inputs, tmp_path_factory):
    """`python grpo_from_scratch.py <tiny args> --num_processes 3`, no --run_name (the launcher names the folder
    for every process), 2 steps of 2 prompts x 4 completions, a periodic evaluation of 5 of the 8 eval questions."""
    tmp_path = tmp_path_factory.mktemp("three")
    output_dir = tmp_path / "out"
    args = without_run_name(tiny.run_args(inputs, output_dir, max_completion_length=24, eval_steps=1, eval_subset_size=5,
                                          eval_batch_size=2, micro_batch_size=2))
    result = launch([sys.executable, str(SCRIPT), *args, "--num_processes", "3"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result, output_dir


def test_three_processes_run_to_completion(three_process_run, inputs):
    result, output_dir = three_process_run
    [run_dir] = list(output_dir.iterdir())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 3 and config["run_name"] == run_dir.name
    assert [r["step"] for r in grpo.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]  # only rank 0 logs
    assert sum(line.startswith("run folder ") for line in result.stdout.splitlines()) == 1  # only rank 0 prints
    assert "3 process(es)" in result.stdout
    assert result.stdout.count("eval before: accuracy") == 1 and "Traceback" not in result.stderr
    # The evaluations were split over the processes and gathered: every question once.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["before"]["n"] == summary["after"]["n"] == 8
    assert [r["index"] for r in grpo.read_jsonl(run_dir / "eval_after.jsonl")] == list(range(8))
    evaluations = grpo.read_jsonl(run_dir / "eval_steps.jsonl")
    assert [(e["step"], e["n"], e["indices"]) for e in evaluations] == [(step, 5, grpo.eval_subset(8, 5)) for step in (1, 2)]
    assert result.stdout.count("eval step 1: accuracy") == 1
    # Every process saved its RNG state and optimizer shard.
    checkpoint = run_dir / "checkpoint"
    assert {p.name for p in checkpoint.glob("rng_rank*.pt")} == {f"rng_rank{r}.pt" for r in range(3)}
    assert {p.name for p in checkpoint.glob("optimizer*.pt")} == {f"optimizer_rank{r}.pt" for r in range(3)}
    # The replicas end identical, and not trivially: there were gradients and the weights moved.
    assert summary["world_size"] == 3 and len(set(summary["replica_checksums"])) == 1
    metrics = grpo.read_jsonl(run_dir / "metrics.jsonl")
    assert any(r["grad_norm"] > 0 and r["reward_std"] > 0 for r in metrics), metrics
    final, initial = weights(run_dir / "model"), weights(Path(inputs["model"]))
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    model = grpo.load_model(str(run_dir / "model"), torch.float32, "sdpa", torch.device("cpu"))
    assert grpo.parameter_checksum(model) == summary["replica_checksums"][0]


def test_torchrun_runs_the_same_path_and_refuses_in_one_line(inputs, tmp_path):
    """torchrun keeps working; and a fresh run into an existing folder is refused by every rank (none hangs in a
    collective), in one line (rank 0's), with the existing run untouched."""
    output_dir = tmp_path / "out"
    args = tiny.run_args(inputs, output_dir, num_steps=1, max_completion_length=8, eval_steps=0)
    result = launch([*TORCHRUN, str(SCRIPT), *args], tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    run_dir = output_dir / "tiny"
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    assert len(set(json.loads((run_dir / "summary.json").read_text())["replica_checksums"])) == 1
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    refused = launch([*TORCHRUN, str(SCRIPT), *args], tmp_path, timeout=180)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--run_name tiny" in errors[0] and "already holds a run" in errors[0], refused.stderr[-3000:]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


# %% N processes on one rollout batch equal one process on all of it
SAME_BATCH_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import grpo_from_scratch as grpo, tiny

    rank, world, device = grpo.setup_distributed()
    tokenizer = tiny.build_tokenizer()
    # One rollout batch of 4 prompts x 2 completions, the same in every process: completions of uneven
    # lengths (masks), rewards, old log-probs away from the current ones (so ratios clip) and a reference.
    generator = torch.Generator().manual_seed(0)
    rows, width, keep = 8, 12, 7
    input_ids = torch.randint(3, len(tokenizer), (rows, width), generator=generator)
    attention_mask = torch.ones(rows, width, dtype=torch.long)
    completion_mask = torch.ones(rows, keep, dtype=torch.long)
    for row, length in enumerate([7, 2, 5, 1, 7, 3, 6, 4]):
        completion_mask[row, length:] = 0
    rewards = torch.tensor([2.0, 0.0, 1.5, 0.2, 0.0, 0.0, 2.2, 0.8])
    advantages = grpo.compute_group_advantages(rewards, 2)

    def model():
        return tiny.tiny_model(tokenizer, seed=1).train()

    with torch.no_grad():
        current = grpo.compute_log_probs(model(), input_ids, attention_mask, keep)
    old = current + 0.3 * torch.randn(current.shape, generator=generator)
    ref = current + 0.2 * torch.randn(current.shape, generator=generator)
    mine = grpo.rows_of_this_process(rows)

    def check(loss_type):  # a function, so its DDP wrapper is gone before the process group
        cfg = grpo.Config(micro_batch_size=2, beta=0.04, epsilon=0.1, max_grad_norm=1e9, learning_rate=0.0,
                          loss_type=loss_type, max_completion_length=keep, shard_optimizer=False)
        policy_model = model()
        update = grpo.grpo_update(grpo.parallel_policy(policy_model, device), grpo.make_optimizer(policy_model, cfg), cfg,
                                  input_ids[mine], attention_mask[mine], completion_mask[mine], keep, advantages[mine],
                                  old[mine], ref[mine])
        alone = model()  # one process, the whole batch in one piece, no process group involved
        log_probs = grpo.PerTokenLogProbs(alone)(input_ids, attention_mask, keep)
        loss, metrics = grpo.grpo_loss(log_probs, old, ref, advantages, completion_mask, epsilon=0.1, beta=0.04,
                                       loss_type=loss_type, max_completion_length=keep)
        loss.backward()
        gradient = [p.grad for p in policy_model.parameters()]
        expected = [p.grad for p in alone.parameters()]
        return {{"max_gradient_difference": max((g - e).abs().max().item() for g, e in zip(gradient, expected)),
                "largest_gradient": max(e.abs().max().item() for e in expected),
                "loss": [update["loss"], loss.item()],
                "metrics": {{key: [update[key], float(value)] for key, value in metrics.items()}}}}

    counts = grpo.split_rows(rows, world)
    gathered = grpo.all_gather_rows(torch.arange(rows)[mine].float()[:, None] * torch.tensor([1.0, -1.0]))

    # gather_rollouts: two rollouts of 4 rows each, whose widths differ by process and by rollout; take_rows.
    def fake_rollout(call):
        own = grpo.rows_of_this_process(4)
        ids = [list(range(100 * call + 10 * row, 100 * call + 10 * row + 2 + rank)) for row in range(own.start, own.stop)]
        completion = [[7] * (1 + rank + call) for _ in ids]
        return {{"prompt_ids": torch.tensor(ids), "prompt_mask": torch.ones(len(ids), 2 + rank, dtype=torch.long),
                "completion_ids": torch.tensor(completion), "completion_mask": torch.ones(len(ids), 1 + rank + call, dtype=torch.long),
                "lengths": torch.full((len(ids),), 1 + rank + call), "truncated": torch.zeros(len(ids), dtype=torch.bool),
                "completions": [f"call {{call}} row {{row}}" for row in range(own.start, own.stop)]}}
    every = grpo.gather_rollouts([fake_rollout(0), fake_rollout(1)], pad_id=0, device=device)
    taken = grpo.take_rows(every, [1, 4])

    # sample_step with dynamic sampling on a real tiny model: groups whose gold is even get a constant reward.
    def odd_gold_signal(completions, answers):
        return [float(len(c) % 5) if int(a) % 2 else 1.0 for c, a in zip(completions, answers)]
    examples = [{{"question": r["question"], "prompt": grpo.build_prompt(r["question"], tokenizer),
                 "answer": grpo.extract_answer_from_dataset(r["answer"])}} for r in tiny.word_problems(40, seed=3)]
    sample_cfg = grpo.Config(batch_size=3, num_generations=3, max_completion_length=8, dynamic_sampling=True,
                             max_extra_rollouts=3, seed=5)
    grpo.seed_everything(5 + rank)
    sampled = grpo.sample_step(model().eval(), tokenizer, examples, sample_cfg, 2, {{"odd": odd_gold_signal}}, [1.0], device)
    result = {{"rows": [mine.start, mine.stop], "counts": counts, "gathered": gathered.tolist(),
              "every": {{key: value if key == "completions" else value.tolist() for key, value in every.items()}},
              "taken": {{key: value if key == "completions" else value.tolist() for key, value in taken.items()}},
              "sampled": {{"rewards": sampled["rewards_per_func"][:, 0].tolist(), "rows": [sampled["rows"].start, sampled["rows"].stop],
                          "answers": [ex["answer"] for ex in sampled["examples"]], "extra_rollouts": sampled["extra_rollouts"],
                          "dropped_groups": sampled["dropped_groups"], "completions": sampled["rollout"]["completions"],
                          "draws": [[int(i) for i in grpo.prompt_indices(40, 1, 3, 5)]]
                                   + [grpo.extra_prompt_indices(40, 2, call, 3, 5) for call in (1, 2, 3)]}},
              "checks": {{loss_type: check(loss_type) for loss_type in tiny.choices("loss_type")}}}}
    with open(sys.argv[1] + f"/rank{{rank}}.json", "w") as handle:
        json.dump(result, handle)
    torch.distributed.destroy_process_group()
""")


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_give_the_gradient_of_one_process_on_the_whole_batch(processes, tmp_path):
    script = tmp_path / "same_batch_check.py"
    script.write_text(SAME_BATCH_CHECK.format(repo=str(REPO), tests=str(REPO / "tests")))
    result = launch([*TORCHRUN[:-1], str(processes), str(script), str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]
    counts = {2: [4, 4], 3: [3, 3, 2]}[processes]  # 3 processes: the group of rows 2-3 straddles ranks 0 and 1
    assert all(r["counts"] == counts for r in ranks)
    assert [r["rows"] for r in ranks] == [[sum(counts[:i]), sum(counts[:i + 1])] for i in range(processes)]
    assert all(r["gathered"] == [[i, -i] for i in range(8)] for r in ranks)  # every row once, in order
    for rank in ranks:
        for loss_type, check in rank["checks"].items():
            assert check["largest_gradient"] > 1e-3, loss_type  # a real gradient to compare
            # fp32 sums in another order differ by a few units in the last place (0.6e-6 of the largest
            # gradient measured with 3 processes); a wrong weighting would be off by a third or more.
            assert check["max_gradient_difference"] <= 1e-5 * check["largest_gradient"], (loss_type, check)
            assert check["loss"][0] == pytest.approx(check["loss"][1], rel=1e-5, abs=1e-8), loss_type
            for key, (got, want) in check["metrics"].items():
                assert got == pytest.approx(want, rel=1e-5, abs=1e-8), (loss_type, key)
    assert any(c["metrics"]["clip_ratio/region_mean"][1] > 0 for c in ranks[0]["checks"].values())  # clipping happened

    # gather_rollouts: rollout 0's rows in rank order, then rollout 1's; prompts left-padded and completions
    # right-padded to the widest over processes and rollouts; take_rows trims the completions to its rows.
    widest_prompt, widest_completion = 2 + processes - 1, processes + 1
    owner_of_row = [rank for rank, count in enumerate(grpo.split_rows(4, processes)) for _ in range(count)]
    for rank in ranks:
        every = rank["every"]
        assert every["completions"] == [f"call {call} row {row}" for call in (0, 1) for row in range(4)]
        for i, (ids, mask, completion) in enumerate(zip(every["prompt_ids"], every["prompt_mask"], every["completion_ids"])):
            call, row = divmod(i, 4)
            width = 2 + owner_of_row[row]  # each process made its prompts 2 + its rank wide
            assert ids == [0] * (widest_prompt - width) + list(range(100 * call + 10 * row, 100 * call + 10 * row + width))
            assert mask == [0] * (widest_prompt - width) + [1] * width
            assert len(completion) == widest_completion and every["lengths"][i] == width - 1 + call
            assert every["completion_mask"][i] == [1] * (width - 1 + call) + [0] * (widest_completion - width + 1 - call)
        taken = rank["taken"]
        assert taken["completions"] == [every["completions"][1], every["completions"][4]]
        assert len(taken["completion_ids"][0]) == max(every["lengths"][1], every["lengths"][4])

    # Dynamic sampling: every process agrees on the step's rewards, draws and counts; together they hold the
    # kept rows once each; the kept groups all have signal (enough were found within the bound here).
    sampled = [rank["sampled"] for rank in ranks]
    assert all(s["rewards"] == sampled[0]["rewards"] and s["draws"] == sampled[0]["draws"] for s in sampled)
    assert len({(s["extra_rollouts"], s["dropped_groups"]) for s in sampled}) == 1
    kept = sampled[0]["rewards"]
    assert len(kept) == 9 and sampled[0]["dropped_groups"] >= 1 and sampled[0]["extra_rollouts"] >= 1
    assert all(len(set(kept[g:g + 3])) > 1 for g in range(0, 9, 3))  # each kept group has signal
    assert [s["rows"] for s in sampled] == [[sum(grpo.split_rows(9, processes)[:r]), sum(grpo.split_rows(9, processes)[:r + 1])]
                                             for r in range(processes)]
    answers = [a for s in sampled for a in s["answers"]]
    assert len(answers) == 9 and all(int(a) % 2 == 1 for a in answers)  # only odd golds carry signal


def test_split_rows_is_even_and_in_order():
    assert grpo.split_rows(84, 8) == [11, 11, 11, 11, 10, 10, 10, 10]
    assert grpo.split_rows(84, 1) == [84] and grpo.split_rows(7, 7) == [1] * 7
    with pytest.raises(grpo.ConfigError, match="--num_processes 9: more processes than the step's 8 completions"):
        grpo.validate_config(grpo.Config(num_processes=9, batch_size=2, num_generations=4))


# %% Faults
def test_killed_launcher_resumes_bit_identical_and_other_counts_are_refused(inputs, tmp_path, capsys):
    """SIGKILL of the launcher after the first checkpoint: its processes notice and exit by themselves within
    seconds; the same command plus --resume ends with the weights and metrics of an uninterrupted 2-process run,
    bit for bit (each process reloads its optimizer shard and RNG state). Resuming with another process count is
    refused in one line, before anything starts."""
    def args(output_dir):
        return [*tiny.run_args(inputs, output_dir, num_steps=24, save_steps=2, seed=3, max_completion_length=16,
                               learning_rate=1e-2, eval_steps=0), "--num_processes", "2"]

    env = subprocess_env(tmp_path)
    run_dir = tmp_path / "killed" / "tiny"
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("baseline", "killed")}
    baseline, victim = (subprocess.Popen([sys.executable, str(SCRIPT), *args(tmp_path / name)], cwd=REPO, env=env,
                                         stdout=logs[name], stderr=subprocess.STDOUT) for name in logs)
    try:
        tiny.wait_for(lambda: (run_dir / "checkpoint" / "trainer_state.json").exists() and tiny.metric_lines(run_dir) >= 3,
                 victim, what="the first checkpoint and step 3")
        workers = descendants(victim.pid)
        assert len(workers) == 2, workers
        victim.send_signal(signal.SIGKILL)  # the launcher alone, as a lost terminal or an OOM kill of it would
        victim.wait(timeout=60)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in workers if alive(pid)]
        baseline.wait(timeout=300)
    finally:
        for process in (victim, baseline):
            kill_all(descendants(process.pid) + [process.pid] if process.poll() is None else descendants(process.pid))
        for log in logs.values():
            log.close()
    assert left == [], "processes outlived their launcher"
    assert baseline.returncode == 0, (tmp_path / "baseline.log").read_text()[-3000:]
    killed_at = json.loads((grpo.find_checkpoint(run_dir) / "trainer_state.json").read_text())["step"]
    assert killed_at < 24 and not (run_dir / "model").exists(), "the kill came after training ended"

    resumed = launch([sys.executable, str(SCRIPT), *args(tmp_path / "killed"), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert [r["step"] for r in grpo.read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 25))
    final, reference = weights(run_dir / "model"), weights(tmp_path / "baseline" / "tiny" / "model")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert any(not torch.equal(reference[k], v) for k, v in weights(Path(inputs["model"])).items())
    keys = ("reward", "loss", "kl", "grad_norm", "completions/mean_length")
    got, want = (grpo.read_jsonl(d / "metrics.jsonl") for d in (run_dir, tmp_path / "baseline" / "tiny"))
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]

    for processes in ("1", "3"):  # one line naming the count to use; nothing starts
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            grpo.main(args(tmp_path / "killed")[:-1] + [processes, "--resume"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: --resume: the run in {run_dir} was trained by 2 process(es) and this launch has {processes}; "
            "resume it with --num_processes 2 (under torchrun: --nproc_per_node 2)"]


def test_a_killed_process_ends_the_whole_run_within_seconds(inputs, tmp_path):
    """SIGKILL of one of the launcher's processes (as the kernel's out-of-memory killer would): the launcher stops
    the other within seconds, prints one line naming the rank and the signal, exits 1, and leaves no process."""
    args = [*tiny.run_args(inputs, tmp_path / "out", num_steps=500, save_steps=100, eval_steps=0), "--num_processes", "2"]
    run_dir = tmp_path / "out" / "tiny"
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        tiny.wait_for(lambda: tiny.metric_lines(run_dir) >= 2, process, what="step 2")
        workers = descendants(process.pid)
        [victim] = [pid for pid in workers if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - killed
        left = [pid for pid in workers if alive(pid)]
    finally:
        kill_all(descendants(process.pid) + [process.pid])
    assert process.returncode == 1, err[-3000:]
    assert took < 20 and left == [], (took, left)
    assert re.findall(r"error: .*", err) == [f"error: rank 1 (pid {victim}) was killed by SIGKILL; the launcher stopped every other process. "
                      "The last checkpoint is intact: resume with --resume"], err[-3000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("launched", [True, False])
def test_sigterm_stops_a_launched_process_at_once_and_a_lone_one_after_its_step(launched, tmp_path):
    """The launcher's SIGTERM means another process failed: its processes exit at once, before a
    collective's error could put a second line beside the launcher's. Alone (or under torchrun)
    SIGTERM is a scheduler's: the step finishes and the stop is recorded."""
    code = textwrap.dedent("""
        import os, signal, time, grpo_from_scratch as grpo
        with grpo.stop_after_step():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        print(grpo.STOP_SIGNALS)
    """)
    env = subprocess_env(tmp_path)
    env.pop(grpo.STOP_FILE_ENV, None)
    if launched:
        env[grpo.STOP_FILE_ENV] = str(tmp_path / "stop")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    if launched:
        assert done.returncode == -signal.SIGTERM and done.stdout == "", done.stderr[-2000:]
    else:
        assert done.returncode == 0 and done.stdout.endswith("\n['SIGTERM']\n"), done.stderr[-2000:]


@pytest.mark.parametrize("how", ["SIGINT to the process group", "SIGTERM to the launcher"])
def test_interrupt_stops_every_process_after_its_step(how, inputs, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group; a scheduler sends SIGTERM to the
    launcher. Either way every process finishes its step, one checkpoint is written (save_steps is larger than the
    run, so only the stop can have written it), one resume command is printed, the exit status is 130, no process is
    left, and the printed command completes the run with every step logged once."""
    output_dir = tmp_path / "out"
    args = [*without_run_name(tiny.run_args(inputs, output_dir, num_steps=8, save_steps=100, eval_steps=0)),
            "--num_processes", "2"]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        tiny.wait_for(lambda: any(tiny.metric_lines(d) >= 1 for d in output_dir.glob("*")), process, what="step 1")
        workers = descendants(process.pid)
        if how.startswith("SIGINT"):
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
        left = [pid for pid in workers if alive(pid)]
    finally:
        kill_all(descendants(process.pid) + [process.pid])
    assert process.returncode == 130, err[-3000:]
    assert left == [] and "Traceback" not in err and "error" not in err
    [run_dir] = list(output_dir.iterdir())
    stopped_at = json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 8 and [r["step"] for r in grpo.read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, stopped_at + 1))
    signame = how.split()[0]
    assert err.count(f"{signame}: every process stops after this step") == 1
    assert err.count("resume with:") == 1 and f"interrupted ({signame} to the launcher) after step {stopped_at}" in err
    command = shlex.split(err.split("resume with:")[1].strip().splitlines()[0])
    assert command[:2] == ["python", "grpo_from_scratch.py"] and command[-3:] == ["--run_name", run_dir.name, "--resume"]
    resumed = launch([sys.executable, *command[1:]], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(output_dir.iterdir()) == [run_dir]
    assert [r["step"] for r in grpo.read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 9))


RANK_ONE_FAULTS = '''
import os


def raises_on_rank_one(completions, answers):
    if os.environ.get("RANK") == "1":
        raise ValueError("the reward server is unreachable")
    return [0.0] * len(completions)


def short_on_rank_one(completions, answers):
    return [0.0] * (len(completions) - (os.environ.get("RANK") == "1"))
'''


@pytest.mark.parametrize("func,status,expected", [
    ("raises_on_rank_one", 1, "error: rank 1: ValueError: the reward server is unreachable (traceback in {run_dir}/error_rank1.txt)"),
    ("short_on_rank_one", 2, "error: rank 1: reward function short_on_rank_one (--reward_funcs): returned 3 values for 4 completions"),
], ids=["exception", "bad-return"])
def test_a_reward_function_failing_on_one_process_ends_the_run(func, status, expected, inputs, tmp_path):
    """A reward function that fails on rank 1 only (rank 0 then waits for rank 1's rewards): rank 1 says why in
    one line (an exception's traceback goes to the run folder), the launcher stops rank 0 within seconds, the exit
    status is the failure's, and no process is left."""
    (tmp_path / "faults.py").write_text(RANK_ONE_FAULTS)
    args = [*tiny.run_args(inputs, tmp_path / "out", eval_steps=0, reward_funcs=f"format,{tmp_path}/faults.py:{func}"),
            "--num_processes", "2"]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=180)
        left = descendants(process.pid)
    finally:
        kill_all(descendants(process.pid) + [process.pid])
    run_dir = tmp_path / "out" / "tiny"
    assert process.returncode == status, err[-3000:]
    assert left == [] and "Traceback" not in err
    # Another process's progress bar may share the line: an error line is what follows "error: ".
    assert re.findall(r"error: .*", err) == [expected.format(run_dir=run_dir)], err[-3000:]
    if status == 1:
        assert "ValueError: the reward server is unreachable" in (run_dir / "error_rank1.txt").read_text()
