"""Chat LMs of several families (tiny and random, each with its family's turn format): the end of an assistant
turn comes from the chat template, not the tokenizer's eos_token, and each family trains, resumes exactly,
packs like it pads, and generates until the end of its turn."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM
from helpers import (CPU, assert_answers_like_tinyvlm, checkpoint_weights, gradient, samples, scramble,
                     straight_and_resumed)

import export
import synthetic
from data import collate, pack_step
from main import VLMConfig, build_model
from model import TinyVLM, find_model_folder
from sources import IGNORE_INDEX

FAMILIES = list(synthetic.LM_FAMILIES)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict:
    folder = str(tmp_path_factory.mktemp("families"))
    return {family: synthetic.family_language_model(folder, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_targets_are_each_answer_and_the_end_of_turn_its_template_writes(family, family_models, tiny_config):
    model = build_model(dataclasses.replace(tiny_config, language_model=family_models[family]), CPU, torch.float32)
    processor = model.processor
    assert processor.end_of_turn == synthetic.END_OF_TURN[family]
    assert processor.end_of_turn_id == processor.tokenizer.convert_tokens_to_ids(synthetic.END_OF_TURN[family])
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red circle."},
             {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Red."}]
    ids, labels = processor.encode_llava(turns)
    targets = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    end = synthetic.END_OF_TURN[family]
    assert processor.tokenizer.decode(targets) == f"A red circle.{end}Red.{end}"
    assert ids.count(model.image_token_id) == model.num_image_tokens


def test_the_real_gemma_3_270m_masks_its_turns_and_answers_in_tinyvlm_as_in_transformers(gemma3_dir, tiny_models):
    cfg = VLMConfig(vision_model=tiny_models["vision_model"], language_model=gemma3_dir, vision_feature_layer=-1,
                    projector_hidden_dim=16)
    model = build_model(cfg, CPU, torch.float32).eval()
    processor = model.processor
    assert (processor.end_of_turn, processor.tokenizer.eos_token) == ("<end_of_turn>", "<eos>")
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red circle."},
             {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Red."}]
    ids, labels = processor.encode_llava(turns)
    targets = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(targets) == "A red circle.<end_of_turn>Red.<end_of_turn>"
    assert ids[0] == processor.tokenizer.bos_token_id and ids.count(model.image_token_id) == model.num_image_tokens

    prompt = "Name the capital of France."
    answer, = model.generate([None], prompt, max_new_tokens=12)
    plain = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    prompt_ids = torch.tensor([processor.encode_prompt(processor.prompt_messages(prompt, False))])
    out = plain.generate(prompt_ids, max_new_tokens=12, do_sample=False, eos_token_id=processor.end_of_turn_id)
    assert answer == processor.tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES[1:])  # SmolLM2's: the rest of the suite
def test_each_family_trains_resumes_exactly_packs_like_it_pads_and_stops_at_its_end_of_turn(
        family, family_models, tiny_config, monkeypatch):
    cfg = dataclasses.replace(tiny_config, language_model=family_models[family], max_steps=2, lr_decay_steps=2,
                              eval_every=2, save_every=2)
    straight, resumed = straight_and_resumed(cfg, first_steps=1)
    a, b = checkpoint_weights(straight), checkpoint_weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)

    model = build_model(dataclasses.replace(cfg, stage="finetune"), CPU, torch.float32)  # the LM trains too
    data, pad = samples(model, 6), model.processor.tokenizer.pad_token_id
    padded = gradient(model, [collate(data[:3], pad, model.image_token_id), collate(data[3:], pad, model.image_token_id)])
    packed = gradient(model, pack_step(data, cfg.max_length, 2 * cfg.max_length, pad, image_token_id=model.image_token_id))
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4 * padded.abs().max().item())

    trained = TinyVLM.from_pretrained(find_model_folder(resumed))
    stops = []
    generate = trained.lm.generate
    monkeypatch.setattr(trained.lm, "generate", lambda **kw: stops.append(kw["eos_token_id"]) or generate(**kw))
    image = synthetic.Image.new("RGB", trained.processor.image_size, "red")
    answer = trained.generate([image], "Describe it.", max_new_tokens=4)
    assert stops == [trained.processor.end_of_turn_id] and isinstance(answer[0], str)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES[1:])  # SmolLM2's: tests/test_export.py
def test_each_family_exports_to_a_folder_that_answers_in_plain_transformers_as_in_tinyvlm(
        family, family_models, tiny_config, tmp_path):
    model = build_model(dataclasses.replace(tiny_config, language_model=family_models[family]), CPU, torch.float32)
    scramble(model)
    export.export(model.eval(), str(tmp_path / "exported"))
    assert_answers_like_tinyvlm(model, str(tmp_path / "exported"), tmp_path, new_tokens=6)
