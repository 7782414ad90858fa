"""Measure TinyVLM's speed on this machine: the training step, the data pipeline and generation.
  python bench.py                          # real sizes (SigLIP-base-224, SmolLM2-135M, default projector)
  python bench.py --tiny                   # tiny models: checks the script in seconds
  python bench.py --parts train --batch_size 64 --json bench.json
  python bench.py --parts data_scale       # loader memory and start-up on CC3M-size and 5M-entry synthetic sets
Models are built from configs with random weights, so nothing is downloaded (a tokenizer is read from the
demo's folder, or --tokenizer). Prints a table per part and writes everything to --json.
"""

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time
import zipfile

import torch
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from data import IGNORE_INDEX, LLaVADataset, collate, open_image_source, to_messages
from demo import INSTRUCTIONS, LANGUAGE_MODEL_DIR, SIGLIP_PREPROCESSING
from main import VLMConfig
from model import ModelConfig, TinyVLM, autocast, pick_device

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
TINY_LM = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=True)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity), in TFLOP/s, matched on the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                   "A100": 312.0, "A40": 149.7, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}
CAPTION_WORDS = ("a photo of the old stone bridge over the river in the autumn light with people walking "
                 "across it near a small town").split()


# ----------------------------------------------------------------------------------------------------------
# Models and batches


def build_model(tiny: bool, weights_dtype: torch.dtype, attention: str, tokenizer, device) -> TinyVLM:
    """TinyVLM at the real sizes (or tiny ones) with random weights."""
    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, attn_implementation=attention,
                                                  **(TINY_VISION if tiny else {})))
    lm = LlamaForCausalLM(LlamaConfig(attn_implementation=attention, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **(TINY_LM if tiny else SMOLLM2_135M)))
    defaults = VLMConfig()
    config = ModelConfig(vision_model="random SigLIP", language_model="random SmolLM2",
                         vision_feature_layer=defaults.vision_feature_layer,
                         pixel_shuffle_factor=defaults.pixel_shuffle_factor,
                         projector_hidden_dim=64 if tiny else defaults.projector_hidden_dim)
    model = TinyVLM(config, vision.to(weights_dtype), lm.to(weights_dtype), tokenizer, SIGLIP_PREPROCESSING)
    return model.to(device)


def synthetic_samples(model: TinyVLM, count: int, seed: int = 0) -> list[dict]:
    """CC3M-like samples: a LLaVA instruction, a caption of 6-16 words (CC3M's are about 10), a 224 px image."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        caption = " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(6, 16))) + " ."
        turns = [{"from": "human", "value": f"{rng.choice(INSTRUCTIONS)}\n<image>"}, {"from": "gpt", "value": caption}]
        input_ids, labels = model.processor.encode(to_messages(turns, model.processor.image_placeholder))
        pixels = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator)
        samples.append({"input_ids": input_ids, "labels": labels, "pixels": pixels})
    return samples


def to_device(batch: dict, device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels", "pixels")}


def full_vocabulary_loss(model: TinyVLM, input_ids, attention_mask, labels, pixels) -> torch.Tensor:
    """The naive loss: logits for every position and the whole vocabulary, then a masked cross-entropy."""
    embeds = model.embed(input_ids, pixels)
    logits = model.lm(inputs_embeds=embeds, attention_mask=attention_mask).logits  # (B, T, vocab)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


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
    vision = model.vision
    vision_config = vision.config
    encoder = getattr(vision, "vision_model", vision).encoder
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    layer_params = sum(p.numel() for p in encoder.layers.parameters())
    vision_flops = 2 * layer_params * patches + 4 * len(encoder.layers) * patches**2 * vision_config.hidden_size
    vision_flops += 2 * sum(p.numel() for p in vision.embeddings.patch_embedding.parameters()) * patches
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


def peak_tflops(device: torch.device) -> tuple[float, str]:
    """The device's dense bf16 peak and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name}: NVIDIA data sheet, dense bf16"
        return float("nan"), f"{name}: peak unknown, add it to GPU_PEAK_TFLOPS"
    size, repeats = 2048, 10
    a, b = torch.randn(size, size, dtype=torch.bfloat16), torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - start
    return 2 * size**3 * repeats / seconds / 1e12, "CPU: a 2048^2 bf16 matmul measured in this run"


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
    peak, peak_source = peak_tflops(device)
    rows = []
    for name, weights_dtype, loss_kind, attention in variants:
        model = build_model(args.tiny, weights_dtype, attention, tokenizer, device)
        samples = synthetic_samples(model, args.batch_size)
        batch = collate(samples, tokenizer.pad_token_id)
        tokens = batch["attention_mask"].sum().item() / args.batch_size
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        batch = to_device(batch, device)
        optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-4, fused=device.type == "cuda")
        loss_fn = full_vocabulary_loss if loss_kind == "full" else TinyVLM.forward
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for step in range(args.warmup + args.steps):
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = loss_fn(model, **batch)
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
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the resident-set peak, to the current resident set
    return proc_status_bytes("VmRSS")


