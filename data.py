"""LLaVA-format data for TinyVLM: read chat.json + images (a folder or images.zip), build chat prompts with
the language model's own chat template, mask the labels to the assistant's tokens, and batch.
Used by main.py (training), generate.py (inference) and eval.py; `Processor` is the one place where an
image and a conversation become tensors, so training and inference prompts cannot drift apart.
"""

import io
import json
import os
import signal
import zipfile
from collections import Counter
from itertools import count

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

IGNORE_INDEX = -100  # label of a token that carries no loss
IMAGE_MARKER = "<image>"  # where LLaVA data puts the image in a human turn
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency composited on white, 16/32-bit and float scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert() clips these at 255 instead of scaling them, which turns most images white.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) * (255.0 / max(high - low, 1e-12))
        image = Image.fromarray(array.round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


class ImageFolder:
    """Images under a root folder; `name` is the path relative to it (LLaVA's "image" field)."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root = root

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()


class ImageZip:
    """Images read straight from a zip file (LLaVA's images.zip) without unpacking it.

    Each process opens its own handle on first use: a ZipFile shared across DataLoader workers would have
    them seek the same file descriptor under each other. Names may be stored under one top-level folder
    (images/GCC_train_x.jpg) while chat.json says GCC_train_x.jpg; both resolve.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image zip not found: {path}")
        self.path = path
        self._zip, self._pid, self._prefix = None, None, ""

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
            top_folders = {n.split("/", 1)[0] for n in names}
            if len(top_folders) == 1 and all("/" in n for n in names):
                self._prefix = top_folders.pop() + "/"
        return self._zip

    def read(self, name: str) -> bytes:
        archive = self._open()
        try:
            return archive.read(name)
        except KeyError:
            if not self._prefix:
                raise FileNotFoundError(f"{name} is not in {self.path}") from None
        try:
            return archive.read(self._prefix + name)
        except KeyError:
            raise FileNotFoundError(f"{name} is not in {self.path}") from None

    def __getstate__(self):  # DataLoader workers get the path, never an open handle
        return {**self.__dict__, "_zip": None, "_pid": None}


def open_image_source(path: str):
    """A folder or a .zip of images, chosen by what `path` is."""
    return ImageZip(path) if path.endswith(".zip") else ImageFolder(path)


def decode_image(data: bytes) -> Image.Image:
    """Bytes to a fully decoded RGB image; raises on a truncated or unreadable file."""
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so a truncated file fails here and not later
    return to_rgb(image)


# ----------------------------------------------------------------------------------------------------------
# LLaVA conversations


def load_llava_json(path: str) -> list:
    """The raw list of entries in a LLaVA-format JSON file (a list, or JSON lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                entries = [json.loads(line) for line in f if line.strip()]
            else:
                entries = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read LLaVA data file {path}: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


def check_entry(entry, require_image: bool) -> str | None:
    """Why a LLaVA entry cannot be trained on, or None if it is fine. Cheap: text only, no image I/O."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        return "malformed entry"
    turns = entry["conversations"]
    if not turns or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        return "malformed entry"
    if any(t.get("from") not in ROLES for t in turns):
        return "unknown role"
    if next((t["from"] for t in turns if t["from"] != "system"), None) != "human":
        return "does not start with a human turn"
    if not any(t["from"] == "gpt" for t in turns):
        return "no assistant turn"
    if any(t["from"] == "gpt" and not t["value"].strip() for t in turns):
        return "empty caption"
    markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    has_image = bool(entry.get("image"))
    if has_image and markers == 0:
        return "no <image> marker"
    if markers > 1:
        return "several <image> markers"
    if not has_image and markers == 1:
        return "<image> marker without image"
    if markers == 1 and IMAGE_MARKER not in next(t["value"] for t in turns if t["from"] == "human"):
        return "<image> not in the first human turn"
    if require_image and not has_image:
        return "no image"
    return None


def filter_entries(entries: list, require_image: bool) -> tuple[list, Counter, list]:
    """Keep the usable entries; count the others by reason and keep a few examples for the log."""
    kept, skipped, examples = [], Counter(), []
    for index, entry in enumerate(entries):
        reason = check_entry(entry, require_image)
        if reason is None:
            kept.append(entry)
            continue
        skipped[reason] += 1
        if len(examples) < 5:
            entry_id = entry.get("id", "?") if isinstance(entry, dict) else "?"
            examples.append(f"entry {index} (id {entry_id}): {reason}")
    return kept, skipped, examples


def split_entries(entries: list, val_size: int, seed: int) -> tuple[list, list]:
    """A seeded, fixed train/validation split: the same seed always holds out the same entries."""
    if not 0 < val_size < len(entries):
        raise ValueError(f"val_size={val_size} must be between 1 and the number of entries - 1 ({len(entries) - 1})")
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:val_size])
    val_set = set(val)
    return [e for i, e in enumerate(entries) if i not in val_set], [entries[i] for i in val]


