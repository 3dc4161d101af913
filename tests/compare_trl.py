"""grpo_from_scratch.py against TRL's GRPOTrainer on the same work, on CPU (a script, not collected by pytest).

TRL is not a dependency of this project; install it in an environment of its own:

    python3 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0        # the CPU wheel first, or pip pulls a multi-GB CUDA build
    .venv-trl/bin/pip install -r requirements.txt trl
    .venv-trl/bin/python tests/compare_trl.py --steps 160      # README's figures
    .venv-trl/bin/python tests/compare_trl.py --warm_start DIR --steps 20   # keep the warm start; fewer steps

The default run took about 6 minutes on 2 CPU cores, 42 s of it building the warm start (with the learning test's
GRPO_LEARNING_THREADS, 2 by default: 10 minutes when other jobs loaded the machine); --warm_start DIR keeps it.

The work is the CPU learning task of tests/test_learning.py: its warm-started tiny Qwen2 (built by that test's
own functions, or read from a GRPO_LEARNING_EXPORT folder with --warm_start), its addition word problems and
its GRPO settings (16 prompts x 8 completions, 20 new tokens, lr 1e-4, beta 0, grad clip 1.0, one micro-batch).
Both trainers get the same prompts (same token ids, same order), the same rewards (this file's
correctness_reward + format_reward, wrapped in TRL's reward signature), plain sampling at temperature 1, the
`grpo` loss, the same epsilon, beta, learning rate (constant), AdamW (torch defaults: betas 0.9/0.999, eps 1e-8,
weight decay 0.01 on every parameter), gradient clipping, group size, batch, reward scaling, completion budget,
mu = 1 and no reference-model sync. Measured, in one process, one trainer after the other:

  1. the gradient of one fixed batch (prompt ids, completion ids, masks, advantages, reference log-probs) through
     this file's PerTokenLogProbs + grpo_loss and through GRPOTrainer.compute_loss, for beta 0 and 0.04;
  2. seconds per training step, with the split of this file's step (rollout / reference / update / the rest:
     rewards, metrics, logging, checkpoints, curves);
  3. held-out greedy accuracy after the run, both scored by this file's evaluate_model on the same problems.

The last line is `COMPARE_TRL key=value ...`. Settings TRL would choose differently by default are set explicitly
in trl_config() below, each with the reason. Written against trl 1.16.0 (with transformers 5.23.0): other versions
may rename GRPOConfig fields or change what compute_loss expects.
"""
import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402

import grpo_from_scratch as grpo  # noqa: E402
import test_learning  # noqa: E402
import tiny  # noqa: E402

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError:
    sys.exit("error: trl is not installed; see the docstring of tests/compare_trl.py for how to install it")

# Quiet output: no weight-loading bars, no deprecation notes about TrainingArguments names, no progress bars
# of either trainer (the table at the end is the output).
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
grpo.tqdm = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True})


# %% The shared work: warm start, problems, settings
def prepare_warm_start(folder: Path) -> None:
    """The learning test's warm start, built by its own functions (same seed, same thread count), saved like
    GRPO_LEARNING_EXPORT saves it: folder/warm_start, folder/train.jsonl, folder/held_out.jsonl."""
    torch.set_num_threads(test_learning.NUM_THREADS)
    grpo.seed_everything(test_learning.SEED)
    tokenizer = tiny.build_tokenizer()
    train, held_out = test_learning.load_problems(folder, tokenizer)
    model = tiny.tiny_model(tokenizer, hidden_size=test_learning.HIDDEN_SIZE, layers=test_learning.LAYERS,
                            seed=test_learning.SEED)
    test_learning.warm_start(model, tokenizer, train, held_out, test_learning.SEED)
    test_learning.export_warm_start(folder, model, tokenizer)


def load_work(folder: Path):
    tokenizer = grpo.load_tokenizer(str(folder / "warm_start"))
    train = grpo.load_gsm8k("train", tokenizer, local_file=str(folder / "train.jsonl"))
    held_out = grpo.load_gsm8k("test", tokenizer, local_file=str(folder / "held_out.jsonl"), flag="--eval_file")
    return tokenizer, train, held_out


def load_policy(folder: Path):
    """A fresh fp32 copy of the warm start, loaded from disk (TRL loads its reference model from the same path)."""
    return grpo.load_model(str(folder / "warm_start"), torch.float32, "sdpa", torch.device("cpu"))


