"""Stage 2: the projector and the language model train on multi-turn and text-only conversations."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from data import collate
from main import build_model, forward_backward, train
from model import TinyVLM
from helpers import CPU, assert_same_updates, initial_weights, samples, shape_images, torchrun


def run(cfg):
    model = build_model(cfg, CPU, torch.float32)
    return model, train(cfg, model, CPU, torch.float32)


def test_instruction_data_has_multi_turn_and_text_only_conversations(instruct_data):
    entries = json.load(open(f"{instruct_data}/instruct.json"))
    text_only = [e for e in entries if "image" not in e]
    multi_turn = [e for e in entries if len(e["conversations"]) > 2]
    assert text_only and multi_turn
    for entry in multi_turn:
        assert "<image>" in entry["conversations"][0]["value"]
        assert all("<image>" not in turn["value"] for turn in entry["conversations"][1:])


@pytest.mark.slow
def test_stage2_starts_from_stage1_and_trains_projector_and_language_model_not_vision(finetune_config,
                                                                                      stage1_model):
    model = build_model(finetune_config, CPU, torch.float32)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    stage1 = load_file(os.path.join(stage1_model, "projector.safetensors"))
    assert all(torch.equal(start[f"projector.{k}"], v) for k, v in stage1.items())
    train(finetune_config, model, CPU, torch.float32)
    for name, p in model.named_parameters():
        if name.startswith("vision."):
            assert torch.equal(start[name], p), name
    for prefix in ("projector.", "lm.model.layers.0.mlp", "lm.model.embed_tokens"):
        assert any(not torch.equal(start[n], p) for n, p in model.named_parameters() if n.startswith(prefix))


def test_text_only_samples_train_in_the_same_batches_as_image_samples(finetune_config):
    model = build_model(finetune_config, CPU, torch.float32)
    entries = json.load(open(finetune_config.data_path))
    from data import LLaVADataset
    from sources import open_image_source
    dataset = LLaVADataset([e for e in entries if "image" not in e][:1] + [e for e in entries if "image" in e][:2],
                           open_image_source(finetune_config.image_root), model.processor)
    batch = collate([dataset[i] for i in range(3)], model.processor.tokenizer.pad_token_id)
    assert batch["pixels"].shape[0] == 2 and batch["input_ids"].shape[0] == 3
    loss = forward_backward(model, [batch], CPU, torch.float32, torch.amp.GradScaler("cpu", enabled=False))
    assert torch.isfinite(loss)
    assert model.projector.gate.weight.grad.abs().sum() > 0 and model.lm.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_stage2_save_load_and_generate_round_trip(finetune_config, instruct_data):
    model, run_dir = run(finetune_config)
    folder = os.path.join(run_dir, "checkpoint")
    assert os.path.isfile(os.path.join(folder, "language_model", "model.safetensors"))
    loaded = TinyVLM.from_pretrained(folder, attn_implementation="eager")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    images = shape_images(instruct_data, 2)
    assert model.eval().generate(images, "What colour is it?", max_new_tokens=5) == \
        loaded.eval().generate(images, "What colour is it?", max_new_tokens=5)


@pytest.mark.slow
def test_stage2_resume_is_exact(finetune_config):
    straight = run(dataclasses.replace(finetune_config, run_name="straight", max_steps=4, lr_decay_steps=4))[1]
    run(dataclasses.replace(finetune_config, run_name="halves", max_steps=2, lr_decay_steps=4))
    halves = run(dataclasses.replace(finetune_config, run_name="halves", max_steps=4, lr_decay_steps=4,
                                     resume=os.path.join(finetune_config.out_dir, "halves")))[1]
    for name in ("projector.safetensors", "language_model/model.safetensors"):
        a = load_file(os.path.join(straight, "checkpoint", name))
        b = load_file(os.path.join(halves, "checkpoint", name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_gradient_checkpointing_gives_the_same_gradients(finetune_config):
    grads = []
    for checkpointing in (False, True):
        cfg = dataclasses.replace(finetune_config, gradient_checkpointing=checkpointing)
        model = build_model(cfg, CPU, torch.float32).train()
        switch = "is_activation_checkpointing"  # transformers >= 5.2x; "is_gradient_checkpointing" before
        assert getattr(model.lm, switch if hasattr(model.lm, switch) else "is_gradient_checkpointing") == checkpointing
        batch = collate(samples(model, 4), model.processor.tokenizer.pad_token_id)
        forward_backward(model, [batch], CPU, torch.float32, torch.amp.GradScaler("cpu", enabled=False))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.slow
def test_stage2_under_torchrun_with_a_text_only_micro_batch(finetune_config, tmp_path):
    """Batch 1 per process and 2 micro-batches per step: some micro-batches give one process a text-only
    sample (no image, the projector unused) while the other has an image. Two processes must agree with one
    process of batch 2. The first two steps log nothing, and read nothing back from the device
    (check_syncs), all-reduce included."""
    entries = json.load(open(finetune_config.data_path))
    images = [e for e in entries if "image" in e][:6]
    texts = [e for e in entries if "image" not in e][:2]
    (tmp_path / "mixed.json").write_text(json.dumps(images + texts))
    cfg = dataclasses.replace(finetune_config, data_path=str(tmp_path / "mixed.json"), max_steps=3, eval_every=3,
                              save_every=3, log_every=3, sample_every=0, check_syncs=True, packing="false",
                              grad_accum_steps=2)  # no_sync, then the all-reduce
    one = run(dataclasses.replace(cfg, run_name="one", batch_size=2))[1]
    two = torchrun(dataclasses.replace(cfg, run_name="two", batch_size=1), processes=2)
    for part, name in (("projector", "projector.safetensors"), ("lm", "language_model/model.safetensors")):
        assert_same_updates(initial_weights(cfg, part), load_file(os.path.join(one, "checkpoint", name)),
                            load_file(os.path.join(two, "checkpoint", name)))
