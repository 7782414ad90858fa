"""Train TinyVLM: stage 1 trains the modality projector on LLaVA-format image-caption data; stage 2
(--stage finetune) trains the projector and the language model on LLaVA instruction data.
  uv run main.py --demo                              # offline demo on synthetic shapes, CPU, minutes
  python main.py --batch_size 32 --lr 1e-3           # any VLMConfig field can be overridden like this
  torchrun --nproc_per_node 4 main.py                # the same run on 4 GPUs
  python main.py --resume runs/stage1-20261127-1200  # continue a stopped run exactly where it stopped
"""

import argparse
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

from cli import as_bool, exit_if_problems, expandable_segments


@dataclass
class VLMConfig:
    # model: the frozen encoders (hub ids or local folders) and the projector between them
    vision_model: str = "google/siglip-base-patch16-224"  # hub id or local folder of a SigLIP vision model
    language_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id or local folder of a chat LM
    vision_feature_layer: int = -2  # which encoder hidden state feeds the projector (LLaVA: penultimate)
    pixel_shuffle_factor: int = 2  # r x r patches make one image token: 14x14 patches -> 7x7 = 49 tokens
    projector_hidden_dim: int = 12288  # SwiGLU width; 82.6M projector parameters, about 300M in all
    max_length: int = 256  # samples longer than this (in tokens) are skipped and counted
    system_prompt: str = ""  # an empty system turn: SmolLM2's default one would add 16 tokens to each sample
    # data: a JSON/JSONL file (LLaVA, Cauldron or chat-messages schema), a parquet file or folder, or a hub
    # dataset id; images embedded in parquet/hub rows, or paths under image_root (a folder or images.zip)
    data_path: str = "data/LLaVA-CC3M-Pretrain-595K/chat.json"  # JSON/JSONL, parquet, or a hub dataset id
    image_root: str = "data/LLaVA-CC3M-Pretrain-595K/images.zip"  # a folder or .zip; empty: images in the data
    data_subset: str = ""  # a hub dataset's subset (configuration), e.g. "ai2d" of HuggingFaceM4/the_cauldron
    data_split: str = "train"  # a hub dataset's split
    val_data_path: str = ""  # held-out data like data_path (a hub id: its val_data_split); empty: val_size of it
    val_data_split: str = "validation"  # a hub val_data_path's split
    val_size: int = 1024  # entries of data_path held out for validation when there is no val_data_path
    num_workers: int = -1  # DataLoader workers per process; -1: from this machine's cores (main.data_workers)
    stage: str = "pretrain"  # pretrain: the projector trains; finetune (stage 2): the projector and the language model
    init_from: str = ""  # a trained TinyVLM (model or run folder) to start from: stage 2 starts from stage 1
    gradient_checkpointing: bool = False  # recompute LM activations in the backward pass: less memory
    lora_rank: int = 0  # stage 2: train LoRA adapters (peft) of the LM's projections instead of all its weights
    lora_alpha: float = 32.0  # the adapters' scale is lora_alpha / lora_rank
    # optimisation (LLaVA stage 1: global batch 256, lr 1e-3, warmup 3%, cosine, one epoch). On GPUs, batch_size
    # -1 (and max_tokens_per_batch 0) sizes the micro-batch for the card's free memory at start-up, and the
    # worst micro-batch the run can meet runs first (memory.py); on CPUs -1 is 64 (stage 2: 16)
    global_batch: int = 256  # samples per optimizer step, all processes together, when batch_size or grad_accum_steps is -1
    batch_size: int = -1  # samples per device and micro-batch; -1: what fits the GPU (CPUs: 64, stage 2: 16)
    grad_accum_steps: int = -1  # micro-batches per step; -1: as many as global_batch takes
    # packing: a step trains on the same samples, laid end to end in rows instead of padded, in micro-batches
    # of at most max_tokens_per_batch tokens (data.pack_step); no sample sees another
    packing: str = "auto"  # lay a step's samples end to end instead of padding them (true, false); auto: GPUs, stage 2
    max_tokens_per_batch: int = 0  # token slots in a packed micro-batch; 0: what fits the GPU (CPU: batch_size x max_length)
    pack_length: int = 0  # rows are filled up to this many tokens under a block-diagonal mask; 0: max_length
    epochs: float = 1.0  # passes over the training data
    max_steps: int = -1  # -1: as many optimizer steps as `epochs` takes
    lr: float = 1e-3  # the projector's
    lm_lr: float = 2e-5  # the language model's, in stage 2
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = -1  # -1: 3% of lr_decay_steps
    lr_decay_steps: int = -1  # length of the warmup + cosine schedule; -1: max_steps
    weight_decay: float = 0.0  # AdamW's weight decay
    grad_clip: float = 1.0  # the gradient norm is clipped to this
    # precision and device
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "auto"  # auto: bf16 on GPUs that have it, else fp16; CPUs: bf16 with AMX or AVX512-BF16, else fp32
    attn_implementation: str = "auto"  # auto: packed, varlen on GPUs and sdpa_varlen on CPUs; padded, sdpa and eager
    compile: str = "auto"  # torch.compile the encoder, projector and LM layers: auto (CUDA only), true, false, a backend
    check_syncs: bool = False  # raise if a step after the first that logs nothing waits for the device (syncs.py)
    seed: int = 1337  # the data order, the validation split and the initial projector
    # evaluation, checkpoints, logging
    eval_every: int = 500  # steps between validation passes; the best one is kept in <run>/best
    save_every: int = 1000  # steps between checkpoints in <run>/checkpoint
    sample_every: int = 500  # steps between captions of held-out images in W&B and the console; 0: never
    num_sample_images: int = 8  # held-out images captioned every sample_every steps
    log_every: int = 10  # steps between training metrics (the loss is read from the device only then)
    out_dir: str = "runs"  # run folders go here
    run_name: str = ""  # empty: stage1-<date>-<time>
    resume: str = ""  # a run folder to continue
    wandb_project: str = "tinyvlm"  # the W&B project
    wandb_mode: str = "online"  # online, offline (local files only) or disabled
    demo: bool = False  # `main.py --demo` runs demo.py: synthetic data, SmolLM2 (or Gemma 3) from PyPI, random SigLIP


# ----------------------------------------------------------------------------------------------------------
# Configuration from the command line


def parse_bool(text: str) -> bool:
    if as_bool(text) is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return as_bool(text)


