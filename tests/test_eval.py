"""eval.py: metrics checked against hand-computed values, and each task read from a fixture with the real
benchmark's schema (MMStar, POPE and VQAv2 parquet; COCO Karpathy JSON; the demo's shapes)."""

import argparse
import io
import json
import os
import shutil

import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image

import eval as benchmarks
from eval import (binary_metrics, caption_metrics, extract_choice, mmstar_options, normalize_vqa_answer,
                  pope_yes_no, vqa_accuracy)
from model import pick_dtype


def png(colour=(255, 0, 0), size=(32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def task_args(**paths) -> argparse.Namespace:
    return argparse.Namespace(limit=None, seed=0, **paths)


# -- metrics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B. cat", "B"), ("B: cat", "B"), ("B)", "B"), ("The answer is B", "B"),
    ("The answer is B.", "B"), ("Answer: (C)", "C"), ("I choose (D) because it is red", "D"),
    ("It is probably C", "C"), ("cat", None), ("", None), ("A or B", None), ("A dog on a bench.", None),
    ("I would say A.", "A")])
def test_option_letters_are_extracted(text, letter):
    assert extract_choice(text) == letter


def test_an_answer_naming_one_options_text_picks_that_option():
    options = mmstar_options("Which animal is shown?\\nOptions: A: a dog, B: a cat, C: a horse, D: a cow")
    assert options == {"A": "a dog", "B": "a cat", "C": "a horse", "D": "a cow"}
    assert extract_choice("It looks like a cat to me.", options) == "B"


def test_pope_answers_follow_llavas_yes_no_rule():
    assert [pope_yes_no(t) for t in ("Yes, there is a dog.", "No.", "There is not a dog", "yes", "No, no dog")] == \
        ["yes", "no", "no", "yes", "no"]


def test_binary_metrics_by_hand():
    perfect = binary_metrics(["yes", "no", "yes"], ["yes", "no", "yes"])
    assert perfect["accuracy"] == perfect["precision"] == perfect["recall"] == perfect["f1"] == 100
    half = binary_metrics(["yes", "yes", "no", "no"], ["yes", "no", "yes", "no"])  # tp fp fn tn = 1 1 1 1
    assert (half["accuracy"], half["precision"], half["recall"], half["f1"], half["yes_ratio"]) == (50, 50, 50, 50, 50)
    always_yes = binary_metrics(["yes"] * 4, ["yes", "no", "no", "no"])  # tp 1, fp 3
    assert always_yes["precision"] == 25 and always_yes["recall"] == 100 and always_yes["f1"] == pytest.approx(40)


def test_vqa_answers_are_normalised_like_the_official_script():
    assert normalize_vqa_answer("Two dogs!") == "2 dogs"
    assert normalize_vqa_answer("The cat.") == "cat"
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("black/white") == "black white"
    assert normalize_vqa_answer("yes, sir") == "yes sir"  # ", " in the input: commas vanish, not become spaces


def test_vqa_accuracy_by_hand():
    humans = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("dog", humans) == 1.0
    assert vqa_accuracy("Cat.", humans) == pytest.approx(0.9)  # 3 humans: (3 x 2/3 + 7 x 1) / 10
    assert vqa_accuracy("bird", humans) == 0.0
    assert vqa_accuracy("bird", ["bird"] + ["dog"] * 9) == pytest.approx(0.3)  # (1 x 0 + 9 x 1/3) / 10
    assert vqa_accuracy("two", ["2"] * 10) == 1.0


CAPTIONS = {"a.jpg": ["a red bus parked near tall buildings"], "b.jpg": ["two small dogs playing on green grass"],
            "c.jpg": ["an old man reading his newspaper quietly"]}


@pytest.mark.parametrize("java", [True, False])
def test_caption_metrics_perfect_and_wrong_predictions(java, monkeypatch):
    if not java:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    elif shutil.which("java") is None:
        pytest.fail("java is not installed: PTBTokenizer cannot run")
    perfect = caption_metrics({k: v[0] for k, v in CAPTIONS.items()}, CAPTIONS)
    assert perfect["BLEU-4"] == pytest.approx(100) and perfect["CIDEr"] == pytest.approx(1000)
    assert ("Python" in perfect["tokenizer"]) != java
    names = list(CAPTIONS)
    swapped = caption_metrics({k: CAPTIONS[names[(i + 1) % 3]][0] for i, k in enumerate(names)}, CAPTIONS)
    assert swapped["BLEU-4"] == pytest.approx(0, abs=1e-6) and swapped["CIDEr"] == pytest.approx(0)


