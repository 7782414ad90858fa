"""Ask a trained TinyVLM about images, from the shell:
  python generate.py --checkpoint runs/demo --image a.jpg b.jpg --prompt "What colour is the shape?"
  python generate.py --checkpoint runs/demo --image photos/ --output answers.jsonl     # a folder of images
  python generate.py --checkpoint runs/demo --image a.jpg,b.jpg --prompt "What changed?"  # two images, one prompt
  python generate.py --checkpoint runs/demo --data val.json --image_root images.zip --output preds.json
From Python: TinyVLM.from_pretrained(folder).generate(images, prompts) (this script's engine).
"""

import argparse
import json
import os
import sys

from cli import HelpFormatter, add_runtime_arguments, exit_if_problems

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_PROMPT = "Describe the image concisely."


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a model folder, or a run folder (its best/)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image files or folders of images")
    source.add_argument("--data", help="a LLaVA-format JSON; images under --image_root")
    parser.add_argument("--image_root", help="folder or .zip holding the --data images")
    parser.add_argument("--prompt", help=f"the question for every image (default for --image: {DEFAULT_PROMPT!r}; "
                                         "for --data: each entry's own first question)")
    parser.add_argument("--output", help="write predictions here (.json or .jsonl)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="the longest answer, in tokens")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="for --do_sample")
    parser.add_argument("--top_p", type=float, default=1.0, help="for --do_sample: nucleus sampling")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts answered together")
    add_runtime_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="for --do_sample")
    args = parser.parse_args(argv)
    if args.data and not args.image_root:
        parser.error("--data needs --image_root")
    return args


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads below
    parse_args(sys.argv[1:])

import torch
import transformers
from PIL import Image
from tqdm import tqdm

from sources import IMAGE_ERRORS, decode_image, first_answer, first_question, load_llava_json, open_image_source
from model import autocast, load_for_inference, runtime_problems


def image_jobs(paths: list[str], prompt: str) -> list[dict]:
    """One job per image file; a folder stands for the images in it (sorted); "a.jpg,b.jpg" is one job with
    two images (the prompt's <image> markers place them, else they go first)."""
    jobs = []
    for path in paths:
        if "," in path and not os.path.exists(path):
            jobs.append({"image": path.split(","), "prompt": prompt})
        elif os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            jobs += [{"image": os.path.join(path, n), "prompt": prompt} for n in names]
        else:
            jobs.append({"image": path, "prompt": prompt})
    return jobs


def llava_jobs(data_path: str, prompt: str | None) -> list[dict]:
    """One job per entry of a LLaVA JSON: its first human turn (or --prompt) and its first answer."""
    return [{"id": entry.get("id"), "image": entry.get("image"), "reference": first_answer(entry),
             "prompt": prompt or first_question(entry) or DEFAULT_PROMPT} for entry in load_llava_json(data_path)]


def image_loader(image_source):
    """job -> its image: a file path, or a name in image_source (a folder or zip); a list of images for a
    list of names; None without an image."""
    def load_one(name: str) -> Image.Image:
        if image_source is None:
            with open(name, "rb") as f:
                return decode_image(f.read())
        return decode_image(image_source.read(name))

    def load(job: dict) -> Image.Image | list | None:
        if not job.get("image"):
            return None
        return [load_one(n) for n in job["image"]] if isinstance(job["image"], list) else load_one(job["image"])
    return load


def answer(model, jobs: list[dict], load_image, device, dtype, batch_size: int = 16, **generation) -> list[dict]:
    """Fill in each job's "answer" (a job has a "prompt"; load_image(job) gives its image, or None for a
    text-only question), or its "error" when its image cannot be read; the others go on. generation:
    TinyVLM.generate's options (max_new_tokens, do_sample, ...). Used by generate.py, eval.py and the demo."""
    progress = tqdm(total=len(jobs), disable=len(jobs) <= batch_size, desc="generating", file=sys.stderr)
    for start in range(0, len(jobs), batch_size):
        batch, images = [], []
        for job in jobs[start:start + batch_size]:
            try:
                images.append(load_image(job))
                batch.append(job)
            except IMAGE_ERRORS as error:  # the caller reports it: generate.py once, eval.py in its counts
                job["error"] = f"cannot read image: {error}"
        if batch:
            with autocast(device, dtype):
                answers = model.generate(images, [job["prompt"] for job in batch], **generation)
            for job, text in zip(batch, answers):
                job["answer"] = text
        progress.update(len(jobs[start:start + batch_size]))
    progress.close()
    return jobs


def write_predictions(jobs: list[dict], path: str) -> None:
    with open(path, "w") as f:
        if path.endswith(".jsonl"):
            f.writelines(json.dumps(job) + "\n" for job in jobs)
        else:
            json.dump(jobs, f, indent=1)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    missing = [f"--image {path!r}: not found" for path in args.image or [] for path in (
        path.split(",") if "," in path and not os.path.exists(path) else [path]) if not os.path.exists(path)]
    exit_if_problems("generate.py", runtime_problems(args.device, args.dtype, args.attn_implementation, args.checkpoint)
                     + missing)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    model, _, device, dtype = load_for_inference(args.checkpoint, args.device, args.dtype, args.attn_implementation)
    if args.data:
        jobs, image_source = llava_jobs(args.data, args.prompt), open_image_source(args.image_root)
    else:
        jobs, image_source = image_jobs(args.image, args.prompt or DEFAULT_PROMPT), None
    jobs = answer(model, jobs, image_loader(image_source), device, dtype, args.batch_size,
                  max_new_tokens=args.max_new_tokens,
                  do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p)
    if args.output:
        write_predictions(jobs, args.output)
        print(f"wrote {len(jobs)} predictions to {args.output}", file=sys.stderr)
    failed = [job for job in jobs if "error" in job]
    for job in jobs:
        if "error" in job:
            print(f"generate.py: error: {job['image']}: {job['error']}", file=sys.stderr)
        elif not args.output:
            print(f"{job['image']}: {job['answer']}")
    if failed and len(jobs) > 1:
        print(f"generate.py: {len(failed)} of {len(jobs)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
