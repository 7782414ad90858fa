"""Benchmark a trained TinyVLM on downstream tasks, with batched greedy generation and the field's metrics.
  python eval.py --checkpoint runs/demo --tasks shapes
  python eval.py --checkpoint RUN --tasks mmstar,pope,vqav2 --limit 500
  python eval.py --checkpoint RUN --tasks coco --coco dataset_coco.json --coco_images data/coco
Each task reads its data as users have it: a hub id through `datasets`, or a local parquet or JSON file.
Prints a table, saves metrics and every prediction to --output (JSON), and logs to W&B with --wandb_mode.
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
from collections import defaultdict

from cli import HelpFormatter, add_runtime_arguments, exit_if_problems

TASK_NAMES = ("shapes", "coco", "mmstar", "pope", "vqav2")  # TASKS below, by name


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a model folder, or a run folder (its best/)")
    parser.add_argument("--tasks", default="shapes", help=f"comma-separated, of: {', '.join(TASK_NAMES)}")
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per task: a fixed subset "
                        "chosen with --seed")
    parser.add_argument("--seed", type=int, default=0, help="chooses the --limit subsets")
    parser.add_argument("--mmstar", default="Lin-Chen/MMStar", help="hub id or local parquet")
    parser.add_argument("--pope", default="lmms-lab/POPE", help="hub id or local parquet")
    parser.add_argument("--vqav2", default="lmms-lab/VQAv2", help="hub id or local parquet (validation split)")
    parser.add_argument("--coco", default="data/coco/dataset_coco.json", help="Karpathy split JSON or LLaVA JSON")
    parser.add_argument("--coco_images", default="data/coco", help="folder or .zip holding val2014/...")
    parser.add_argument("--shapes", default="data/demo/val.json", help="the demo's held-out LLaVA JSON")
    parser.add_argument("--shapes_images", default="data/demo/images.zip", help="its images")
    parser.add_argument("--batch_size", type=int, default=16, help="questions answered together")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="the longest answer, in tokens")
    add_runtime_arguments(parser)
    parser.add_argument("--output", default=None, help="results JSON (default: eval_results.json in the model folder)")
    parser.add_argument("--wandb_mode", default="disabled", help="online or offline to log the results to W&B")
    parser.add_argument("--wandb_project", default="tinyvlm", help="with --wandb_mode online or offline")
    args = parser.parse_args(argv)
    unknown = set(args.tasks.split(",")) - set(TASK_NAMES)
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads below
    parse_args(sys.argv[1:])

import transformers
from PIL import Image

from sources import decode_image, first_answer, first_question, load_llava_json, open_image_source, to_rgb
from generate import answer
from model import load_for_inference, runtime_problems

# Prompt suffixes as LLaVA-1.5's evaluation writes them (llava/eval and its scripts/v1_5/eval).
# The demo's held-out shapes (demo.py draws them): captions answer SHAPES_PROMPT and name one of each.
SHAPES_PROMPT = "Describe the image concisely."
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPE_NAMES = ("circle", "square", "triangle")
MULTIPLE_CHOICE_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


# ----------------------------------------------------------------------------------------------------------
# Reading benchmarks the way users have them


def load_rows(source: str, split: str):
    """Rows of a benchmark: a local .parquet / .json / .jsonl file, or a hub dataset id (with its split)."""
    from datasets import load_dataset

    if os.path.exists(source):
        kind = "parquet" if source.endswith(".parquet") else "json"
        return load_dataset(kind, data_files=source, split="train")
    return load_dataset(source, split=split)


def to_image(value) -> Image.Image:
    """A dataset's image cell as RGB: a PIL image (datasets' Image feature), {"bytes": ...} (plain parquet),
    raw bytes, or a base64 string."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return decode_image(value["bytes"])
        with open(value["path"], "rb") as f:
            return decode_image(f.read())
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value))
    import base64

    return decode_image(base64.b64decode(value))


# ----------------------------------------------------------------------------------------------------------
# Answer parsing and metrics


def extract_choice(text: str, options: dict | None = None) -> str | None:
    """The option letter (A-D) a free-form answer picks, or None: "B", "(B)", "B. cat", "B: cat",
    "The answer is B", "Answer: (C)", then an option's own text if exactly one appears, then a lone
    capital letter A-D that stands by itself."""
    text = text.strip()
    patterns = (r"^\(?([A-D])\)?(?:[.:)\]]|\s*$)",  # "B", "(B)", "B.", "B)", "B: ..."
                r"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\(?([A-D])\)?(?![A-Za-z])",  # "The answer is B", "Answer: (C)"
                r"\(([A-D])\)")  # "... (B) ..."
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    if options:
        named = [letter for letter, option in options.items() if option and option.lower() in text.lower()]
        if len(named) == 1:
            return named[0]
    # a lone capital A-D, but not the article in "A dog ..."
    letters = {m.group(1) for m in re.finditer(r"(?<![A-Za-z'])([A-D])(?![A-Za-z'])", text)
               if not (m.group(1) == "A" and re.match(r"\s+(?!or\b|and\b)[a-z]", text[m.end():]))}
    return letters.pop() if len(letters) == 1 else None


