"""What several test modules do: run the training loop, read what a run wrote, make samples and images, train
under torchrun, compare two runs' updates."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import zipfile

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from data import LLaVADataset
from main import VLMConfig, build_model, command_line, forward_backward, train
from model import pick_dtype
from sources import open_image_source

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cfg: VLMConfig) -> str:
    """main.py's training loop on cfg's device, in this process; returns the run folder."""
    device = torch.device(cfg.device if cfg.device != "auto" else "cpu")
    dtype = pick_dtype(cfg.dtype, device)
    return train(cfg, build_model(cfg, device, dtype), device, dtype)


def gradient(model, micro_batches: list) -> torch.Tensor:
    """The gradient of the trained weights that one step of these micro-batches gives, flattened."""
    model.zero_grad()
    forward_backward(model, micro_batches, CPU, torch.float32, torch.amp.GradScaler("cpu", enabled=False))
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir: str) -> list[float]:
    return [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]


def checkpoint_weights(run_dir: str, folder: str = "checkpoint") -> dict:
    """The trained weights a run saved: the projector's and, after stage 2, the language model's."""
    folder = os.path.join(run_dir, folder)
    weights = load_file(os.path.join(folder, "projector.safetensors"))
    lm_file = os.path.join(folder, "language_model", "model.safetensors")
    return {**weights, **(load_file(lm_file) if os.path.isfile(lm_file) else {})}


def straight_and_resumed(cfg: VLMConfig, first_steps: int) -> tuple[str, str]:
    """cfg's run straight through, and the same run stopped after first_steps and resumed to the end."""
    straight = run(dataclasses.replace(cfg, run_name="straight"))
    run(dataclasses.replace(cfg, run_name="halves", max_steps=first_steps))
    return straight, run(dataclasses.replace(cfg, run_name="halves", resume=os.path.join(cfg.out_dir, "halves")))


def conversations(cfg, model, count: int) -> list[dict]:
    """The first `count` stage-2 samples, text-only ones among them, each image a different one."""
    entries = json.load(open(cfg.data_path))
    dataset = LLaVADataset(entries[:count], open_image_source(cfg.image_root), model.processor, cfg.max_length)
    samples = [dataset[i] for i in range(count)]
    assert any(s["pixels"] is None for s in samples) and any(s["pixels"] is not None for s in samples)
    return samples


def samples(model, count: int) -> list[dict]:
    """Conversations of different lengths, each with a random image of the model's size."""
    torch.manual_seed(0)
    result = []
    for i in range(count):
        turns = [{"from": "human", "value": "<image>\nDescribe" + " it" * i},
                 {"from": "gpt", "value": "a red circle" + " and a square" * (i % 3) + "."}]
        input_ids, labels = model.processor.encode_llava(turns)
        result.append({"input_ids": input_ids, "labels": labels,
                       "pixels": torch.randint(0, 256, (3, *model.processor.image_size), dtype=torch.uint8)})
    return result


def shape_images(shapes_data: str, count: int) -> list:
    with zipfile.ZipFile(os.path.join(shapes_data, "images.zip")) as archive:
        names = sorted(archive.namelist())[:count]
        return [Image.open(io.BytesIO(archive.read(n))).convert("RGB") for n in names]


def scripted_language_model(tokenizer, script: list[int], folder: str) -> None:
    """A tiny Llama whose greedy continuation of any prompt is exactly `script`: every layer's output is
    zeroed, so the next token depends only on the current one, and the embeddings and head chain
    (any token) -> script[0] -> script[1] -> ..."""
    hidden = 32
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id))
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding, head = lm.model.embed_tokens.weight, lm.lm_head.weight
        embedding.zero_()
        embedding[:, 0] = 1.0  # every token: direction 0
        head.zero_()
        head[script[0], 0] = 10.0  # direction 0 -> the first scripted token
        for i, (current, following) in enumerate(zip(script, script[1:]), start=1):
            embedding[current] = 0.0
            embedding[current, i] = 1.0
            head[following, i] = 10.0
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def scramble(model) -> None:
    """Weights large enough for the image and the prompt to change a tiny model's answers."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in list(model.projector.parameters()) + list(model.lm.parameters()):
            p.normal_(0, 0.5)


def torchrun(cfg: VLMConfig, processes: int) -> str:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", "main.py", *command_line(cfg)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return os.path.join(cfg.out_dir, cfg.run_name)


def initial_weights(cfg: VLMConfig, part: str = "projector") -> dict:
    return getattr(build_model(cfg, CPU, torch.float32), part).state_dict()


def assert_same_updates(initial: dict, a: dict, b: dict, tolerance: float = 0.01) -> None:
    """Two runs moved the weights the same way, to `tolerance` of how far they moved. Bit equality is not to be
    had: one batch of 4 and two of 2 pad to different lengths, and Adam magnifies the rounding differences of
    near-zero gradients."""
    for name in a:
        update, difference = (a[name] - initial[name]).norm(), (a[name] - b[name]).norm()
        assert update > 0 and difference < tolerance * update, (name, difference / update)


# Run in a fresh interpreter isolated from the repository (-I: no script folder, cwd or PYTHONPATH on sys.path):
# the exported folder, each case's images and messages in, prompt ids and greedy answers out.
PLAIN_TRANSFORMERS = r"""
import json, sys
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
try:
    import model
    sys.exit("TinyVLM is importable here")
except ImportError:
    pass
folder, cases, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
processor = AutoProcessor.from_pretrained(folder)
vlm = AutoModelForImageTextToText.from_pretrained(folder)
results = []
for case in cases:
    content = [{"type": "image"} for _ in case["images"]] + [{"type": "text", "text": case["prompt"]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [Image.open(path) for path in case["images"]] or None
    inputs = processor(images=images, text=text, return_tensors="pt")
    output = vlm.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    results.append({"input_ids": inputs["input_ids"][0].tolist(),
                    "answer": processor.decode(output[0, prompt_length:], skip_special_tokens=True).strip(),
                    "pixel_values": inputs["pixel_values"].tolist() if images else None})
print(json.dumps(results))
"""


def random_images(folder, size, count: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator).numpy()
        paths.append(str(folder / f"image{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def answers_in_plain_transformers(folder: str, cases: list[dict], new_tokens: int, cwd) -> list[dict]:
    result = subprocess.run([sys.executable, "-I", "-c", PLAIN_TRANSFORMERS, folder, json.dumps(cases), str(new_tokens)],
                            cwd=cwd, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=""))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_answers_like_tinyvlm(model, folder: str, tmp_path, new_tokens: int = 10) -> None:
    """Same prompt ids and same greedy answers for one image, two images and no image."""
    images = random_images(tmp_path, model.processor.image_size[::-1], 4)
    cases = [{"images": [images[0]], "prompt": "Describe the image."},
             {"images": [images[1]], "prompt": "What colour is the shape?"},
             {"images": [images[2], images[3]], "prompt": "What differs between the two?"},
             {"images": [], "prompt": "What is the capital of France?"}]
    plain = answers_in_plain_transformers(folder, cases, new_tokens, tmp_path)
    for case, result in zip(cases, plain):
        pictures = [Image.open(path) for path in case["images"]]
        messages = model.processor.prompt_messages(case["prompt"], len(pictures))
        assert result["input_ids"] == model.processor.encode_prompt(messages), case
        expected = model.generate([pictures or None], case["prompt"], max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens)
        assert result["answer"] == expected[0], case


