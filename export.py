"""Export a trained TinyVLM as one self-contained folder that plain transformers loads, with no TinyVLM code and
no network: transformers' own AyaVisionForConditionalGeneration (a SigLIP-style encoder, pixel shuffle, a
LayerNorm and a SwiGLU projector, then any causal LM) computes what TinyVLM computes.
  python export.py runs/stage1-20261127-1200 exported/            # a run (its best/ or checkpoint/) or a model folder
  python export.py runs/stage2-.../best exported/ --push_to_hub you/tinyvlm-stage2   # and upload it with a model card
Then, anywhere: AutoProcessor.from_pretrained("exported"), AutoModelForImageTextToText.from_pretrained("exported")
(the README shows a whole question and answer). In float32 (the default) its greedy answers are TinyVLM's in
float32: generate.py --dtype float32.
"""

import argparse
import glob
import json
import os
import sys

from cli import HelpFormatter, exit_if_problems


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("checkpoint", help="a TinyVLM model folder, or a run folder (its best/, else checkpoint/)")
    parser.add_argument("folder", help="where to write the exported model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="of the exported weights")
    parser.add_argument("--push_to_hub", default="", metavar="REPO", help="upload the folder, with a model card")
    parser.add_argument("--private", action="store_true", help="make the hub repository private")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads below
    parse_args(sys.argv[1:])

import torch
from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from model import TinyVLM, find_model_folder, readable_by_all

# What TinyVLM puts in a user turn: each image's placeholder run, then the text, joined by newlines
# (sources.llava_to_messages). This prefix turns the processor's messages, whose content is a list of
# {"type": "image"} and {"type": "text"} items, into such string turns and hands them to the language model's own
# chat template, which follows it unchanged.
MESSAGES_AS_TINYVLM_TURNS = """{%- set converted = namespace(messages=[]) -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}{%- set content = message['content'] -%}
{%- else -%}{%- set parts = namespace(texts=[]) -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{%- set parts.texts = parts.texts + ['<image>'] -%}
{%- elif item['type'] == 'text' and item['text'] | trim -%}{%- set parts.texts = parts.texts + [item['text'] | trim] -%}
{%- endif -%}
{%- endfor -%}
{%- set content = parts.texts | join('\\n') -%}
{%- endif -%}
{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': content}] -%}
{%- endfor -%}
{%- set messages = converted.messages -%}
"""


def system_turn(system_prompt: str | None) -> str:
    """Jinja that gives a conversation without a system turn TinyVLM's system prompt (None: the template's own)."""
    if system_prompt is None:
        return ""
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system_prompt)}}}] + messages -%}}"
            "{%- endif -%}\n")


def aya_config(model: TinyVLM) -> AyaVisionConfig:
    """The AyaVision configuration that computes what `model` computes: the encoder cut at the feature layer
    (that layer's hidden state, before the post-layernorm, as TinyVLM reads it), all its patches (no class token),
    the projector's pixel shuffle, LayerNorm eps and width, TinyVLM's image placeholder id."""
    vision_config = model.vision.config.to_dict()
    layers = len(model.vision.layers)
    # the feature layer's output is the last hidden state; a model fed by the patch embeddings (layer 0) keeps one
    # layer, unused (zero weights), as the encoder reports no hidden states without one, and reads the one before
    # (a negative index: AyaVision takes a feature layer of 0 for "no hidden states wanted")
    vision_config.update(num_hidden_layers=max(layers, 1), vision_use_head=False)
    text_config = model.lm.config.to_dict()
    text_config["vocab_size"] = vocabulary_size(model)
    return AyaVisionConfig(
        vision_config=vision_config, text_config=text_config,
        vision_feature_layer=-1 if layers else -2, vision_feature_select_strategy="full",
        downsample_factor=model.config.pixel_shuffle_factor, adapter_layer_norm_eps=model.projector.norm.eps,
        alignment_intermediate_size=2 * model.projector.gate.out_features, image_token_id=model.image_token_id,
        tie_word_embeddings=model.lm.config.tie_word_embeddings)


def vocabulary_size(model: TinyVLM) -> int:
    """The language model's vocabulary, widened to hold TinyVLM's image placeholder: TinyVLM never embeds it
    (its embedding is overwritten), but AyaVision looks it up before overwriting it."""
    return max(model.lm.config.vocab_size, model.image_token_id + 1)


