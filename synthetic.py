"""Synthetic models and data for bench.py and the tests, made offline: TinyVLM's encoders at their real sizes
or tiny, with random weights, in memory or saved as from_pretrained folders; and data shaped like
LLaVA-CC3M-Pretrain-595K and llava_v1_5_mix665k (entries, JPEGs, images.zip, chat.json), at any scale.
"""

import io
import json
import os
import random
import zipfile

import torch
from PIL import Image, ImageDraw
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          SiglipVisionConfig, SiglipVisionModel)

from model import SIGLIP_PREPROCESSING, ModelConfig, TinyVLM

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "smollm2-tokenizer")
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)
# Tiny encoders: a 32 px SigLIP of 8 px patches (4 image tokens after pixel shuffle 2) and a 2-layer Llama with
# SmolLM2's vocabulary, its weights large enough (initializer_range 0.5) for the image tokens to sway it
TINY_IMAGE_SIZE = 32
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
TINY_LM = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.5)


# ----------------------------------------------------------------------------------------------------------
# Models


def language_model_config(tokenizer, tiny: bool, **overrides) -> LlamaConfig:
    return LlamaConfig(**{**(TINY_LM if tiny else SMOLLM2_135M), **overrides}, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# Chat LM families, tiny and random, each with its own turn format: written here in each family's layout (the
# real templates carry more: tools, reasoning), on SmolLM2's vocabulary with the family's turn tokens added.
# The Llama 3 and Gemma formats end a turn with a token that is not the tokenizer's eos_token.
LLAMA3_TEMPLATE = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA_TEMPLATE = ("<bos>{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
                  "{% set ns.system = m['content'] + '\n\n' if m['content'] else '' %}{% else %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
                  "{{ ns.system if loop.index0 == 1 and ns.system else '' }}{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LM_FAMILIES = {  # name: (transformers model_type, config overrides, chat template or None for SmolLM2's, tokens)
    "smollm2": ("llama", {}, None, []),
    "llama3": ("llama", {}, LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                              "<|eot_id|>"]),
    "qwen2": ("qwen2", {}, None, []),
    "qwen3": ("qwen3", {"head_dim": 16}, None, []),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 512, "query_pre_attn_scalar": 16}, GEMMA_TEMPLATE,
               ["<bos>", "<start_of_turn>", "<end_of_turn>"]),
}
END_OF_TURN = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>",
               "gemma3": "<end_of_turn>"}


def family_language_model(folder: str, family: str) -> str:
    """A tiny random causal LM of a family with its tokenizer and chat template, saved for from_pretrained."""
    model_type, overrides, template, tokens = LM_FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
        tokenizer.eos_token = "<|endoftext|>"  # not the end of a turn, as in these families
    if template:
        tokenizer.chat_template = template
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY_LM, "vocab_size": len(tokenizer), **overrides},
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(f"{folder}/{family}")
    tokenizer.save_pretrained(f"{folder}/{family}")
    return f"{folder}/{family}"


def vision_config(tiny: bool, image_size: int = 224, **overrides) -> SiglipVisionConfig:
    """SigLIP-base-patch16-224's architecture (SiglipVisionConfig's defaults), or the tiny one, without the
    pooling head a VLM does not use."""
    return SiglipVisionConfig(vision_use_head=False, image_size=image_size, **(TINY_VISION if tiny else {}),
                              **overrides)


