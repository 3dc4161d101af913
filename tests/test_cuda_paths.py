"""The branches that only run on CUDA, tested on a CPU with recorders in place of the CUDA calls:
dtype and attention choice, a launched process binding its GPU and joining over NCCL, DDP's device,
one process per visible GPU by default, and this process's GPU random state in a checkpoint."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import grpo_from_scratch as grpo
import tiny


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
    """A launched process on a GPU box binds its LOCAL_RANK GPU and joins over NCCL."""
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


def test_ddp_gets_the_local_gpu(monkeypatch):
    made = []
    model = tiny.tiny_model(tiny.build_tokenizer())
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda module, **kwargs: made.append(kwargs) or module)
    grpo.parallel_policy(model, torch.device("cuda", 5))
    grpo.parallel_policy(model, torch.device("cpu"))
    assert [m["device_ids"] for m in made] == [[5], None]


def test_one_process_per_visible_gpu_by_default(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert grpo.launch_world_size(grpo.Config()) == 8
    assert grpo.launch_world_size(grpo.Config(num_processes=2)) == 2
    monkeypatch.setenv("WORLD_SIZE", "3")  # inside a launched process (or under torchrun) the launcher's count rules
    assert grpo.launch_world_size(grpo.Config(num_processes=2)) == 3
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(grpo.ConfigError, match="--num_processes 9: only 8 GPU"):
        grpo.validate_config(grpo.Config(num_processes=9))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert grpo.launch_world_size(grpo.Config()) == 1  # a CPU: one process unless asked


def test_checkpoint_keeps_this_gpus_random_state(monkeypatch):
    """A checkpoint saves the state of this process's GPU generator and a resume restores it."""
    state, restored = torch.tensor([1, 2], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new_state: restored.append(new_state))
    saved = grpo.capture_rng_state()
    state.fill_(9)  # the GPU's generator moves on after the save
    grpo.restore_rng_state(saved)
    assert [s.tolist() for s in restored] == [[1, 2]]


def test_a_flash_attention_model_decodes_compiled_with_grouped_query_attention(monkeypatch):
    """A GPU box with flash-attn: the loss pass attends with flash_attention_2, and generation still compiles
    whole. During the compiled generate() call (recorded) the model attends with grouped_query_attention, in
    eval mode, under a CompileConfig asking for one full graph (transformers turns fullgraph off for any
    attention named flash); afterwards it is back on flash_attention_2 and in train mode. Recorded, because
    set_attn_implementation checks that flash-attn is installed, and it is not here."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.tiny_model(tokenizer).train()
    monkeypatch.setattr(model, "set_attn_implementation",
                        lambda name: setattr(model.config, "_attn_implementation", name))
    model.set_attn_implementation("flash_attention_2")
    seen = []

    def generate(ids, attention_mask, **kwargs):
        seen.append((model.config._attn_implementation, model.training, kwargs.get("compile_config"), len(ids)))
        return torch.cat([ids, ids[:, -1:].expand(-1, kwargs["max_new_tokens"])], 1)
    monkeypatch.setattr(model, "generate", generate)
    decoding = grpo.CompiledDecoding(model, 4, 100)
    prompts = [grpo.build_prompt(q, tokenizer) for q in ("Hi?", "How many pens?", "2 + 2?")]
    out = grpo.generate_completions(model, tokenizer, prompts, 1.0, 5, decoding)
    assert seen == [(grpo.DECODE_ATTENTION, False, decoding.compile_config, 4)]  # 3 rows padded to the compiled 4
    assert "flash" not in grpo.DECODE_ATTENTION and decoding.compile_config.fullgraph
    assert out["completion_ids"].shape[0] == 3
    assert model.config._attn_implementation == "flash_attention_2" and model.training