def mmstar_options(question: str) -> dict:
    """MMStar writes its options into the question: "Options: A: cat, B: dog, C: ..., D: ..."."""
    found = re.findall(r"([A-D])[:.]\s*(.+?)(?=,\s*[A-D][:.]\s|$)", question.split("Options:")[-1].strip())
    return {letter: option.strip().rstrip(",") for letter, option in found}


def pope_yes_no(text: str) -> str:
    """LLaVA's POPE rule: the first sentence, commas dropped; "no" if it has the word no, No or not."""
    words = text.split(".")[0].replace(",", "").split()
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def binary_metrics(predicted: list[str], truth: list[str]) -> dict:
    """POPE's metrics with "yes" as the positive class, in %."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predicted, truth))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predicted, truth))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predicted, truth))
    tn = sum(p == "no" and t == "no" for p, t in zip(predicted, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * (tp + tn) / len(truth), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * (tp + fp) / len(truth), "n": len(truth)}


# The official VQA evaluation's normalisation (github.com/GT-Vision-Lab/VQA, vqaEval.py), rewritten.
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!"]
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = {"a", "an", "the"}
# The official map takes each contraction written without its apostrophes back to the written form.
VQA_CONTRACTIONS = {c.replace("'", ""): c for c in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's I'd I'd've I'm I've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she'll "
    "she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've "
    "there're there's they'd they'd've they'll they're they've twas wasn't we'd we'd've we'll we're we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're who's "
    "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've").split()}


def normalize_vqa_answer(text: str) -> str:
    """Lower-case; punctuation removed (or turned into a space); periods not between digits removed; number
    words to digits; articles dropped; contractions restored. Applied to the prediction and to every human
    answer, as lmms-eval does (the official script skips it when all humans agree)."""
    original = text = text.replace("\n", " ").replace("\t", " ").strip()
    for mark in VQA_PUNCTUATION:  # each mark is judged on the original text, as the official script does
        if (mark + " " in original or " " + mark in original) or re.search(r"(\d)(,)(\d)", original):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = re.sub(r"(?!<=\d)(\.)(?!\d)", "", text)  # sic: the official pattern, lookbehind typo included
    words = []
    for word in text.lower().split():
        word = VQA_NUMBERS.get(word, word)
        if word not in VQA_ARTICLES:
            words.append(VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official VQA accuracy of one answer, in [0, 1]: for each of the (10) human answers, min(1, number
    of the other humans who gave the prediction / 3), averaged. It equals min(#humans who gave it / 3, 1)
    except just below the cut: 1 of 10 humans scores 0.3 (not 0.33), 3 of 10 score 0.9 (not 1)."""
    prediction = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in human_answers]
    scores = [min(1.0, sum(h == prediction for j, h in enumerate(humans) if j != i) / 3) for i in range(len(humans))]
    return sum(scores) / len(scores)


def ptb_tokenize(captions: dict) -> tuple[dict, str]:
    """COCO caption tokenisation: pycocoevalcap's PTBTokenizer (Stanford CoreNLP, needs Java); without Java,
    a Python stand-in that lower-cases, splits off PTB punctuation and clitics and drops punctuation."""
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize(captions), "PTBTokenizer (Stanford CoreNLP)"
    punctuation = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
    tokenized = {}
    for key, items in captions.items():
        tokenized[key] = []
        for item in items:
            text = re.sub(r"([.,!?;:\"()\[\]{}]|--)", r" \1 ", item["caption"].lower())
            text = re.sub(r"(\w)('s|'re|'ve|'d|'ll|'m|n't)\b", r"\1 \2", text)
            tokenized[key].append(" ".join(t for t in text.split() if t not in punctuation and t not in "()[]{}"))
    return tokenized, "Python stand-in for PTBTokenizer (no Java found)"