# Tiny random encoders of other families, with preprocessor configs in their families' manner: CLIP's vision
# tower and DINOv2 with registers resize the shorter side and crop the centre, and put a class token (and
# registers) before the patches. 32 px crops of 8 px patches, as the tiny SigLIP.
ENCODER_FAMILIES = {
    "clip": ("clip_vision_model", {}, {"size": {"shortest_edge": 32}, "image_mean": [0.4815, 0.4578, 0.4082],
                                       "image_std": [0.2686, 0.2613, 0.2758]}),
    "dinov2": ("dinov2_with_registers", {"num_register_tokens": 4, "image_size": 32},
               {"size": {"shortest_edge": 40}, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
}


def family_vision_model(folder: str, family: str) -> str:
    """A tiny random vision encoder of a family with its preprocessor config, saved for from_pretrained."""
    model_type, overrides, preprocessing = ENCODER_FAMILIES[family]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY_VISION, "image_size": TINY_IMAGE_SIZE, **overrides})
    AutoModel.from_config(config).save_pretrained(f"{folder}/{family}")
    with open(f"{folder}/{family}/preprocessor_config.json", "w") as f:
        json.dump({"do_resize": True, "resample": 3, "do_center_crop": True,
                   "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, **preprocessing}, f)
    return f"{folder}/{family}"


def model_folders(folder: str, tokenizer, tiny: bool = True) -> dict:
    """A random SigLIP (with its preprocessor config) and a random Llama with the real SmolLM2 tokenizer and chat
    template, saved as from_pretrained folders: what main.py loads. Tiny (32 px images), or at the real sizes
    (224 px, saved in bf16)."""
    torch.manual_seed(0)
    image_size = TINY_IMAGE_SIZE if tiny else 224
    vision = SiglipVisionModel(vision_config(tiny, image_size))
    lm = LlamaForCausalLM(language_model_config(tokenizer, tiny))
    if not tiny:
        vision, lm = vision.to(torch.bfloat16), lm.to(torch.bfloat16)
    vision.save_pretrained(f"{folder}/vision")
    with open(f"{folder}/vision/preprocessor_config.json", "w") as f:
        json.dump(dict(SIGLIP_PREPROCESSING, size={"height": image_size, "width": image_size}), f)
    lm.save_pretrained(f"{folder}/lm")
    tokenizer.save_pretrained(f"{folder}/lm")
    return {"vision_model": f"{folder}/vision", "language_model": f"{folder}/lm"}


def random_model(tiny: bool, weights_dtype: torch.dtype, attention: str, tokenizer, device) -> TinyVLM:
    """TinyVLM in memory, at the real sizes (or tiny encoders at 224 px) with random weights: the default
    feature layer, pixel shuffle and projector width (tiny: 64)."""
    torch.manual_seed(0)
    vision = SiglipVisionModel(vision_config(tiny, attn_implementation=attention))
    lm = LlamaForCausalLM(language_model_config(tokenizer, tiny, attn_implementation=attention))
    config = ModelConfig(vision_model="random SigLIP", language_model="random SmolLM2", vision_feature_layer=-2,
                         pixel_shuffle_factor=2, projector_hidden_dim=64 if tiny else 12288)
    model = TinyVLM(config, vision.to(weights_dtype), lm.to(weights_dtype), tokenizer, SIGLIP_PREPROCESSING)
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------
# Data

INSTRUCTIONS = ("Describe the image concisely.", "Provide a brief description of the given image.",
                "Summarize the visual content of the image.")  # three of LLaVA-CC3M's


CAPTION_WORDS = ("a photo of the old stone bridge over the river in the autumn light with people walking "
                 "across it near a small town").split()

# llava_v1_5_mix665k as the LLaVA-1.5 paper lists it (its Table 7: source, conversations), and how each source
# is shaped there: (image, turns, words per question, words per answer), each drawn uniformly from its range.
# The shapes are estimates from how LLaVA-1.5 formats each source (all questions about one image in one
# conversation; short answers with a one-word instruction), not statistics of the file, which cannot be read here.
SHORT_ANSWER = "Answer the question using a single word or phrase."
MIX665K_SOURCES = {
    "LLaVA-Instruct conversation": (58_000, True, (1, 5), (6, 15), (20, 120), ""),
    "LLaVA-Instruct detail": (23_000, True, (1, 1), (6, 12), (60, 150), ""),
    "LLaVA-Instruct reasoning": (77_000, True, (1, 1), (10, 25), (60, 180), ""),
    "ShareGPT (text only)": (40_000, False, (1, 6), (10, 200), (50, 400), ""),
    "VQAv2": (83_000, True, (2, 8), (4, 10), (1, 3), SHORT_ANSWER),
    "GQA": (72_000, True, (3, 15), (6, 14), (1, 3), SHORT_ANSWER),
    "OKVQA": (9_000, True, (1, 3), (6, 12), (1, 3), SHORT_ANSWER),
    "OCRVQA": (80_000, True, (3, 7), (5, 10), (1, 8), SHORT_ANSWER),
    "A-OKVQA": (66_000, True, (1, 2), (20, 35), (1, 1), "Answer with the option's letter."),
    "TextCaps": (22_000, True, (1, 1), (8, 8), (8, 20), ""),
    "RefCOCO": (48_000, True, (2, 10), (10, 15), (2, 8), ""),
    "VG": (86_000, True, (3, 12), (10, 14), (3, 10), ""),
}
WORDS = (CAPTION_WORDS + "what is the man holding in his hand why might this be a good place to sit and read "
         "describe picture region colour number written sign [0.12, 0.34, 0.56, 0.78]".split())


def cc3m_like_entries(count: int, seed: int = 0) -> list[dict]:
    """LLaVA-CC3M entries: a LLaVA instruction and a caption of 6-16 words (CC3M's are about 10)."""
    rng = random.Random(seed)
    return [{"id": str(i), "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": f"{rng.choice(INSTRUCTIONS)}\n<image>"},
        {"from": "gpt", "value": " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(6, 16))) + " ."}]}
        for i in range(count)]


def mix665k_like_entries(count: int, seed: int = 0) -> list[dict]:
    """LLaVA entries drawn from MIX665K_SOURCES in proportion to their sizes."""
    rng = random.Random(seed)
    names = list(MIX665K_SOURCES)
    weights = [MIX665K_SOURCES[name][0] for name in names]
    entries = []
    for i in range(count):
        _, has_image, turns, question_words, answer_words, suffix = MIX665K_SOURCES[rng.choices(names, weights)[0]]
        conversation = []
        for k in range(rng.randint(*turns)):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*question_words))) + "? " + suffix
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*answer_words))) + "."
            marker = "<image>\n" if has_image and k == 0 else ""
            conversation += [{"from": "human", "value": marker + question.strip()}, {"from": "gpt", "value": answer}]
        entries.append({"id": str(i), **({"image": f"{i}.jpg"} if has_image else {}), "conversations": conversation})
    return entries