def ours_config(args, run_dir: Path) -> grpo.Config:
    """The learning test's GRPO settings, with this script's steps, beta and checkpoint cadence."""
    settings = {**test_learning.GRPO_CONFIG, "num_steps": args.steps, "beta": args.beta}
    return grpo.Config(seed=test_learning.SEED, output_dir=str(run_dir.parent), run_name=run_dir.name,
                       save_steps=args.save_steps, **settings)


def trl_reward_funcs():
    """This file's correctness and format rewards in TRL's signature: keyword arguments, the dataset's
    `answer` column repeated once per completion."""
    def correctness(prompts, completions, answer, **kwargs):
        return grpo.correctness_reward(completions, answer)

    def format(prompts, completions, **kwargs):  # noqa: A001 (TRL logs the function's name)
        return grpo.format_reward(completions)

    return [correctness, format]


def trl_config(cfg: grpo.Config, output_dir: Path) -> GRPOConfig:
    """cfg's settings in GRPOConfig terms. One optimizer step per generation batch: per_device_train_batch_size
    counts completions, not prompts, and with gradient_accumulation_steps 1 TRL sets steps_per_generation 1 and
    generation_batch_size = per_device_train_batch_size, so each step samples batch_size x num_generations
    completions and takes one optimizer step on all of them, in one forward (TRL's log-prob chunk is
    per_device_train_batch_size), like micro_batch_size = the whole batch here."""
    completions = cfg.batch_size * cfg.num_generations
    assert cfg.micro_batch_size >= completions, "the comparison runs both trainers on one micro-batch"
    return GRPOConfig(
        output_dir=str(output_dir), seed=cfg.seed, max_steps=cfg.num_steps, use_cpu=True,
        per_device_train_batch_size=completions, gradient_accumulation_steps=1, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, num_iterations=cfg.mu,
        # Plain sampling, as here (TRL's defaults, set so the comparison does not depend on them).
        temperature=cfg.temperature, top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0,
        # The loss: TRL's default loss_type is "dapo" (tokens of the whole accumulated batch); "grpo" is this file's
        # mean of per-sequence means. use_bias_correction_kl (default True) multiplies the k3 KL by the ratio, which
        # changes the KL gradient even on-policy; this file has no such factor.
        loss_type=cfg.loss_type, beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        use_bias_correction_kl=False, scale_rewards="group" if cfg.scale_rewards else "none",
        mask_truncated_completions=False, top_entropy_quantile=1.0, sync_ref_model=False,
        # Optimisation: transformers' default schedule is linear decay (here: constant) and the optimizer is passed
        # in trainer_for() (transformers' own would exempt biases and norms from weight decay).
        learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=cfg.max_grad_norm,
        # fp32 like this file on CPU (GRPOConfig defaults to bf16), no gradient checkpointing (cfg has none).
        bf16=False, fp16=False, gradient_checkpointing=cfg.gradient_checkpointing,
        # The prompts arrive in this file's order (see trl_dataset), so TRL must not reshuffle them.
        shuffle_dataset=False, dataloader_num_workers=0,
        # Logging every step and checkpoints at this file's cadence, so both pay for the same bookkeeping.
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, report_to="none", disable_tqdm=True,
        log_completions=False,
    )


def trl_dataset(train: list[dict], cfg: grpo.Config) -> Dataset:
    """The prompts of every step in this file's order (prompt_indices), as TRL rows: `prompt` is the already
    templated string, which TRL tokenizes as it is (same ids as here; checked in gradient_check)."""
    rows = [train[i] for step in range(cfg.num_steps)
            for i in grpo.prompt_indices(len(train), step, cfg.batch_size, cfg.seed)]
    return Dataset.from_list([{"prompt": row["prompt"], "answer": row["answer"]} for row in rows])


def trainer_for(model, tokenizer, cfg: grpo.Config, train: list[dict], output_dir: Path, callbacks=()) -> GRPOTrainer:
    # The same optimizer as MasterWeightAdamW on an fp32 model: torch's AdamW over every parameter, its defaults.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    # TRL stops on the model's generation_config eos ids plus the tokenizer's eos; this file also stops on
    # <|endoftext|>, so give the model the same list.
    model.generation_config.eos_token_id = grpo.stop_token_ids(tokenizer)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward_funcs(), args=trl_config(cfg, output_dir),
                          train_dataset=trl_dataset(train, cfg), processing_class=tokenizer,
                          optimizers=(optimizer, None), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # it prints every step's log dict
    return trainer


