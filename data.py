"""What training consumes: the Processor, the one place where an image and a conversation become model
inputs (the language model's own chat template, labels masked to the assistant's tokens), for training and
inference alike; the dataset of LLaVA entries (sources.py reads them); batches padded or packed, a whole
step at a time; the seeded, resumable sampler; and the DataLoader worker's set-up.
"""

import ctypes
import json
import signal
from collections import Counter
from itertools import chain, count

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from sources import (IGNORE_INDEX, IMAGE_ERRORS, IMAGE_MARKER, conversation_to_llava, decode_image, image_names,
                     llava_to_messages, to_rgb, with_image_markers)


# ----------------------------------------------------------------------------------------------------------
# Processor: image and conversation to tensors, shared by training and inference


def encoder_image_size(image_settings: dict) -> tuple[int, int]:
    """(height, width) of the images an encoder takes, from its preprocessor config: its size (SigLIP) or, for
    encoders that resize the shorter side and crop (CLIP, DINOv2), its crop size."""
    size = image_settings.get("crop_size") if image_settings.get("do_center_crop") else image_settings["size"]
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or "height" not in size or "width" not in size:
        raise ValueError(f"preprocessor config: expected a size (or, with do_center_crop, a crop_size) with "
                         f"height and width, got {size}")
    return size["height"], size["width"]


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
        self.image_token, self.num_image_tokens = image_token, num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_placeholder = image_token * num_image_tokens
        self.end_of_turn = self.template_end_of_turn()  # a target: the model learns to end its answers
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)  # generation stops at it
        self.image_size = encoder_image_size(image_settings)  # (H, W) the encoder sees
        # CLIP and DINOv2 resize the shorter side, then crop the centre; SigLIP resizes to the size itself
        self.shortest_edge = image_settings["size"].get("shortest_edge")
        rescale = image_settings.get("do_rescale", True)
        self.rescale_factor = image_settings.get("rescale_factor", 1 / 255) if rescale else 1.0
        normalize = image_settings.get("do_normalize", True)
        self.image_mean = image_settings["image_mean"] if normalize else [0.0, 0.0, 0.0]
        self.image_std = image_settings["image_std"] if normalize else [1.0, 1.0, 1.0]

    def template_end_of_turn(self) -> str:
        """The token the chat template writes right after an assistant turn's content: SmolLM2's and Qwen's
        <|im_end|>, Gemma's <end_of_turn>, Llama 3's <|eot_id|>; not always the tokenizer's eos_token. Found by
        rendering a one-word answer."""
        question = [{"role": "user", "content": "Hi."}]
        prompt = self.render(question, add_generation_prompt=True)
        whole = self.render(question + [{"role": "assistant", "content": "Hello."}], add_generation_prompt=False)
        if not whole.startswith(prompt + "Hello."):
            raise ValueError("the chat template does not render an assistant turn as <generation prompt><content>"
                             "...; cannot mask labels")
        after = self.tokenizer(whole[len(prompt + "Hello."):], add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        if not after or after[0] not in special:
            raise ValueError("the chat template ends an assistant turn with no special token; cannot teach the model "
                             "to stop")
        return self.tokenizer.convert_ids_to_tokens(after[0])

    def image_to_pixels(self, image: Image.Image) -> torch.Tensor:
        """An image resized for the encoder, as uint8 (3, H, W). The resize is torch's antialiased bilinear
        interpolation of uint8 images, whatever filter the encoder's preprocessor config names: several times
        as fast as PIL's bicubic resize, which took half of a DataLoader worker's time, and within about one
        level of 255 of it on average (tests/test_data.py)."""
        pixels = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)  # (3, h, w) uint8, channels last
        size = self.image_size
        if self.shortest_edge:  # the shorter side to shortest_edge, the aspect kept, then the centre crop
            h, w = pixels.shape[1:]
            size = (max(size[0], round(h * self.shortest_edge / min(h, w))),
                    max(size[1], round(w * self.shortest_edge / min(h, w))))
        if tuple(pixels.shape[1:]) != size:
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True)[0]
        top, left = (size[0] - self.image_size[0]) // 2, (size[1] - self.image_size[1]) // 2
        pixels = pixels[:, top:top + self.image_size[0], left:left + self.image_size[1]]
        return pixels.contiguous()  # (3, H, W) uint8

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template's text. A conversation without a system turn gets system_prompt as one (None
        leaves it to the template, which for SmolLM2 adds a 16-token default to every sample)."""
        return self.render_many([messages], add_generation_prompt)[0]

    def render_many(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        """render() of several conversations in one call of the template."""
        if not conversations:
            return []
        if self.system_prompt is not None:
            conversations = [[{"role": "system", "content": self.system_prompt}] + messages
                             if messages and messages[0]["role"] != "system" else messages
                             for messages in conversations]
        return self.tokenizer.apply_chat_template(conversations, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and its labels: each assistant turn's content and its
        end-of-turn token are targets, every other token (system, user, image, role headers) is IGNORE."""
        return self.encode_many([messages])[0]

    def encode_many(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        """encode() of several conversations, in one call of the tokenizer."""
        ids, labels, bounds = self.encode_flat(conversations)
        return [(ids[a:z].tolist(), labels[a:z].tolist()) for a, z in zip(bounds[:-1], bounds[1:])]

    def encode_flat(self, conversations: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encode_many() as arrays: the conversations' token ids and labels end to end, (N,) each, and where each
        conversation starts, (len(conversations) + 1,), computed for the whole batch at once. Each image's run of
        placeholders is tokenized as a single placeholder and widened back to num_image_tokens after: the
        placeholder is an added token, which splits the text around it, so the ids are the same, for half the
        tokenizing."""
        conversations = [[{**m, "content": m["content"].replace(self.image_placeholder, self.image_token)}
                          for m in messages] for messages in conversations]
        texts = self.render_many(conversations, add_generation_prompt=False)
        text_starts = np.cumsum([0] + [len(text) for text in texts])  # where each text starts, all end to end
        span_starts, span_ends, prompt_lengths = [], [], {}  # a prompt before an answer recurs: rendered once
        for messages, text, text_start in zip(conversations, texts, text_starts.tolist()):
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                prompt = json.dumps(messages[:i])
                if prompt not in prompt_lengths:
                    prompt_lengths[prompt] = len(self.render(messages[:i], add_generation_prompt=True))
                start, target = prompt_lengths[prompt], message["content"] + self.end_of_turn
                if text[start:start + len(target)] != target:
                    raise ValueError("the chat template does not render an assistant turn as "
                                     "<generation prompt><content><end of turn>; cannot mask labels")
                span_starts.append(text_start + start)
                span_ends.append(text_start + start + len(target))
        token_ids, offsets = self.tokenize_with_offsets(texts)
        counts = [len(row) for row in token_ids]
        ids = np.fromiter(chain.from_iterable(token_ids), np.int64, sum(counts))  # (N,)
        starts = np.fromiter((start for row in offsets for start, _ in row), np.int64, sum(counts))
        starts += np.repeat(text_starts[:-1], counts)  # each token's first character, in the texts end to end
        span = np.searchsorted(span_starts, starts, side="right") - 1  # the last assistant turn starting before
        is_target = starts < np.array(span_ends + [0])[span]  # ... and still going on (none before: span -1, 0)
        widths = np.where(ids == self.image_token_id, self.num_image_tokens, 1)  # a placeholder: its run
        lengths = np.bincount(np.repeat(np.arange(len(texts)), counts), widths, minlength=len(texts))
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (len(conversations) + 1,)
        return np.repeat(ids, widths), np.repeat(np.where(is_target, ids, IGNORE_INDEX), widths), bounds

    def encode_llava(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """encode() of a LLaVA conversation ({"from": "human" | "gpt", "value"} turns, <image> markers)."""
        return self.encode_llava_many([turns])[0]

    def encode_llava_many(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        return self.encode_many([llava_to_messages(turns, self.image_placeholder) for turns in conversations])

    def tokenize_with_offsets(self, texts: list[str]) -> tuple[list, list]:
        """Token ids and character offsets of texts; straight from the Rust tokenizer when there is one
        (what the tokenizer's __call__ does too, without turning each encoding into a dict of lists)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encodings], [e.offsets for e in encodings]
        encodings = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return encodings["input_ids"], encodings["offset_mapping"]

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation up to the assistant's next turn: what generation starts from."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def conversation_messages(self, conversation: list[dict], with_image: bool) -> list[dict]:
        """A conversation so far (see sources.conversation_to_llava) as messages, formatted exactly like a
        training sample."""
        return llava_to_messages(conversation_to_llava(conversation, with_image), self.image_placeholder)

    def images_to_pixels(self, images: list) -> torch.Tensor | None:
        """A sample's images: None, (3, H, W) uint8 for one, (num_images, 3, H, W) for several."""
        if not images:
            return None
        pixels = [self.image_to_pixels(image) for image in images]
        return pixels[0] if len(pixels) == 1 else torch.stack(pixels)  # (num_images, 3, H, W)

    def prompt_messages(self, prompt: str, with_image: bool | int = True) -> list[dict]:
        """A one-turn user prompt with its images (True: one; an int: that many), formatted exactly like a
        training sample: the images go first unless the prompt places them with <image> markers."""
        num_images = int(with_image)
        value = with_image_markers(prompt, num_images) if num_images else prompt
        if value.count(IMAGE_MARKER) != num_images:
            raise ValueError(f"the prompt has {value.count(IMAGE_MARKER)} <image> markers for {num_images} images")
        return llava_to_messages([{"from": "human", "value": value}], self.image_placeholder)


# ----------------------------------------------------------------------------------------------------------
# Dataset, sampler, batches


SKIPPED_WHEN_LOADED = ("image missing", "image unreadable", "too long")  # the reasons LLaVADataset gives


class LLaVADataset(Dataset):
    """LLaVA entries as training samples: the rows of a datasets.Dataset (sources.open_data; tokenized there
    once, or here) or a list of entries; an entry may have several images. A sample that cannot be used (its
    image is missing, truncated or unreadable, or it is longer than max_length tokens) comes back as
    {"skipped": reason}; the collate function drops it and counts it, so one bad file never stops a run."""

    def __init__(self, entries, image_source, processor: Processor, max_length: int = 2048):
        self.entries, self.images, self.processor, self.max_length = entries, image_source, processor, max_length
        self.tokens = None  # the token ids, targets and images of tokenized entries, read as Arrow columns
        if "input_ids" in getattr(entries, "column_names", ()):
            self.tokens = entries.select_columns(["input_ids", "targets", "image"]).with_format("arrow")

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The samples at indices: a DataLoader worker fetches a whole step's with one read of the table."""
        if self.tokens is not None:
            rows = self.tokens[indices]  # an Arrow table: each row's token ids sliced out of one flat array
            ids, targets = (rows.column(name).combine_chunks() for name in ("input_ids", "targets"))
            bounds = ids.offsets.to_numpy() - ids.offsets[0].as_py()  # a slice's offsets start where it does
            ids, targets = ids.flatten().to_numpy().astype(np.int64), targets.flatten().to_numpy(zero_copy_only=False)
            return [self.sample(ids[a:z], np.where(targets[a:z], ids[a:z], IGNORE_INDEX), names)
                    for a, z, names in zip(bounds[:-1], bounds[1:], rows.column("image").to_pylist())]
        entries = self.entries[indices] if hasattr(self.entries, "column_names") else [self.entries[i] for i in indices]
        if isinstance(entries, dict):  # a Dataset's rows come as columns
            entries = [dict(zip(entries, values)) for values in zip(*entries.values())]
        return [self.sample(*self.processor.encode_llava(entry["conversations"]), image_names(entry))
                for entry in entries]

    def sample(self, input_ids, labels, names: list | None) -> dict:
        if len(input_ids) > self.max_length:
            return {"skipped": "too long"}
        if names is None:  # open_data never lets such an entry through; a hand-made list might
            return {"skipped": "image missing"}
        images = []
        for name in names:  # the k-th image fills the k-th run of image tokens
            try:
                images.append(decode_image(self.images.read(name), self.processor.image_size[::-1]))
            except FileNotFoundError:
                return {"skipped": "image missing"}
            except IMAGE_ERRORS:  # PIL: truncated, not an image
                return {"skipped": "image unreadable"}
        pixels = self.processor.images_to_pixels(images)  # None, (3, H, W) or (num_images, 3, H, W) uint8
        return {"input_ids": input_ids, "labels": labels, "pixels": pixels}


def skip_counts(samples: list[dict]) -> dict:
    """The skipped samples among `samples`, counted by reason: a plain dict, because the DataLoader's pin-memory
    step copies a batch's dicts and update()s the copies, which for a Counter adds the counts a second time."""
    return dict(Counter(s["skipped"] for s in samples if "skipped" in s))


def model_positions(input_ids: torch.Tensor, labels: torch.Tensor, image_token_id: int | None) -> dict:
    """Where the model writes image features and reads predictions, as flat indices into the batch's
    B * T positions, computed here on the host so that the model's step needs no data-dependent shape
    (boolean indexing, nonzero, masked_scatter) on the device:
    - image_positions: the placeholders, in row-major order (the k-th image's tokens are the k-th run);
    - target_positions: each position whose next token is a target (position t predicts token t + 1).
    Without image_token_id the model finds the placeholders itself."""
    width = input_ids.shape[1]
    is_target = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1)
    rows, columns = is_target.nonzero(as_tuple=True)
    positions = {"target_positions": rows * width + columns, "num_targets": len(rows)}
    if image_token_id is not None:
        positions["image_positions"] = (input_ids.flatten() == image_token_id).nonzero().flatten()
    return positions


def collate(samples: list[dict], pad_token_id: int, image_token_id: int | None = None,
            padding_side: str = "right") -> dict:
    """Pad a list of samples into a batch. The images of all samples (one (3, H, W) or several (k, 3, H, W)
    each) are concatenated in order, so the k-th image fills the k-th run of placeholders in the batch.
    attention_mask marks the real tokens; training leaves it out (right padding: every real token comes
    before every pad and attends only to what is before it), generation needs it (left padding)."""
    kept = [s for s in samples if "skipped" not in s]
    longest = max((len(s["input_ids"]) for s in kept), default=0)
    input_ids = torch.full((len(kept), longest), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(kept), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(kept), longest), dtype=torch.long)  # (B, T)
    for row, sample in enumerate(kept):
        n = len(sample["input_ids"])
        columns = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        input_ids[row, columns] = torch.tensor(sample["input_ids"])
        labels[row, columns] = torch.tensor(sample["labels"])
        attention_mask[row, columns] = 1
    images = [s["pixels"].reshape(-1, *s["pixels"].shape[-3:]) for s in kept if s["pixels"] is not None]
    pixels = torch.cat(images) if images else None  # (num_images, 3, H, W) uint8, samples' images in order
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pixels": pixels,
            **model_positions(input_ids, labels, image_token_id), "skipped": skip_counts(samples),
            "num_samples": len(kept), "num_tokens": int(attention_mask.sum())}