# -- tasks on fixtures with the real schemas -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mmstar(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mmstar") / "val.parquet"
    rows = {"index": [0, 1, 2], "question": [
        "What colour is the square?\\nOptions: A: red, B: green, C: blue, D: white",
        "How many squares are there?\\nOptions: A: one, B: two, C: three, D: four",
        "Where is the square?\\nOptions: A: left, B: right, C: top, D: nowhere"],
        "image": [{"bytes": png(), "path": None}] * 3, "answer": ["A", "A", "D"],
        "category": ["coarse perception", "fine-grained perception", "coarse perception"],
        "l2_category": ["color", "counting", "position"],
        "meta_info": [{"source": "x", "split": "val", "image_path": "a.png"}] * 3}
    features = Features({"index": Value("int64"), "question": Value("string"), "image": ImageFeature(),
                         "answer": Value("string"), "category": Value("string"), "l2_category": Value("string"),
                         "meta_info": {"source": Value("string"), "split": Value("string"),
                                       "image_path": Value("string")}})
    Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def pope(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pope") / "test.parquet"
    rows = {"id": ["0", "1", "2", "3"], "question_id": ["1", "2", "3", "4"],
            "question": ["Is there a dog in the image?", "Is there a cat in the image?",
                         "Is there a bus in the image?", "Is there a car in the image?"],
            "answer": ["yes", "no", "yes", "no"], "image_source": ["COCO_val2014_000000000001"] * 4,
            "image": [{"bytes": png(), "path": None}] * 4,
            "category": ["adversarial", "adversarial", "popular", "random"]}
    Dataset.from_dict(rows).to_parquet(str(path))  # images as plain {bytes, path} structs, no Image feature
    return str(path)


@pytest.fixture(scope="module")
def vqav2(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vqav2") / "validation.parquet"
    answers = [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)]
               for humans in (["2"] * 10, ["red"] * 3 + ["maroon"] * 7)]
    rows = {"question_type": ["how many", "what color is the"], "multiple_choice_answer": ["2", "maroon"],
            "answers": answers, "image_id": [1, 2], "answer_type": ["number", "other"], "question_id": [10, 20],
            "question": ["How many dogs are there?", "What color is the bus?"],
            "image": [{"bytes": png(), "path": None}] * 2}
    features = Features({"question_type": Value("string"), "multiple_choice_answer": Value("string"),
                         "answers": [{"answer": Value("string"), "answer_confidence": Value("string"),
                                      "answer_id": Value("int64")}],
                         "image_id": Value("int64"), "answer_type": Value("string"), "question_id": Value("int64"),
                         "question": Value("string"), "image": ImageFeature()})
    Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    images = []
    for i, captions in enumerate(CAPTIONS.values()):
        filename = f"COCO_val2014_{i:012d}.jpg"
        (root / "val2014" / filename).write_bytes(png())
        images.append({"filepath": "val2014", "sentids": [i], "filename": filename, "imgid": i, "split": "test",
                       "sentences": [{"tokens": captions[0].split(), "raw": captions[0].capitalize() + ".",
                                      "imgid": i, "sentid": i}], "cocoid": i})
    images.append(dict(images[0], split="train", filename="COCO_train2014_000000000009.jpg", cocoid=9))
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(root / "dataset_coco.json"), str(root)


def test_mmstar_task_reads_the_parquet_and_scores_per_category(mmstar):
    jobs, load_image, score = benchmarks.mmstar_task(task_args(mmstar=mmstar))
    assert [j["truth"] for j in jobs] == ["A", "A", "D"]
    assert jobs[0]["prompt"].endswith("Answer with the option's letter from the given choices directly.")
    assert load_image(jobs[0]).size == (32, 24)
    for job, text in zip(jobs, ["A", "The answer is B", "(D)"]):
        job["answer"] = text
    metrics = score(jobs)
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert metrics["category"] == {"coarse perception": 100.0, "fine-grained perception": 0.0}
    assert metrics["l2_category"]["counting"] == 0.0