def field_help() -> dict[str, str]:
    """Each VLMConfig field's comment above: its --help line (one source for both)."""
    lines = inspect.getsource(VLMConfig).splitlines()
    return {m[1]: m[2] for m in (re.match(r"\s+(\w+): [^#]+#\s*(.*)", line) for line in lines) if m}


def parse_args(argv: list[str]) -> dict:
    """The VLMConfig fields given on the command line, typed: `--lr 1e-3`, `--lr=1e-3`, `--demo`."""
    # allow_abbrev=False: --max_step would otherwise pass for --max_steps, a typo that half-matches two flags
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    helps = field_help()
    for option in fields(VLMConfig):
        text = f"{helps.get(option.name, '')} (default: {option.default!r})".replace("%", "%%").lstrip()
        if option.type is bool:
            parser.add_argument(f"--{option.name}", type=parse_bool, nargs="?", const=True,
                                default=argparse.SUPPRESS, help=text, metavar="true|false")
        else:
            parser.add_argument(f"--{option.name}", type=option.type, default=argparse.SUPPRESS, help=text,
                                metavar=option.type.__name__.upper())
    return vars(parser.parse_args(argv))


if __name__ == "__main__":  # --help and a mistyped flag answer here, in a second, before torch loads below
    parse_args(sys.argv[1:])

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizer threads fight DataLoader workers
expandable_segments(os.environ)  # before torch loads

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (SKIPPED_WHEN_LOADED, LLaVADataset, StreamSampler, collate, encoder_image_size, pack_step, padded_step,
                  start_worker, to_device)
from sources import (IGNORE_INDEX, IMAGE_ERRORS, DataError, check_data_paths, decode_image, first_answer, first_question,
                     image_names, open_data, split_entries, without_long_samples)
from attention import pick_attention, varlen_problem
from model import (ModelConfig, TinyVLM, autocast, find_model_folder, model_folder_problems,
                   image_token_count, pick_compile, pick_device, pick_dtype, runtime_problems)
from memory import (DoesNotFit, Layout, available_memory, describe, fit_micro_batch, fit_shared_memory, rehearse,
                    shared_memory_free, worst_case_batches)
from syncs import no_syncs


# Stage 2 as LLaVA-1.5 finetunes: llava_v1_5_mix665k, global batch 128, lr 2e-5, warmup 3%, cosine, one epoch.
# Packed into rows of up to 512 tokens, with attention per conversation: most token slots hold real tokens
# instead of padding (bench.py --parts packing; docs/measurements.md).
FINETUNE_CONFIG = dict(data_path="data/llava_v1_5_mix665k.json", image_root="data/llava_images", max_length=2048,
                       global_batch=128, pack_length=512, lr=2e-5, lm_lr=2e-5,
                       eval_every=200, save_every=1000)


def resolve_config(overrides: dict, preset: dict | None = None) -> VLMConfig:
    """Defaults, then stage 2's (with --stage finetune), then `preset` (an application's own defaults: the
    demo's), then the model settings of --init_from, then a resumed run's saved config (with --resume), then
    the command line."""
    values = dict(FINETUNE_CONFIG) if overrides.get("stage") == "finetune" else {}
    values.update(preset or {})
    init_from = overrides.get("init_from", values.get("init_from"))
    if init_from:  # the architecture and prompt format are the checkpoint's
        values.update(saved_json("--init_from", lambda: os.path.join(find_model_folder(init_from), "config.json")))
    if overrides.get("resume"):
        values.update(saved_json("--resume", lambda: os.path.join(resumable_checkpoint(overrides["resume"]),
                                                                  "training_config.json")))
    values.update(overrides)
    return VLMConfig(**{k: v for k, v in values.items() if k in VLMConfig.__dataclass_fields__})


def saved_json(setting: str, find_path) -> dict:
    """The JSON file that find_path() locates for a setting; a missing or unreadable one is an error that
    names the setting."""
    try:
        with open(find_path()) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{setting}: {error}") from error


# ----------------------------------------------------------------------------------------------------------
# Checking a config before anything loads

CHOICES = {"stage": ("pretrain", "finetune"), "wandb_mode": ("online", "offline", "disabled")}


def config_problems(cfg: VLMConfig, check_paths: bool = True) -> list[str]:
    """Every problem with cfg that shows before data, weights or workers load, one line each: ranges, choices,
    combinations and, with check_paths, local paths (a hub id is left to the hub)."""
    problems = []

    def need(ok: bool, name: str, what: str):
        if not ok:
            problems.append(f"--{name} {getattr(cfg, name)!r}: {what}")

    for name in ("batch_size", "grad_accum_steps"):
        need(getattr(cfg, name) >= 1 or getattr(cfg, name) == -1, name, "must be 1 or more, or -1 (automatic)")
    for name in ("max_length", "projector_hidden_dim", "pixel_shuffle_factor", "global_batch"):
        need(getattr(cfg, name) >= 1, name, "must be 1 or more")
    need(cfg.val_size >= 1 or bool(cfg.val_data_path), "val_size", "must be 1 or more, or pass --val_data_path")
    for name in ("eval_every", "save_every", "sample_every", "log_every", "num_sample_images",
                 "max_tokens_per_batch", "pack_length"):
        need(getattr(cfg, name) >= 0, name, "must be 0 or more")
    for name in ("max_steps", "warmup_steps", "lr_decay_steps", "num_workers"):
        need(getattr(cfg, name) >= -1, name, "must be 0 or more, or -1 (automatic)")
    for name in ("epochs", "lr", "lm_lr", "grad_clip"):
        need(getattr(cfg, name) > 0, name, "must be more than 0")
    need(cfg.weight_decay >= 0, "weight_decay", "must be 0 or more")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "must be between 0 and 1")
    need(cfg.lora_rank >= 0, "lora_rank", "must be 0 (no LoRA) or more")
    need(cfg.lora_rank == 0 or cfg.stage == "finetune", "lora_rank", "LoRA adapts the LM, which trains in stage 2 only")
    for name, choices in CHOICES.items():
        need(getattr(cfg, name) in choices, name, f"must be one of {', '.join(choices)}")
    problems += runtime_problems(cfg.device, cfg.dtype, cfg.attn_implementation)
    try:
        pick_compile(cfg.compile, torch.device("cpu"))
    except ValueError as error:
        problems.append(f"--compile {cfg.compile!r}: {error}")
    if cfg.stage == "finetune" and not cfg.init_from and not cfg.resume:
        problems.append("--stage finetune: needs --init_from, the stage-1 model or run folder it starts from")
    need(str(cfg.packing) == "auto" or as_bool(str(cfg.packing)) is not None, "packing", "must be auto, true or false")
    if as_bool(str(cfg.packing)) and 0 < cfg.max_tokens_per_batch < cfg.max_length:
        need(False, "max_tokens_per_batch", f"must hold one row of --max_length {cfg.max_length} tokens")
    if not check_paths:
        return problems
    for name in ("vision_model", "language_model"):
        problems += model_folder_problems(name, getattr(cfg, name))
    if cfg.init_from:
        try:
            find_model_folder(cfg.init_from)
        except FileNotFoundError as error:
            problems.append(f"--init_from {cfg.init_from!r}: {error}")
    tokens = local_image_tokens(cfg)
    if isinstance(tokens, str):  # the grid and the factor do not fit (model.image_token_count's words)
        problems.append(f"--{tokens}" if tokens.startswith("pixel_shuffle_factor") else
                        f"--vision_model {cfg.vision_model!r}: {tokens}")
    elif tokens is not None:  # the chat template's turn markers around an image and a one-word answer: ~16 more
        need(cfg.max_length > tokens + 16, "max_length", f"leaves no room for the {tokens} image tokens and a "
             f"prompt: every sample would be skipped (at least {tokens + 17})")
    try:
        check_data_paths(cfg.data_path, cfg.image_root, cfg.val_data_path)
    except FileNotFoundError as error:
        problems.append(f"{error} (--data_path, --image_root, --val_data_path)")
    if os.path.isfile(cfg.image_root) and not cfg.image_root.endswith(".zip"):
        need(False, "image_root", "a file that is not a .zip: give the images' folder or their .zip")
    if not cfg.resume and cfg.run_name and checkpoint_folder(os.path.join(cfg.out_dir, cfg.run_name)):
        need(False, "run_name", f"{os.path.join(cfg.out_dir, cfg.run_name)} already holds a checkpoint: pass --resume "
             f"{os.path.join(cfg.out_dir, cfg.run_name)} to continue it, or another --run_name")
    return problems


