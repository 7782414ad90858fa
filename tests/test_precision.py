"""Training in the dtype a GPU trains in: frozen weights in bf16, what trains in float32 under bf16 autocast.
Every stage and layout, on any CPU (the models are tiny, so bf16 without hardware support is fast enough):
what trains is float32, every weight with a gradient moves in one step at the default learning rates (in bf16
an AdamW step of 2e-5 is below half a rounding step of most weights), and the loss falls."""

import dataclasses
import json

import pytest
import torch
from helpers import CPU

from data import LLaVADataset, pack_step, padded_step
from main import FINETUNE_CONFIG, VLMConfig, build_model, build_optimizer, forward_backward
from sources import open_image_source

CASES = {  # name: (stage, packing, attention, LoRA rank); several seconds each where bf16 is emulated
    "stage 1": ("pretrain", "false", "eager", 0),
    "stage 1 packed, varlen": ("pretrain", "true", "varlen", 0),
    "stage 2": ("finetune", "true", "sdpa_varlen", 0),
    "stage 2 with LoRA": ("finetune", "true", "varlen", 16),
}


def micro_batches(cfg: VLMConfig, model, count: int) -> list[dict]:
    """The first `count` samples of cfg's data as one step, padded or packed as cfg says."""
    entries = json.load(open(cfg.data_path))[:count]
    dataset = LLaVADataset(entries, open_image_source(cfg.image_root), model.processor, cfg.max_length)
    samples = [dataset[i] for i in range(count)]
    tokens = dict(pad_token_id=model.processor.tokenizer.pad_token_id, image_token_id=model.image_token_id)
    if cfg.packing == "true":
        return pack_step(samples, cfg.max_length, 4 * cfg.max_length, fill_length=4 * cfg.max_length, **tokens)
    return padded_step(samples, 4, **tokens)


@pytest.mark.parametrize("case", [pytest.param(case, marks=[] if "LoRA" in case else pytest.mark.slow) for case in CASES])
def test_in_bf16_what_trains_is_float32_moves_at_the_default_learning_rates_and_the_loss_falls(
        case, tiny_config, finetune_config):
    stage, packing, attention, lora_rank = CASES[case]
    defaults = FINETUNE_CONFIG if stage == "finetune" else {}
    cfg = dataclasses.replace(finetune_config if stage == "finetune" else tiny_config, packing=packing,
                              attn_implementation=attention, lora_rank=lora_rank, dtype="bfloat16",
                              lr=defaults.get("lr", VLMConfig.lr), lm_lr=defaults.get("lm_lr", VLMConfig.lm_lr))
    model = build_model(cfg, CPU, torch.bfloat16)
    assert model.vision.dtype == torch.bfloat16
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.float32}
    assert any("lora_A" in name for name in trained) == bool(lora_rank)
    optimizer = build_optimizer(cfg, model, CPU)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"]
    batches = micro_batches(cfg, model, 8)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    targets = sum(b["num_targets"] for b in batches)
    losses, had_gradient = [], set()
    model.train()
    for _ in range(3):
        before = {name: p.detach().clone() for name, p in trained.items()}
        losses.append(forward_backward(model, batches, CPU, torch.bfloat16, scaler).item() / targets)
        gradients = {name: p.grad != 0 for name, p in trained.items() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, nonzero in gradients.items():
            if nonzero.any():  # LoRA's A has none in the first step: B starts at zero
                had_gradient.add(name)
                moved = (trained[name].detach() != before[name])[nonzero].float().mean().item()
                assert moved > 0.99, (name, moved)
    assert had_gradient == set(trained)
    assert losses[-1] < losses[0], losses