def with_rows(matrix: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding or output matrix with zero rows appended up to `rows`."""
    return torch.cat([matrix, matrix.new_zeros(rows - len(matrix), matrix.shape[1])]) if rows > len(matrix) else matrix


def aya_weights(model: TinyVLM) -> dict:
    """TinyVLM's weights under AyaVision's names. TinyVLM's SwiGLU is down(silu(gate(x)) * up(x)); AyaVision's
    splits linear_1's output into (x, gate) and computes linear_2(silu(gate) * x): linear_1 is up stacked on
    gate. TinyVLM's projector has no biases, so AyaVision's are zero. SigLIP's post-layernorm is not on the path
    (AyaVision reads hidden_states[-1]); it is stored as the identity it is in TinyVLM."""
    projector = model.projector
    weights = {f"model.vision_tower.{name}": value for name, value in model.vision.model.state_dict().items()}
    prefix = "model.vision_tower." + ("vision_model." if hasattr(model.vision.model, "vision_model") else "")
    hidden = model.vision.config.hidden_size
    weights[prefix + "post_layernorm.weight"] = torch.ones(hidden)
    weights[prefix + "post_layernorm.bias"] = torch.zeros(hidden)
    weights.update({
        "model.multi_modal_projector.layernorm.weight": projector.norm.weight,
        "model.multi_modal_projector.layernorm.bias": projector.norm.bias,
        "model.multi_modal_projector.linear_1.weight": torch.cat([projector.up.weight, projector.gate.weight]),
        "model.multi_modal_projector.linear_1.bias": torch.zeros(2 * projector.gate.out_features),
        "model.multi_modal_projector.linear_2.weight": projector.down.weight,
        "model.multi_modal_projector.linear_2.bias": torch.zeros(projector.down.out_features),
    })
    rows = vocabulary_size(model)
    embedding = next(name for name, p in model.lm.named_parameters() if p is model.lm.get_input_embeddings().weight)
    for name, value in model.language_model_state().items():  # LoRA adapters, if any, merged in
        if name.startswith("model."):
            weights["model.language_model." + name.removeprefix("model.")] = (
                with_rows(value, rows) if name == embedding else value)
        elif name == "lm_head.weight" and not model.lm.config.tie_word_embeddings:
            weights[name] = with_rows(value, rows)
    return weights


def aya_processor(model: TinyVLM) -> AyaVisionProcessor:
    """Images resized to the encoder's size, one tile (AyaVisionProcessor asks for crops unless told otherwise at
    each call: max_patches=1 makes its answer one tile whatever it asks), rescaled and normalised as TinyVLM does;
    each <image> of the text widened to the image's run of placeholders with nothing around it; TinyVLM's
    system prompt and turn format in the chat template."""
    processor = model.processor
    height, width = processor.image_size
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": height, "width": width}, crop_to_patches=False, min_patches=1, max_patches=1,
        resample=2,  # bilinear, as TinyVLM's
        do_rescale=True, rescale_factor=processor.rescale_factor, do_normalize=True,
        image_mean=processor.image_mean, image_std=processor.image_std, do_convert_rgb=True)
    tokenizer = processor.tokenizer
    template = MESSAGES_AS_TINYVLM_TURNS + system_turn(processor.system_prompt) + tokenizer.chat_template
    patch_size = model.vision.config.patch_size
    return AyaVisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
        patch_size=patch_size, downsample_factor=model.config.pixel_shuffle_factor, img_size=height,
        image_token="<image>", img_patch_token=processor.image_token,
        start_of_img_token="", end_of_img_token="", tile_global_token="", img_line_break_token="")


def export(model: TinyVLM, folder: str, dtype: torch.dtype = torch.float32) -> dict:
    """Write `model` to folder as an AyaVision model with its processor; returns the files and their sizes."""
    if model.vision.config.model_type != "siglip_vision_model" or model.processor.shortest_edge:
        raise ValueError(f"export.py writes SigLIP-family encoders (as AyaVision prepares images: resized, not "
                         f"cropped, no class token); this one is {model.vision.config.model_type}")
    if model.processor.image_size[0] != model.processor.image_size[1]:
        raise ValueError(f"AyaVision takes square images; this encoder takes {model.processor.image_size}")
    config = aya_config(model)
    with torch.device("meta"):
        aya = AyaVisionForConditionalGeneration(config)
    weights = {name: value.detach().to("cpu", dtype) for name, value in aya_weights(model).items()}
    if not model.vision.layers:
        weights.update({name: torch.zeros(p.shape, dtype=dtype) for name, p in aya.named_parameters()
                        if name.startswith("model.vision_tower.") and ".encoder.layers.0." in f".{name}"})
    aya.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        aya.tie_weights()
    missing = [name for name, p in aya.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the export left AyaVision's {missing[:5]} without weights")
    aya.generation_config.eos_token_id = model.processor.end_of_turn_id
    # the placeholder's widened output row is never a word: greedy answers stay TinyVLM's
    aya.generation_config.suppress_tokens = [model.image_token_id]
    aya.generation_config.pad_token_id = model.processor.tokenizer.pad_token_id
    aya.save_pretrained(folder)
    aya_processor(model).save_pretrained(folder)
    readable_by_all(folder)
    return {os.path.relpath(path, folder): os.path.getsize(path) for path in sorted(glob.glob(f"{folder}/*"))}


# ----------------------------------------------------------------------------------------------------------
# The model card and the upload

LICENCES = {"google/siglip-base-patch16-224": "apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}


def training_record(model_folder: str) -> dict | None:
    """What a run says about the model in model_folder (a run's best/ or checkpoint/): its training config and
    the last logged step, train loss and validation loss; None for a model folder outside a run."""
    run_dir = os.path.dirname(os.path.abspath(model_folder))
    config_path = os.path.join(run_dir, "checkpoint", "training_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        record = {"config": json.load(f)}
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
        for key in ("train/loss", "val/loss"):
            logged = [m for m in metrics if key in m]
            if logged:
                record[key] = (logged[-1]["step"], logged[-1][key])
    return record


def stages(model_folder: str) -> list[dict]:
    """The training records of model_folder and of the models it started from (--init_from), first stage first."""
    records, folder = [], model_folder
    while folder and len(records) < 4:
        record = training_record(folder)
        if record is None:
            break
        records.insert(0, record)
        init_from = record["config"].get("init_from")
        folder = find_model_folder(init_from) if init_from and os.path.isdir(init_from) else None
    return records


CARD_USAGE = """## Use it with transformers

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo}")
model = AutoModelForImageTextToText.from_pretrained("{repo}")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("photo.jpg")], text=text, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Use it with TinyVLM