def local_image_tokens(cfg: VLMConfig) -> int | str | None:
    """The image tokens per image that cfg's local vision model makes, a problem if its patch grid does not fit
    pixel_shuffle_factor, or None when the model is not a local folder (a hub id: known on loading)."""
    config_path, preprocessing_path = (os.path.join(cfg.vision_model, name)
                                       for name in ("config.json", "preprocessor_config.json"))
    if not (os.path.isfile(config_path) and os.path.isfile(preprocessing_path)) or cfg.pixel_shuffle_factor < 1:
        return None
    with open(config_path) as f, open(preprocessing_path) as g:
        config, preprocessing = json.load(f), json.load(g)
    config = config.get("vision_config", config)
    try:
        return image_token_count(encoder_image_size(preprocessing), config["patch_size"],
                                       cfg.pixel_shuffle_factor)
    except (KeyError, ValueError) as error:
        return str(error)


CPU_BATCH_SIZE = {"pretrain": 64, "finetune": 16}  # batch_size -1 on CPUs (bench.py --parts step)


def packs(cfg: VLMConfig, device: torch.device) -> bool:
    """Whether the run packs its samples (--packing): auto packs on GPUs, where varlen attention makes every
    token slot a real token at flash speed, and in stage 2 on CPUs (instruction conversations vary in length
    far more than captions do)."""
    if str(cfg.packing) == "auto":
        return device.type == "cuda" or cfg.stage == "finetune"
    return bool(as_bool(str(cfg.packing)))


