"""Measure TinyVLM's speed on this machine: the training step, the data pipeline and generation.
  python bench.py --suite gpu --json results.json   # on a bare GPU machine: correctness, speed, one CC3M epoch
  python bench.py --suite gpu --tiny                # the same code with tiny models, on a CPU, in a minute or two
  python bench.py                                   # step variants, stage-2 memory, data, generation (real sizes)
  python bench.py --parts train --batch_size 64 --json bench.json
  python bench.py --parts data_scale       # loader memory and start-up on CC3M-size and 5M-entry synthetic sets
Models are built from configs with random weights and the tokenizer is assets/smollm2-tokenizer, so nothing is
downloaded and only torch, transformers, pillow, safetensors, numpy and tqdm are needed (and peft for the LoRA
rows of memory and finetune_lora). Prints a table per part and writes everything to --json.
"""

import argparse
import contextlib
import ctypes
import gc
import io
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import replace
from functools import partial

from cli import exit_if_problems

PARTS = ("train", "step", "memory", "finetune", "finetune_lora", "data", "data_scale", "packing", "generate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--suite", choices=["gpu"], default=None,
                        help="gpu: correctness checks of main.py's loop, training speed eager and compiled by "
                             "micro-batch, data by workers, generation, one CC3M epoch (replaces --parts)")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the real sizes")
    parser.add_argument("--tests", default="", help="the suite's pytest arguments (default: the tests marked gpu)")
    parser.add_argument("--suite_minutes", type=float, default=7.0, help="the suite skips the parts left after this")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile's, for the suite's compiled "
                        "runs (the tests use aot_eager: inductor takes minutes to compile on 2 CPU cores)")
    parser.add_argument("--parts", default="train,finetune,data,generate",
                        help="comma-separated, of: train, step, memory, finetune, finetune_lora, "
                             "data, data_scale, packing, generate")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default: 8 on CPU, 64 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5; the suite 10, tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, the suite 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="the run dtype (autocast and frozen weights); auto: bf16 "
                        "on GPUs and on CPUs with bf16 matrix instructions, else fp32 (main.py's auto)")
    parser.add_argument("--attention", default=None, help="default: sdpa on GPUs, eager on CPUs")
    parser.add_argument("--step_shares", default="8,64", help="samples per timed step (step; comma-separated)")
    parser.add_argument("--finetune_batch_size", type=int, default=16, help="stage 2's default per-device batch")
    parser.add_argument("--finetune_steps", type=int, default=2)
    parser.add_argument("--data_images", type=int, default=None, help="JPEGs in the data part's zip")
    parser.add_argument("--profile_samples", type=int, default=400, help="samples per image size (data)")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--packing_samples", type=int, default=4096, help="conversations per stage (packing)")
    parser.add_argument("--packing_batch_size", type=int, default=4, help="stage 2's timed micro-batch (packing)")
    parser.add_argument("--packing_grad_accum", type=int, default=2,
                        help="stage 2's timed micro-batches per step (packing; the config's is 8)")
    parser.add_argument("--pack_lengths", default="512",
                        help="also time packing with rows filled up to these lengths (packing; comma-separated)")
    parser.add_argument("--packing_steps", type=int, default=2, help="timed steps per layout (packing)")
    parser.add_argument("--packing_rounds", type=int, default=1,
                        help="times each layout's steps are timed, in alternating order (packing)")
    parser.add_argument("--packing_lm_layers", type=int, default=30, help="LM layers kept (packing; 30: all)")
    parser.add_argument("--tokenizer", help="SmolLM2-135M-Instruct's, shipped in assets/",
                        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "smollm2-tokenizer"))
    parser.add_argument("--a40_mfu", type=float, default=0.4, help="MFU assumed for the A40 projection")
    parser.add_argument("--a40_dollars_per_hour", type=float, default=0.44)
    parser.add_argument("--scale_dir", default="data/scale", help="where data_scale makes its synthetic sets")
    parser.add_argument("--scale_entries", default="595375,5000000", help="CC3M-595K's size, and more")
    parser.add_argument("--scale_batches", type=int, default=5, help="steps (of 256) before memory is measured")
    parser.add_argument("--scale_runs", default="cold:8,warm:1,warm:8",
                        help="cache:workers per start-up; cold deletes the caches first")
    parser.add_argument("--scale_child", help=argparse.SUPPRESS)  # one data_scale start-up, in its own process
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    exit_if_problems("bench.py", [f"--parts {args.parts!r}: unknown {', '.join(sorted(unknown))}; known: "
                                  f"{', '.join(PARTS)}"] if unknown else [])
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads below
    parse_args(sys.argv[1:])

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from data import LLaVADataset, Processor, collate, pack_step, padded_step, start_worker
from main import (CPU_BATCH_SIZE, FINETUNE_CONFIG, VLMConfig, build_model, build_optimizer, data_workers, forward_backward,
                  packs, step_share, train, with_micro_batches)
from memory import DoesNotFit, Layout, estimator, fit_micro_batch, state_bytes
from model import SIGLIP_PREPROCESSING, TinyVLM, autocast, pick_compile, pick_device, pick_dtype
from sources import IGNORE_INDEX, decode_image, llava_to_messages, open_data
from syncs import SyncRecorder
from synthetic import (TOKENIZER_DIR, cc3m_like_entries, cc3m_like_jpeg, cc3m_like_samples, cc3m_like_zip,
                       encoded_samples, instruct_like_samples, llava_caption_set, make_scale_set, mix665k_like_entries,
                       model_folders, random_model)

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity), in TFLOP/s, matched on the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                   "A100": 312.0, "A40": 149.7, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}


# ----------------------------------------------------------------------------------------------------------
# Models and batches