def test_pope_task_scores_each_split(pope):
    jobs, load_image, score = benchmarks.pope_task(task_args(pope=pope))
    assert load_image(jobs[0]).size == (32, 24)  # a plain {bytes, path} cell
    for job in jobs:
        job["answer"] = "Yes." if job["truth"] == "yes" else "No, there is not."
    metrics = score(jobs)
    assert metrics["all"]["f1"] == 100 and metrics["adversarial"]["n"] == 2 and metrics["random"]["accuracy"] == 100
    for job in jobs:
        job["answer"] = "Yes"
    assert score(jobs)["all"]["accuracy"] == 50


def test_vqav2_task_scores_by_answer_type(vqav2):
    jobs, _, score = benchmarks.vqav2_task(task_args(vqav2=vqav2))
    jobs[0]["answer"], jobs[1]["answer"] = "Two", "red"
    metrics = score(jobs)
    assert metrics["number"] == 100 and metrics["other"] == pytest.approx(90)
    assert metrics["accuracy"] == pytest.approx(95)


def test_vqav2_limit_takes_a_fixed_seeded_subset(vqav2):
    first, _, _ = benchmarks.vqav2_task(argparse.Namespace(vqav2=vqav2, limit=1, seed=0))
    again, _, _ = benchmarks.vqav2_task(argparse.Namespace(vqav2=vqav2, limit=1, seed=0))
    assert len(first) == 1 and first[0]["id"] == again[0]["id"]


def test_coco_task_reads_karpathys_test_split(coco):
    data, images = coco
    jobs, load_image, score = benchmarks.coco_task(task_args(coco=data, coco_images=images))
    assert len(jobs) == 3 and all(j["image"].startswith("val2014/") for j in jobs)  # the train image is left out
    assert load_image(jobs[0]).size == (32, 24)
    for job in jobs:
        job["answer"] = job["references"][0]
    metrics = score(jobs)
    assert metrics["BLEU-4"] == pytest.approx(100) and metrics["CIDEr"] == pytest.approx(1000)


def test_shapes_task_scores_the_demo_held_out_set(shapes_data):
    jobs, _, score = benchmarks.shapes_task(task_args(shapes=f"{shapes_data}/val.json",
                                                      shapes_images=f"{shapes_data}/images.zip"))
    for job in jobs:
        job["answer"] = f"a {job['entry']['colour']} {job['entry']['shape']}."
    assert score(jobs)["accuracy"] == 100
    jobs[0]["answer"] = "a purple hexagon."
    assert score(jobs)["accuracy"] == pytest.approx(100 * 17 / 18)


@pytest.mark.slow
def test_eval_script_runs_every_task_and_writes_results(tiny_model, tmp_path, mmstar, pope, vqav2, coco,
                                                       shapes_data):
    folder = str(tmp_path / "model")
    tiny_model.save_pretrained(folder)
    output = tmp_path / "results.json"
    results = benchmarks.main([
        "--checkpoint", folder, "--tasks", "shapes,coco,mmstar,pope,vqav2", "--mmstar", mmstar, "--pope", pope,
        "--vqav2", vqav2, "--coco", coco[0], "--coco_images", coco[1], "--shapes", f"{shapes_data}/val.json",
        "--shapes_images", f"{shapes_data}/images.zip", "--max_new_tokens", "3", "--output", str(output),
        "--wandb_mode", "offline"])
    saved = json.loads(output.read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    auto = pick_dtype("auto", torch.device("cpu"))  # what eval.py's defaults ran with, saved beside the results
    assert saved["device"] == "cpu" and saved["dtype"] == str(auto).removeprefix("torch.")
    assert {task: len(p) for task, p in saved["predictions"].items()} == \
        {"shapes": 18, "coco": 3, "mmstar": 3, "pope": 4, "vqav2": 2}
    assert results["mmstar"]["n"] == 3 and results["pope"]["all"]["n"] == 4 and "CIDEr" in results["coco"]
    assert os.path.isdir(tmp_path / "wandb")


def test_the_task_names_eval_py_parses_are_its_tasks():
    assert set(benchmarks.TASK_NAMES) == set(benchmarks.TASKS)