def first_question(entry: dict) -> str:
    """The first human turn of a LLaVA entry without its <image> marker: the prompt to ask at inference."""
    turns = entry.get("conversations", [])
    question = next((t["value"] for t in turns if t.get("from") == "human"), "")
    return question.replace(IMAGE_MARKER, "").strip()


def first_answer(entry: dict) -> str | None:
    return next((t["value"] for t in entry.get("conversations", []) if t.get("from") == "gpt"), None)


def to_messages(conversations: list, image_placeholder: str) -> list[dict]:
    """LLaVA turns as chat-template messages: human/gpt become user/assistant; the <image> marker, before
    or after the instruction, is removed and the image placeholder put first, as LLaVA does."""
    messages = []
    for turn in conversations:
        text = turn["value"].strip()
        if IMAGE_MARKER in text:
            instruction = text.replace(IMAGE_MARKER, "").strip()
            text = image_placeholder + ("\n" + instruction if instruction else "")
        messages.append({"role": ROLES[turn["from"]], "content": text})
    return messages


def chat_turns(conversation: list[dict], with_image: bool) -> list[dict]:
    """A conversation so far, ending with the user's question, as LLaVA turns. It may be written as chat
    messages ({"role": "user"/"assistant"/"system", "content"}) or as LLaVA turns ({"from", "value"}). With an
    image and no <image> marker, the marker goes first in the first user turn, where LLaVA data has it.
    Raises ValueError on a conversation training would not accept, so a prompt never holds a stray marker."""
    llava_role = {role: llava for llava, role in ROLES.items()}
    turns = []
    for index, turn in enumerate(conversation):
        turn = turn if isinstance(turn, dict) else {}
        role = turn.get("from", llava_role.get(turn.get("role")))
        text = turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(text, str):
            raise ValueError(f"turn {index} of the conversation is not a user, assistant or system message")
        turns.append({"from": role, "value": text})
    speakers = [turn["from"] for turn in turns if turn["from"] != "system"]
    if not speakers or speakers[0] != "human" or speakers[-1] != "human":
        raise ValueError("a conversation must start and end with a user turn")
    first_user_turn = next(turn for turn in turns if turn["from"] == "human")
    markers = sum(turn["value"].count(IMAGE_MARKER) for turn in turns)
    if with_image and markers == 0:
        first_user_turn["value"] = f"{IMAGE_MARKER}\n{first_user_turn['value']}"
    elif markers != with_image or (markers and IMAGE_MARKER not in first_user_turn["value"]):
        raise ValueError(f"{markers} {IMAGE_MARKER} markers for {int(with_image)} image: the one image goes in "
                         f"the first user turn")
    return turns


# ----------------------------------------------------------------------------------------------------------
# Processor: image and conversation to tensors, shared by training and inference


