"""No host-device sync inside a training step: main.py's real loop, stage 1 padded and stage 2 packed, with
gradient accumulation, runs every step that logs nothing under syncs.no_syncs, which on a CPU raises at the
first operation that would make the host wait for a GPU (syncs.SyncRecorder)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from helpers import CPU, run

import main
from model import TinyVLM
from syncs import SyncRecorder, no_syncs


def test_the_recorder_sees_each_kind_of_sync_and_nothing_else():
    x = torch.arange(6.0, requires_grad=True)
    mask = x.detach() > 2
    waits = {
        "item": lambda: x.sum().item(), "bool": lambda: bool(x.sum() > 0), "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(), "numpy": lambda: x.detach().numpy(), "to cpu": lambda: x.to("cpu"),
        "to a cpu device": lambda: x.to(torch.device("cpu"), torch.float64),
        "copy_ into a host tensor": lambda: torch.empty(6).copy_(x),
        "nonzero": lambda: mask.nonzero(), "boolean index": lambda: x[mask],
        "masked_select": lambda: x.masked_select(mask),
        "masked_scatter": lambda: torch.zeros(6).masked_scatter(mask, x),
        "index_put with a mask": lambda: torch.zeros(6).index_put_((mask,), torch.tensor(1.0)),
    }
    for name, operation in waits.items():
        with SyncRecorder() as recorder:
            operation()
        assert recorder.syncs, name
    index = torch.tensor([1, 3])
    with SyncRecorder() as recorder:  # what TinyVLM's step does instead: indices computed on the host, inputs
        index.to("cpu", non_blocking=True)  # queued for the device on the way in, dtypes changed where they are
        y = torch.zeros(6, 2, dtype=torch.float64).index_copy(0, index, x[:2, None].expand(2, 2).to(torch.float64) * 2)
        y = y.index_select(0, index)
        (y.sum() * 2).backward()
        torch.nn.utils.clip_grad_norm_([x], 1.0)
    assert recorder.syncs == []
    with pytest.raises(RuntimeError, match="_local_scalar_dense"), no_syncs(CPU):
        x.sum().item()


def counting_quiet_steps(monkeypatch) -> list:
    """Counts the steps main.py runs under no_syncs (enabled), and runs them there."""
    quiet = []

    def counted(device, enabled=True):
        quiet.extend([1] if enabled else [])
        return no_syncs(device, enabled)

    monkeypatch.setattr(main, "no_syncs", counted)
    return quiet


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("packing, attention", [("false", "eager"), ("false", "sdpa"), ("true", "varlen")])
def test_stage1_steps_with_accumulation_read_nothing_back(tiny_config, monkeypatch, device, packing, attention):
    """On a GPU under CUDA's sync debug mode; on a CPU under the recorder. sdpa with no mask (right-padded
    batches) and varlen (packed rows, their bounds from the host; on a CPU its reference) are the GPU's paths."""
    quiet = counting_quiet_steps(monkeypatch)
    cfg = dataclasses.replace(tiny_config, check_syncs=True, device=device.type, num_workers=2, batch_size=2,
                              grad_accum_steps=2, max_steps=7, packing=packing, attn_implementation=attention,
                              dtype="bfloat16" if device.type == "cuda" else tiny_config.dtype,  # flash: half only
                              max_tokens_per_batch=256 if packing == "true" else 0,
                              log_every=3, eval_every=6, save_every=6, sample_every=6, num_sample_images=2)
    run(cfg)
    # steps 3, 6 and the last (7) log, evaluate, caption or save; step 1 compiles and warms up; 2, 4, 5 are quiet
    assert len(quiet) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("packing, attention", [(True, "sdpa"), (True, "eager"), (True, "varlen"), (False, "sdpa")])
@pytest.mark.slow
def test_stage2_steps_read_nothing_back(finetune_config, monkeypatch, packing, attention, device):
    """Packed rows (the block-diagonal mask built on the device, or varlen's bounds) and padded batches,
    text-only micro-batches among them; sdpa and varlen are what GPUs get."""
    quiet = counting_quiet_steps(monkeypatch)
    cfg = dataclasses.replace(finetune_config, check_syncs=True, device=device.type, packing=packing,
                              attn_implementation=attention, dtype="bfloat16" if device.type == "cuda" else "float32",
                              batch_size=2, grad_accum_steps=3, max_tokens_per_batch=256, max_steps=4,
                              log_every=4, eval_every=4, save_every=4, sample_every=0)
    run(cfg)
    assert len(quiet) == 2  # steps 2 and 3: the first warms up, the last logs


@pytest.mark.parametrize("reading", ["item", "cpu", "to cpu", "copy_"])
def test_a_sync_inside_a_step_stops_the_run_and_says_where(tiny_config, monkeypatch, reading):
    forward = TinyVLM.forward
    read = {"item": lambda loss: loss.item(), "cpu": lambda loss: loss.cpu(), "to cpu": lambda loss: loss.to("cpu"),
            "copy_": lambda loss: torch.empty(()).copy_(loss)}[reading]

    def forward_that_reads_the_loss(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        print(f"loss {read(loss.detach())}")  # what a progress bar showing the loss of every step would do
        return loss

    monkeypatch.setattr(TinyVLM, "forward", forward_that_reads_the_loss)
    with pytest.raises(RuntimeError, match="makes the host wait[^\n]*\n(.|\n)*forward_that_reads_the_loss"):
        run(dataclasses.replace(tiny_config, check_syncs=True, log_every=10, eval_every=10, save_every=10, max_steps=3))


@pytest.mark.slow
def test_under_distributed_data_parallel_no_checked_step_rebuilds_the_gradient_buckets(tiny_config, monkeypatch,
                                                                                        tmp_path):
    """DistributedDataParallel rebuilds its buckets in its second step, reading their order back (a copy inside
    C++ that the CPU recorder cannot see, and that CUDA's sync debug mode stops): the check starts after it.
    One process in a gloo group is enough for DDP to do it."""
    wrapped, buckets_built, wrapped_for_ddp = [], [], main.wrapped_for_ddp

    def wrapping(model, device):
        wrapped.append(wrapped_for_ddp(model, device))
        return wrapped[-1]

    def checking(device, enabled=True):
        if enabled:
            buckets_built.append(wrapped[-1]._has_rebuilt_buckets)
        return no_syncs(device, enabled)

    monkeypatch.setattr(main, "wrapped_for_ddp", wrapping)
    monkeypatch.setattr(main, "no_syncs", checking)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        run(dataclasses.replace(tiny_config, check_syncs=True, max_steps=5, log_every=5, eval_every=5, save_every=5,
                                sample_every=0))
    finally:
        dist.destroy_process_group()
    assert buckets_built == [True, True]  # steps 3 and 4: step 2 rebuilt them


def test_sdpa_varlen_reads_the_conversation_bounds_back_in_every_layer(finetune_config):
    """Why GPUs do not get it: on a CPU the bounds are host values anyway, on a GPU they would stall it."""
    cfg = dataclasses.replace(finetune_config, check_syncs=True, packing=True, attn_implementation="sdpa_varlen",
                              batch_size=2, grad_accum_steps=2, max_steps=3, log_every=3, eval_every=3,
                              save_every=3, sample_every=0)
    with pytest.raises(RuntimeError, match="in sdpa_varlen"):
        run(cfg)
