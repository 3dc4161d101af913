"""Run torch's multi-GPU nn.DataParallel code on a CPU, with N emulated GPUs.

On a CPU or a single GPU, nn.DataParallel calls its module directly, so its multi-device path
(scatter the inputs, replicate the module, run each replica in its own thread, gather the
outputs, and autograd back through all of it) never runs. `emulated_gpus(n)` makes torch see n
CUDA devices that are all the CPU, replacing only what needs CUDA:

- device discovery: `torch.cuda.device_count()` and nn.DataParallel's device type and list
  (n devices; the source device "cuda:0" is the CPU, where the module lives);
- the copy kernels of `torch.nn.parallel.comm` (broadcast_coalesced, reduce_add_coalesced,
  scatter, gather): clone, sum, chunk and cat on the CPU, chunking exactly as torch's C++ does;
- the CPU-tensor guard at the top of the Broadcast and Gather autograd functions (their forward
  is otherwise torch's, and their backward is torch's unchanged);
- the accelerator stream/device contexts in `parallel_apply`'s worker threads and
  `torch.cuda.device(i)`; entering emulated device i also selects device i's own random generator
  for `torch.multinomial` (sampling), since every CUDA device has one. As on CUDA, torch.manual_seed
  gives every device the same seed and torch.cuda.manual_seed seeds the current device only;
  `torch.cuda.get_rng_state_all` / `set_rng_state_all` (what a checkpoint saves and a resume
  restores) read and set those generators.

Everything else is torch's and transformers' own code: DataParallel.forward, scatter_kwargs,
replicate, parallel_apply's threads, gather_map, the autograd graph through them, and generate().
`EmulatedGpus.calls` counts the multi-device forwards and replicas, so a test can prove the path ran.
"""
import importlib
import threading
import types
from contextlib import contextmanager, nullcontext
from itertools import chain

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import _functions, comm, scatter_gather

# torch.nn.parallel re-exports functions named like these modules, so import the modules by path.
data_parallel = importlib.import_module("torch.nn.parallel.data_parallel")
parallel_apply = importlib.import_module("torch.nn.parallel.parallel_apply")


class EmulatedGpus:
    def __init__(self, count: int):
        self.count = count
        self.local = threading.local()  # .device: the emulated GPU this thread runs on
        self.generators: dict[int, torch.Generator] = {}
        self.lock = threading.Lock()
        self.calls = {"data_parallel_forwards": 0, "replicas": 0, "parallel_apply": 0}

    # -- per-device random generators, like CUDA's one per device -----------------------------
    def generator(self, device: int | None = None) -> torch.Generator | None:
        device = getattr(self.local, "device", None) if device is None else device
        if device is None:
            return None
        with self.lock:
            if device not in self.generators:
                self.generators[device] = torch.Generator().manual_seed(torch.initial_seed())
            return self.generators[device]

    def manual_seed(self, seed: int) -> None:
        """torch.cuda.manual_seed: seeds the current emulated device (device 0 outside a device block)."""
        device = getattr(self.local, "device", None)
        self.generator(0 if device is None else device).manual_seed(seed)

    @contextmanager
    def on_device(self, index):
        previous = getattr(self.local, "device", None)
        self.local.device = index
        try:
            yield
        finally:
            self.local.device = previous


# -- torch.nn.parallel.comm on the CPU ------------------------------------------------------
def _broadcast_coalesced(tensors, devices, buffer_size=None):
    return [[t.detach().clone() for t in tensors] for _ in devices]


def _reduce_add_coalesced(inputs, destination=None, buffer_size=None):
    return tuple(torch.stack(list(per_device)).sum(0) for per_device in zip(*inputs))


def _scatter(tensor, devices=None, chunk_sizes=None, dim=0, streams=None, *, out=None):
    # torch's C++ scatter: tensor.chunk(len(devices)) when no sizes are given, which yields fewer
    # chunks than devices when the batch is small (5 rows on 4 GPUs -> 2, 2, 1).
    pieces = tensor.split(list(chunk_sizes), dim) if chunk_sizes is not None else tensor.chunk(len(devices), dim)
    return tuple(piece.contiguous().clone() for piece in pieces)


def _gather(tensors, dim=0, destination=None, *, out=None):
    return torch.cat(list(tensors), dim)


class _Broadcast(_functions.Broadcast):
    @staticmethod
    def forward(ctx, target_gpus, *inputs):  # torch's forward without its "not for CPU tensors" guard
        ctx.target_gpus = list(target_gpus)
        if len(inputs) == 0:
            return ()
        ctx.num_inputs = len(inputs)
        ctx.input_device = -1
        outputs = comm.broadcast_coalesced(inputs, ctx.target_gpus)
        non_differentiables = []
        for idx, input_requires_grad in enumerate(ctx.needs_input_grad[1:]):
            if not input_requires_grad:
                non_differentiables.extend(output[idx] for output in outputs)
        ctx.mark_non_differentiable(*non_differentiables)
        return tuple(chain.from_iterable(outputs))