def caption_metrics(predictions: dict, references: dict) -> dict:
    """CIDEr and BLEU-4 (x100) with pycocoevalcap's own scorers. predictions: id -> caption; references:
    id -> list of captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = list(predictions)
    gts, tokenizer = ptb_tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res, _ = ptb_tokenize({i: [{"caption": predictions[i]}] for i in ids})
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"CIDEr": 100 * float(cider), "BLEU-4": 100 * float(bleu[3]), "n": len(ids), "tokenizer": tokenizer}


# ----------------------------------------------------------------------------------------------------------
# Tasks: each returns (jobs, image loader, scorer). A job is {"id", "prompt", ...truth}; the loader gives its
# image; the scorer turns the answered jobs into metrics.


def named(text: str, vocabulary) -> set:
    return set(text.lower().replace(".", " ").replace(",", " ").split()) & set(vocabulary)


def is_correct_shape_answer(entry: dict, answer: str) -> bool:
    """Whether an answer about a demo image is right. A caption must name the right colour and the right
    shape and no other; a colour or shape answer the right one and no other; a yes/no answer must start with
    the right word."""
    task = entry.get("task", "caption")
    colour_right = named(answer, SHAPE_COLOURS) == {entry["colour"]}
    shape_right = named(answer, SHAPE_NAMES) == {entry["shape"]}
    if task == "caption":
        return colour_right and shape_right
    if task == "colour":
        return colour_right
    if task == "shape":
        return shape_right
    expected = first_answer(entry).split(".")[0].lower()
    words = answer.lower().replace(".", " ").replace(",", " ").split()
    return bool(words) and words[0] == expected


def seeded_subset(rows: list, limit: int | None, seed: int) -> list:
    """The first `limit` of a seeded shuffle: a fixed subset, the same for every checkpoint."""
    if limit is None or limit >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:limit])]


def benchmark_rows(source: str, split: str, args):
    """A benchmark's rows (images decoded only when a job asks), its text columns, and the row numbers of
    the fixed --limit subset."""
    rows = load_rows(source, split)
    return rows, rows.remove_columns("image"), seeded_subset(list(range(len(rows))), args.limit, args.seed)


def image_column_loader(rows):
    return lambda job: to_image(rows[job["row"]]["image"])


def mmstar_task(args):
    rows, table, chosen = benchmark_rows(args.mmstar, "val", args)  # seeded: MMStar is sorted by category
    jobs = [{"id": table[i]["index"], "row": i, "prompt": table[i]["question"] + MULTIPLE_CHOICE_SUFFIX,
             "truth": table[i]["answer"], "category": table[i]["category"], "l2_category": table[i]["l2_category"],
             "options": mmstar_options(table[i]["question"])} for i in chosen]

    def score(jobs):
        for job in jobs:
            job["choice"] = extract_choice(job.get("answer", ""), job["options"])
            job["correct"] = job["choice"] == job["truth"]
        metrics = {"accuracy": 100 * sum(j["correct"] for j in jobs) / len(jobs), "n": len(jobs)}
        for key in ("category", "l2_category"):
            groups = defaultdict(list)
            for job in jobs:
                groups[job[key]].append(job["correct"])
            metrics[key] = {name: 100 * sum(v) / len(v) for name, v in sorted(groups.items())}
        return metrics

    return jobs, image_column_loader(rows), score


def pope_task(args):
    rows, table, chosen = benchmark_rows(args.pope, "test", args)
    jobs = [{"id": table[i]["question_id"], "row": i, "prompt": table[i]["question"] + SHORT_ANSWER_SUFFIX,
             "truth": table[i]["answer"].strip().lower(), "category": table[i]["category"]} for i in chosen]

    def score(jobs):
        for job in jobs:
            job["yes_no"] = pope_yes_no(job.get("answer", ""))
        metrics = {"all": binary_metrics([j["yes_no"] for j in jobs], [j["truth"] for j in jobs])}
        for category in sorted({j["category"] for j in jobs}):
            part = [j for j in jobs if j["category"] == category]
            metrics[category] = binary_metrics([j["yes_no"] for j in part], [j["truth"] for j in part])
        return metrics

    return jobs, image_column_loader(rows), score


def vqav2_task(args):
    rows, table, chosen = benchmark_rows(args.vqav2, "validation", args)
    jobs = [{"id": table[i]["question_id"], "row": i, "prompt": table[i]["question"] + SHORT_ANSWER_SUFFIX,
             "humans": [a["answer"] for a in table[i]["answers"]], "answer_type": table[i]["answer_type"]}
            for i in chosen]

    def score(jobs):
        for job in jobs:
            job["accuracy"] = vqa_accuracy(job.get("answer", ""), job["humans"])
        metrics = {"accuracy": 100 * sum(j["accuracy"] for j in jobs) / len(jobs), "n": len(jobs)}
        for kind in sorted({j["answer_type"] for j in jobs}):
            part = [j["accuracy"] for j in jobs if j["answer_type"] == kind]
            metrics[kind] = 100 * sum(part) / len(part)
        return metrics

    return jobs, image_column_loader(rows), score


def coco_task(args):
    """Karpathy's dataset_coco.json (its "test" split, images at filepath/filename under --coco_images), or a
    LLaVA-format caption JSON (references: each entry's answers, grouped by image)."""
    with open(args.coco) as f:
        data = json.load(f)
    references = defaultdict(list)
    if isinstance(data, dict) and "images" in data:
        for image in data["images"]:
            if image.get("split") == "test":
                path = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
                references[path] += [s["raw"].strip() for s in image["sentences"]]
    else:
        for entry in data:
            references[entry["image"]].append(first_answer(entry).strip())
    images = seeded_subset(sorted(references), args.limit, args.seed)
    jobs = [{"id": path, "image": path, "prompt": CAPTION_PROMPT, "references": references[path]} for path in images]
    source = open_image_source(args.coco_images)

    def score(jobs):
        answered = [j for j in jobs if "answer" in j]
        return caption_metrics({j["id"]: j["answer"] for j in answered}, {j["id"]: j["references"] for j in answered})

    return jobs, lambda job: decode_image(source.read(job["image"])), score


def shapes_task(args):
    """The demo's held-out set (LLaVA JSON with "colour" and "shape" fields, and "task" for questions):
    captions answer SHAPES_PROMPT, questions their own; demo.py reports its accuracy with this code."""
    entries = seeded_subset(load_llava_json(args.shapes), args.limit, args.seed)
    jobs = [{"id": e["id"], "image": e["image"], "prompt": SHAPES_PROMPT if "task" not in e else first_question(e),
             "entry": e} for e in entries]
    source = open_image_source(args.shapes_images)

    def score(jobs):
        for job in jobs:
            job["correct"] = "answer" in job and is_correct_shape_answer(job["entry"], job["answer"])
        kinds = defaultdict(list)
        for job in jobs:
            kinds[job["entry"].get("task", "caption")].append(job["correct"])
        return {"accuracy": 100 * sum(j["correct"] for j in jobs) / len(jobs), "n": len(jobs),
                **{kind: 100 * sum(v) / len(v) for kind, v in sorted(kinds.items()) if len(kinds) > 1}}

    return jobs, lambda job: decode_image(source.read(job["image"])), score


TASKS = {"shapes": shapes_task, "coco": coco_task, "mmstar": mmstar_task, "pope": pope_task, "vqav2": vqav2_task}


def run_task(name: str, model, args, device, dtype) -> tuple[dict, list[dict]]:
    """Answer every job of a task (batched, greedy) and score it. Returns (metrics, answered jobs)."""
    jobs, load_image, score = TASKS[name](args)
    model.eval()
    answer(model, jobs, load_image, device, dtype, args.batch_size, max_new_tokens=args.max_new_tokens)
    failed = sum("error" in job for job in jobs)
    metrics = score(jobs)
    if failed:
        metrics["unreadable_images"] = failed
    return metrics, jobs


# ----------------------------------------------------------------------------------------------------------


def flat_metrics(results: dict) -> dict:
    """{"pope": {"all": {"f1": 80}}} -> {"pope/all/f1": 80}, numbers only."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in flat_metrics(value).items()})
        elif isinstance(value, (int, float)):
            flat[key] = value
    return flat


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    exit_if_problems("eval.py", runtime_problems(args.device, args.dtype, args.attn_implementation, args.checkpoint))
    transformers.utils.logging.disable_progress_bar()
    model, folder, device, dtype = load_for_inference(args.checkpoint, args.device, args.dtype,
                                                     args.attn_implementation)
    results, predictions = {}, {}
    for name in args.tasks.split(","):
        results[name], jobs = run_task(name, model, args, device, dtype)
        predictions[name] = [{k: v for k, v in job.items() if k not in ("entry", "row")} for job in jobs]
    print(f"\n{'task':8s} {'metric':28s} value")
    for key, value in flat_metrics(results).items():
        task, _, metric = key.partition("/")
        print(f"{task:8s} {metric:28s} {value:.2f}" if isinstance(value, float) else f"{task:8s} {metric:28s} {value}")
    output = args.output or os.path.join(folder, "eval_results.json")
    with open(output, "w") as f:
        json.dump({"checkpoint": folder, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                   "results": results, "predictions": predictions}, f, indent=1, default=str)
    print(f"wrote {output}")
    if args.wandb_mode != "disabled":
        import wandb

        run = wandb.init(project=args.wandb_project, job_type="eval", mode=args.wandb_mode,
                         dir=os.path.dirname(os.path.abspath(output)), config={"checkpoint": folder, **vars(args)})
        run.log({f"eval/{k}": v for k, v in flat_metrics(results).items()})
        run.finish()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