class Processor:
    """Turns images and conversations into model inputs, for training and for generation alike.

    image_settings is the vision encoder's own preprocessor config (size, resample, rescale, mean, std).
    Images are resized here (on the CPU, in DataLoader workers) and kept as uint8; the model rescales and
    normalises them on its device, which moves 4x fewer bytes to the GPU.
    """

    def __init__(self, tokenizer, image_settings: dict, image_token: str, num_image_tokens: int,
                 system_prompt: str | None = ""):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([image_token], special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_placeholder = image_token * num_image_tokens
        self.end_of_turn = tokenizer.eos_token  # SmolLM2-Instruct: <|im_end|>, the end of every turn
        self.end_of_turn_id = tokenizer.eos_token_id
        size = image_settings["size"]
        if "height" not in size or "width" not in size:
            raise ValueError(f"preprocessor config: expected size with height and width, got {size}")
        self.image_size = (size["height"], size["width"])
        self.resample = Image.Resampling(image_settings.get("resample", Image.Resampling.BICUBIC))
        rescale = image_settings.get("do_rescale", True)
        self.rescale_factor = image_settings.get("rescale_factor", 1 / 255) if rescale else 1.0
        normalize = image_settings.get("do_normalize", True)
        self.image_mean = image_settings["image_mean"] if normalize else [0.0, 0.0, 0.0]
        self.image_std = image_settings["image_std"] if normalize else [1.0, 1.0, 1.0]

    def image_to_pixels(self, image: Image.Image) -> torch.Tensor:
        """An RGB image resized for the encoder, as uint8 (3, H, W)."""
        height, width = self.image_size
        image = to_rgb(image).resize((width, height), self.resample)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template's text. A conversation without a system turn gets system_prompt as one (None
        leaves it to the template, which for SmolLM2 adds a 16-token default to every sample)."""
        if self.system_prompt is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and its labels: each assistant turn's content and its
        end-of-turn token are targets, every other token (system, user, image, role headers) is IGNORE."""
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            target = message["content"] + self.end_of_turn
            if text[start:start + len(target)] != target:
                raise ValueError("the chat template does not render an assistant turn as "
                                 "<generation prompt><content><end of turn>; cannot mask labels")
            spans.append((start, start + len(target)))
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = encoding["input_ids"]
        labels = [IGNORE_INDEX] * len(input_ids)
        for position, (token_start, _) in enumerate(encoding["offset_mapping"]):
            if any(start <= token_start < end for start, end in spans):
                labels[position] = input_ids[position]
        return input_ids, labels

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation up to the assistant's next turn: what generation starts from."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_messages(self, conversation: list[dict], with_image: bool) -> list[dict]:
        """A conversation so far (see chat_turns) as messages, formatted exactly like a training sample."""
        return to_messages(chat_turns(conversation, with_image), self.image_placeholder)

    def prompt_messages(self, prompt: str, with_image: bool = True) -> list[dict]:
        """A one-turn user prompt, with the image, formatted exactly like a training sample."""
        value = f"{IMAGE_MARKER}\n{prompt}" if with_image else prompt
        return to_messages([{"from": "human", "value": value}], self.image_placeholder)


# ----------------------------------------------------------------------------------------------------------
# Dataset, sampler, batches


SKIPPED_WHEN_LOADED = ("image missing", "image unreadable", "too long")  # the reasons LLaVADataset gives


class LLaVADataset(Dataset):
    """LLaVA entries as training samples. A sample that cannot be used (its image is missing, truncated or
    unreadable, or it is longer than max_length tokens) comes back as {"skipped": reason}; the collate
    function drops it and counts it, so one bad file never stops a run."""

    def __init__(self, entries: list, image_source, processor: Processor, max_length: int = 2048):
        self.entries, self.images, self.processor, self.max_length = entries, image_source, processor, max_length

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        messages = to_messages(entry["conversations"], self.processor.image_placeholder)
        input_ids, labels = self.processor.encode(messages)
        if len(input_ids) > self.max_length:
            return {"skipped": "too long"}
        pixels = None
        if entry.get("image"):
            try:
                pixels = self.processor.image_to_pixels(decode_image(self.images.read(entry["image"])))
            except FileNotFoundError:
                return {"skipped": "image missing"}
            except (OSError, ValueError, Image.DecompressionBombError):  # PIL: truncated, not an image
                return {"skipped": "image unreadable"}
        return {"input_ids": input_ids, "labels": labels, "pixels": pixels}