# %% 1. One batch through both losses
# (this file's loss type, beta, TRL's loss type, TRL's use_bias_correction_kl): the same math under both names,
# then two of TRL's defaults: "dapo" (equal to bnpo on one process and one micro-batch) and the bias-corrected KL.
GRADIENT_CASES = [("grpo", 0.0, "grpo", False), ("grpo", 0.04, "grpo", False), ("bnpo", 0.04, "bnpo", False),
                  ("dr_grpo", 0.04, "dr_grpo", False), ("bnpo", 0.0, "dapo", False), ("grpo", 0.04, "grpo", True)]


def gradient_check(folder: Path, tokenizer, train: list[dict], args) -> list[dict]:
    """The same rollout through this file's PerTokenLogProbs + grpo_loss and through TRL's compute_loss (with the
    inputs dict its _generate_and_score_completions builds), from the same weights; relative difference of the loss
    and of the flattened gradient. The policy is the warm start with seeded noise on its weights and the reference
    is the warm start, so the KL term and its gradient are not zero."""
    cfg = ours_config(args, folder / "unused")
    warm = load_policy(folder)
    torch.manual_seed(1)
    batch = [train[i] for i in grpo.prompt_indices(len(train), 0, cfg.batch_size, cfg.seed)]
    prompts = [ex["prompt"] for ex in batch for _ in range(cfg.num_generations)]
    answers = [ex["answer"] for ex in batch for _ in range(cfg.num_generations)]
    rollout = grpo.generate_completions(warm, tokenizer, prompts, cfg.temperature, cfg.max_completion_length)
    rewards = grpo.score_completions({"correctness": grpo.correctness_reward, "format": grpo.format_reward},
                                     rollout["completions"], answers)
    advantages = grpo.compute_group_advantages(rewards.sum(1), cfg.num_generations, cfg.scale_rewards)
    input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], 1)
    attention_mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], 1)
    keep = rollout["completion_ids"].shape[1]
    with torch.no_grad():
        ref_log_probs = grpo.compute_log_probs(warm, input_ids, attention_mask, keep, cfg.temperature)
        policy_weights = copy.deepcopy(warm)
        for param in policy_weights.parameters():
            param.add_(0.05 * param.abs().mean() * torch.randn_like(param))

    # TRL tokenizes the prompt strings itself (processing_class(text=prompts)): its ids must be the ones this file
    # generated from.
    for row, prompt in enumerate(prompts):
        trl_ids = tokenizer(text=[prompt])["input_ids"][0]
        assert trl_ids == rollout["prompt_ids"][row][rollout["prompt_mask"][row].bool()].tolist(), "prompt ids differ"

    results = []
    for loss_type, beta, trl_loss_type, bias_correction in GRADIENT_CASES:
        ours_model = copy.deepcopy(policy_weights).train()
        log_probs = grpo.PerTokenLogProbs(ours_model)(input_ids, attention_mask, keep, cfg.temperature)
        ours_loss, _ = grpo.grpo_loss(log_probs, None, ref_log_probs if beta else None, advantages,
                                      rollout["completion_mask"], epsilon=cfg.epsilon, beta=beta, loss_type=loss_type,
                                      max_completion_length=cfg.max_completion_length)
        ours_loss.backward()
        ours_grad = torch.cat([p.grad.flatten() for p in ours_model.parameters()])

        trl_model = copy.deepcopy(policy_weights)
        with tempfile.TemporaryDirectory() as scratch:
            trainer = trainer_for(trl_model, tokenizer, dataclasses.replace(cfg, loss_type=trl_loss_type, beta=beta),
                                  train, Path(scratch))
            trainer.args.use_bias_correction_kl = bias_correction
            trl_model.train()
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch per step here
            inputs = {"prompt_ids": rollout["prompt_ids"], "prompt_mask": rollout["prompt_mask"],
                      "completion_ids": rollout["completion_ids"], "completion_mask": rollout["completion_mask"],
                      "advantages": advantages, "num_items_in_batch": rollout["completion_mask"].sum()}
            if beta:
                inputs["ref_per_token_logps"] = ref_log_probs
            trl_loss = trainer.compute_loss(trl_model, inputs)
            trl_loss.backward()
        trl_grad = torch.cat([p.grad.flatten() for p in trl_model.parameters()])
        results.append({
            "ours": f"{loss_type}, beta {beta}",
            "trl": f"{trl_loss_type}, beta {beta}" + (", use_bias_correction_kl" if bias_correction else ""),
            "same_math": not bias_correction, "beta": beta,
            "loss_ours": ours_loss.item(), "loss_trl": trl_loss.item(),
            "loss_rel_diff": abs(ours_loss.item() - trl_loss.item()) / max(abs(trl_loss.item()), 1e-30),
            "grad_rel_diff": ((ours_grad - trl_grad).norm() / trl_grad.norm()).item()})
    return results