The TinyVLM model folder it was exported from loads with `TinyVLM.from_pretrained(folder)`, and
`python generate.py --checkpoint folder --image photo.jpg` answers from the shell.
"""


def model_card(model_folder: str, repo: str) -> str:
    """README.md for the hub: the base models and their licences, the data and stages, steps and final
    losses, eval.py's results when the folder has them, and how to load the model."""
    with open(os.path.join(model_folder, "config.json")) as f:
        config = json.load(f)
    bases = [config["vision_model"], config["language_model"]]
    licences = [LICENCES.get(base, "see its model card") for base in bases]
    records = stages(model_folder)
    hub_data = sorted({r["config"]["data_path"] for r in records if not os.path.exists(r["config"]["data_path"])})
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             f"license: {licences[0] if len(set(licences)) == 1 and licences[0] in LICENCES.values() else 'other'}",
             "base_model:", *[f"- {base}" for base in bases],
             *(["datasets:", *[f"- {name}" for name in hub_data]] if hub_data else []),
             "tags:", "- tinyvlm", "---", "", f"# {repo}", "",
             f"A small vision-language model trained with TinyVLM: the frozen vision encoder `{bases[0]}` and the "
             f"language model `{bases[1]}`, joined by a SwiGLU projector over pixel-shuffled patch features "
             f"(factor {config['pixel_shuffle_factor']}). It is stored as transformers' AyaVision architecture, "
             "which computes exactly what TinyVLM computes.", "",
             "| base model | licence |", "|---|---|", *[f"| `{b}` | {lic} |" for b, lic in zip(bases, licences)],
             "", "## Training", ""]
    if not records:
        lines.append("No training run was found beside the exported model folder.")
    else:
        lines += ["| stage | data | trained | steps | final train loss | final validation loss |",
                  "|---|---|---|---|---|---|"]
    for record in records:
        cfg = record["config"]
        trained = "the projector" if cfg["stage"] == "pretrain" else "the projector and the language model"
        step, train_loss = record.get("train/loss", ("-", float("nan")))
        val = f"{record['val/loss'][1]:.4f} (step {record['val/loss'][0]})" if "val/loss" in record else "-"
        lines.append(f"| {cfg['stage']} | `{cfg['data_path']}` | {trained} | {step} | {train_loss:.4f} | {val} |")
    results_path = os.path.join(model_folder, "eval_results.json")
    if os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f).get("results", {})
        lines += ["", "## Evaluation (TinyVLM's eval.py)", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {task} | {metric} | {value:.4g} |" for task, metrics in results.items()
                  for metric, value in metrics.items() if isinstance(value, (int, float))]
    return "\n".join(lines) + "\n\n" + CARD_USAGE.format(repo=repo)


def write_model_card(folder: str, model_folder: str, repo: str) -> str:
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(model_card(model_folder, repo))
    return path


def push_to_hub(folder: str, repo: str, private: bool = False) -> str:
    """Upload the exported folder (model, processor, card) to the hub repository `repo`; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo, commit_message="TinyVLM export")
    return str(url)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        source = find_model_folder(args.checkpoint)
    except FileNotFoundError as error:
        exit_if_problems("export.py", [f"checkpoint {args.checkpoint!r}: {error}"])
    model = TinyVLM.from_pretrained(source)
    sizes = export(model, args.folder, getattr(torch, args.dtype))
    for name, size in sizes.items():
        print(f"{size / 1e6:10.1f} MB  {args.folder}/{name}")
    if args.push_to_hub:
        write_model_card(args.folder, source, args.push_to_hub)
        print(f"uploaded: {push_to_hub(args.folder, args.push_to_hub, args.private)}")


if __name__ == "__main__":
    main()