MODEL_INPUTS = ("input_ids", "labels", "pixels", "position_ids", "image_positions", "target_positions", "cu_seq_lens")


def to_device(batch: dict, device: torch.device) -> dict:
    """A micro-batch's model inputs on the device (and max_seq_length, a host number). From pinned memory (the
    DataLoader pins batches on CUDA) the copies are asynchronous: the host queues them and moves on."""
    inputs = {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS if batch.get(key) is not None}
    return inputs | ({"max_seq_length": batch["max_seq_length"]} if "max_seq_length" in batch else {})


def padded_step(samples: list[dict], batch_size: int, pad_token_id: int, image_token_id: int | None = None) -> list:
    """A process's share of one optimizer step, padded: its samples ordered by length, longest first, and cut
    into micro-batches of batch_size, each padded to its own longest sample. The step's loss is divided by
    its target tokens (main.forward_backward), so the order within a step leaves its gradient unchanged,
    while samples of similar length share a micro-batch and little of it is padding. Skipped samples are
    counted in the first micro-batch, which is empty when all were skipped."""
    kept = sorted((s for s in samples if "skipped" not in s), key=lambda s: -len(s["input_ids"]))  # stable
    batches = [collate(kept[i:i + batch_size], pad_token_id, image_token_id) for i in range(0, len(kept), batch_size)]
    batches = batches or [collate([], pad_token_id, image_token_id)]
    batches[0]["skipped"] = skip_counts(samples)
    return batches


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

    def order(self, epoch: int) -> np.ndarray:
        # a numpy array, not a list: 5M Python ints would cost the main process about 180 MB
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()

    def __iter__(self):
        epoch, order = None, None
        for position in count(self.start):
            if (position - self.start) // self.batch_size % self.world_size != self.rank:
                continue
            if position // self.num_samples != epoch:
                epoch = position // self.num_samples
                order = self.order(epoch)
            yield int(order[position % self.num_samples])


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