def peak_memory(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM")


def proc_status_bytes(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def instruct_samples(model: TinyVLM, count: int, seed: int = 0) -> list[dict]:
    """LLaVA-Instruct-like samples: three question-answer turns of 40-70 words after the image."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        turns = []
        for k in range(3):
            question = " ".join(rng.choice(CAPTION_WORDS) for _ in range(10)) + "?"
            turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                      {"from": "gpt", "value": " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(40, 70)))}]
        input_ids, labels = model.processor.encode(to_messages(turns, model.processor.image_placeholder))
        pixels = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator)
        samples.append({"input_ids": input_ids, "labels": labels, "pixels": pixels})
    return samples


def bench_finetune(args, tokenizer, device, dtype) -> list[dict]:
    """Stage 2's training step (projector and language model trained, fp32 weights under autocast) with and
    without gradient checkpointing: time and peak memory, the whole process's and per sample above idle."""
    rows = []
    for checkpointing in (False, True):
        model = build_model(args.tiny, dtype, args.attention, tokenizer, device)
        model.lm.float().requires_grad_(True)
        if checkpointing:
            model.checkpoint_language_model()
        batch = collate(instruct_samples(model, args.finetune_batch_size), tokenizer.pad_token_id)
        tokens = batch["attention_mask"].sum().item() / args.finetune_batch_size
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
        batch = to_device(batch, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        model.train()
        times = []
        for step in range(1 + args.finetune_steps):
            if step == 1:  # after one step the optimizer state exists: what remains is the step's own memory
                idle = memory_now_and_reset_peak(device)
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = model(**batch)
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


def cc3m_like_jpeg(rng: random.Random, quality: int = 75) -> bytes:
    """A JPEG like CC3M's (about 12 KB; 14.5 KB at quality 85): a smooth gradient, a few shapes, texture."""
    width, height = rng.choice([(400, 300), (300, 400), (500, 333), (333, 500)])
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + rng.randint(20, 150), y + rng.randint(20, 150)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(35):  # texture, so the JPEGs weigh what photos do
        x, y = rng.randrange(width), rng.randrange(height)
        draw.line((x, y, x + rng.randint(-60, 60), y + rng.randint(-60, 60)),
                  fill=tuple(rng.randrange(256) for _ in range(3)), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def cc3m_like_zip(folder: str, count: int, seed: int = 0) -> str:
    """A zip of small JPEGs like CC3M's (about 11 KB each): smooth gradients with a few shapes."""
    rng = random.Random(seed)
    path = os.path.join(folder, "images.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"GCC_train_{i:09d}.jpg", cc3m_like_jpeg(rng))
    return path


CC3M_ENTRIES = 595_375


def make_scale_set(folder: str, num_entries: int, num_images: int = CC3M_ENTRIES, seed: int = 0) -> dict:
    """A synthetic set shaped like LLaVA-CC3M-Pretrain-595K, made once under `folder` and reused:
    images.zip (num_images ZIP_STORED JPEGs of about 14.5 KB, 8.6 GB; 512 distinct ones repeat, to spare the CPU) and
    chat_<num_entries>.json (entry i shows image i mod num_images, so 5M entries reuse the 595K images)."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    zip_path, json_path = os.path.join(folder, "images.zip"), os.path.join(folder, f"chat_{num_entries}.json")
    if not os.path.isfile(zip_path):
        pool = [cc3m_like_jpeg(rng, quality=85) for _ in range(512)]
        with zipfile.ZipFile(zip_path + ".tmp", "w", zipfile.ZIP_STORED) as archive:
            for i in range(num_images):
                archive.writestr(f"GCC_train_{i:09d}.jpg", pool[i % len(pool)])
        os.replace(zip_path + ".tmp", zip_path)
    if not os.path.isfile(json_path):
        rng = random.Random(seed + 1)
        with open(json_path + ".tmp", "w") as f:  # written entry by entry: 5M entries never sit in memory
            f.write("[")
            for i in range(num_entries):
                instruction = rng.choice(INSTRUCTIONS)
                human = f"{instruction}\n<image>" if rng.random() < 0.5 else f"<image>\n{instruction}"
                caption = " ".join(rng.choices(CAPTION_WORDS, k=rng.randint(6, 14))) + " ."
                entry = {"id": f"GCC_train_{i:09d}", "image": f"GCC_train_{i % num_images:09d}.jpg",
                         "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]}
                f.write(("," if i else "") + json.dumps(entry))
            f.write("]")
        os.replace(json_path + ".tmp", json_path)
    return {"data_path": json_path, "image_root": zip_path}


def bench_data(args, tokenizer) -> list[dict]:
    """Images/s of the whole input pipeline (zip read, JPEG decode, RGB, resize, tokenize, collate), by the
    number of DataLoader workers."""
    model = build_model(True, torch.float32, "eager", tokenizer, torch.device("cpu"))  # for its Processor
    processor = model.processor
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        zip_path = cc3m_like_zip(folder, args.data_images)
        mean_kb = os.path.getsize(zip_path) / args.data_images / 1024
        turns = [{"from": "human", "value": "<image>\nDescribe the image concisely."},
                 {"from": "gpt", "value": "a photo of the old stone bridge over the river ."}]
        entries = [{"id": str(i), "image": f"GCC_train_{i:09d}.jpg", "conversations": turns}
                   for i in range(args.data_images)]
        dataset = LLaVADataset(entries, open_image_source(zip_path), processor)
        for workers in sorted({0, 1, 2, 4, 8, os.cpu_count() or 1}):
            if workers > (os.cpu_count() or 1):
                continue
            loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers,
                                                 collate_fn=lambda s: collate(s, tokenizer.pad_token_id),
                                                 pin_memory=torch.cuda.is_available())
            iterator = iter(loader)
            first = next(iterator)  # workers started and warm
            start = time.perf_counter()
            count = sum(len(batch["input_ids"]) for batch in iterator)
            seconds = time.perf_counter() - start
            rows.append({"workers": workers, "images_per_s": count / seconds, "jpeg_kb": mean_kb,
                         "images": count + len(first["input_ids"])})
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
    """One start-up of the training input pipeline, in a fresh process: open the data (building its caches if
    they are missing), split it, start a DataLoader like main.py's, time the first batch, then measure the
    memory of the main process and its workers after `batches` more batches."""
    from functools import partial

    from data import Processor, StreamSampler, ignore_sigint_in_worker, open_data, split_entries
    tokenizer = AutoTokenizer.from_pretrained(LANGUAGE_MODEL_DIR)
    processor = Processor(tokenizer, SIGLIP_PREPROCESSING, "<image>", 49)
    defaults = VLMConfig()
    start, cpu_start = time.perf_counter(), time.process_time()
    entries, images, skipped, _ = open_data(data_path, image_root, require_image=True)
    train, _ = split_entries(entries, defaults.val_size, defaults.seed)
    dataset = LLaVADataset(train, images, processor, defaults.max_length)
    opened, open_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=64, sampler=StreamSampler(len(train), defaults.seed, 0, 64), num_workers=workers,
        collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id), worker_init_fn=ignore_sigint_in_worker,
        persistent_workers=workers > 0)
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
            "first_batch_size": len(first["input_ids"])}


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
    model = build_model(args.tiny, dtype, args.attention, tokenizer, device).eval()
    images = [Image.fromarray(torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8).numpy()) for _ in range(16)]
    prompt = "Describe the image concisely."
    rows = []
    for batch_size in (1, 16):
        runs = {"generate() with KV cache": lambda: model.generate(
                    images[:batch_size], prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
                "no cache": lambda: generate_without_cache(model, images[:batch_size], prompt, args.new_tokens)}
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the real sizes")
    parser.add_argument("--parts", default="train,finetune,data,generate")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default: 8 on CPU, 64 on GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", help="the run dtype (autocast and frozen weights)")
    parser.add_argument("--attention", default=None, help="default: sdpa on GPUs, eager on CPUs")
    parser.add_argument("--finetune_batch_size", type=int, default=16, help="stage 2's default per-device batch")
    parser.add_argument("--finetune_steps", type=int, default=2)
    parser.add_argument("--data_images", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--tokenizer", default=None, help="default: the demo's SmolLM2 folder, else the hub id")
    parser.add_argument("--a40_mfu", type=float, default=0.4, help="MFU assumed for the A40 projection")
    parser.add_argument("--a40_dollars_per_hour", type=float, default=0.44)
    parser.add_argument("--scale_dir", default="data/scale", help="where data_scale makes its synthetic sets")
    parser.add_argument("--scale_entries", default=f"{CC3M_ENTRIES},5000000")
    parser.add_argument("--scale_batches", type=int, default=20, help="batches of 64 before memory is measured")
    parser.add_argument("--scale_runs", default="cold:8,warm:1,warm:8",
                        help="cache:workers per start-up; cold deletes the caches first")
    parser.add_argument("--scale_child", help=argparse.SUPPRESS)  # one data_scale start-up, in its own process
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args()
    if args.scale_child:
        print(json.dumps(scale_child(*json.loads(args.scale_child))))
        return
    transformers.utils.logging.disable_progress_bar()
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    args.attention = args.attention or ("sdpa" if device.type == "cuda" else "eager")
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    tokenizer_path = args.tokenizer or (LANGUAGE_MODEL_DIR if os.path.isdir(LANGUAGE_MODEL_DIR)
                                        else "HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {"device": device_name, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "tiny": args.tiny, "dtype": args.dtype}
    print(json.dumps(report))
    parts = args.parts.split(",")
    if "train" in parts:
        report["train"] = bench_train(args, tokenizer, device, dtype)
        print_table("training step", report["train"], ["variant", "batch_size", "step_ms", "samples_per_s",
                                                        "tokens_per_s", "mfu", "peak_memory_gb", "first_loss"])
        report["cc3m_epoch_projection"] = cc3m_projection(report["train"], args.a40_mfu, args.a40_dollars_per_hour)
        print(json.dumps(report["cc3m_epoch_projection"]))
    if "finetune" in parts:
        report["finetune"] = bench_finetune(args, tokenizer, device, dtype)
        print_table("stage-2 training step (language model trained too)", report["finetune"],
                    ["gradient_checkpointing", "batch_size", "tokens_per_sample", "step_ms", "samples_per_s",
                     "peak_memory_gb", "memory_per_sample_mb"])
    if "data" in parts:
        report["data"] = bench_data(args, tokenizer)
        print_table("data pipeline (zip -> decode -> resize -> tokenize -> collate)", report["data"],
                    ["workers", "images_per_s", "jpeg_kb"])
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
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