class _Gather(_functions.Gather):
    @staticmethod
    def forward(ctx, target_device, dim, *inputs):  # torch's forward without its "not for CPU tensors" guard
        ctx.target_device = -1
        ctx.dim = dim
        ctx.input_gpus = tuple(-1 for _ in inputs)
        ctx.unsqueezed_scalar = all(t.dim() == 0 for t in inputs) and dim == 0
        if ctx.unsqueezed_scalar:
            inputs = tuple(t.view(1) for t in inputs)
        ctx.input_sizes = tuple(i.size(ctx.dim) for i in inputs)
        return comm.gather(inputs, ctx.dim, ctx.target_device)


class _TorchWithEmulatedAccelerator:
    """torch, except that torch.accelerator reports the emulated devices (for parallel_apply's workers)."""

    def __init__(self, gpus: EmulatedGpus):
        self.accelerator = types.SimpleNamespace(
            is_available=lambda: True,
            current_accelerator=lambda: torch.device("cpu"),
            current_stream=lambda device=None: nullcontext(),
            device_index=gpus.on_device,
        )

    def __getattr__(self, name):
        return getattr(torch, name)


@contextmanager
def emulated_gpus(count: int, monkeypatch: pytest.MonkeyPatch):
    """Within the block, torch sees `count` CUDA GPUs, all of them the CPU (see the module docstring)."""
    assert count >= 2, "with one device nn.DataParallel takes its pass-through path"
    gpus = EmulatedGpus(count)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "device", gpus.on_device)
    monkeypatch.setattr(torch.cuda, "manual_seed", gpus.manual_seed)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [gpus.generator(i).get_state() for i in range(count)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: [gpus.generator(i).set_state(state) for i, state in enumerate(states)])
    monkeypatch.setattr(data_parallel, "_get_available_device_type", lambda: "cuda")
    monkeypatch.setattr(data_parallel, "_get_all_device_indices", lambda: list(range(count)))
    monkeypatch.setattr(data_parallel, "_check_balance", lambda device_ids: None)  # reads CUDA device properties
    original_init = nn.DataParallel.__init__

    def init_on_emulated_devices(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.src_device_obj = torch.device("cpu")  # emulated cuda:0, where the module's weights are

    monkeypatch.setattr(nn.DataParallel, "__init__", init_on_emulated_devices)
    original_forward = nn.DataParallel.forward

    def counted_forward(self, *inputs, **kwargs):
        gpus.calls["data_parallel_forwards"] += 1
        return original_forward(self, *inputs, **kwargs)

    monkeypatch.setattr(nn.DataParallel, "forward", counted_forward)
    original_replicate = nn.DataParallel.replicate

    def counted_replicate(self, module, device_ids):
        gpus.calls["replicas"] += len(device_ids)
        return original_replicate(self, module, device_ids)

    monkeypatch.setattr(nn.DataParallel, "replicate", counted_replicate)
    for name, function in (("broadcast_coalesced", _broadcast_coalesced), ("reduce_add_coalesced", _reduce_add_coalesced),
                           ("scatter", _scatter), ("gather", _gather)):
        monkeypatch.setattr(comm, name, function)
    monkeypatch.setattr(_functions, "Broadcast", _Broadcast)
    monkeypatch.setattr(_functions, "Gather", _Gather)
    monkeypatch.setattr(scatter_gather, "Gather", _Gather)
    # parallel_apply resolves torch.accelerator through its module's `torch`: give it a view of torch
    # whose accelerator is the emulated one (the real torch keeps reporting no accelerator).
    monkeypatch.setattr(parallel_apply, "torch", _TorchWithEmulatedAccelerator(gpus))
    original_parallel_apply = parallel_apply.parallel_apply

    def counted_parallel_apply(*args, **kwargs):
        gpus.calls["parallel_apply"] += 1
        return original_parallel_apply(*args, **kwargs)

    for module in (parallel_apply, data_parallel, nn.parallel):
        monkeypatch.setattr(module, "parallel_apply", counted_parallel_apply)
    original_multinomial = torch.multinomial

    def multinomial_on_device(input, num_samples, replacement=False, *, generator=None, out=None):
        generator = generator or gpus.generator()
        return original_multinomial(input, num_samples, replacement, generator=generator, out=out)

    monkeypatch.setattr(torch, "multinomial", multinomial_on_device)
    original_manual_seed = torch.manual_seed

    def manual_seed_every_device(seed):
        gpus.generators.clear()  # re-created from torch.initial_seed(), the new seed, on next use
        return original_manual_seed(seed)

    monkeypatch.setattr(torch, "manual_seed", manual_seed_every_device)
    yield gpus