def packed_batch(rows: list[list[dict]], pad_token_id: int, image_token_id: int | None = None,
                 max_seq_length: int = 0) -> dict:
    """Rows of whole samples laid end to end, padded to the fullest row. Position ids restart at 0 for each
    sample (and for the padding after the last one); from them the model builds a block-diagonal causal mask
    (attention.training_attention_mask), so no sample attends to another, or varlen attention takes the
    sequences' bounds: cu_seq_lens (int32, where each sample and each row's padding starts and ends in the
    flattened rows) and max_seq_length (no sequence is longer; at least the max_seq_length given, so that
    it stays the same from batch to batch). Images follow the samples in row-major order, the order of their
    runs of placeholders."""
    width = max((sum(len(s["input_ids"]) for s in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (rows, width)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (rows, width)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (rows, width)
    sequence_lengths = []
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
        sequence_lengths += [len(s["input_ids"]) for s in row] + ([width - start] if width > start else [])
    images = [s["pixels"].reshape(-1, *s["pixels"].shape[-3:]) for row in rows for s in row if s["pixels"] is not None]
    pixels = torch.cat(images) if images else None  # (num_images, 3, H, W) uint8
    num_tokens = sum(len(s["input_ids"]) for row in rows for s in row)
    cu_seq_lens = torch.tensor([0, *np.cumsum(sequence_lengths, dtype=np.int64)], dtype=torch.int32)  # (sequences + 1,)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "pixels": pixels,
            "cu_seq_lens": cu_seq_lens, "max_seq_length": max([max_seq_length, *sequence_lengths]),
            **model_positions(input_ids, labels, image_token_id), "skipped": {},
            "num_samples": sum(map(len, rows)), "num_tokens": num_tokens}


def pack_step(samples: list[dict], row_length: int, max_tokens_per_batch: int, pad_token_id: int,
              fill_length: int = 0, image_token_id: int | None = None) -> list[dict]:
    """A process's share of one optimizer step, packed: whole samples in rows of up to fill_length tokens
    (pack_rows; 0: row_length, the longest a sample may be), a longer sample in a row of its own. The rows,
    widest first, go into micro-batches as wide as their widest row, of at most max_tokens_per_batch token
    slots; a micro-batch ends early where rows get narrower than 90% of its width, so little is padding.
    Under a block-diagonal mask each token's attention costs its row's width, so rows are kept short
    (stage 2: 512); varlen attention costs each token its own conversation only, so there a micro-batch is one
    row as wide as max_tokens_per_batch (fill_length), and every slot holds a real token. The step trains on
    the same samples as unpacked, in fewer, fuller micro-batches; how many depends on their lengths. Skipped
    samples are counted in the first micro-batch, which is empty when all were skipped."""
    if max_tokens_per_batch < row_length:
        raise ValueError(f"max_tokens_per_batch={max_tokens_per_batch} must be at least max_length={row_length}")
    fill_length = min(fill_length or row_length, max_tokens_per_batch)
    kept = [s for s in samples if "skipped" not in s]
    if any(len(s["input_ids"]) > row_length for s in kept):  # main.py skips them before; a row must hold one
        raise ValueError(f"a sample of {max(len(s['input_ids']) for s in kept)} tokens does not fit a row of "
                         f"{row_length}")
    short = [s for s in kept if len(s["input_ids"]) <= fill_length]
    rows = [[short[i] for i in row] for row in pack_rows([len(s["input_ids"]) for s in short], fill_length)]
    rows += [[s] for s in kept if len(s["input_ids"]) > fill_length]
    widths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    order = sorted(range(len(rows)), key=lambda r: -widths[r])  # stable: a pure function of the samples
    batches, start = [], 0
    while start < len(order):
        width, end = widths[order[start]], start + 1
        while (end < len(order) and (end - start + 1) * width <= max_tokens_per_batch
               and widths[order[end]] >= 0.9 * width):
            end += 1
        batches.append(packed_batch([rows[r] for r in order[start:end]], pad_token_id, image_token_id, row_length))
        start = end
    batches = batches or [packed_batch([], pad_token_id, image_token_id, row_length)]
    batches[0]["skipped"] = skip_counts(samples)
    return batches


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def start_worker(_worker_id: int):
    """Set up a DataLoader worker:
    - Ctrl-C reaches every process of the group; the main process saves a checkpoint and stops the workers
      itself, so a worker must not die first and fail the batch being fetched.
    - glibc raises its mmap threshold to the size of each large block freed, so after the first batch a
      worker's decode and collate buffers (up to the 9.6 MB of a batch's pixels) come from the heap and stay
      resident after they are freed. A fixed threshold returns them to the OS (bench.py --parts data_scale;
      docs/measurements.md)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only; elsewhere nothing to do
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)
