"""Stage 2 with LoRA (peft): only the adapters and the projector train, a checkpoint holds the adapters and not
the language model, resume is exact, and a loaded or exported model computes what the trained one did."""

import dataclasses
import os

import pytest
import torch
from helpers import CPU, assert_answers_like_tinyvlm, checkpoint_weights, run, samples, straight_and_resumed

from data import collate
from main import build_model
from model import TinyVLM, find_model_folder


@pytest.fixture
def lora_config(finetune_config):
    return dataclasses.replace(finetune_config, lora_rank=4, max_steps=4, lr_decay_steps=4, eval_every=2,
                               save_every=2, lr=1e-2, lm_lr=1e-2)


def test_only_the_adapters_and_the_projector_train(lora_config):
    model = build_model(lora_config, CPU, torch.float32)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith("projector.") or "lora_" in name for name in trained)
    assert any(".q_proj.lora_A." in name for name in trained) and any(".down_proj.lora_B." in name for name in trained)
    run_dir = run(lora_config)
    folder = find_model_folder(run_dir)
    assert os.listdir(os.path.join(folder, "language_model")) == ["adapters.safetensors"]  # the base LM is not copied
    loaded = TinyVLM.from_pretrained(folder)
    base = build_model(dataclasses.replace(lora_config, lora_rank=0), CPU, torch.float32)  # the LM it started from
    adapted = {k.replace(".base_layer.", "."): v for k, v in loaded.lm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(adapted[name], weight) for name, weight in base.lm.state_dict().items())
    assert any(p.abs().sum() > 0 for n, p in loaded.lm.named_parameters() if "lora_B" in n)  # B left 0: it trained


@pytest.mark.slow
def test_lora_resume_is_exact(lora_config):
    straight, resumed = straight_and_resumed(lora_config, first_steps=2)
    a, b = checkpoint_weights(straight), checkpoint_weights(resumed)
    assert set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_the_merged_language_model_computes_what_the_adapted_one_does(lora_config):
    """What export.py writes: the adapters merged into a plain model of the LM's class."""
    model = TinyVLM.from_pretrained(find_model_folder(run(lora_config)))
    batch = collate(samples(model, 3), model.processor.tokenizer.pad_token_id, model.image_token_id)
    input_ids = batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, 0)
    base = build_model(dataclasses.replace(lora_config, lora_rank=0), CPU, torch.float32).lm
    with torch.no_grad():
        adapted, before = model.lm(input_ids=input_ids).logits, base(input_ids=input_ids).logits
        base.load_state_dict(model.language_model_state())
        merged = base(input_ids=input_ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5 * adapted.abs().max().item())
    assert not torch.allclose(adapted, before)  # the adapters changed what the LM computes


def test_lora_needs_stage_2(lora_config, capsys):
    import main

    with pytest.raises(SystemExit):
        main.main(main.command_line(dataclasses.replace(lora_config, stage="pretrain", init_from="")))
    assert "--lora_rank 4: LoRA adapts the LM, which trains in stage 2 only" in capsys.readouterr().err


@pytest.mark.slow
def test_an_exported_lora_model_answers_in_plain_transformers_as_in_tinyvlm(lora_config, tmp_path):
    import export

    run_dir = run(lora_config)
    export.main([run_dir, str(tmp_path / "exported")])
    assert_answers_like_tinyvlm(TinyVLM.from_pretrained(find_model_folder(run_dir)), str(tmp_path / "exported"),
                                tmp_path)
