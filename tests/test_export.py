"""export.py: a TinyVLM leaves as a folder that plain transformers (AyaVision) loads and answers from, token for
token as TinyVLM does, in a process that cannot import TinyVLM; and the model card and upload of --push_to_hub."""

import dataclasses
import json
import os

import pytest
import torch
from helpers import answers_in_plain_transformers, assert_answers_like_tinyvlm, random_images, run
from PIL import Image

import demo
import export
from main import VLMConfig, build_model
from model import TinyVLM, find_model_folder

def trained_projector(model: TinyVLM) -> TinyVLM:
    """A projector far from its initialisation (a random tiny model's answers then depend on the image)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def test_a_stage1_model_answers_in_plain_transformers_as_in_tinyvlm(tiny_model, tmp_path):
    model = trained_projector(tiny_model)
    sizes = export.export(model, str(tmp_path / "exported"))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "chat_template.jinja"} <= set(sizes)
    config = json.load(open(tmp_path / "exported" / "config.json"))
    assert config["architectures"] == ["AyaVisionForConditionalGeneration"]
    assert_answers_like_tinyvlm(model, str(tmp_path / "exported"), tmp_path)


@pytest.mark.slow
def test_a_stage2_run_exported_from_the_command_line_answers_as_in_tinyvlm(finetune_config, tmp_path):
    run_dir = run(dataclasses.replace(finetune_config, max_steps=2, eval_every=2, save_every=2))
    export.main([run_dir, str(tmp_path / "exported")])
    model = TinyVLM.from_pretrained(find_model_folder(run_dir))  # its finetuned language model included
    assert_answers_like_tinyvlm(model, str(tmp_path / "exported"), tmp_path)


@pytest.mark.slow
def test_the_demos_model_answers_in_plain_transformers_as_in_tinyvlm(smollm2_dir, tmp_path):
    cfg = VLMConfig(**{**demo.DEMO_CONFIG, "language_model": smollm2_dir})
    demo.prepare_vision_model(cfg.vision_model)
    model = trained_projector(build_model(cfg, torch.device("cpu"), torch.float32))
    export.export(model, str(tmp_path / "exported"))
    assert_answers_like_tinyvlm(model, str(tmp_path / "exported"), tmp_path, new_tokens=6)


def test_resized_images_stay_within_a_level_of_tinyvlms_pixels(tiny_model, tmp_path):
    """Images of another size are resized by each side's bilinear filter (PIL's, torch's): the normalised
    pixels the two give stay within about one level of 255 on average."""
    export.export(tiny_model, str(tmp_path / "exported"))
    images = random_images(tmp_path, (45, 37), 1, seed=3)
    plain = answers_in_plain_transformers(str(tmp_path / "exported"), [{"images": images, "prompt": "Hi"}], 1,
                                          tmp_path)
    theirs = torch.tensor(plain[0]["pixel_values"])[0]  # (3, H, W), normalised
    ours = tiny_model.processor.image_to_pixels(Image.open(images[0])).float()  # (3, H, W), uint8 values
    ours = (ours * tiny_model.vision.scale + tiny_model.vision.shift)[0]
    level = tiny_model.vision.scale.flatten()[0].item()  # one level of 255, normalised
    assert theirs.shape == ours.shape and (theirs - ours).abs().mean() < 1.5 * level


def test_the_model_card_names_the_bases_stages_losses_and_results_and_the_upload_sends_the_folder(
        finetune_config, tmp_path, monkeypatch):
    run_dir = run(dataclasses.replace(finetune_config, max_steps=2, eval_every=2, save_every=2))
    model_folder = find_model_folder(run_dir)
    with open(os.path.join(model_folder, "eval_results.json"), "w") as f:
        json.dump({"results": {"shapes": {"accuracy": 0.875, "n": 72}}}, f)
    calls = []

    class RecordingHfApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", sorted(os.listdir(folder_path)), repo_id))

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingHfApi)
    export.main([run_dir, str(tmp_path / "exported"), "--push_to_hub", "someone/tiny-vlm", "--private"])
    card = open(tmp_path / "exported" / "README.md").read()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert f"- {finetune_config.vision_model}" in card and f"- {finetune_config.language_model}" in card
    stage2 = [m for m in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "train/loss" in m][-1]
    assert f"| finetune | `{finetune_config.data_path}` | the projector and the language model | 2 | " \
           f"{stage2['train/loss']:.4f} |" in card
    assert "| shapes | accuracy | 0.875 |" in card and 'from_pretrained("someone/tiny-vlm")' in card
    assert calls[0] == ("create_repo", "someone/tiny-vlm", True, True)
    assert calls[1][0] == "upload_folder" and calls[1][2] == "someone/tiny-vlm"
    assert {"README.md", "model.safetensors", "config.json"} <= set(calls[1][1])