# %% 2-3. Training runs: time per step, then held-out accuracy
class ClockedLogger(grpo.RunLogger):
    """The run's own logger (metrics.jsonl, completions, curves), plus the time each step's metrics arrive."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamps, self.records = [], []

    def log_step(self, metrics: dict) -> None:
        super().log_step(metrics)
        self.stamps.append(time.perf_counter())
        self.records.append(metrics)


class StepClock(TrainerCallback):
    """The time each TRL step ends (after its optimizer step, logging and checkpoint)."""

    def __init__(self):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def run_ours(folder: Path, runs: Path, tokenizer, train, held_out, args) -> dict:
    """train_with_grpo as main() calls it: the run folder, RunLogger (metrics.jsonl, curves), checkpoints."""
    cfg = ours_config(args, runs / "ours")
    model = load_policy(folder)
    (runs / "ours").mkdir(parents=True)
    logger = ClockedLogger(runs / "ours", cfg, None)
    grpo.seed_everything(cfg.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    grpo.train_with_grpo(model, tokenizer, train, cfg, runs / "ours", logger=logger)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    split = {key: statistics.fmean(r[key] for r in logger.records) for key in ("rollout_time", "reference_time", "update_time")}
    return {"train_seconds": seconds, "cpu_seconds": cpu_seconds, "median_step_s": median_interval(start, logger.stamps),
            **split, "rest_time": seconds / cfg.num_steps - sum(split.values()),
            "rewards": [r["reward"] for r in logger.records], "accuracy": evaluate(model, tokenizer, held_out),
            "load_after": os.getloadavg()[0]}


def run_trl(folder: Path, runs: Path, tokenizer, train, held_out, args) -> dict:
    cfg = ours_config(args, runs / "trl")
    model = load_policy(folder)
    clock = StepClock()
    trainer = trainer_for(model, tokenizer, cfg, train, runs / "trl", callbacks=[clock])
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"train_seconds": seconds, "cpu_seconds": cpu_seconds, "median_step_s": median_interval(start, clock.stamps),
            "rewards": [log["reward"] for log in trainer.state.log_history if "reward" in log],
            "accuracy": evaluate(model, tokenizer, held_out), "load_after": os.getloadavg()[0]}


def median_interval(start: float, stamps: list[float]) -> float:
    """Median time between consecutive step ends: a whole loop iteration, bookkeeping included."""
    return statistics.median(b - a for a, b in zip([start, *stamps], stamps))


def evaluate(model, tokenizer, held_out) -> float:
    return test_learning.evaluate(model, tokenizer, held_out)["accuracy"]


# %% Report
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=test_learning.GRPO_CONFIG["num_steps"], help="GRPO steps per trainer")
    parser.add_argument("--beta", type=float, default=test_learning.GRPO_CONFIG["beta"], help="KL weight of the training runs")
    parser.add_argument("--save_steps", type=int, default=grpo.Config.save_steps, help="checkpoint cadence of both runs")
    # One thread by default, as in the tests (conftest.py): the tiny model is overhead-bound, and on a busy machine
    # two OpenMP threads waiting on each other can slow a step down several times over.
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both runs")
    parser.add_argument("--order", choices=("ours,trl", "trl,ours"), default="ours,trl", help="which trainer runs first")
    parser.add_argument("--warm_start", help="folder of a warm start to reuse (a GRPO_LEARNING_EXPORT folder of "
                        "tests/test_learning.py); built there when missing")
    parser.add_argument("--skip_training", action="store_true", help="only the gradient check")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.warm_start or Path(scratch) / "work")
        if not (folder / "warm_start").is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            prepare_warm_start(folder)
            print(f"warm start built by tests/test_learning.py's functions in {time.perf_counter() - started:.0f} s")
        torch.set_num_threads(args.threads)
        tokenizer, train, held_out = load_work(folder)
        grads = gradient_check(folder, tokenizer, train, args)
        runs, load_before = {}, os.getloadavg()[0]
        if not args.skip_training:
            before = evaluate(load_policy(folder), tokenizer, held_out)
            for name in args.order.split(","):
                runs[name] = (run_ours if name == "ours" else run_trl)(folder, Path(scratch) / "runs", tokenizer, train,
                                                                      held_out, args)
                print(f"{name}: {args.steps} steps in {runs[name]['train_seconds']:.1f} s")

    print(f"\ngrpo_from_scratch vs TRL | {time.strftime('%Y-%m-%d')} | {platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| trl {trl.__version__}")
    print("1. one batch (16 prompts x 8 completions), same weights and inputs: this file vs GRPOTrainer.compute_loss")
    print(f"   {'this file':<20}{'TRL':<38}{'loss, this file / TRL':>26}{'rel. diff loss':>16}{'rel. diff grad':>16}")
    for row in grads:
        losses = f"{row['loss_ours']:.4e} / {row['loss_trl']:.4e}"
        print(f"   {row['ours']:<20}{row['trl']:<38}{losses:>26}{row['loss_rel_diff']:>16.1e}{row['grad_rel_diff']:>16.1e}")
    worst = {beta: max(r["grad_rel_diff"] for r in grads if r["same_math"] and r["beta"] == beta) for beta in (0.0, 0.04)}
    line = f"COMPARE_TRL grad_rel_diff_beta0={worst[0.0]:.1e} grad_rel_diff_beta0.04={worst[0.04]:.1e}"
    if runs:
        ours, theirs = runs["ours"], runs["trl"]
        print(f"2-3. training: {args.steps} steps of 16 prompts x 8 completions, 20 new tokens, beta {args.beta}, checkpoint "
              f"every {args.save_steps} steps; run order {args.order}; 1-min load average {load_before:.1f} before, "
              f"{runs[args.order.split(',')[0]]['load_after']:.1f} / {runs[args.order.split(',')[1]]['load_after']:.1f} after")
        print(f"   {'':<44}{'this file':>12}{'TRL':>12}")
        rows = [("training time (s)", ours["train_seconds"], theirs["train_seconds"], ".1f"),
                ("process CPU time (s)", ours["cpu_seconds"], theirs["cpu_seconds"], ".1f"),
                ("median step (s)", ours["median_step_s"], theirs["median_step_s"], ".3f"),
                ("mean reward, first 20 steps", statistics.fmean(ours["rewards"][:20]),
                 statistics.fmean(theirs["rewards"][:20]), ".3f"),
                ("mean reward, last 20 steps", statistics.fmean(ours["rewards"][-20:]),
                 statistics.fmean(theirs["rewards"][-20:]), ".3f"),
                ("held-out greedy accuracy before", before, before, ".3f"),
                ("held-out greedy accuracy after", ours["accuracy"], theirs["accuracy"], ".3f")]
        for label, a, b, spec in rows:
            print(f"   {label:<44}{a:>12{spec}}{b:>12{spec}}")
        print(f"   this file's mean step: rollout {ours['rollout_time']:.3f} s, reference {ours['reference_time']:.3f} s, "
              f"update {ours['update_time']:.3f} s, rest (rewards, metrics, logging, checkpoints, curves) "
              f"{ours['rest_time']:.3f} s")
        line += (f" ours_train_s={ours['train_seconds']:.1f} trl_train_s={theirs['train_seconds']:.1f}"
                 f" ours_median_step_s={ours['median_step_s']:.3f} trl_median_step_s={theirs['median_step_s']:.3f}"
                 f" before={before:.3f} ours_after={ours['accuracy']:.3f} trl_after={theirs['accuracy']:.3f}")
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"gradient": grads, "runs": runs, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