def encoded_samples(model: TinyVLM, entries: list[dict], max_length: int, seed: int = 0) -> list[dict]:
    """Entries as training samples; those longer than max_length skipped, as in training. The samples with
    an image share one random image: its pixels do not change the time a step takes."""
    image = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    samples = []
    for entry in entries:
        input_ids, labels = model.processor.encode_llava(entry["conversations"])
        if len(input_ids) > max_length:
            samples.append({"skipped": "too long"})
            continue
        samples.append({"input_ids": input_ids, "labels": labels, "pixels": image if "image" in entry else None})
    return samples


def cc3m_like_samples(model: TinyVLM, count: int, seed: int = 0) -> list[dict]:
    """CC3M-like samples: a LLaVA instruction, a caption of 6-16 words (CC3M's are about 10), a 224 px image."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        caption = " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(6, 16))) + " ."
        turns = [{"from": "human", "value": f"{rng.choice(INSTRUCTIONS)}\n<image>"}, {"from": "gpt", "value": caption}]
        input_ids, labels = model.processor.encode_llava(turns)
        pixels = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator)
        samples.append({"input_ids": input_ids, "labels": labels, "pixels": pixels})
    return samples


def instruct_like_samples(model: TinyVLM, count: int, seed: int = 0) -> list[dict]:
    """LLaVA-Instruct-like samples: three question-answer turns of 40-70 words after the image."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        turns = []
        for k in range(3):
            question = " ".join(rng.choice(CAPTION_WORDS) for _ in range(10)) + "?"
            turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                      {"from": "gpt", "value": " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(40, 70)))}]
        input_ids, labels = model.processor.encode_llava(turns)
        pixels = torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator)
        samples.append({"input_ids": input_ids, "labels": labels, "pixels": pixels})
    return samples


