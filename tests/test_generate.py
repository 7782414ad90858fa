"""Inference: TinyVLM.generate and generate.py."""

import json
import os

import pytest
import torch
from helpers import CPU, scripted_language_model, shape_images
from transformers import AutoTokenizer

import generate
from main import VLMConfig, build_model
from model import TinyVLM
from sources import load_llava_json


def test_generation_is_greedy_deterministic_and_stops_at_the_end_of_turn_token(tiny_models, tmp_path, shapes_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["language_model"])
    red, circle = tokenizer.encode(" red")[0], tokenizer.encode(" circle")[0]
    end_of_text, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    # <|endoftext|> is not where SmolLM2-Instruct's turn ends: generation must go on past it
    script = [red, end_of_text, circle, end_of_turn]  # without a stop, end_of_turn -> red circle ...
    scripted_language_model(tokenizer, script, str(tmp_path / "lm"))
    cfg = VLMConfig(vision_model=tiny_models["vision_model"], language_model=str(tmp_path / "lm"),
                    vision_feature_layer=-1, projector_hidden_dim=16)
    model = build_model(cfg, CPU, torch.float32).eval()
    images = shape_images(shapes_data, 2)
    answers = model.generate(images, "What is it?", max_new_tokens=20)
    assert answers == ["red circle", "red circle"]
    assert model.generate(images, "What is it?", max_new_tokens=20) == answers


@pytest.mark.gpu
def test_batched_left_padded_generation_equals_one_by_one(tiny_model, shapes_data, device):
    tiny_model.to(device)
    images = shape_images(shapes_data, 4)
    prompts = ["Describe.", "What colour is the shape in this picture?", "Name the shape.", "Hi"]
    with torch.no_grad():  # weights large enough for the image, the prompt and padding errors to show
        for p in list(tiny_model.projector.parameters()) + list(tiny_model.lm.parameters()):
            p.normal_(0, 0.5)
    batched = tiny_model.generate(images, prompts, max_new_tokens=8)
    alone = [tiny_model.generate([image], [prompt], max_new_tokens=8)[0] for image, prompt in zip(images, prompts)]
    assert batched == alone
    assert len(set(batched)) > 1  # the images and prompts matter


def test_text_only_prompts_generate_with_the_real_smollm2(smollm2_dir, tiny_models):
    cfg = VLMConfig(vision_model=tiny_models["vision_model"], language_model=smollm2_dir,
                    vision_feature_layer=-1, projector_hidden_dim=16)
    model = build_model(cfg, CPU, torch.bfloat16).eval()
    answer, = model.generate([None], "What is the capital of France?", max_new_tokens=30)
    assert "Paris" in answer and "<|im_end|>" not in answer


def trained_folder(tiny_model, tmp_path) -> str:
    folder = str(tmp_path / "model")
    tiny_model.save_pretrained(folder)
    return folder


def test_generate_script_answers_each_image_of_a_folder(tiny_model, shapes_data, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(shape_images(shapes_data, 3)):
        image.save(folder / f"photo{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not a job")
    output = tmp_path / "answers.jsonl"
    status = generate.main(["--checkpoint", trained_folder(tiny_model, tmp_path), "--image", str(folder),
                            "--output", str(output), "--max_new_tokens", "4", "--device", "cpu"])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [os.path.basename(r["image"]) for r in rows] == ["broken.jpg", "photo0.png", "photo1.png", "photo2.png"]
    assert "error" in rows[0] and all("answer" in r for r in rows[1:])
    assert status == 1 and "broken.jpg" in capsys.readouterr().err


def test_generate_script_writes_one_prediction_per_llava_entry(tiny_model, shapes_data, tmp_path):
    output = tmp_path / "predictions.json"
    status = generate.main(["--checkpoint", trained_folder(tiny_model, tmp_path), "--data",
                            f"{shapes_data}/val.json", "--image_root", f"{shapes_data}/images.zip",
                            "--output", str(output), "--max_new_tokens", "4", "--batch_size", "5"])
    predictions = json.loads(output.read_text())
    entries = load_llava_json(f"{shapes_data}/val.json")
    assert status == 0 and [p["id"] for p in predictions] == [e["id"] for e in entries]
    assert all(p["answer"] is not None and p["reference"] for p in predictions)
    assert "<image>" not in predictions[0]["prompt"]


def test_generate_script_prints_answers_for_image_files(tiny_model, shapes_data, tmp_path, capsys):
    paths = []
    for i, image in enumerate(shape_images(shapes_data, 2)):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    folder = trained_folder(tiny_model, tmp_path)
    assert generate.main(["--checkpoint", folder, "--image", *paths, "--prompt", "Name it.",
                          "--max_new_tokens", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = TinyVLM.from_pretrained(folder).generate(shape_images(shapes_data, 2), "Name it.", max_new_tokens=3)
    assert printed == [f"{path}: {answer}" for path, answer in zip(paths, expected)]