def step_share(cfg: VLMConfig, world_size: int) -> int:
    """The samples each process takes in a step: batch_size x grad_accum_steps, or its part of global_batch."""
    if cfg.batch_size > 0 and cfg.grad_accum_steps > 0:
        return cfg.batch_size * cfg.grad_accum_steps
    return max(1, cfg.global_batch // world_size)


def micro_batch_layout(cfg: VLMConfig, model: TinyVLM, device: torch.device, world_size: int) -> Layout:
    return Layout(packs(cfg, device), model.lm.config._attn_implementation == "varlen", cfg.max_length,
                  step_share(cfg, world_size))


def sizes_automatically(cfg: VLMConfig, device: torch.device) -> bool:
    """Whether this run's micro-batch is chosen for the device's memory: on GPUs (checks_before_training), with
    batch_size -1 (and, packed, max_tokens_per_batch 0)."""
    return (checks_before_training(device) and cfg.batch_size == -1
            and (not packs(cfg, device) or not cfg.max_tokens_per_batch))


def with_micro_batches(cfg: VLMConfig, model: TinyVLM, device: torch.device, dtype: torch.dtype,
                       world_size: int = 1, log=print) -> VLMConfig:
    """cfg with its micro-batches worked out (batch_size and grad_accum_steps of -1, max_tokens_per_batch 0) for
    this device and number of processes, a step of global_batch samples in all. On a GPU, with -1, the largest
    micro-batch whose worst case fits its free memory (memory.fit_micro_batch; one line says what and why): a
    number of samples for padded batches, of token slots for packed ones, where a process's whole step is one
    stream of samples. On CPUs 64 samples (stage 2: 16), and packed micro-batches of batch_size x max_length
    slots."""
    share = step_share(cfg, world_size)
    if sizes_automatically(cfg, device):
        layout = micro_batch_layout(cfg, model, device, world_size)
        size, line = fit_micro_batch(model, layout, device, dtype, *available_memory(device), world_size)
        if dist.is_initialized():  # every process takes the same size: the smallest any chose
            smallest = torch.tensor([size], device=device)
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
            size = int(smallest.item())
        log(line)
        return with_micro_batch_size(cfg, layout, size)
    batch_size = cfg.batch_size if cfg.batch_size > 0 else min(share, CPU_BATCH_SIZE[cfg.stage])
    if cfg.grad_accum_steps > 0 and cfg.batch_size == -1:
        batch_size = max(1, share // cfg.grad_accum_steps)
    grad_accum_steps = cfg.grad_accum_steps if cfg.grad_accum_steps > 0 else max(1, share // batch_size)
    tokens = cfg.max_tokens_per_batch or (batch_size * cfg.max_length if packs(cfg, device) else 0)
    return replace(cfg, batch_size=batch_size, grad_accum_steps=grad_accum_steps, max_tokens_per_batch=tokens)


def with_micro_batch_size(cfg: VLMConfig, layout: Layout, size: int) -> VLMConfig:
    """cfg with micro-batches of `size`: token slots when packed (a process's step then one stream of its
    samples), else samples (the step that many times over)."""
    if layout.packed:
        return replace(cfg, batch_size=layout.samples_per_step, grad_accum_steps=1, max_tokens_per_batch=size)
    return replace(cfg, batch_size=size, grad_accum_steps=max(1, layout.samples_per_step // size))


def checks_before_training(device: torch.device) -> bool:
    """Whether the run checks, before its first step, its attention kernel (varlen against sdpa) and its memory
    (the worst micro-batch run first): on GPUs, where either can fail; the tests turn it on for CPUs."""
    return device.type == "cuda"


def checked_attention(model: TinyVLM, dtype: torch.dtype, log) -> None:
    """varlen attention confirmed on this GPU (attention.varlen_problem), or replaced by sdpa with the block-
    diagonal mask of packed rows, in one line saying why."""
    if model.lm.config._attn_implementation != "varlen":
        return
    problem = varlen_problem(model.lm, dtype)
    if problem:
        model.lm.set_attn_implementation("sdpa")
        log(f"varlen attention: {problem}; packed rows use sdpa with a block-diagonal mask instead")


def after_the_worst_case(cfg: VLMConfig, model: TinyVLM, device: torch.device, dtype: torch.dtype,
                         world_size: int, automatic: bool, log) -> VLMConfig:
    """cfg once the worst micro-batches the run can meet (memory.worst_case_batches) have run a forward and
    backward with AdamW's state held besides: an out-of-memory error comes now, not hours in. Where the size
    was chosen from an estimate, an out-of-memory error halves it, once, and says so; otherwise, or the second
    time, DoesNotFit names the setting to lower. Every process runs it, on its own (no gradient is synced), and
    they agree on the outcome."""
    layout = micro_batch_layout(cfg, model, device, world_size)
    size = original = cfg.max_tokens_per_batch if layout.packed else cfg.batch_size
    setting = "--max_tokens_per_batch" if layout.packed else "--batch_size"
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for attempt in (1, 2):
        out_of_memory = False
        try:
            for batch in worst_case_batches(model, layout, size):
                rehearse(model, batch, device, dtype, trained * 4 * (2 + (world_size > 1)))
        except torch.OutOfMemoryError:
            out_of_memory = True
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if all_reduce_sum(torch.tensor([float(out_of_memory)], device=device)).item() == 0:
            return cfg if size == original else with_micro_batch_size(cfg, layout, size)
        smaller = max(cfg.max_length, size // 2) if layout.packed else size // 2
        if not automatic or attempt == 2 or smaller in (0, size):
            raise DoesNotFit(f"out of memory on the worst micro-batch the run can meet, {describe(layout, size)}: "
                             f"lower {setting} (now {size}) or --max_length (now {cfg.max_length}), or in stage 2 "
                             "set --gradient_checkpointing true or --lora_rank 16")
        log(f"out of memory on the worst micro-batch the run can meet, {describe(layout, size)}: halved to "
            f"{describe(layout, smaller)}")
        size = smaller
    return cfg


def command_line(cfg: VLMConfig) -> list[str]:
    """cfg as main.py's arguments (--field=value), which parse_args reads back into the same config."""
    return [f"--{name}={value}" for name, value in asdict(cfg).items()]


def model_config(cfg: VLMConfig) -> ModelConfig:
    return ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if hasattr(cfg, f.name)})


# ----------------------------------------------------------------------------------------------------------
# Device, precision, distributed


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); under torchrun this joins the process group."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


# ----------------------------------------------------------------------------------------------------------
# Schedule, checkpoints, logs


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """The multiplier of each parameter group's learning rate: linear warmup, then cosine decay to min_ratio
    at decay_steps. A pure function of the step, so the step is all the scheduler state a checkpoint needs."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - min_ratio)


def save_atomically(folder: str, write) -> None:
    """write(tmp_folder), then swap it in for folder. A crash at any point leaves either the old folder or
    the new one whole: the old one is only renamed aside (folder.old) until the new one is in place."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_folder(run_dir: str) -> str | None:
    """The run's last complete checkpoint: checkpoint/, or checkpoint.old/ if a save was cut short."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.isfile(os.path.join(run_dir, name, "training_state.pt")):
            return os.path.join(run_dir, name)
    return None


def resumable_checkpoint(run_dir: str) -> str:
    folder = checkpoint_folder(run_dir)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir} (expected {run_dir}/checkpoint)")
    return folder


def load_training_state(run_dir: str) -> dict:
    """The checkpoint's training state, on the CPU: saved from cuda:0, it would otherwise load onto cuda:0 in
    every process; optimizer.load_state_dict moves each tensor onto its parameter's device."""
    return torch.load(os.path.join(resumable_checkpoint(run_dir), "training_state.pt"), map_location="cpu",
                      weights_only=True)


class Logger:
    """Metrics to the console (a progress bar), to <run>/metrics.jsonl and to W&B, from rank 0 only."""

    def __init__(self, cfg: VLMConfig, run_dir: str, enabled: bool, wandb_id: str | None,
                 resumed_at: int | None = None, max_steps: int | None = None):
        self.enabled, self.run = enabled, None
        self.bar = tqdm(total=max_steps, initial=resumed_at or 0, disable=not enabled, dynamic_ncols=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if enabled and resumed_at is not None:  # forget what was logged after the checkpoint: it is redone
            for path in (self.path, os.path.join(run_dir, "samples.jsonl")):
                if os.path.exists(path):
                    with open(path) as f:
                        kept = [line for line in f if json.loads(line)["step"] <= resumed_at]
                    with open(path, "w") as f:
                        f.writelines(kept)
        if enabled and cfg.wandb_mode != "disabled":
            import wandb

            self.run = wandb.init(project=cfg.wandb_project, name=os.path.basename(run_dir), config=asdict(cfg),
                                  mode=cfg.wandb_mode, dir=run_dir, id=wandb_id, resume="allow")

    @property
    def wandb_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_samples(self, rows: list[dict], images: list, step: int) -> None:
        """Generated captions of fixed held-out images: a W&B table, the console and <run>/samples.jsonl."""
        if not self.enabled:
            return
        with open(os.path.join(os.path.dirname(self.path), "samples.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "samples": rows}) + "\n")
        tqdm.write(f"step {step}: captions of held-out images")
        for row in rows:
            tqdm.write(f"  {row['image']}: {row['generated']!r} (reference: {row['reference']!r})")
        if self.run is not None:
            import wandb

            columns = ["image", "prompt", "reference", "generated"]
            table = wandb.Table(columns=columns, data=[[wandb.Image(image), *(row[c] for c in columns[1:])]
                                                       for row, image in zip(rows, images)])
            self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        self.bar.close()
        if self.run is not None:
            self.run.finish()


# ----------------------------------------------------------------------------------------------------------
# Training


def load_data(cfg: VLMConfig, processor, log) -> tuple[LLaVADataset, LLaVADataset]:
    """Train and validation datasets. Entries that cannot be trained on are skipped and counted here, at
    start-up, those longer than max_length tokens among them (every entry is tokenized once, sources.tokenize);
    samples whose image turns out bad are skipped and counted as they are loaded. Under torchrun the first
    process builds the caches while the others wait, then they read them."""
    require_image = cfg.stage == "pretrain"  # stage 2 mixes text-only samples in, as LLaVA-1.5 does
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()

    def opened(data_path: str, split: str):
        return open_data(data_path, cfg.image_root, require_image, cfg.data_subset, split, processor)

    entries, images, skipped, examples = opened(cfg.data_path, cfg.data_split)
    if cfg.val_data_path:
        val, val_images, val_skipped, _ = opened(cfg.val_data_path, cfg.val_data_split)
        train = entries
        skipped.update({f"val {reason}": n for reason, n in val_skipped.items()})
    else:
        (train, val), val_images = split_entries(entries, held_out_count(cfg, len(entries), log), cfg.seed), images
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()
    train, too_long = without_long_samples(train, cfg.max_length)
    val, val_too_long = without_long_samples(val, cfg.max_length)
    skipped.update({reason: n for reason, n in (("too long", too_long), ("val too long", val_too_long)) if n})
    if skipped:
        log(f"{cfg.data_path}: skipped {sum(skipped.values())} entries {dict(skipped)}, e.g. {examples}")
    if not len(train):
        raise DataError(f"{cfg.data_path}: nothing to train on: every entry was skipped {dict(skipped)}; "
                        f"{what_to_change(cfg, skipped)}")
    datasets = [LLaVADataset(train, images, processor, cfg.max_length),
                LLaVADataset(val, val_images, processor, cfg.max_length)]
    return datasets[0], datasets[1], skipped


def held_out_count(cfg: VLMConfig, num_entries: int, log) -> int:
    """How many of data_path's entries to hold out for validation: val_size, or a tenth of a set too small for
    the default val_size (a set of your own images, say). A val_size that was asked for and does not fit is an
    error naming the setting."""
    if cfg.val_size < num_entries:
        return cfg.val_size
    if num_entries < 2:
        raise DataError(f"{cfg.data_path}: {num_entries} usable entry: too few to hold one out; pass --val_data_path")
    if cfg.val_size != VLMConfig.val_size:
        raise DataError(f"--val_size {cfg.val_size}: {cfg.data_path} has {num_entries} usable entries; pass a "
                        "smaller --val_size or a --val_data_path")
    count = max(1, num_entries // 10)
    log(f"{cfg.data_path}: {num_entries} entries, fewer than val_size {cfg.val_size}: {count} held out for "
        "validation (--val_size sets it)")
    return count


def what_to_change(cfg: VLMConfig, skipped: dict) -> str:
    """Advice for a run whose samples are all skipped, from the reason that skipped most of them."""
    reason = max(skipped, key=skipped.get) if skipped else ""
    if "too long" in reason:
        return f"raise --max_length (now {cfg.max_length}) or shorten the conversations"
    if "image" in reason:
        return "check --image_root (the images' folder or .zip) against the entries' image paths"
    return "see the examples above, and --data_path"


def idle_batch(model: TinyVLM) -> dict:
    """One sample with an image and no target: the forward and backward a process runs when every sample of
    its micro-batches was skipped, so that DistributedDataParallel's all-reduce still gets its gradients
    (zeros) from it and the other processes do not wait forever."""
    processor = model.processor
    input_ids = [processor.image_token_id] * model.num_image_tokens + [processor.end_of_turn_id]
    pixels = torch.zeros((3, *processor.image_size), dtype=torch.uint8)
    return collate([{"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids), "pixels": pixels}],
                   processor.tokenizer.pad_token_id, processor.image_token_id)


def forward_backward(trainer, micro_batches: list, device, dtype, scaler, world_size: int = 1) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step over its micro-batches, on every process; `trainer`
    is the model, or the model in DistributedDataParallel, which averages the gradients across processes
    in the last micro-batch's backward pass (no_sync before it).

    Each micro-batch's summed loss is divided by the number of target tokens in the whole step, across
    all micro-batches and processes, and multiplied by world_size to undo DDP's average, so every target
    token weighs the same: 4 micro-batches of 2 give the gradient of one batch of 8, and N processes the
    gradient of their global batch. The target tokens were counted on the host, in collate; across
    processes they are summed on the device. Nothing is read back: returns this process's summed loss, on
    the device."""
    local_targets = sum(b["num_targets"] for b in micro_batches)
    if dist.is_initialized():  # a fill with a host number and an all-reduce: queued, not waited for
        num_targets = all_reduce_sum(torch.full((), float(local_targets), device=device)).clamp(min=1)
    else:
        num_targets = max(local_targets, 1)
    model = trainer.module if isinstance(trainer, DistributedDataParallel) else trainer
    batches = [b for b in micro_batches if b["input_ids"].numel()]  # drop those whose samples were all skipped
    if not batches and isinstance(trainer, DistributedDataParallel):
        batches = [idle_batch(model)]
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last or trainer is model else trainer.no_sync():
            with autocast(device, dtype):
                batch_loss = trainer(**to_device(batch, device))
                if batch["pixels"] is None and trainer is not model:  # text only (stage 2): the projector
                    # gets zero gradients, so that DDP need not search the graph for unused parameters each step
                    batch_loss = batch_loss + 0.0 * sum(p.sum() for p in model.projector.parameters())
            scaler.scale(batch_loss * world_size / num_targets).backward()
        loss_sum += batch_loss.detach()
    return loss_sum


def readable_images(dataset: LLaVADataset, count: int) -> tuple[list[dict], list]:
    """The first `count` entries of dataset whose image can be read, and their images."""
    entries, images = [], []
    for entry in dataset.entries:
        if len(entries) == count:
            break
        names = image_names(entry)
        if not names or len(names) > 1:  # samples to caption show one image each
            continue
        try:
            images.append(decode_image(dataset.images.read(names[0])))
            entries.append(dict(entry, image=names[0]))
        except IMAGE_ERRORS:
            continue
    return entries, images


def caption_samples(model, entries: list[dict], images: list, device, dtype) -> list[dict]:
    """Greedy answers to each entry's own first question: what training-time sampling logs."""
    prompts = [first_question(entry) for entry in entries]
    model.eval()
    with autocast(device, dtype):
        answers = model.generate(images, prompts, max_new_tokens=48)
    model.train()
    return [{"image": e["image"], "prompt": p, "reference": first_answer(e), "generated": a}
            for e, p, a in zip(entries, prompts, answers)]


@torch.no_grad()
def evaluate(model, loader, device, dtype) -> float:
    """Mean loss per target token over the whole loader (summed over processes). Eagerly: in eval mode and
    without gradients a compiled region would compile graphs of its own, for a pass every eval_every steps."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, target tokens)
    with torch.compiler.set_stance("force_eager"):
        for batch in loader:
            if batch["input_ids"].numel() == 0:
                continue
            with autocast(device, dtype):
                totals[0] += model(**to_device(batch, device)).double()
            totals[1] += batch["num_targets"]
    all_reduce_sum(totals)
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def build_model(cfg: VLMConfig, device: torch.device, dtype: torch.dtype) -> TinyVLM:
    """The model to train, with what it trains marked requires_grad. Frozen encoders are held in the run's
    dtype (bf16 on a modern GPU): they are never updated, so float32 copies would only cost memory and
    bandwidth. Trained weights (the projector; in stage 2 the language model too) are float32 under autocast.
    With init_from, the weights it holds are loaded; otherwise the projector starts from cfg.seed."""
    torch.manual_seed(cfg.seed)  # the projector's initial weights
    frozen_dtype = dtype if dtype != torch.float16 else torch.float32  # fp16 weights would need loss scaling
    # the LM trains in float32 in stage 2; with LoRA only the adapters train (in float32) and the LM stays frozen
    lm_dtype = torch.float32 if cfg.stage == "finetune" and not cfg.lora_rank else frozen_dtype
    attention = pick_attention(cfg.attn_implementation, device, packs(cfg, device))
    if cfg.init_from:
        model = TinyVLM.from_pretrained(find_model_folder(cfg.init_from), frozen_dtype, attention, lm_dtype)
    else:
        model = TinyVLM.from_config(model_config(cfg), frozen_dtype, None, attention, lm_dtype)
    if cfg.stage == "finetune" and cfg.lora_rank:
        model.config = replace(model.config, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
        if not any("lora_" in name for name, _ in model.lm.named_parameters()):  # a LoRA stage 2 resumed has them
            model.add_lora()
    elif cfg.stage == "finetune":
        model.lm.requires_grad_(True)
    if cfg.stage == "finetune":
        if cfg.gradient_checkpointing:
            model.checkpoint_language_model()
    elif cfg.stage != "pretrain":
        raise ValueError(f"stage must be pretrain or finetune, got {cfg.stage!r}")
    model = model.to(device)
    backend = pick_compile(cfg.compile, device)
    if backend:
        model.compile_regions(backend)
    return model


def build_optimizer(cfg: VLMConfig, model: TinyVLM, device: torch.device) -> torch.optim.AdamW:
    """AdamW over what trains: the projector at lr and, in stage 2, the language model at lm_lr. Each group's
    base_lr is scaled by the schedule every step. Fused (one kernel for all parameters) on CUDA and CPUs: its
    step counts stay on the device, where the unfused AdamW would read them on the host."""
    groups = [{"params": list(model.projector.parameters()), "base_lr": cfg.lr}]
    if cfg.stage == "finetune":
        groups.append({"params": [p for p in model.lm.parameters() if p.requires_grad], "base_lr": cfg.lm_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                             fused=True if device.type in ("cuda", "cpu") else None)


def build_loaders(cfg: VLMConfig, train_set, val_set, processor, position: int, rank: int, world_size: int,
                  device: torch.device, one_row: bool = False, log=print) -> tuple[DataLoader, DataLoader]:
    """The endless training stream from `position` on, and this process's share of the validation set. One
    item of the stream is this process's whole share of a step, cut into micro-batches by length (padded)
    or packed (one row each under varlen attention, one_row; rows of pack_length under a mask); its samples
    are this process's slices of each global micro-batch. The workers' items in flight are kept within
    /dev/shm (memory.fit_shared_memory)."""
    tokens = dict(pad_token_id=processor.tokenizer.pad_token_id, image_token_id=processor.image_token_id)
    packed = packs(cfg, device)
    if packed:
        step_collate = partial(pack_step, row_length=cfg.max_length, max_tokens_per_batch=cfg.max_tokens_per_batch,
                               fill_length=cfg.max_tokens_per_batch if one_row else cfg.pack_length, **tokens)
    else:
        step_collate = partial(padded_step, batch_size=cfg.batch_size, **tokens)
    share = cfg.batch_size * cfg.grad_accum_steps
    item_bytes = share * (3 * math.prod(processor.image_size) + 4 * 8 * cfg.max_length)  # pixels, ids, labels, ...
    workers, prefetch, line = fit_shared_memory(data_workers(cfg.num_workers), item_bytes, shared_memory_free())
    if line:
        log(line)
    options = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=start_worker)
    sampler = StreamSampler(len(train_set), cfg.seed, position, cfg.batch_size, rank, world_size)
    train_loader = DataLoader(train_set, sampler=sampler, batch_size=share, collate_fn=step_collate,
                              persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None, **options)
    val_subset = torch.utils.data.Subset(val_set, list(range(rank, len(val_set), world_size)))
    # validation runs without gradients, padded: as many samples as a training micro-batch holds at their longest
    val_batch = max(1, cfg.max_tokens_per_batch // cfg.max_length) if packed else cfg.batch_size
    return train_loader, DataLoader(val_subset, batch_size=val_batch, collate_fn=partial(collate, **tokens), **options)


def data_workers(requested: int) -> int:
    """DataLoader workers: as requested, or for -1 the cores this process may use less one (the main process
    drives the device), divided among the processes torchrun started on this machine."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def wrapped_for_ddp(model: TinyVLM, device: torch.device):
    """The module the loop calls: under torchrun, the model in DistributedDataParallel, which syncs only the
    parameters that train (a text-only micro-batch still gives the projector a gradient: forward_backward)."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


@dataclass
class Progress:
    """Where a run stands: with the weights, the optimizer and the GradScaler, what a checkpoint holds."""

    step: int = 0
    position: int = 0  # samples of the training stream consumed, by all processes together
    best_val_loss: float = float("inf")
    skipped_samples: torch.Tensor = field(  # this process's samples skipped while loading, by reason
        default_factory=lambda: torch.zeros(len(SKIPPED_WHEN_LOADED), dtype=torch.float64))
    wandb_id: str = ""
    saved_at: int = -1  # the step of the last checkpoint

    def count_skipped(self, micro_batches: list) -> None:
        for batch in micro_batches:
            for reason, count in batch["skipped"].items():
                self.skipped_samples[SKIPPED_WHEN_LOADED.index(reason)] += count


@dataclass
class Interval:
    """What the steps since the last log add up to: the loss summed on the device (read back only when it is
    logged) and, counted on the host, target tokens, tokens, samples and the time."""

    device: torch.device
    loss_sum: torch.Tensor = None
    targets: int = 0
    tokens: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss_sum: torch.Tensor, micro_batches: list) -> None:
        self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum
        self.targets += sum(b["num_targets"] for b in micro_batches)
        self.tokens += sum(b["num_tokens"] for b in micro_batches)
        self.samples += sum(b["num_samples"] for b in micro_batches)

    def totals(self) -> tuple[float, float, float, float]:
        """(mean loss per target token, tokens, samples, seconds), summed over processes: reads the device."""
        counts = torch.tensor([self.targets, self.tokens, self.samples], dtype=torch.float64).to(self.device)
        sums = all_reduce_sum(torch.cat([self.loss_sum.double().view(1), counts])).tolist()
        return sums[0] / max(sums[1], 1), sums[2], sums[3], time.perf_counter() - self.start


def log_training(cfg: VLMConfig, logger, progress: Progress, interval: Interval, grad_norm: torch.Tensor,
                 lr_scale: float, skipped_entries: dict, device: torch.device) -> None:
    """The training metrics of the steps since the last log, summed over all processes; rank 0 writes them.
    Steps that held no sample at all, in all processes, stop the run: log_every steps in a row with every
    sample skipped means the data is broken, not unlucky, and a run that goes on would train on nothing."""
    loss, tokens, samples, seconds = interval.totals()
    skipped_loading = all_reduce_sum(progress.skipped_samples.to(device, copy=True)).tolist()
    if samples == 0:
        counts = {reason: int(n) for reason, n in zip(SKIPPED_WHEN_LOADED, skipped_loading) if n}
        raise DataError(f"{cfg.data_path}: the steps up to step {progress.step} held no sample to train on, every "
                        f"one was skipped while loading {counts}; {what_to_change(cfg, counts)}")
    metrics = {"train/loss": loss, "train/lr": cfg.lr * lr_scale, "train/grad_norm": grad_norm.item(),
               **({"train/lm_lr": cfg.lm_lr * lr_scale} if cfg.stage == "finetune" else {}),
               "train/samples_per_s": samples / seconds, "train/tokens_per_s": tokens / seconds,
               **{f"data/skipped {reason}": n for reason, n in skipped_entries.items()},
               **{f"data/skipped {reason}": n for reason, n in zip(SKIPPED_WHEN_LOADED, skipped_loading) if n}}
    logger.log(metrics, progress.step)
    logger.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{cfg.lr * lr_scale:.2e}", samples_per_s=f"{samples / seconds:.1f}")


def save_checkpoint(run_dir: str, cfg: VLMConfig, model: TinyVLM, optimizer, scaler, progress: Progress,
                    device: torch.device, is_main: bool) -> None:
    """<run>/checkpoint, written atomically by rank 0 (every process joins the skip-count sum): the trained
    weights as save_pretrained writes them, training_state.pt and training_config.json."""
    progress.saved_at = progress.step
    state = {
        "step": progress.step, "position": progress.position, "best_val_loss": progress.best_val_loss,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "skipped_samples": all_reduce_sum(progress.skipped_samples.to(device, copy=True)).cpu(),
        "rng_cpu": torch.get_rng_state(), "wandb_id": progress.wandb_id,
        "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.tensor([]),
    }

    def write(folder):
        model.save_pretrained(folder, save_language_model=cfg.stage == "finetune")
        torch.save(state, os.path.join(folder, "training_state.pt"))
        with open(os.path.join(folder, "training_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    if is_main:
        save_atomically(os.path.join(run_dir, "checkpoint"), write)
        tqdm.write(f"step {progress.step}: saved {run_dir}/checkpoint")


def restore_checkpoint(run_dir: str, model: TinyVLM, optimizer, scaler, device: torch.device, rank: int) -> Progress:
    """Load a run's last checkpoint into the model, optimizer, GradScaler and RNGs; return its progress. The
    learning rates stay this config's, not the saved ones."""
    state = load_training_state(run_dir)
    model.load_weights(checkpoint_folder(run_dir))
    base_lrs = [group["base_lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])  # moves the state onto each parameter's device
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["base_lr"] = base_lr
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and len(state["rng_cuda"]):
        torch.cuda.set_rng_state(state["rng_cuda"])
    progress = Progress(step=state["step"], position=state["position"], best_val_loss=state["best_val_loss"],
                        wandb_id=state["wandb_id"], saved_at=state["step"])
    if rank == 0:  # the sum over all processes was saved: rank 0 carries it on, the others start from zero
        progress.skipped_samples = state["skipped_samples"]
    return progress


def new_run_folder(cfg: VLMConfig) -> str:
    default_name = ("stage1" if cfg.stage == "pretrain" else "stage2") + time.strftime("-%Y%m%d-%H%M%S")
    run_dir = cfg.resume or os.path.join(cfg.out_dir, cfg.run_name or default_name)
    if not cfg.resume and checkpoint_folder(run_dir):
        raise FileExistsError(f"{run_dir} already holds a checkpoint: pass --resume {run_dir} to continue it, "
                              "or choose another --run_name")
    return run_dir


def catch_stop_signals() -> tuple[list, dict]:
    """SIGINT and SIGTERM append to the returned list instead of killing the run: the loop saves and stops at
    the end of the step. Returns the list and the handlers to put back."""
    stop_signals = []
    handlers = {s: signal.signal(s, lambda signum, _: stop_signals.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    return stop_signals, handlers


def train(cfg: VLMConfig, model: TinyVLM, device: torch.device, dtype: torch.dtype, rank: int = 0,
          world_size: int = 1) -> str:
    """The training loop. Returns the run folder."""
    is_main = rank == 0
    log = tqdm.write if is_main else (lambda text: None)
    run_dir = new_run_folder(cfg)
    checking = checks_before_training(device)
    if checking:
        checked_attention(model, dtype, log)
    automatic = sizes_automatically(cfg, device)
    cfg = with_micro_batches(cfg, model, device, dtype, world_size, log)
    if checking:
        cfg = after_the_worst_case(cfg, model, device, dtype, world_size, automatic, log)
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        log("config:\n" + json.dumps(asdict(cfg), indent=2))
    train_set, val_set, skipped_entries = load_data(cfg, model.processor, log)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * world_size
    max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * len(train_set) / global_batch)
    decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps > 0 else max_steps
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps >= 0 else math.ceil(0.03 * decay_steps)

    optimizer = build_optimizer(cfg, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    progress = Progress()
    if cfg.resume:
        progress = restore_checkpoint(run_dir, model, optimizer, scaler, device, rank)
        log(f"resumed {run_dir} at step {progress.step} (sample {progress.position})")
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, model.processor, progress.position, rank,
                                             world_size, device, model.lm.config._attn_implementation == "varlen", log)
    log(f"data: {len(train_set)} training and {len(val_set)} validation samples, {train_loader.num_workers} "
        f"DataLoader workers per process, steps of {cfg.batch_size} x {cfg.grad_accum_steps} x {world_size}")
    trainer = wrapped_for_ddp(model, device)
    logger = Logger(cfg, run_dir, is_main, progress.wandb_id or None, progress.step if cfg.resume else None,
                    max_steps)
    progress.wandb_id = logger.wandb_id or ""
    sample_entries, sample_images = (readable_images(val_set, cfg.num_sample_images)
                                     if is_main and cfg.sample_every > 0 else ([], []))
    if progress.step == 0 and sample_entries:  # what the model says before it learns anything
        logger.log_samples(caption_samples(model, sample_entries, sample_images, device, dtype), sample_images, 0)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    stop_signals, previous_handlers = catch_stop_signals()
    interval = Interval(device)
    model.train()
    batches = iter(train_loader)
    try:
        while progress.step < max_steps:
            step = progress.step + 1
            # the periodic work this step does, besides training
            periodic = {name: every > 0 and (step % every == 0 or step == max_steps) for name, every in (
                ("log", cfg.log_every), ("eval", cfg.eval_every), ("sample", cfg.sample_every),
                ("save", cfg.save_every))}
            # ---- one training step (every process). The host takes this process's share of the step, its
            # micro-batches collated and counted by the workers; the device runs forward, backward, clip and
            # AdamW, and nothing is read back on a step that logs nothing (check_syncs makes sure)
            micro_batches = next(batches)
            progress.position += global_batch
            progress.count_skipped(micro_batches)
            # the first step compiles and warms up (work done once, which may wait for the device), and under
            # DistributedDataParallel the second rebuilds its gradient buckets, reading their order back; from
            # then on, a step that logs nothing must not wait for the device
            first_checked = 3 if dist.is_initialized() else 2
            with no_syncs(device, cfg.check_syncs and step >= first_checked and not any(periodic.values())):
                lr_scale = lr_factor(progress.step, warmup_steps, decay_steps, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_scale
                loss_sum = forward_backward(trainer, micro_batches, device, dtype, scaler, world_size)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                interval.add(loss_sum, micro_batches)
                progress.step = step
                logger.bar.update(1)

            # ---- log the training metrics (every process adds its part; rank 0 writes)
            if periodic["log"]:
                log_training(cfg, logger, progress, interval, grad_norm, lr_scale, skipped_entries, device)
            # ---- evaluate and keep the best model (every process evaluates its share; rank 0 saves best/)
            if periodic["eval"]:
                val_loss = evaluate(model, val_loader, device, dtype)
                logger.log({"val/loss": val_loss}, step)
                log(f"step {step}: val loss {val_loss:.4f}")
                if val_loss < progress.best_val_loss:
                    progress.best_val_loss = val_loss
                    if is_main:
                        save_atomically(os.path.join(run_dir, "best"), partial(
                            model.save_pretrained, save_language_model=cfg.stage == "finetune"))
            # ---- caption the held-out images (rank 0)
            if periodic["sample"] and sample_entries:
                rows = caption_samples(model, sample_entries, sample_images, device, dtype)
                logger.log_samples(rows, sample_images, step)
            # ---- save a checkpoint (every process adds its skip counts; rank 0 writes)
            if periodic["save"]:
                save_checkpoint(run_dir, cfg, model, optimizer, scaler, progress, device, is_main)
            if periodic["log"]:  # the next interval's clock starts after this step's periodic work
                interval = Interval(device)
            # ---- stop on SIGINT or SIGTERM: one process at once, several together at a logging step
            if world_size == 1:
                stopping = bool(stop_signals)
            else:
                stopping = periodic["log"] and all_reduce_sum(torch.tensor([len(stop_signals)], device=device)).item() > 0
            if stopping and step < max_steps:
                log(f"stop requested: checkpoint at step {step}; resume with --resume {run_dir}")
                if progress.saved_at != step:
                    save_checkpoint(run_dir, cfg, model, optimizer, scaler, progress, device, is_main)
                break
    finally:
        logger.finish()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    return run_dir


def main(argv: list[str]) -> None:
    overrides = parse_args(argv)
    if overrides.get("demo"):  # the demo is an application of this file, not a part of it: hand over to it
        os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"),
                                  *argv])
    transformers.utils.logging.disable_progress_bar()  # one bar per loaded file otherwise
    try:
        cfg = resolve_config(overrides)
    except (OSError, ValueError) as error:  # --resume or --init_from naming something unusable
        exit_if_problems("main.py", [str(error)])
    exit_if_problems("main.py", config_problems(cfg))  # before a minute of loading weights and data
    rank, world_size, local_rank = setup_distributed()
    device = pick_device(cfg.device, local_rank)
    dtype = pick_dtype(cfg.dtype, device)
    try:
        model = build_model(cfg, device, dtype)
        train(cfg, model, device, dtype, rank, world_size)
    except (DataError, DoesNotFit) as error:  # the message says which file or setting
        print(f"main.py: error: {error}", file=sys.stderr)
        sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