def cc3m_like_jpeg(rng: random.Random, quality: int = 75, size: tuple[int, int] | None = None) -> bytes:
    """A JPEG like CC3M's (about 12 KB at 400 x 300; 14.5 KB at quality 85): a smooth gradient, a few shapes,
    texture. Of one of CC3M's usual sizes, or of `size`."""
    width, height = size or rng.choice([(400, 300), (300, 400), (500, 333), (333, 500)])
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + rng.randint(20, 150), y + rng.randint(20, 150)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(35 * width * height // 120_000):  # texture, so the JPEGs weigh what photos do
        x, y = rng.randrange(width), rng.randrange(height)
        draw.line((x, y, x + rng.randint(-60, 60), y + rng.randint(-60, 60)),
                  fill=tuple(rng.randrange(256) for _ in range(3)), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def cc3m_like_zip(folder: str, count: int, seed: int = 0, distinct: int = 0) -> str:
    """A zip of small JPEGs like CC3M's (about 11 KB each): smooth gradients with a few shapes. With distinct,
    only that many different ones, repeated (they are decoded the same way, and made faster)."""
    rng = random.Random(seed)
    pool = [cc3m_like_jpeg(rng) for _ in range(min(distinct, count))]
    path = os.path.join(folder, "images.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"GCC_train_{i:09d}.jpg", pool[i % len(pool)] if pool else cc3m_like_jpeg(rng))
    return path


def llava_caption_set(folder: str, num_train: int, num_val: int, seed: int = 0, distinct_images: int = 0) -> dict:
    """chat.json, val.json and images.zip in LLaVA-CC3M-Pretrain-595K's layout, with CC3M-like captions."""
    rng = random.Random(seed)
    zip_path = cc3m_like_zip(folder, num_train + num_val, seed, distinct_images)
    entries = []
    for i in range(num_train + num_val):
        caption = " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(6, 16))) + " ."
        entries.append({"id": f"GCC_train_{i:09d}", "image": f"GCC_train_{i:09d}.jpg", "conversations": [
            {"from": "human", "value": f"{rng.choice(INSTRUCTIONS)}\n<image>"}, {"from": "gpt", "value": caption}]})
    for name, part in (("chat.json", entries[:num_train]), ("val.json", entries[num_train:])):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(part, f)
    return {"data_path": f"{folder}/chat.json", "val_data_path": f"{folder}/val.json", "image_root": zip_path}


CC3M_ENTRIES = 595_375


def make_scale_set(folder: str, num_entries: int, num_images: int = CC3M_ENTRIES, seed: int = 0) -> dict:
    """A synthetic set shaped like LLaVA-CC3M-Pretrain-595K, made once under `folder` and reused:
    images.zip (num_images ZIP_STORED JPEGs of about 14.5 KB, 8.6 GB; 512 distinct ones repeat, to spare the CPU) and
    chat_<num_entries>.json (entry i shows image i mod num_images, so 5M entries reuse the 595K images)."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    zip_path, json_path = os.path.join(folder, "images.zip"), os.path.join(folder, f"chat_{num_entries}.json")
    if not os.path.isfile(zip_path):
        pool = [cc3m_like_jpeg(rng, quality=85) for _ in range(512)]
        with zipfile.ZipFile(zip_path + ".tmp", "w", zipfile.ZIP_STORED) as archive:
            for i in range(num_images):
                archive.writestr(f"GCC_train_{i:09d}.jpg", pool[i % len(pool)])
        os.replace(zip_path + ".tmp", zip_path)
    if not os.path.isfile(json_path):
        rng = random.Random(seed + 1)
        with open(json_path + ".tmp", "w") as f:  # written entry by entry: 5M entries never sit in memory
            f.write("[")
            for i in range(num_entries):
                instruction = rng.choice(INSTRUCTIONS)
                human = f"{instruction}\n<image>" if rng.random() < 0.5 else f"<image>\n{instruction}"
                caption = " ".join(rng.choices(CAPTION_WORDS, k=rng.randint(6, 14))) + " ."
                entry = {"id": f"GCC_train_{i:09d}", "image": f"GCC_train_{i % num_images:09d}.jpg",
                         "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]}
                f.write(("," if i else "") + json.dumps(entry))
            f.write("]")
        os.replace(json_path + ".tmp", json_path)
    return {"data_path": json_path, "image_root": zip_path}
