"""Micro-batching must not change the update: the gradient accumulated over micro-batches equals
the gradient of the whole batch in one forward/backward, for every loss aggregation."""
import copy

import pytest
import torch

import grpo_from_scratch as grpo
import tiny


def rollout_batch(tokenizer, model, seed=0):
    """A real rollout of 3 prompts x 4 completions with ragged completion lengths."""
    torch.manual_seed(seed)
    prompts = [grpo.build_prompt(row["question"], tokenizer) for row in tiny.word_problems(3, seed=7) for _ in range(4)]
    rollout = grpo.generate_completions(model, tokenizer, prompts, temperature=1.0, max_new_tokens=12)
    # A random tiny model rarely stops, so give the completions ragged lengths (1..12 tokens): the
    # micro-batch weights of grpo and bnpo only matter when lengths differ.
    lengths = torch.tensor([12, 3, 7, 1, 12, 9, 5, 12, 2, 11, 6, 4])
    completion_mask = (torch.arange(12)[None, :] < lengths[:, None]).int()
    input_ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
    attention_mask = torch.cat([rollout["prompt_mask"], completion_mask], dim=1)
    advantages = grpo.compute_group_advantages(torch.arange(12, dtype=torch.float32) % 5, 4)
    return input_ids, attention_mask, completion_mask, rollout["completion_ids"].shape[1], advantages


@pytest.mark.parametrize("loss_type", tiny.choices("loss_type"))
def test_micro_batches_give_the_whole_batch_gradient(loss_type):
    tokenizer = tiny.build_tokenizer()
    base = tiny.tiny_model(tokenizer)
    input_ids, attention_mask, completion_mask, keep, advantages = rollout_batch(tokenizer, base)
    reference = grpo.make_reference(base)
    with torch.no_grad():
        ref_log_probs = grpo.compute_log_probs(reference, input_ids, attention_mask, keep)
        # a perturbed "old policy" so the ratio is not 1 and clipping can act
        old_log_probs = grpo.compute_log_probs(base, input_ids, attention_mask, keep) + 0.05 * torch.randn(12, keep)

    # One forward/backward over the whole batch, written out directly.
    whole = copy.deepcopy(base)
    log_probs = grpo.compute_log_probs(whole, input_ids, attention_mask, keep)
    loss, _ = grpo.grpo_loss(log_probs, old_log_probs, ref_log_probs, advantages, completion_mask, epsilon=0.1,
                             beta=0.04, loss_type=loss_type, max_completion_length=12)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in whole.named_parameters()}

    # The trainer's grpo_update with micro-batches of 5 (12 = 5 + 5 + 2) and no clipping.
    cfg = grpo.Config(micro_batch_size=5, loss_type=loss_type, max_completion_length=12, max_grad_norm=1e9,
                      learning_rate=1e-3, temperature=1.0)
    chunked = copy.deepcopy(base)
    optimizer = grpo.MasterWeightAdamW(chunked.parameters(), lr=cfg.learning_rate)
    update = grpo.grpo_update(grpo.PerTokenLogProbs(chunked), optimizer, cfg, input_ids, attention_mask,
                              completion_mask, keep, advantages, old_log_probs, ref_log_probs)

    assert update["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert update["grad_norm"] > 0
    for name, param in chunked.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)
    # and the optimizer really stepped
    assert any(not torch.equal(p, q) for p, q in zip(chunked.parameters(), base.parameters()))


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_micro_batch_weights_matter_for_token_means(loss_type):
    """Guard against a test that cannot fail: averaging micro-batch losses with equal weights
    gives a different bnpo (or dapo) gradient when completion lengths are ragged."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.tiny_model(tokenizer)
    input_ids, attention_mask, completion_mask, keep, advantages = rollout_batch(tokenizer, model)
    log_probs = grpo.compute_log_probs(model, input_ids, attention_mask, keep)
    whole, _ = grpo.grpo_loss(log_probs, None, None, advantages, completion_mask, epsilon=0.1, beta=0.0, loss_type=loss_type)
    parts = [grpo.grpo_loss(log_probs[s], None, None, advantages[s], completion_mask[s], epsilon=0.1, beta=0.0,
                            loss_type=loss_type)[0] for s in (slice(0, 5), slice(5, 10), slice(10, 12))]
    weights = [grpo.loss_denominator(completion_mask[s], loss_type) / grpo.loss_denominator(completion_mask, loss_type)
               for s in (slice(0, 5), slice(5, 10), slice(10, 12))]
    assert sum(w * p for w, p in zip(weights, parts)).item() == pytest.approx(whole.item(), rel=1e-5)
    assert sum(parts).item() / 3 != pytest.approx(whole.item(), rel=1e-3)