def padded_batch_on(batch: dict, device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels", "pixels")}


def full_vocabulary_loss(model: TinyVLM, batch: dict) -> torch.Tensor:
    """The naive loss: logits for every position and the whole vocabulary, then a masked cross-entropy."""
    embeds = model.embed(batch["input_ids"], batch["pixels"])
    logits = model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits  # (B, T, vocab)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def target_loss(model: TinyVLM, batch: dict) -> torch.Tensor:
    """TinyVLM's loss: the LM head at target positions only."""
    return model(batch["input_ids"], batch["labels"], batch["pixels"])


# ----------------------------------------------------------------------------------------------------------
# FLOPs and peaks


def flops_per_sample(model: TinyVLM, tokens: float, targets: float) -> dict:
    """Model FLOPs of one training sample (multiply-add = 2 FLOPs), by part:
    - vision forward: 2 x (kept encoder layers' parameters) per patch, plus attention 4 x patches^2 x width
      per layer; no backward (frozen, run without autograd);
    - projector: 2 x params per image token forward; backward computes every weight gradient (2 x params)
      and the input gradient of `down` only (its own input needs none);
    - LM decoder (frozen, embeddings excluded): forward 2 x params per token plus causal-agnostic
      attention 4 x layers x tokens^2 x width; backward computes activation gradients only, about one
      forward again;
    - LM head at the target positions only: forward and input-gradient backward, 2 x 2 x vocab x width each.
    """
    vision_config = model.vision.config
    transformer = getattr(model.vision.model, "vision_model", model.vision.model)
    # the encoder's positions: its patches at the processor's image size, and any class token and registers
    patches = (model.processor.image_size[0] // vision_config.patch_size) ** 2 + model.vision.prefix_tokens
    layers = model.vision.layers
    layer_params = sum(p.numel() for p in layers.parameters())
    vision_flops = 2 * layer_params * patches + 4 * len(layers) * patches**2 * vision_config.hidden_size
    patch_embedding = next(m for m in transformer.embeddings.modules() if isinstance(m, torch.nn.Conv2d))
    vision_flops += 2 * sum(p.numel() for p in patch_embedding.parameters()) * patches
    projector = model.projector
    projector_params = sum(p.numel() for p in projector.parameters())
    image_tokens = model.num_image_tokens
    projector_flops = image_tokens * (2 * projector_params + 2 * projector_params + 2 * projector.down.weight.numel())
    lm_config = model.lm.config
    decoder = model.lm.get_decoder()
    decoder_params = sum(p.numel() for p in decoder.layers.parameters())
    attention = 4 * lm_config.num_hidden_layers * tokens**2 * lm_config.hidden_size
    lm_flops = 2 * (2 * decoder_params * tokens + attention)
    head_flops = 4 * targets * lm_config.vocab_size * lm_config.hidden_size
    parts = {"vision": vision_flops, "projector": projector_flops, "language_model": lm_flops, "lm_head": head_flops}
    return {**parts, "total": sum(parts.values())}


def peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """The device's dense bf16 peak and where the figure comes from; on a CPU, a matmul in the run dtype timed
    here (bf16 on a CPU without bf16 instructions would take minutes and mean nothing)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name}: NVIDIA data sheet, dense bf16"
        return float("nan"), f"{name}: peak unknown, add it to GPU_PEAK_TFLOPS"
    size, repeats = 2048, 10
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - start
    name = str(dtype).removeprefix("torch.")
    return 2 * size**3 * repeats / seconds / 1e12, f"CPU: a 2048^2 {name} matmul measured in this run"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# The three parts


def bench_train(args, tokenizer, device, dtype) -> list[dict]:
    """Steady-state training steps (vision forward, projector, LM forward and backward, AdamW) of variants
    that each change one thing against the naive baseline."""
    variants = [  # (name, frozen weights dtype, loss, attention)
        ("naive: fp32 frozen weights, full-vocabulary logits", torch.float32, "full", args.attention),
        ("frozen weights in the run dtype", dtype, "full", args.attention),
        ("+ LM head on target positions only (TinyVLM)", dtype, "targets", args.attention),
    ]
    other_attention = "sdpa" if args.attention == "eager" else "eager"
    variants.append((f"TinyVLM with {other_attention} attention", dtype, "targets", other_attention))
    peak, peak_source = peak_tflops(device, dtype)
    rows = []
    for name, weights_dtype, loss_kind, attention in variants:
        model = random_model(args.tiny, weights_dtype, attention, tokenizer, device)
        samples = cc3m_like_samples(model, args.batch_size)
        batch = collate(samples, tokenizer.pad_token_id)
        tokens = batch["attention_mask"].sum().item() / args.batch_size
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        batch = padded_batch_on(batch, device)
        optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-4, fused=device.type == "cuda")
        loss_fn = full_vocabulary_loss if loss_kind == "full" else target_loss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for step in range(args.warmup + args.steps):
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = loss_fn(model, batch)
            (loss / targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            losses.append(loss.item() / targets)
        seconds = sorted(times)[len(times) // 2]  # median step
        flops = flops_per_sample(model, tokens, targets / args.batch_size)
        achieved = flops["total"] * args.batch_size / seconds / 1e12
        cuda_peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        rows.append({
            "variant": name, "loss": loss_kind, "attention": attention, "batch_size": args.batch_size,
            "step_ms": 1000 * seconds, "samples_per_s": args.batch_size / seconds,
            "tokens_per_s": tokens * args.batch_size / seconds, "tflops": achieved, "mfu": achieved / peak,
            "peak_memory_gb": cuda_peak, "first_loss": losses[0], "tokens_per_sample": tokens,
            "gflops_per_sample": {k: v / 1e9 for k, v in flops.items()}, "peak_tflops": peak,
            "peak_source": peak_source})
        del model, optimizer, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def memory_now_and_reset_peak(device) -> float:
    """Bytes in use now; from here the peak is measured again (on Linux CPUs, through clear_refs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc keeps freed memory resident unless told to give it
    if trim is not None:  # back: without this a model freed before would hide inside the next one's "before"
        trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the resident-set peak, to the current resident set
    return proc_status_bytes("VmRSS")


def peak_memory(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM")


def proc_status_bytes(field: str, path: str = "/proc/self/status") -> float:
    """A size in kB from /proc/self/status (VmRSS, VmHWM) or /proc/meminfo (MemAvailable), in bytes."""
    with open(path) as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def bench_finetune(args, tokenizer, device, dtype) -> list[dict]:
    """Stage 2's training step (projector and language model trained, fp32 weights under autocast) with and
    without gradient checkpointing: time and peak memory, the whole process's and per sample above idle."""
    rows = []
    for checkpointing in (False, True):
        model = random_model(args.tiny, dtype, args.attention, tokenizer, device)
        model.lm.float().requires_grad_(True)
        if checkpointing:
            model.checkpoint_language_model()
        batch = collate(instruct_like_samples(model, args.finetune_batch_size), tokenizer.pad_token_id)
        tokens = batch["attention_mask"].sum().item() / args.finetune_batch_size
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        batch = padded_batch_on(batch, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        model.train()
        times = []
        for step in range(1 + args.finetune_steps):
            if step == 1:  # after one step the optimizer state exists: what remains is the step's own memory
                idle = memory_now_and_reset_peak(device)
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = target_loss(model, batch)
            (loss / targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
        seconds = sorted(times[1:])[len(times[1:]) // 2]
        peak = peak_memory(device)
        rows.append({"gradient_checkpointing": checkpointing, "batch_size": args.finetune_batch_size,
                     "tokens_per_sample": tokens, "step_ms": 1000 * seconds,
                     "samples_per_s": args.finetune_batch_size / seconds, "peak_memory_gb": peak / 1e9,
                     "memory_per_sample_mb": (peak - idle) / args.finetune_batch_size / 1e6,
                     "memory": "CUDA allocated" if device.type == "cuda" else "process resident set (VmHWM)"})
        del model, optimizer, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------------
# The training step before and after it was made to read nothing back from the device (--parts step)


def forward_before(model: TinyVLM, batch: dict) -> torch.Tensor:
    """TinyVLM's training forward as it was before, kept here to measure against: the padding mask passed to
    the LM (transformers checks it on the host, sdpa gets a mask), packed rows' mask left to transformers
    (which reads their position ids back), the image tokens written with masked_scatter (its backward a
    masked_select) and the target positions picked with a boolean mask."""
    input_ids, labels, pixels = batch["input_ids"], batch["labels"], batch["pixels"]
    is_image = input_ids == model.image_token_id  # (B, T)
    embeds = model.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, H)
    if pixels is not None:
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), model.encode_images(pixels).to(embeds.dtype))
    hidden = model.lm.get_decoder()(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                                    position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    is_target = targets != IGNORE_INDEX
    logits = model.lm.get_output_embeddings()(hidden[:, :-1][is_target])  # (num_targets, vocab)
    return F.cross_entropy(logits.float(), targets[is_target], reduction="sum")


def step_before(model: TinyVLM, micro_batches: list, device, dtype, parameters, optimizer) -> None:
    """One optimizer step as main.py ran it before: the loss per target token computed on the device."""
    num_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(device, dtype):
            loss = forward_before(model, batch)
        (loss / num_targets).backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_after(model: TinyVLM, micro_batches: list, device, dtype, parameters, optimizer) -> None:
    """One optimizer step as main.py runs it now."""
    forward_backward(model, micro_batches, device, dtype, torch.amp.GradScaler(device.type, enabled=False))
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_micro_batches(version: str, stage: str, share: list, batch_size: int, max_length: int, pad: int,
                       image: int) -> list:
    """A step's share as each version cuts it: before, stream order (stage 1) or packed without the
    host-side positions; after, by length (padded_step) or packed with them."""
    if stage.startswith("stage 2"):
        return pack_step(share, max_length, batch_size * max_length, pad, 512, image if version == "after" else None)
    if version == "before":
        return [collate(share[i:i + batch_size], pad) for i in range(0, len(share), batch_size)]
    return padded_step(share, batch_size, pad, image)


def bench_step(args, tokenizer, device, dtype) -> list[dict]:
    """main.py's training step before and after at real sizes (or --tiny), stage 1 (CC3M-like, padded,
    projector trained) and stage 2 (mix665k-like, packed in rows of up to 512, projector and LM trained),
    steps of --step_shares samples in 4 micro-batches each: ms/step, samples/s, real-token share and the
    operations per step that would make the host wait for a GPU (syncs.SyncRecorder)."""
    rows = []
    finetune = dict(VLMConfig().__dict__, **FINETUNE_CONFIG)
    stages = [("stage 1, padded", cc3m_like_entries, VLMConfig.max_length, ("eager", "sdpa")),
              ("stage 2, packed", mix665k_like_entries, finetune["max_length"], ("sdpa", "sdpa_varlen"))]
    for stage, make_entries, max_length, attentions in stages:
        model = random_model(args.tiny, dtype, attentions[0], tokenizer, device)
        if stage.startswith("stage 2"):
            model.lm.float().requires_grad_(True)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type in ("cuda", "cpu"))
        pad, image = tokenizer.pad_token_id, model.image_token_id
        samples = encoded_samples(model, make_entries(max(args.step_shares) * (args.steps + args.warmup + 1)), max_length)
        samples = [s for s in samples if "skipped" not in s]
        for share_size in args.step_shares:
            batch_size = max(1, share_size // 4)
            shares = [samples[i * share_size:(i + 1) * share_size] for i in range(max(1, args.warmup) + args.steps)]
            variants = [(version, attention) for attention in attentions for version in ("before", "after")
                        if not (attention == "sdpa_varlen" and version == "before")]
            for version, attention in variants:
                model.lm.set_attn_implementation(attention)
                run_step = step_before if version == "before" else step_after
                steps = [step_micro_batches(version, stage, share, batch_size, max_length, pad, image)
                         for share in shares]
                with SyncRecorder() as recorder:  # the first step, untimed: counting every operation slows it
                    run_step(model, steps[0], device, dtype, parameters, optimizer)
                times = []
                for i, micro_batches in enumerate(steps[1:], start=1):
                    synchronize(device)
                    start = time.perf_counter()
                    run_step(model, micro_batches, device, dtype, parameters, optimizer)
                    synchronize(device)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - start)
                seconds = sorted(times)[len(times) // 2]
                timed = [b for micro_batches in steps[max(1, args.warmup):] for b in micro_batches]
                rows.append({"stage": stage, "version": version, "attention": attention,
                             "step": f"{share_size} ({batch_size} x {len(steps[-1])})", "step_ms": 1000 * seconds,
                             "samples_per_s": share_size / seconds, "real_token_share": real_token_share(timed),
                             "syncs_per_step": len(recorder.syncs),
                             "sync_ops": sorted({name for name, _ in recorder.syncs})})
                print(rows[-1], flush=True)
        del model, optimizer
    return rows


def default_config_token_shares(tokenizer, steps: int = 64) -> list[dict]:
    """The share of real tokens in the token slots of stage 1's default steps on CC3M-like lengths (lengths
    only: no model runs), by how a step's share is cut into micro-batches: padded (in stream order, by length),
    or packed by data.pack_step into one row per micro-batch (varlen attention, the GPU default; the slots a
    16 GB card and an 80 GB one get, from bench.py --parts memory) or into rows of max_length (a mask)."""
    processor = Processor(tokenizer, SIGLIP_PREPROCESSING, "<image>", 49)  # SigLIP-base at 224 px, pixel shuffle 2
    rows = []
    for batch_size, accumulation in ((64, 4), (128, 2), (256, 1)):
        share = batch_size * accumulation
        entries = cc3m_like_entries(share * steps, seed=1)
        lengths = [len(ids) for ids, _ in processor.encode_llava_many([e["conversations"] for e in entries])]
        for layout, multiple in (("stream order", 1), ("by length", 1), ("by length, widths rounded up to 8", 8)):
            real = slots = 0
            for start in range(0, len(lengths), share):
                step = lengths[start:start + share]
                step = sorted(step, reverse=True) if layout.startswith("by length") else step
                for i in range(0, share, batch_size):
                    micro = step[i:i + batch_size]
                    real += sum(micro)
                    slots += len(micro) * -(-max(micro) // multiple) * multiple
            rows.append({"config": f"{batch_size} x {accumulation}", "layout": layout, "real_token_share": real / slots,
                         "mean_tokens": sum(lengths) / len(lengths), "longest": max(lengths)})
    samples = [{"input_ids": [0] * n, "labels": [IGNORE_INDEX] * n, "pixels": None} for n in lengths]
    max_length = VLMConfig.max_length
    for layout, budget, fill in (("packed, one row per micro-batch of up to 8,192 slots", 8192, 8192),
                                 ("packed, one row per micro-batch of up to 65,536 slots", 65536, 65536),
                                 (f"packed, rows of {max_length} under a mask", 8192, max_length)):
        batches = [b for start in range(0, len(samples), 256)
                   for b in pack_step(samples[start:start + 256], max_length, budget, 0, fill)]
        rows.append({"config": "256 x 1", "layout": layout, "real_token_share": real_token_share(batches),
                     "micro_batches_per_step": len(batches) / steps, "mean_tokens": sum(lengths) / len(lengths),
                     "longest": max(lengths)})
    return rows


# Llama-3.2-1B's architecture (its config.json's sizes): a 1B-class LM for stage 2's memory, random weights
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64)


def stage_model(tokenizer, device, dtype, sizes: dict | None, stage: str = "finetune", lora_rank: int = 0,
                attention: str = "sdpa") -> TinyVLM:
    """A stage's model as build_model makes it, random weights at real sizes: SigLIP-base frozen in `dtype`, the
    projector in float32, and SmolLM2-135M (sizes None) or a Llama of `sizes` (LLAMA_1B): frozen in `dtype` in
    stage 1 and under LoRA (with float32 adapters of rank lora_rank), trained whole in float32 in stage 2."""
    model = random_model(False, dtype, attention, tokenizer, device)
    if sizes:
        model.lm = LlamaForCausalLM(LlamaConfig(**sizes, pad_token_id=tokenizer.pad_token_id,
                                                attn_implementation=attention)).to(dtype).requires_grad_(False)
        model.projector = type(model.projector)(model.vision.config.hidden_size, 12288, sizes["hidden_size"], 2)
    model.config = replace(model.config, lora_rank=lora_rank)
    if lora_rank:
        model.add_lora()
    elif stage == "finetune":
        model.lm.float().requires_grad_(True)
    model.vision.requires_grad_(False)
    return model.to(device)


STAGE2_LMS = (("SmolLM2-135M", None), ("1B (Llama-3.2-1B sizes)", LLAMA_1B))
CARDS_GB = (16, 24, 48, 80)  # a T4 or V100 16GB, an RTX 4090, an A40, an A100 or H100 80GB
CUDA_CONTEXT_GB = 1.0  # what a card holds before a run allocates anything: the CUDA context, the driver's reserve


def bench_memory(args, tokenizer, device, dtype) -> list[dict]:
    """The micro-batch main.py chooses on a GPU, card by card (16, 24, 48 and 80 GB), for stage 1, stage 2
    and stage 2 with LoRA (rank 16), with SmolLM2-135M and a 1B-class LM (LLAMA_1B): packed with varlen
    attention at the stage's defaults (stage 1: 256 samples a step of up to 256 tokens; stage 2: 128 of up to
    2048), and its estimated peak (memory.fit_micro_batch: fake tensors at real sizes, nothing computed, so the
    figures are any device's). The weights are made on the meta device and given memory they never touch. A
    card's memory for the run is its size less CUDA_CONTEXT_GB."""
    dtype = torch.bfloat16  # a GPU's; nothing is computed, so the CPU's own dtype does not matter here
    rows = []
    for name, sizes in STAGE2_LMS:
        for stage, lora_rank in (("pretrain", 0), ("finetune", 0), ("finetune", 16)):
            with torch.device("meta"):
                model = stage_model(tokenizer, torch.device("meta"), dtype, sizes, stage, lora_rank, "varlen")
            model = model.to_empty(device=device)
            defaults = FINETUNE_CONFIG if stage == "finetune" else {}
            max_length = defaults.get("max_length", VLMConfig.max_length)
            layout = Layout(True, True, max_length, defaults.get("global_batch", VLMConfig.global_batch))
            estimate = estimator(model, layout, device, dtype)
            training = "stage 1" if stage == "pretrain" else f"stage 2{', LoRA 16' if lora_rank else ''}"
            for card in CARDS_GB:
                row = {"card_gb": card, "training": training, "language_model": name,
                       "state_gb": state_bytes(model) / 1e9}
                try:
                    size, _ = fit_micro_batch(model, layout, device, dtype, (card - CUDA_CONTEXT_GB) * 1e9,
                                              f"a {card} GB card")
                    row.update(micro_batch_tokens=size, samples_at_max_length=size // max_length,
                               estimated_peak_gb=estimate(size) / 1e9, note="")
                except DoesNotFit as error:
                    row.update(micro_batch_tokens=0, estimated_peak_gb=float("nan"), note=str(error).split(":")[0])
                rows.append(row)
                print(rows[-1], flush=True)
            del model, estimate
    return rows


def available_memory(device) -> float:
    """Bytes a new allocation can have: the device's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return proc_status_bytes("MemAvailable", "/proc/meminfo")


def bench_finetune_lora(args, tokenizer, device, dtype) -> list[dict]:
    """Stage 2's training step as main.py runs it (build_optimizer's fused AdamW, forward_backward, gradient
    checkpointing), at real sizes, full finetuning against LoRA (rank 16), for SmolLM2-135M and a 1B-class LM:
    ms per step of --finetune_batch_size LLaVA-Instruct-like conversations (median after one warm-up step),
    and peak memory. A configuration whose weights, float32 gradients and AdamW state alone would not fit in
    the memory available is not run, and its row says so."""
    rows = []
    for name, sizes in STAGE2_LMS:
        for lora_rank in (0, 16):
            row = {"language_model": name, "training": f"LoRA rank {lora_rank}" if lora_rank else "full",
                   "batch_size": args.finetune_batch_size}
            with torch.device("meta"):  # sizes only, no memory
                model = stage_model(tokenizer, torch.device("meta"), dtype, sizes, "finetune", lora_rank)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            needed = sum(p.numel() * p.element_size() for p in model.parameters()) + trained * 4 * 3
            available = available_memory(device)
            if needed > 0.9 * available:
                rows.append({**row, "trained_params_m": trained / 1e6, "step_ms": float("nan"),
                             "note": f"not run: weights, gradients and AdamW state need {needed / 1e9:.1f} GB, more "
                                     f"than 90% of the {available / 1e9:.1f} GB available (activations not counted)"})
                print(rows[-1], flush=True)
                continue
            idle = memory_now_and_reset_peak(device)
            model = stage_model(tokenizer, device, dtype, sizes, "finetune", lora_rank)
            model.checkpoint_language_model()
            cfg = VLMConfig(stage="finetune", lora_rank=lora_rank)
            optimizer = build_optimizer(cfg, model, device)
            batch = collate(instruct_like_samples(model, args.finetune_batch_size), tokenizer.pad_token_id,
                            model.image_token_id)
            scaler = torch.amp.GradScaler(device.type, enabled=False)
            model.train()
            times = []
            for _ in range(1 + args.finetune_steps):
                synchronize(device)
                start = time.perf_counter()
                forward_backward(model, [batch], device, dtype, scaler)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(device)
                times.append(time.perf_counter() - start)
            seconds = sorted(times[1:])[len(times[1:]) // 2]
            rows.append({**row, "trained_params_m": trained / 1e6, "tokens_per_sample": batch["num_tokens"] /
                         args.finetune_batch_size, "step_ms": 1000 * seconds,
                         "samples_per_s": args.finetune_batch_size / seconds,
                         "peak_memory_gb": (peak_memory(device) - idle) / 1e9,
                         "note": f"{'CUDA allocated' if device.type == 'cuda' else 'resident set'} above what was before"})
            print(rows[-1], flush=True)
            del model, optimizer, batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_data(args, tokenizer, worker_counts=None, repeats: int = 1, images_per_worker: int = 0) -> list[dict]:
    """Images/s of the whole input pipeline (zip read, JPEG decode, resize, stored tokens, collate), by the
    number of DataLoader workers. Each of --data_images JPEGs is read `repeats` times (as separate entries);
    with images_per_worker, a run reads only 256 + that many per worker of them (every run lasts about as long)."""
    model = random_model(True, torch.float32, "eager", tokenizer, torch.device("cpu"))  # for its Processor
    processor = model.processor
    cpus = os.cpu_count() or 1
    worker_counts = worker_counts or sorted({0, 1, 2, 4, 8, cpus})
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        zip_path = cc3m_like_zip(folder, args.data_images)
        mean_kb = os.path.getsize(zip_path) / args.data_images / 1024
        entries = [dict(entry, image=f"GCC_train_{i % args.data_images:09d}.jpg")
                   for i, entry in enumerate(cc3m_like_entries(args.data_images * repeats))]
        with open(f"{folder}/chat.json", "w") as f:
            json.dump(entries, f)
        dataset = caption_set(f"{folder}/chat.json", zip_path, processor)  # as main.py reads it
        for workers in worker_counts:
            if workers > cpus:
                continue
            size = min(len(dataset), 256 + images_per_worker * workers) if images_per_worker else len(dataset)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(size)), batch_size=32,
                                                 num_workers=workers,
                                                 collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id,
                                                                    image_token_id=processor.image_token_id),
                                                 pin_memory=torch.cuda.is_available())
            iterator = iter(loader)
            first = next(iterator)  # workers started and warm
            start = time.perf_counter()
            count = sum(len(batch["input_ids"]) for batch in iterator)
            seconds = time.perf_counter() - start
            rows.append({"workers": workers, "images_per_s": count / seconds, "jpeg_kb": mean_kb,
                         "images": count + len(first["input_ids"])})
    return rows


# ----------------------------------------------------------------------------------------------------------
# The data path stage by stage (--parts data): what one DataLoader worker spends on a sample, before and now


class BeforeDataset(torch.utils.data.Dataset):
    """The training sample as data.py made it before (kept here to measure against): the whole JPEG decoded,
    converted to RGB twice, PIL's bicubic resize, a numpy copy, and the chat template rendered and tokenized
    (with every placeholder) for each sample, every epoch."""

    def __init__(self, entries: list[dict], images, processor):
        self.entries, self.images, self.processor = entries, images, processor

    def __len__(self):
        return len(self.entries)

    def stages(self, index: int, clock=None) -> dict:
        clock = clock or (lambda name: None)
        entry = self.entries[index]
        data = self.images.read(entry["image"])
        clock("zip read")
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
        clock("decode")
        image = image.convert("RGB")  # image_to_pixels' own to_rgb, on an image already RGB
        clock("to RGB again")
        height, width = self.processor.image_size
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        clock("resize")
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        clock("to tensor")
        messages = llava_to_messages(entry["conversations"], self.processor.image_placeholder)
        text = self.processor.render(messages, add_generation_prompt=False)
        start = len(self.processor.render(messages[:1], add_generation_prompt=True))
        encoding = self.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoding["input_ids"]
        labels = [t if offset >= start else IGNORE_INDEX for t, (offset, _) in zip(input_ids, encoding["offset_mapping"])]
        clock("tokenize")
        return {"input_ids": input_ids, "labels": labels, "pixels": pixels}

    def __getitem__(self, index: int) -> dict:
        return self.stages(index)


def now_stages(dataset: LLaVADataset, index: int, clock) -> dict:
    """LLaVADataset's sample of tokenized entries (sources.open_data), its stages timed one by one; "tokenize"
    is reading the stored token ids."""
    row = dataset.tokens[index].to_pylist()[0]
    input_ids = np.asarray(row["input_ids"], dtype=np.int64)
    labels, names = np.where(row["targets"], input_ids, IGNORE_INDEX), row["image"]
    clock("tokenize")
    data = dataset.images.read(names[0])
    clock("zip read")
    image = decode_image(data, dataset.processor.image_size[::-1])
    clock("decode")
    clock("to RGB again")
    pixels = dataset.processor.image_to_pixels(image)
    clock("resize")
    clock("to tensor")  # image_to_pixels gives the tensor
    return {"input_ids": input_ids, "labels": labels, "pixels": pixels}


def per_sample_ms(stages, count: int) -> dict:
    """Milliseconds per sample of each stage of stages(index, clock) over `count` samples, and of the whole."""
    totals = {}
    last = [0.0]

    def clock(name):
        now = time.perf_counter()
        totals[name] = totals.get(name, 0.0) + now - last[0]
        last[0] = now

    start = time.perf_counter()
    for index in range(count):
        last[0] = time.perf_counter()
        stages(index, clock)
    whole = time.perf_counter() - start
    return {**{f"{name} ms": 1000 * seconds / count for name, seconds in totals.items()},
            "whole sample ms": 1000 * whole / count, "samples_per_s_per_core": count / whole}


def loader_rate(dataset, workers: int, pad: int, image: int | None, count: int, at_least: int = 1280) -> float:
    """Samples/s through a DataLoader of `workers` workers, batches of 64, after its first batch. The first
    `count` samples are read over and over until there are `at_least`: over a handful of batches the
    workers' start and the prefetched first batches would weigh as much as the rate (1 worker on 400
    samples measured 680-1,040 samples/s from one run to the next, on 1,280 980 and 1,110 in two runs)."""
    indices = [i % count for i in range(max(count, at_least))]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=64, num_workers=workers,
        collate_fn=partial(collate, pad_token_id=pad, image_token_id=image), worker_init_fn=start_worker)
    iterator = iter(loader)
    first = next(iterator)
    start = time.perf_counter()
    samples = sum(len(batch["input_ids"]) for batch in iterator)
    return samples / (time.perf_counter() - start) if samples else float(len(first["input_ids"]))


def bench_data_profile(args, tokenizer) -> list[dict]:
    """The time one DataLoader worker spends on a CC3M-like sample, stage by stage, before and now, for
    JPEGs of 224 x 224, 400 x 300 (CC3M's usual) and 640 x 480, and the samples/s of 1 and 2 workers.
    Stages are timed one at a time in this process (one thread, as in a worker), so a row need not add up
    to its whole."""
    processor = random_model(True, torch.float32, "eager", tokenizer, torch.device("cpu")).processor
    torch.set_num_threads(1)  # as in a DataLoader worker
    rows = []
    for size in ((224, 224), (400, 300), (640, 480)):
        with tempfile.TemporaryDirectory() as folder:
            rng = random.Random(0)
            count = args.profile_samples
            with zipfile.ZipFile(f"{folder}/images.zip", "w", zipfile.ZIP_STORED) as archive:
                for i in range(count):
                    archive.writestr(f"{i}.jpg", cc3m_like_jpeg(rng, size=size))
            entries = [dict(e, image=f"{e['id']}.jpg") for e in cc3m_like_entries(count)]
            with open(f"{folder}/chat.json", "w") as f:
                json.dump(entries, f)
            store, images, _, _ = open_data(f"{folder}/chat.json", f"{folder}/images.zip", True, processor=processor)
            now = LLaVADataset(store, images, processor)
            before = BeforeDataset(entries, images, processor)
            kb = os.path.getsize(f"{folder}/images.zip") / count / 1024
            for version, dataset, stages in (("before", before, before.stages),
                                             ("now", now, partial(now_stages, now))):
                stages(0, lambda name: None)  # warm: opened files, imported filters
                row = {"image": f"{size[0]}x{size[1]}, {kb:.0f} KB", "version": version,
                       **per_sample_ms(stages, count)}
                for workers in (1, 2):
                    row[f"{workers} workers samples/s"] = loader_rate(
                        dataset, workers, tokenizer.pad_token_id, processor.image_token_id if version == "now" else None,
                        count)
                rows.append(row)
                print(rows[-1], flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def tree_pss_mb(pids: list[int], field: str = "Pss") -> float:
    """Proportional set size of these processes together, in MB: each shared page counts once in all.
    field: Pss, or its part Pss_Anon (private heap), Pss_File (mapped files) or Pss_Shmem (batches in flight)."""
    total_kb = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total_kb += next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return total_kb / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (/proc/PID/stat): on a shared machine, the work done."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scale_child(data_path: str, image_root: str, workers: int, batches: int) -> dict:
    """One start-up of the training input pipeline, in a fresh process, as main.py runs it (load_data,
    build_loaders: the default micro-batches of this device): open the data (building its caches, tokens
    included, if they are missing), split it, start the DataLoader, time the first step's batches, then
    measure the memory of the main process and its workers after `batches` more steps."""
    from main import build_loaders, load_data

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    processor = Processor(tokenizer, SIGLIP_PREPROCESSING, "<image>", 49)
    cpu = torch.device("cpu")
    cfg = with_micro_batches(VLMConfig(data_path=data_path, image_root=image_root, num_workers=workers), None, cpu,
                             torch.float32)
    start, cpu_start = time.perf_counter(), time.process_time()
    train, val, skipped = load_data(cfg, processor, log=lambda text: None)
    opened, open_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    loader, _ = build_loaders(cfg, train, val, processor, 0, 0, 1, cpu)
    batch_iterator = iter(loader)
    first = next(batch_iterator)
    first_batch = time.perf_counter() - start
    worker_pids = [w.pid for w in getattr(batch_iterator, "_workers", [])]
    cpu_to_first_batch = time.process_time() - cpu_start + sum(cpu_seconds(pid) for pid in worker_pids)
    for _ in range(batches):
        next(batch_iterator)
    pids = [os.getpid()] + worker_pids
    return {"entries": len(train), "workers": workers, "open_s": opened, "first_batch_s": first_batch,
            "open_cpu_s": open_cpu, "first_batch_cpu_s": cpu_to_first_batch,
            "pss_mb": tree_pss_mb(pids), "main_pss_mb": tree_pss_mb(pids[:1]), "skipped": dict(skipped),
            **{f"{part.lower()}_mb": tree_pss_mb(pids, part) for part in ("Pss_Anon", "Pss_File", "Pss_Shmem")},
            "first_batch_size": sum(len(b["input_ids"]) for b in first)}


def bench_data_scale(args) -> list[dict]:
    """Memory and start-up time of the input pipeline on CC3M-scale synthetic data (made under --scale_dir
    the first time) and on a 5M-entry set of the same images: by default a cold start (caches deleted) with 8
    workers, then warm starts with 1 and 8 workers, each in a fresh process."""
    import shutil
    import subprocess
    import sys

    rows = []
    for num_entries in (int(n) for n in args.scale_entries.split(",")):
        paths = make_scale_set(args.scale_dir, num_entries)
        for cache, workers in (run.split(":") for run in args.scale_runs.split(",")):
            if cache == "cold":
                shutil.rmtree(os.path.join(args.scale_dir, ".tinyvlm_cache"), ignore_errors=True)
            command = [sys.executable, os.path.abspath(__file__), "--scale_child",
                       json.dumps([paths["data_path"], paths["image_root"], int(workers), args.scale_batches])]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = {"set": f"{num_entries:,} entries", "cache": cache, **json.loads(result.stdout.splitlines()[-1])}
            rows.append(row)
            print(row, flush=True)
        warm = sorted((r["workers"], r["pss_mb"]) for r in rows if r["cache"] == "warm" and r["set"] == row["set"])
        if len(warm) >= 2:  # the memory one more worker adds, between the fewest and the most workers run
            rows[-1]["per_extra_worker_mb"] = (warm[-1][1] - warm[0][1]) / (warm[-1][0] - warm[0][0])
    return rows


@torch.no_grad()
def generate_without_cache(model: TinyVLM, images: list, prompt: str, new_tokens: int) -> list[str]:
    """Greedy decoding that runs the whole sequence through the LM for every new token: the cost the KV cache
    saves. (transformers' generate() ignores use_cache=False when it starts from inputs_embeds.)"""
    batch = model.prompt_batch(images, prompt)
    embeds, mask = model.embed(batch["input_ids"], batch["pixels"]), batch["attention_mask"]
    generated = []
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
        next_token = logits[:, -1].argmax(-1)  # (B,)
        generated.append(next_token)
        embeds = torch.cat([embeds, model.lm.get_input_embeddings()(next_token)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    tokens = torch.stack(generated, dim=1)  # (B, new_tokens)
    return [t.strip() for t in model.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def bench_generate(args, tokenizer, device, dtype) -> list[dict]:
    """Images/s and generated tokens/s of TinyVLM.generate (KV cache) and of decoding without a cache. Every
    sequence generates exactly --new_tokens tokens (min_new_tokens), so random weights time like trained
    ones."""
    model = random_model(args.tiny, dtype, args.attention, tokenizer, device).eval()
    images = [Image.fromarray(torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8).numpy()) for _ in range(16)]
    prompt = "Describe the image concisely."
    rows = []
    for batch_size in (1, 16):
        batch_images = images[:batch_size]
        runs = {"generate() with KV cache": lambda batch_images=batch_images: model.generate(
                    batch_images, prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
                "no cache": lambda batch_images=batch_images: generate_without_cache(model, batch_images, prompt,
                                                                                      args.new_tokens)}
        for name, run in runs.items():
            with autocast(device, dtype):
                run()  # warm-up
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
            seconds = time.perf_counter() - start
            rows.append({"batch_size": batch_size, "decoding": name, "seconds": seconds,
                         "images_per_s": batch_size / seconds,
                         "new_tokens_per_s": batch_size * args.new_tokens / seconds})
    return rows


# ----------------------------------------------------------------------------------------------------------
# The GPU suite (--suite gpu): does main.py's loop run correctly on this device, how fast is the model step at
# real sizes, is the data pipeline fast enough to feed it, and what does one CC3M epoch cost


def default_path(args, tokenizer, device) -> dict:
    """main.py's training loop as a real run takes it: models loaded from folders (real sizes, or tiny), CC3M-like
    data in chat.json + images.zip, DataLoader workers (pinned memory on CUDA), the default micro-batches,
    torch.compile as configured (auto: inductor on CUDA), a validation pass, a checkpoint, and every quiet step
    under check_syncs (on CUDA torch.cuda.set_sync_debug_mode("error"): a step that waits for the GPU stops the
    run). Reports the graphs compiled, the time dynamo spent compiling, the first log interval's excess over the
    steady state (compiling and workers starting) and the steady samples/s, data loading included."""
    folder = tempfile.mkdtemp(prefix="tinyvlm-path-")
    steps, log_every = args.path_steps, 2 if args.tiny else 5
    models = model_folders(folder, tokenizer, tiny=args.tiny)
    cfg = VLMConfig()  # on a GPU: packed rows of the micro-batch its memory fits, the worst case run first
    if args.tiny:
        cfg = replace(cfg, batch_size=8, grad_accum_steps=2, vision_feature_layer=-1, projector_hidden_dim=64,
                      max_length=128)
    per_step = step_share(cfg, 1)
    data = llava_caption_set(folder, per_step * steps, args.path_val, distinct_images=512)
    cfg = replace(cfg, **models, **data, num_workers=-1, max_steps=steps, warmup_steps=2,
                  eval_every=steps // 2, save_every=steps, sample_every=0, log_every=log_every,
                  compile="auto" if device.type == "cuda" else args.compile_backend, check_syncs=True,
                  device=device.type, dtype="auto", out_dir=f"{folder}/runs", run_name="path", wandb_mode="disabled")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    result = {"steps": steps, "workers": data_workers(cfg.num_workers),
              "compile": pick_compile(cfg.compile, device) or "off"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        run_dir, printed = train_run(cfg)
    except Exception as error:  # a sync under check_syncs, say: reported with where it happened
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[-3000:])
        return result
    with open(os.path.join(run_dir, "checkpoint", "training_config.json")) as f:  # as the run worked it out
        ran = json.load(f)
    result["micro_batches"] = (f"{ran['max_tokens_per_batch']:,} token slots packed" if packs(VLMConfig(**ran), device)
                               else f"{ran['batch_size']} x {ran['grad_accum_steps']}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rates = [row["train/samples_per_s"] for row in map(json.loads, f) if "train/samples_per_s" in row]
    steady = sorted(rates[2:] or rates[-1:])[len(rates[2:] or rates[-1:]) // 2]  # median, after two intervals
    first_interval = log_every * per_step / rates[0]
    result["sizing"] = [line for line in printed.splitlines() if "micro-batch" in line or "varlen" in line]
    if device.type == "cuda":  # against the estimate the sizing line gives
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["card_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    result.update(ok=True, seconds=time.perf_counter() - start, graphs=dict(torch._dynamo.utils.counters["stats"]),
                  dynamo_compile_s=torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0),
                  first_interval_excess_s=first_interval - log_every * per_step / steady,
                  steady_samples_per_s=steady, samples_per_s_by_interval=rates)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def run_quietly(function, *args) -> tuple:
    """(function(*args), what it printed): its console output (the config, progress bars) kept out of the
    suite's tables."""
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        return function(*args), out.getvalue()


def caption_set(data_path: str, image_root: str, processor, max_length: int = 2048) -> LLaVADataset:
    """A JSON caption set as main.py reads it (sources.open_data: checked, tokenized once; a list of entries
    where datasets is not installed, as on a bare GPU machine: tests/test_bench.py runs the suite so)."""
    entries, images, _, _ = open_data(data_path, image_root, True, processor=processor)
    return LLaVADataset(entries, images, processor, max_length)


def train_run(cfg: VLMConfig) -> tuple[str, str]:
    """main.py's training of cfg: (the run's folder, what it printed)."""
    device = torch.device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    return run_quietly(lambda: train(cfg, build_model(cfg, device, dtype), device, dtype))


def bench_train_speed(args, tokenizer, device, dtype) -> list[dict]:
    """The training step main.py runs (forward_backward, gradient clipping, AdamW) at real sizes, eager and
    compiled, by micro-batch size: ms/step, samples/s, MFU, peak memory. The compiled model is compiled once
    and keeps its graphs across batch sizes, as in a run; its first steps (compiling) are warm-up."""
    peak, peak_source = peak_tflops(device, dtype)
    rows = []
    for compiled in (False, True):
        model = random_model(args.tiny, dtype, args.attention, tokenizer, device)
        if compiled:
            torch._dynamo.reset()
            model.compile_regions(backend=args.compile_backend)
        optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-4, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        for batch_size in args.suite_batch_sizes:
            batch = collate(cc3m_like_samples(model, batch_size), tokenizer.pad_token_id)
            tokens = batch["attention_mask"].sum().item() / batch_size
            targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item() / batch_size
            if device.type == "cuda":
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            try:
                for _ in range(args.warmup + args.steps):
                    synchronize(device)
                    start = time.perf_counter()
                    forward_backward(model, [batch], device, dtype, scaler)
                    torch.nn.utils.clip_grad_norm_(model.projector.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
            except torch.OutOfMemoryError:
                rows.append({"compiled": compiled, "batch_size": batch_size, "step_ms": float("nan"),
                             "samples_per_s": float("nan"), "mfu": float("nan"), "peak_memory_gb": float("nan"),
                             "warmup_s": float("nan"), "note": "out of memory"})
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            seconds = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]  # median step
            flops = flops_per_sample(model, tokens, targets)["total"]
            rows.append({"compiled": compiled, "batch_size": batch_size, "step_ms": 1000 * seconds,
                         "samples_per_s": batch_size / seconds, "mfu": flops * batch_size / seconds / 1e12 / peak,
                         "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                         else float("nan"), "warmup_s": sum(times[:args.warmup]), "tokens_per_sample": tokens,
                         "gflops_per_sample": flops / 1e9, "peak_tflops": peak, "peak_source": peak_source, "note": ""})
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def cc3m_epoch(speed_rows: list[dict], data_rows: list[dict], device_name: str, peak: float,
               dollars_per_hour: float) -> dict:
    """Minutes for one epoch of LLaVA-CC3M-595K on this machine, from the fastest model step and the fastest
    data pipeline measured here, and the A40 figures derived from it (not measured)."""
    best = max((r for r in speed_rows if math.isfinite(r["samples_per_s"])), key=lambda r: r["samples_per_s"])
    data_best = max(data_rows, key=lambda r: r["images_per_s"])
    samples_per_s = min(best["samples_per_s"], data_best["images_per_s"])
    minutes = 595_375 / samples_per_s / 60
    a40_model_minutes = 595_375 / (best["samples_per_s"] * GPU_PEAK_TFLOPS["A40"] / peak) / 60
    a40_minutes = max(a40_model_minutes, 595_375 / data_best["images_per_s"] / 60)
    return {"device": device_name, "samples_per_s": samples_per_s, "minutes": minutes,
            "limited_by": "model" if best["samples_per_s"] <= data_best["images_per_s"] else "data",
            "best_model_step": {k: best[k] for k in ("compiled", "batch_size", "samples_per_s", "mfu")},
            "best_data": {k: data_best[k] for k in ("workers", "images_per_s")},
            "a40_minutes_derived": a40_minutes, "a40_dollars_derived": a40_minutes / 60 * dollars_per_hour,
            "a40_assumptions": (f"derived, not measured: the A40 reaches the MFU measured here ({best['mfu']:.0%}) of "
                                f"its {GPU_PEAK_TFLOPS['A40']} TFLOP/s dense bf16 peak, its host feeds "
                                f"{data_best['images_per_s']:.0f} images/s as this one did with "
                                f"{data_best['workers']} workers, at ${dollars_per_hour}/hour")}


GPU_TESTS = ["-m", "gpu", "tests/test_train.py", "tests/test_generate.py", "tests/test_compile.py",
             "tests/test_syncs.py", "tests/test_model.py", "tests/test_varlen.py"]


def gpu_tests(test_args: list[str]) -> dict:
    """The tests marked gpu (pytest, in a process of its own), which run on the GPU when there is one: the
    training loop with workers, pinned memory and the run dtype, SIGTERM and exact resume, fp16 with a
    GradScaler, batched generation, compile against eager and its graphs, no sync in a quiet step (CUDA's sync
    debug mode), the padding mask left out. Their pass/fail is the suite's."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                             "-rfE", *test_args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                            text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return {"ok": result.returncode == 0, "summary": summary, "seconds": time.perf_counter() - start,
            "output_tail": (result.stdout + result.stderr)[-6000:], "args": test_args}


def run_gpu_suite(args, tokenizer, device, dtype, report: dict) -> bool:
    """The suite's parts, in order of what a first GPU run most needs to learn, each printed as it comes;
    once --suite_minutes have passed the parts left are skipped (and say so), so the call ends in time.
    Returns whether the tests and main.py's default path passed."""
    start = time.perf_counter()

    def part(name: str, function, *part_args):
        if time.perf_counter() - start > 60 * args.suite_minutes:
            report[name] = {"skipped": f"over --suite_minutes {args.suite_minutes}"}
            print(f"\n{name}: skipped, over --suite_minutes {args.suite_minutes}", flush=True)
            return None
        part_start, result = time.perf_counter(), None
        try:
            report[name] = result = function(*part_args)
            report.setdefault("part_seconds", {})[name] = time.perf_counter() - part_start
        except Exception as error:  # one part's failure reported, the parts after it still run
            traceback.print_exc()
            report[name] = {"error": f"{type(error).__name__}: {error}"[-3000:]}
            print(f"\n{name}: FAILED: {report[name]['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with open(args.json, "w") as f:  # after every part: a call cut short keeps what it measured
            json.dump(report, f, indent=1, default=str)
        return result

    tests = part("tests", gpu_tests, args.tests.split() if args.tests else GPU_TESTS)
    if tests:
        print(f"\ntests on {device.type}: {tests['summary']} ({tests['seconds']:.0f} s)" +
              ("" if tests["ok"] else "\n" + tests["output_tail"][-3000:]), flush=True)
    path = part("default_path", default_path, args, tokenizer, device)
    if path:
        print(f"\nmain.py's default path ({path.get('micro_batches', '?')} micro-batches, {path['workers']} workers, "
              f"compile {path['compile']}, check_syncs): " + (f"{path['steady_samples_per_s']:.0f} samples/s steady, data "
              f"included; graphs {path['graphs']}; dynamo compiling {path['dynamo_compile_s']:.0f} s; first "
              f"interval {path['first_interval_excess_s']:.0f} s over the steady state; peak "
              f"{path.get('peak_memory_gb', float('nan')):.1f} GB; " + " / ".join(path["sizing"]) if path["ok"] else
              f"FAILED: {path['error']}"), flush=True)
    if part("train_speed", bench_train_speed, args, tokenizer, device, dtype):
        print_table(f"training step at {'tiny' if args.tiny else 'real'} sizes ({args.dtype}, {args.attention})",
                    report["train_speed"], ["compiled", "batch_size", "step_ms", "samples_per_s", "mfu",
                                            "peak_memory_gb", "warmup_s", "note"])
    if part("packing", bench_packing, args, tokenizer, device, dtype):
        print_table("padded, length-grouped and packed micro-batches", report["packing"],
                    ["stage", "layout", "attention", "real_token_share", "timed_batch", "micro_batches_per_step",
                     "tokens_per_s", "samples_per_s", "speedup", "error"])
    if part("data", bench_data, args, tokenizer, args.suite_workers, args.data_repeats, 512):
        print_table("data pipeline (images.zip -> uint8 batches of 32)", report["data"], ["workers", "images_per_s"])
    if part("generate", bench_generate, args, tokenizer, device, dtype):
        print_table(f"generation ({args.new_tokens} new tokens per image)", report["generate"],
                    ["batch_size", "decoding", "images_per_s", "new_tokens_per_s"])
    if isinstance(report.get("train_speed"), list) and isinstance(report.get("data"), list):
        peak = report["train_speed"][0]["peak_tflops"]
        report["cc3m_epoch"] = epoch = cc3m_epoch(report["train_speed"], report["data"], report["device"], peak,
                                                  args.a40_dollars_per_hour)
        print(f"\none CC3M-595K epoch on {epoch['device']}: {epoch['minutes']:.1f} min at {epoch['samples_per_s']:.0f} "
              f"samples/s (limited by the {epoch['limited_by']})\nA40, derived: {epoch['a40_minutes_derived']:.1f} "
              f"min, ${epoch['a40_dollars_derived']:.2f} ({epoch['a40_assumptions']})")
    print(f"\nsuite: {time.perf_counter() - start:.0f} s", flush=True)
    return bool(tests and tests["ok"]) and bool(path and path["ok"])


# ----------------------------------------------------------------------------------------------------------
# Packing


def step_batches(share: list[dict], layout: str, batch_size: int, max_length: int, max_tokens: int, pad: int,
                 image: int | None = None) -> list:
    """One process's share of a step as micro-batches: padded in stream order (padding alone), length-grouped
    (sorted by length, then cut into micro-batches of batch_size: data.padded_step, main.py's without packing),
    packed in rows (data.pack_step: "packed", rows of max_length; "packed N", rows filled up to N tokens, under
    a block-diagonal mask), or packed in one row per micro-batch of max_tokens slots ("one row": varlen's)."""
    if layout == "one row":
        return pack_step(share, max_length, max_tokens, pad, max_tokens, image)
    if layout.startswith("packed"):
        return pack_step(share, max_length, max_tokens, pad, int(layout.split()[1]) if " " in layout else 0, image)
    if layout == "grouped":
        return padded_step(share, batch_size, pad, image)
    return [collate(share[i:i + batch_size], pad, image) for i in range(0, len(share), batch_size)]


def real_token_share(batches: list[dict]) -> float:
    return sum(b["num_tokens"] for b in batches) / max(1, sum(b["input_ids"].numel() for b in batches))


def packing_variants(args, device, max_length: int, stage: str) -> list[tuple[str, str]]:
    """(layout, LM attention) pairs to time: padded and length-grouped with --attention (sdpa on GPUs: flash,
    no mask); packed rows with sdpa and the block-diagonal mask (every token scores its whole row: varlen's
    fallback), with rows of --pack_lengths in stage 2; on GPUs (and with tiny models) one row per micro-batch
    with varlen (flash attention per conversation, no mask; on CPUs its dense reference), and flex attention
    (block-sparse; it has no backward on CPUs); on CPUs sdpa_varlen (sdpa once per conversation)."""
    variants = [("padded", args.attention), ("grouped", args.attention), ("packed", "sdpa")]
    if stage.startswith("stage 2"):
        variants += [(f"packed {n}", "sdpa") for n in args.pack_lengths.split(",") if n and int(n) < max_length]
    if device.type == "cuda" or args.tiny:
        variants.append(("one row", "varlen"))
    if device.type == "cuda":
        variants.append(("packed", "flex_attention"))
    else:
        variants += [(layout, "sdpa_varlen") for layout, attention in variants if attention == "sdpa"]
    return list(dict.fromkeys(variants))  # --attention sdpa: each pair once


def bench_packing(args, tokenizer, device, dtype) -> list[dict]:
    """Share of real tokens in the token slots (over many steps of the default config, lengths only) and trained
    tokens/s and samples/s (a few timed steps of the whole model) for padded, length-grouped and packed
    micro-batches (packing_variants: stage 1 padded against packed, stage 2 masked against varlen, on a GPU),
    on stage-2 (llava_v1_5_mix665k-like) and stage-1 (CC3M-like) data. Every layout trains the same samples."""
    rows = []
    finetune = dict(VLMConfig().__dict__, **FINETUNE_CONFIG)
    # the default configs' step shares (stage 2's micro-batch as on CPUs: 16 samples; stage 1's as on GPUs: 256)
    stages = [("stage 2, mix665k-like", mix665k_like_entries, finetune["max_length"], CPU_BATCH_SIZE["finetune"],
               finetune["global_batch"] // CPU_BATCH_SIZE["finetune"], args.packing_batch_size, args.packing_grad_accum),
              ("stage 1, CC3M-like", cc3m_like_entries, VLMConfig.max_length, VLMConfig.global_batch, 1,
               args.packing_batch_size * 4, 1)]
    for stage, make_entries, max_length, batch_size, accum, timed_batch_size, timed_accum in stages:
        model = random_model(args.tiny, dtype, args.attention, tokenizer, device)
        decoder = model.lm.get_decoder()
        decoder.layers = decoder.layers[:args.packing_lm_layers]  # every layout pays the same per layer
        decoder.config.num_hidden_layers = len(decoder.layers)
        pad = tokenizer.pad_token_id
        samples = encoded_samples(model, make_entries(args.packing_samples), max_length)
        kept = [s for s in samples if "skipped" not in s]
        lengths = sorted(len(s["input_ids"]) for s in kept)
        print(f"{stage}: {len(kept)} samples, {len(samples) - len(kept)} longer than {max_length} skipped; tokens "
              f"per sample: mean {sum(lengths) / len(lengths):.0f}, median {lengths[len(lengths) // 2]}, "
              f"90th percentile {lengths[len(lengths) * 9 // 10]}, max {lengths[-1]}")
        if stage.startswith("stage 2"):
            model.lm.float().requires_grad_(True)
            trained = list(model.parameters())
        else:
            trained = list(model.projector.parameters())
        optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        timed_share = timed_batch_size * timed_accum
        image = model.image_token_id
        warm_up = step_batches(samples[-timed_batch_size:], "padded", timed_batch_size, max_length, 0, pad, image)
        forward_backward(model, warm_up, device, dtype, scaler)  # allocations, kernels, AdamW state: untimed
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        variants = packing_variants(args, device, max_length, stage)
        seconds, errors = dict.fromkeys(variants, 0.0), {}
        steps = [samples[step * timed_share:(step + 1) * timed_share] for step in range(args.packing_steps)]
        # every variant trains the same steps, as its layout splits them into micro-batches
        step_layouts = {(layout, attention): [step_batches(share_samples, layout, timed_batch_size, max_length,
                                                           timed_batch_size * max_length, pad, image)
                                              for share_samples in steps] for layout, attention in variants}
        # rounds take the variants in alternating order, so that a slow spell of this (shared, noisy) machine
        # does not fall on one variant alone
        for round_ in range(args.packing_rounds):
            for layout, attention in variants[::-1] if round_ % 2 else variants:
                if (layout, attention) in errors:
                    continue
                try:
                    model.lm.set_attn_implementation(attention)
                    for batches in step_layouts[layout, attention]:
                        synchronize(device)
                        start = time.perf_counter()
                        forward_backward(model, batches, device, dtype, scaler)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        synchronize(device)
                        seconds[layout, attention] += time.perf_counter() - start
                except Exception as error:  # flex attention, say, failing to compile: reported, the others go on
                    errors[layout, attention] = f"{type(error).__name__}: {error}"[:500]
                    optimizer.zero_grad(set_to_none=True)
        share = batch_size * accum  # the default config's share of a step, for the token slots
        for layout, attention in variants:
            slots = [b for i in range(0, len(samples) - share + 1, share) for b in step_batches(
                samples[i:i + share], layout, batch_size, max_length, batch_size * max_length, pad, image)]
            timed = [b for batches in step_layouts[layout, attention] for b in batches]
            error = errors.get((layout, attention))
            rows.append({"stage": stage, "layout": layout, "attention": attention,
                         "real_token_share": real_token_share(slots),
                         "config_batch": f"{batch_size} x {accum}", "max_length": max_length,
                         "timed_batch": f"{timed_batch_size} x {timed_accum}", "timed_steps": args.packing_steps,
                         "rounds": args.packing_rounds, "micro_batches_per_step": len(timed) / args.packing_steps,
                         "timed_real_token_share": real_token_share(timed),
                         "tokens_per_s": None if error else
                         args.packing_rounds * sum(b["num_tokens"] for b in timed) / seconds[layout, attention],
                         "samples_per_s": None if error else
                         args.packing_rounds * sum(b["num_samples"] for b in timed) / seconds[layout, attention],
                         **({"error": error} if error else {})})
            print(rows[-1])
        stage_rows = [row for row in rows if row["stage"] == stage]
        for row in stage_rows:
            if row["tokens_per_s"] and stage_rows[0]["tokens_per_s"]:
                row["speedup"] = row["tokens_per_s"] / stage_rows[0]["tokens_per_s"]  # against padded
        del model, optimizer
    return rows


# ----------------------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row.get(c, ''):.3g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                         for c in columns))


def cc3m_projection(train_rows: list[dict], mfu: float, dollars_per_hour: float) -> dict:
    """One epoch of LLaVA-CC3M-595K on one A40 at a given MFU, from the FLOPs per sample measured here."""
    tinyvlm = next(row for row in train_rows if row["loss"] == "targets")
    flops = tinyvlm["gflops_per_sample"]["total"] * 1e9 * 595_375
    seconds = flops / (GPU_PEAK_TFLOPS["A40"] * 1e12 * mfu)
    return {"epoch_pflops": flops / 1e15, "a40_mfu_assumed": mfu, "a40_minutes": seconds / 60,
            "a40_dollars": seconds / 3600 * dollars_per_hour, "dollars_per_hour_assumed": dollars_per_hour}


def main() -> int:
    args = parse_args(sys.argv[1:])
    if args.scale_child:
        print(json.dumps(scale_child(*json.loads(args.scale_child))))
        return
    transformers.utils.logging.disable_progress_bar()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    args.dtype = str(dtype).removeprefix("torch.")
    args.attention = args.attention or ("sdpa" if device.type == "cuda" else "eager")
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    suite, tiny = args.suite == "gpu", args.tiny
    args.steps = args.steps or (2 if tiny else 10 if suite else 5)
    args.warmup = args.warmup or (1 if tiny else 3 if suite else 2)
    args.data_images = args.data_images or (64 if tiny else 2048 if suite else 512)
    args.data_repeats = 1 if tiny else 8  # the suite reads each JPEG 8 times: enough work for 16 workers
    args.suite_batch_sizes = (2, 4) if tiny else (32, 64, 128, 256)
    args.suite_workers = (1, 2) if tiny else tuple(sorted({1, 4, 8, 16, data_workers(-1)}))
    args.path_steps, args.path_val = (6, 16) if tiny else (40, 512)
    if tiny:
        args.packing_samples = min(args.packing_samples, 256)
    args.step_shares = [int(n) for n in args.step_shares.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": device_name, "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
              "dtype": args.dtype, "suite": args.suite}
    print(json.dumps(report))
    ok = True
    if suite:
        ok = run_gpu_suite(args, tokenizer, device, dtype, report)
    parts = [] if suite else args.parts.split(",")
    if "train" in parts:
        report["train"] = bench_train(args, tokenizer, device, dtype)
        print_table("training step", report["train"], ["variant", "batch_size", "step_ms", "samples_per_s",
                                                        "tokens_per_s", "mfu", "peak_memory_gb", "first_loss"])
        report["cc3m_epoch_projection"] = cc3m_projection(report["train"], args.a40_mfu, args.a40_dollars_per_hour)
        print(json.dumps(report["cc3m_epoch_projection"]))
    if "step" in parts:
        report["step"] = bench_step(args, tokenizer, device, dtype)
        print_table("training step, before and after (main.py's step; syncs: operations that wait for a GPU)",
                    report["step"], ["stage", "version", "attention", "step", "step_ms", "samples_per_s",
                                     "real_token_share", "syncs_per_step"])
        report["token_shares"] = default_config_token_shares(tokenizer)
        print_table("stage 1's real-token share on CC3M-like lengths", report["token_shares"],
                    ["config", "layout", "real_token_share", "micro_batches_per_step", "mean_tokens", "longest"])
    if "finetune_lora" in parts:
        report["finetune_lora"] = bench_finetune_lora(args, tokenizer, device, dtype)
        print_table("stage 2's training step, full finetuning and LoRA (rank 16), gradient checkpointing",
                    report["finetune_lora"], ["language_model", "training", "batch_size", "trained_params_m",
                                              "step_ms", "samples_per_s", "peak_memory_gb", "note"])
    if "memory" in parts:
        report["memory"] = bench_memory(args, tokenizer, device, dtype)
        print_table("the micro-batch chosen for each card (main.py on a GPU, batch_size -1; packed, varlen; fake "
                    "tensors)", report["memory"], ["card_gb", "training", "language_model", "state_gb",
                                                   "micro_batch_tokens", "samples_at_max_length", "estimated_peak_gb",
                                                   "note"])
    if "finetune" in parts:
        report["finetune"] = bench_finetune(args, tokenizer, device, dtype)
        print_table("stage-2 training step (language model trained too)", report["finetune"],
                    ["gradient_checkpointing", "batch_size", "tokens_per_sample", "step_ms", "samples_per_s",
                     "peak_memory_gb", "memory_per_sample_mb"])
    if "data" in parts:
        report["data_profile"] = bench_data_profile(args, tokenizer)
        print_table("one DataLoader worker's time per sample (ms), stage by stage, before and now",
                    report["data_profile"], ["image", "version", "zip read ms", "decode ms", "to RGB again ms",
                                             "resize ms", "to tensor ms", "tokenize ms", "whole sample ms",
                                             "samples_per_s_per_core", "1 workers samples/s", "2 workers samples/s"])
        report["data"] = bench_data(args, tokenizer)
        print_table("data pipeline (zip -> decode -> resize -> tokenize -> collate)", report["data"],
                    ["workers", "images_per_s", "jpeg_kb"])
    if "packing" in parts:
        report["packing"] = bench_packing(args, tokenizer, device, dtype)
        print_table("padded, length-grouped and packed micro-batches", report["packing"],
                    ["stage", "layout", "attention", "real_token_share", "timed_batch", "micro_batches_per_step",
                     "timed_real_token_share", "tokens_per_s", "samples_per_s", "speedup", "error"])
    if "data_scale" in parts:
        report["data_scale"] = bench_data_scale(args)
        print_table("input pipeline at scale (main process + workers, proportional set size)", report["data_scale"],
                    ["set", "cache", "workers", "open_s", "open_cpu_s", "first_batch_s", "first_batch_cpu_s",
                     "pss_mb", "main_pss_mb", "pss_anon_mb", "pss_file_mb", "pss_shmem_mb", "per_extra_worker_mb"])
    if "generate" in parts:
        report["generate"] = bench_generate(args, tokenizer, device, dtype)
        print_table(f"generation ({args.new_tokens} new tokens per image)", report["generate"],
                    ["batch_size", "decoding", "images_per_s", "new_tokens_per_s"])
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.json}" + ("" if ok else "; some correctness checks FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
