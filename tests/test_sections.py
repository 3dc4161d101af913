"""Sections people copy run on their own. The text of a `# %%` cell of grpo_from_scratch.py is executed
alone, in a namespace holding only torch and the standard library (the file's own standard-library imports,
math among them), and must reproduce what the module computes: the GRPO math cell its log-probs, masks,
advantages, losses and gradients; the rewards cell, with the answer-parsing cell, every reward function."""
import ast
import sys
from pathlib import Path

import pytest
import torch

import grpo_from_scratch as grpo
import tiny

SOURCE = (Path(__file__).resolve().parents[1] / "grpo_from_scratch.py").read_text()


def cell(number: int) -> str:
    """The text of cell `number`, from its `# %% N.` marker to the next marker."""
    start = SOURCE.index(f"\n# %% {number}. ")
    return SOURCE[start:SOURCE.index("\n# %%", start + 1)]


def standalone(*numbers: int) -> dict:
    """The cells executed alone after the file's standard-library imports and `import torch`."""
    imports = [node for node in ast.parse(SOURCE).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    standard = [node for node in imports if (getattr(node, "module", None) or node.names[0].name).split(".")[0]
                in sys.stdlib_module_names]
    namespace = {"__name__": "copied"}
    exec("\n".join(ast.unparse(node) for node in standard) + "\nimport torch\n", namespace)
    before = set(namespace)
    for number in numbers:
        exec(compile(cell(number), f"cell {number}", "exec"), namespace)
    assert set(namespace) - before, "the cells defined nothing"
    return namespace


def test_the_grpo_math_cell_runs_alone_and_gives_the_module_results():
    math_cell = standalone(7)
    assert "Config" not in math_cell and "np" not in math_cell and "F" not in math_cell
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0, 0.0, 2.0])
    for scale in tiny.choices("scale_rewards"):
        assert torch.equal(math_cell["compute_group_advantages"](rewards, 4, scale),
                           grpo.compute_group_advantages(rewards, 4, scale))
    ids = torch.tensor([[5, 7, 2, 9, 2], [1, 2, 3, 4, 5]])
    assert torch.equal(math_cell["create_completion_mask"](ids, [2, 9]), grpo.create_completion_mask(ids, [2, 9]))

    tokenizer = tiny.build_tokenizer()
    model = tiny.tiny_model(tokenizer)
    input_ids = torch.randint(3, len(tokenizer), (4, 12))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding
    theirs = math_cell["compute_log_probs"](model, input_ids, mask, 6, 0.7, 3)
    assert torch.equal(theirs, grpo.compute_log_probs(model, input_ids, mask, 6, 0.7, 3))
    theirs = theirs.detach()

    completion_mask = torch.ones(4, 6, dtype=torch.int)
    completion_mask[1, 4:] = 0
    advantages, old, ref = torch.randn(4), theirs + 0.05 * torch.randn(4, 6), theirs + 0.1 * torch.randn(4, 6)
    for loss_type in tiny.choices("loss_type"):
        for level in tiny.choices("importance_sampling_level"):
            for old_log_probs in (None, old):
                results = []
                for module in (math_cell, vars(grpo)):
                    log_probs = theirs.detach().clone().requires_grad_()
                    loss, metrics = module["grpo_loss"](
                        log_probs, old_log_probs, ref, advantages, completion_mask, epsilon=0.1, beta=0.04,
                        epsilon_high=0.2, loss_type=loss_type, max_completion_length=6,
                        importance_sampling_level=level)
                    loss.backward()
                    results.append((loss, metrics, log_probs.grad))
                (loss, metrics, grad), (loss_module, metrics_module, grad_module) = results
                assert torch.equal(loss, loss_module) and torch.equal(grad, grad_module)
                assert grad.abs().sum() > 0
                assert all(torch.equal(metrics[key], metrics_module[key]) for key in metrics_module)


def test_the_rewards_cell_runs_alone_with_the_answer_parsing_cell():
    cells = standalone(2, 4)
    assert "Config" not in cells and "np" not in cells
    completions = ["<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>", "<answer>$1,350.</answer>",
                   "The answer is 8", "<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>\ntrailing", ""]
    answers = ["7", "1350", "8", "7", "7"]
    for name in grpo.REWARD_FUNCS:
        assert cells["REWARD_FUNCS"][name](completions, answers) == grpo.REWARD_FUNCS[name](completions, answers)
    spec = "correctness,format,soft_overlong,xml_count"
    funcs, weights = cells["load_reward_funcs"](spec, "1,0.5,2,1", 20, 4)
    module_funcs, module_weights = grpo.load_reward_funcs(spec, "1,0.5,2,1", 20, 4)
    lengths = [5, 17, 20, 19, 1]
    table = cells["score_completions"](funcs, completions, answers, lengths)
    assert torch.equal(table, grpo.score_completions(module_funcs, completions, answers, lengths))
    assert torch.equal(cells["weighted_reward"](table, weights), grpo.weighted_reward(table, module_weights))
    assert cells["parse_number"]("\\boxed{\\frac{3}{4}}") == grpo.parse_number("\\boxed{\\frac{3}{4}}") == 0.75
    with pytest.raises(NameError):  # the negative control: a cell that needs what it was not given fails here
        exec("numpy_sum = np.sum([1])", dict(cells))