def collate(samples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of samples into a batch. Images of the samples that have one are stacked in order, so the
    k-th image fills the k-th run of placeholders in the batch."""
    kept = [s for s in samples if "skipped" not in s]
    skipped = Counter(s["skipped"] for s in samples if "skipped" in s)
    longest = max((len(s["input_ids"]) for s in kept), default=0)
    input_ids = torch.full((len(kept), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(kept), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(kept), longest), dtype=torch.long)
    for row, sample in enumerate(kept):
        n = len(sample["input_ids"])
        columns = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        input_ids[row, columns] = torch.tensor(sample["input_ids"])
        labels[row, columns] = torch.tensor(sample["labels"])
        attention_mask[row, columns] = 1
    images = [s["pixels"] for s in kept if s["pixels"] is not None]
    pixels = torch.stack(images) if images else None  # (num_images, 3, H, W) uint8
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pixels": pixels,
            "skipped": skipped, "num_samples": len(kept), "num_tokens": int(attention_mask.sum())}


class StreamSampler(Sampler):
    """An endless, seeded stream of sample indices: epoch e is a permutation seeded with seed + e.

    Global position p of the stream is sample order[p // n][p % n]. Training consumes the stream in global
    micro-batches of batch_size * world_size; rank r takes the r-th slice of each, so the samples in a step
    do not depend on the number of processes, and a run resumes at any position with any world size.
    """

    def __init__(self, num_samples: int, seed: int, start: int = 0, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.seed, self.start = num_samples, seed, start
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self):
        epoch, order = None, None
        for position in count(self.start):
            if (position - self.start) // self.batch_size % self.world_size != self.rank:
                continue
            if position // self.num_samples != epoch:
                epoch = position // self.num_samples
                order = self.order(epoch)
            yield order[position % self.num_samples]


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: the indices of samples grouped into rows of at most row_length tokens, longest
    samples first (ties in the given order), each into the first row it fits. A pure function of the
    lengths, so the same samples always pack the same way."""
    if any(length > row_length for length in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {row_length}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the stream order
    rows, free = [], []  # free[r]: token slots left in rows[r]
    for i in order:
        row = next((r for r, space in enumerate(free) if lengths[i] <= space), None)
        if row is None:
            rows.append([])
            free.append(row_length)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def packed_batch(rows: list[list[dict]], pad_token_id: int) -> dict:
    """Rows of whole samples laid end to end, padded to the fullest row. Position ids restart at 0 for each
    sample (and for the padding after the last one), and no attention mask is given: from that, transformers
    builds a block-diagonal causal mask, so no sample attends to another (the model must run with
    use_cache=False: with a cache, transformers ignores the restarts). Images follow the samples in row-major
    order, the order of their runs of placeholders."""
    width = max((sum(len(s["input_ids"]) for s in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (rows, width)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (rows, width)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (rows, width)
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            n = len(sample["input_ids"])
            input_ids[r, start:start + n] = torch.tensor(sample["input_ids"])
            labels[r, start:start + n] = torch.tensor(sample["labels"])
            labels[r, start] = IGNORE_INDEX  # never predicted from the sample before it (never a target anyway)
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    images = [s["pixels"] for row in rows for s in row if s["pixels"] is not None]
    pixels = torch.stack(images) if images else None  # (num_images, 3, H, W) uint8
    num_tokens = sum(len(s["input_ids"]) for row in rows for s in row)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": None,
            "pixels": pixels, "skipped": Counter(), "num_samples": sum(map(len, rows)), "num_tokens": num_tokens}


def pack_step(samples: list[dict], row_length: int, max_tokens_per_batch: int, pad_token_id: int) -> list[dict]:
    """A process's share of one optimizer step, packed: whole samples in rows of row_length tokens (pack_rows),
    and rows in micro-batches of at most max_tokens_per_batch token slots. The step trains on the same
    samples as unpacked, in fewer, fuller micro-batches; how many depends on their lengths. Skipped samples
    are counted in the first micro-batch, which is empty when all were skipped."""
    rows_per_batch = max_tokens_per_batch // row_length
    if rows_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch={max_tokens_per_batch} must be at least max_length={row_length}")
    kept = [s for s in samples if "skipped" not in s]
    rows = [[kept[i] for i in row] for row in pack_rows([len(s["input_ids"]) for s in kept], row_length)]
    batches = [packed_batch(rows[i:i + rows_per_batch], pad_token_id) for i in range(0, len(rows), rows_per_batch)]
    batches = batches or [packed_batch([], pad_token_id)]
    batches[0]["skipped"] = Counter(s["skipped"] for s in samples if "skipped" in s)
    return batches


def ignore_sigint_in_worker(_worker_id: int):
    """Ctrl-C reaches every process of the group; the main process saves a checkpoint and stops the workers
    itself, so a worker must not die first and fail the batch being fetched."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
