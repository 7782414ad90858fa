"""Where TinyVLM's data comes from: every source (LLaVA JSON or JSONL, parquet, a hub dataset; in the LLaVA, the
Cauldron's or the chat-messages schema) as one `datasets.Dataset` of checked LLaVA entries, tokenized once with
Dataset.map and cached beside the data; images from a folder, a zip read in place, or the Arrow table.
"""

import glob
import hashlib
import io
import json
import multiprocessing
import os
import struct
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = -100  # label of a token that carries no loss
IMAGE_MARKER = "<image>"  # where LLaVA data puts the image in a human turn
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA's speakers -> chat roles
LLAVA_ROLES = {role: speaker for speaker, role in ROLES.items()}  # chat roles -> LLaVA's speakers
EMBEDDED = "embedded://"  # an image in a parquet or hub table: embedded://<column>/<row>/<k-th image>
CACHE_FORMAT = 3  # bump when what the caches hold changes: they are then built again
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL's on a bad image file


class DataError(ValueError):
    """Data found bad while it loads: the message names the file and the setting; the programs print it and
    exit with status 1, without a traceback."""


def cache_folder(source: str) -> str:
    """Where a source's caches go: .tinyvlm_cache beside it or, where that folder is read-only, $TINYVLM_CACHE
    (default ~/.cache/tinyvlm). Deleting the folder clears them."""
    source = os.path.abspath(source)
    folder = os.path.join(os.path.dirname(source), ".tinyvlm_cache")
    if os.access(folder if os.path.isdir(folder) else os.path.dirname(source), os.W_OK):
        return folder
    fallback = os.environ.get("TINYVLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinyvlm")
    return os.path.join(fallback, hashlib.sha1(source.encode()).hexdigest()[:16])


def cache_file(source: str, what: str) -> str:
    """The path of a cache of a source file in its cache folder, named by what identifies the file's contents
    cheaply (size, modification time): a changed file is read again. Makes the folder."""
    os.makedirs(cache_folder(source), exist_ok=True)
    stamp = [CACHE_FORMAT, os.path.abspath(source), os.path.getsize(source), os.stat(source).st_mtime_ns]
    digest = hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:16]
    return os.path.join(cache_folder(source), f"{os.path.basename(source)}.{what}-{digest}")


# ----------------------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency composited on white, 16/32-bit and float scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # PIL's convert() would clip them at 255
        array = np.asarray(image, dtype=np.float64)
        array = (array - array.min()) * (255.0 / max(float(array.max() - array.min()), 1e-12))
        image = Image.fromarray(array.round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes to a fully decoded RGB image; raises on a truncated or unreadable file. With size (width, height),
    a JPEG at least twice as large is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), no smaller."""
    image = Image.open(io.BytesIO(data))
    if size is not None and image.format == "JPEG":
        image.draft("RGB", size)
    image.load()  # decode now, so a truncated file fails here and not later
    return to_rgb(image)


class ImageFolder:
    """Images under a root folder; `name` is the path relative to it (LLaVA's "image" field)."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root = root

    def read(self, name: str) -> bytes:
        if escapes_root(name):
            raise FileNotFoundError(f"{name} is outside {self.root}: not read")
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()


class ImageZip:
    """Images read in place from a zip (LLaVA's images.zip) through an index of its members (zip_index) that
    every process maps, each reading with os.pread on a descriptor of its own. Names may be stored under one
    top-level folder (images/x.jpg) while the data says x.jpg; both resolve."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image zip not found: {path}")
        self.path, self._index, self._fd, self._pid = path, zip_index(path), None, None  # built in the main process

    def read(self, name: str) -> bytes:
        if self._pid != os.getpid():  # a worker opens its own descriptor (and, spawned, maps the index)
            self._index, self._pid = zip_index(self.path) if self._index is None else self._index, os.getpid()
            self._fd = os.open(self.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # no read-ahead: it reads 128 KB around each 20 KB JPEG, 2-3x slower
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            names = self._index[0]  # sorted by name: they share a top folder if the first and the last do
            top = names[0].split(b"/")[0] + b"/" if len(names) else b""
            self._top = top if len(names) and names[0].startswith(top) and names[-1].startswith(top) else b""
        names, members = self._index
        for candidate in (name.encode(), self._top + name.encode()):
            row = np.searchsorted(names, candidate)
            if row < len(names) and names[row] == candidate:
                return self.member(candidate, *(int(v) for v in members[row].tolist()))
        raise FileNotFoundError(f"{name} is not in {self.path}")

    def member(self, name: bytes, offset: int, size: int, crc: int, method: int) -> bytes:
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise OSError(f"{name.decode()} in {self.path}: encrypted, or compressed by method {method}")
        data = os.pread(self._fd, 30 + len(name) + 64 + size, offset)  # header, name, extra field (if short), data
        if len(data) < 30 or data[:4] != b"PK\x03\x04":
            raise OSError(f"{self.path}: bad local header for {name.decode()}")
        start = 30 + sum(struct.unpack("<HH", data[26:30]))  # after the name and the extra field
        data = data[start:start + size] if start + size <= len(data) else os.pread(self._fd, size, offset + start)
        data = zlib.decompress(data, -15) if method == zipfile.ZIP_DEFLATED else data
        if zlib.crc32(data) != crc:
            raise OSError(f"{name.decode()} in {self.path}: CRC mismatch (a corrupt zip?)")
        return data

    def __getstate__(self):  # DataLoader workers get the path, never an open descriptor or mapped index
        return {**self.__dict__, "_index": None, "_fd": None, "_pid": None}


def zip_index(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A zip's member names and their (offset, size, crc, method; -1 if encrypted), sorted by name, read from its
    central directory once into memory-mapped files in the cache folder: zipfile would read the whole directory
    again in every process, and datasets reads no zip in place. The names are an array of their own, contiguous,
    which np.searchsorted needs (given a field of a structured array it copies the whole column each time)."""
    prefix = cache_file(path, "index")
    if not os.path.isfile(f"{prefix}.members.npy"):  # written last: its presence means the index is whole
        try:
            with zipfile.ZipFile(path) as archive:
                infos = [info for info in archive.infolist() if not info.is_dir()]
        except zipfile.BadZipFile as error:
            raise DataError(f"{path} (--image_root): not a readable zip file ({error})") from error
        names = np.array([info.filename.encode() for info in infos], dtype=bytes)
        members = np.array([(i.header_offset, i.compress_size, i.CRC, -1 if i.flag_bits & 0x1 else i.compress_type)
                            for i in infos], dtype=[("offset", "<i8"), ("size", "<i8"), ("crc", "<u4"), ("method", "<i2")])
        order = np.argsort(names, kind="stable")
        for part, array in (("names", names[order]), ("members", members[order])):
            with open(f"{prefix}.tmp{os.getpid()}", "wb") as f:
                np.save(f, array)
            os.replace(f"{prefix}.tmp{os.getpid()}", f"{prefix}.{part}.npy")  # whole or not at all
    return np.load(f"{prefix}.names.npy", mmap_mode="r"), np.load(f"{prefix}.members.npy", mmap_mode="r")


def open_image_source(path: str):
    return ImageZip(path) if path.endswith(".zip") else ImageFolder(path)


class DatasetImages:
    """The images of a parquet or hub table: those of its image columns (EMBEDDED) from its memory-mapped Arrow
    table, their bytes, else their path; paths from image_root (a folder or zip, or None)."""

    def __init__(self, table, paths=None):
        self.table, self.paths = table, paths

    def read(self, name: str) -> bytes:
        if name.startswith(EMBEDDED):
            column, row, k = name[len(EMBEDDED):].rsplit("/", 2)
            image = self.table.data.table.column(column)[int(row)].as_py()
            image = image[int(k)] if isinstance(image, list) else image
            if image["bytes"] or not image["path"]:
                return image["bytes"]
            name = image["path"]
        if self.paths is None:
            raise FileNotFoundError(f"{name}: an image path, and no image_root was given")
        return self.paths.read(name)


# ----------------------------------------------------------------------------------------------------------
# LLaVA conversations


def load_llava_json(path: str) -> list:
    """The raw list of entries in a LLaVA-format JSON file (a list, or JSON lines)."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
        if not isinstance(entries, list):
            raise ValueError(f"expected a JSON list of entries, got {type(entries).__name__}")
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the data file {path}: {error}") from error
    return entries


def image_names(entry: dict) -> list | None:
    """An entry's images as a list of names ("image": one name or a list of them; absent, empty or null: none),
    or None when the field holds something else (a number, an object, a list of non-names)."""
    images = entry.get("image")
    images = [] if images in (None, "", []) else [images] if isinstance(images, str) else images
    return images if isinstance(images, list) and all(isinstance(name, str) and name for name in images) else None


def escapes_root(name: str) -> bool:
    """An absolute path, or one that climbs out of the image root with '..'."""
    return name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")


def check_entry(entry, require_image: bool) -> str | None:
    """Why a LLaVA entry cannot be trained on, or None if it is fine. Cheap: text only, no image I/O.
    "image" may list several images: the k-th goes to the k-th <image> marker, in any human turn."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        return "malformed entry"
    turns = entry["conversations"]
    if not turns or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        return "malformed entry"
    if any(not isinstance(t.get("from"), str) or t["from"] not in ROLES for t in turns):
        return "unknown role"
    if next((t["from"] for t in turns if t["from"] != "system"), None) != "human":
        return "does not start with a human turn"
    if not any(t["from"] == "gpt" for t in turns):
        return "no assistant turn"
    if any(t["from"] == "gpt" and not t["value"].strip() for t in turns):
        return "empty caption"
    images = image_names(entry)
    if images is None:
        return "image is not a path"
    if any(escapes_root(name) for name in images):
        return "image path outside image_root"
    if any(IMAGE_MARKER in t["value"] for t in turns if t["from"] != "human"):
        return "<image> outside a human turn"
    markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    if images and markers == 0:
        return "no <image> marker"
    if not images and markers:
        return "<image> marker without image"
    if markers != len(images):
        return "<image> markers do not match the images"
    return "no image" if require_image and not images else None


def first_question(entry: dict) -> str:
    """The first human turn of a LLaVA entry without its <image> marker: the prompt to ask at inference."""
    question = next((t["value"] for t in entry.get("conversations", []) if t.get("from") == "human"), "")
    return question.replace(IMAGE_MARKER, "").strip()


def first_answer(entry: dict) -> str | None:
    return next((t["value"] for t in entry.get("conversations", []) if t.get("from") == "gpt"), None)


def llava_to_messages(conversations: list, image_placeholder: str) -> list[dict]:
    """LLaVA turns as chat-template messages (human/gpt: user/assistant). A turn's one <image> marker, before or
    after the instruction, goes first, as LLaVA does; several (interleaved images) each become a placeholder."""
    messages = []
    for turn in conversations:
        text = turn["value"].strip()
        if text.count(IMAGE_MARKER) == 1:
            instruction = text.replace(IMAGE_MARKER, "").strip()
            text = image_placeholder + ("\n" + instruction if instruction else "")
        else:
            text = text.replace(IMAGE_MARKER, image_placeholder)
        messages.append({"role": ROLES[turn["from"]], "content": text})
    return messages


def conversation_to_llava(conversation: list[dict], with_image: bool) -> list[dict]:
    """A conversation so far, ending with the user's question, as LLaVA turns: from chat messages ({"role",
    "content"}) or LLaVA turns ({"from", "value"}), the image's marker first in the first user turn unless placed.
    Raises ValueError on a conversation that training would not accept (check_entry, the answer still to come),
    so a prompt never holds a stray marker."""
    messages = [{"role": ROLES.get(turn.get("from"), turn.get("role")), "content": turn.get("value", turn.get("content"))}
                if isinstance(turn, dict) else turn for turn in conversation]
    entry = row_to_llava({"messages": messages, "image": ["image"] if with_image else None})
    turns = entry["conversations"] or []
    problem = check_entry({**entry, "conversations": turns + [{"from": "gpt", "value": "..."}]}, require_image=False)
    if problem or turns[-1]["from"] != "human":
        raise ValueError(f"not a conversation the model was trained on: {problem or 'it must end with a user turn'}")
    return turns


def with_image_markers(text: str, num_images: int) -> str:
    """The text with an <image> marker per image before it, unless it places its images itself."""
    return text if IMAGE_MARKER in text else f"{IMAGE_MARKER}\n" * num_images + text


def message_text(content) -> str | None:
    """A chat message's content: a string, or {"type": "text", "text"} and {"type": "image"} parts joined by
    newlines, an image part an <image> marker; None if malformed."""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        parts = [IMAGE_MARKER if part.get("type") == "image" else part.get("text") for part in content]
        return "\n".join(parts) if all(isinstance(part, str) for part in parts) else None
    return content if isinstance(content, str) else None


def row_to_llava(row) -> dict:
    """A row in any schema as a LLaVA entry {"id", "image", "conversations"}: LLaVA's own (conversations, image),
    the Cauldron's (texts: [{"user", "assistant"}], images) or chat messages (messages: [{"role", "content"}],
    image or images). Images of the last two without markers go first, as the Cauldron and LLaVA do. Wrong
    types are left for check_entry to name."""
    if not isinstance(row, dict):
        return row
    entry = {"id": row.get("id"), "image": row.get("image") if row.get("image") is not None else row.get("images")}
    if "conversations" in row:
        return {**entry, "conversations": row["conversations"]}
    pairs, messages = row.get("texts"), row.get("messages")
    turns = None
    if "texts" in row and isinstance(pairs, list) and all(isinstance(pair, dict) for pair in pairs):
        turns = [{"from": speaker, "value": pair.get(key)} for pair in pairs
                 for speaker, key in (("human", "user"), ("gpt", "assistant"))]
    elif "texts" not in row and isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        turns = [{"from": LLAVA_ROLES.get(m.get("role"), m.get("role")) if isinstance(m.get("role"), str) else None,
                  "value": message_text(m.get("content"))} for m in messages]
    names, first_human = image_names(entry), next((t for t in turns or [] if t["from"] == "human"), None)
    if names and first_human and all(isinstance(t["value"], str) and IMAGE_MARKER not in t["value"] for t in turns):
        first_human["value"] = with_image_markers(first_human["value"], len(names))
    return {**entry, "conversations": turns}


# ----------------------------------------------------------------------------------------------------------
# Every source as one Dataset of checked entries, tokenized once


def entry_features(tokens: bool = False):
    """The entries' columns, whatever the source: id, image (names), conversations (LLaVA turns) and the problem
    that makes an entry unusable ("" if none); or, with tokens, those tokenize adds: each one's input_ids,
    targets and length."""
    from datasets import Features, List, Value

    if tokens:
        return Features(input_ids=List(Value("int32")), targets=List(Value("bool")), length=Value("int32"))
    return Features(id=Value("string"), image=List(Value("string")), problem=Value("string"),
                    conversations=List({"from": Value("string"), "value": Value("string")}))


def entry_row(row) -> dict:
    """A source row as an entries row (row_to_llava, check_entry); an unusable one keeps only its id and the
    reason, so a wrong type never reaches Arrow, whose columns hold one type each."""
    entry = row_to_llava(row)
    problem = check_entry(entry, require_image=False) or ""
    entry_id = entry.get("id") if isinstance(entry, dict) else None
    return {"id": "" if entry_id is None else str(entry_id), "problem": problem,
            "image": [] if problem else image_names(entry),
            "conversations": [] if problem else [{"from": t["from"], "value": t["value"]} for t in entry["conversations"]]}


def json_entries(path: str):
    """The entries of a JSON list or JSON-lines file as a Dataset, built once into an Arrow file in the cache
    folder, named by the file's stamp, and memory-mapped. Written a batch at a time with datasets' ArrowWriter:
    Dataset.from_generator writes a row at a time, 15x slower at CC3M's scale."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    arrow_file = cache_file(path, "entries") + ".arrow"
    if not os.path.isfile(arrow_file):
        rows = [entry_row(row) for row in load_llava_json(path)]
        with ArrowWriter(path=f"{arrow_file}.tmp{os.getpid()}", features=entry_features()) as writer:
            for start in range(0, max(len(rows), 1), 10_000):
                writer.write_batch({key: [row[key] for row in rows[start:start + 10_000]] for key in entry_features()})
            writer.finalize()
        os.replace(f"{arrow_file}.tmp{os.getpid()}", arrow_file)  # whole or not at all
    return datasets.Dataset.from_file(arrow_file)


def table_entries(batch, indices: list, image_columns: list) -> dict:
    """A batch (Arrow) of a parquet or hub table as entries rows, each image named where it is (EMBEDDED)."""
    import pyarrow.compute as pc

    rows = batch.drop_columns(image_columns).to_pylist()
    for column in image_columns:
        images = batch.column(column)
        counts = pc.list_value_length(images) if hasattr(images.type, "value_type") else pc.if_else(
            images.is_valid(), 1, None)  # a list of images, or one (an empty value: none)
        for row, index, count in zip(rows, indices, counts.to_pylist()):
            row[column] = None if count is None else [f"{EMBEDDED}{column}/{index}/{k}" for k in range(count)]
    rows = [entry_row(row) for row in rows]
    return {key: [row[key] for row in rows] for key in ("id", "image", "problem", "conversations")}


def source_entries(data_path: str, image_root: str, subset: str = "", split: str = "train"):
    """Every entry of a source as a Dataset (entry_features), bad ones marked, and the image source to read
    their images from. Built once into memory-mapped Arrow files that every process shares: JSON and JSONL by
    json_entries, parquet (cached beside it) and hub tables by Dataset.map."""
    import datasets

    if data_path.endswith((".json", ".jsonl")):  # a zip's index built meanwhile, in a process of its own
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            paths = pool.submit(open_image_source, image_root) if image_root else None
            return json_entries(data_path), paths and paths.result()
    paths = open_image_source(image_root) if image_root else None
    if os.path.exists(data_path):
        files = [data_path] if os.path.isfile(data_path) else sorted(glob.glob(f"{data_path}/**/*.parquet", recursive=True))
        try:
            table = datasets.load_dataset("parquet", data_files=files, split="train",
                                          cache_dir=os.path.join(cache_folder(files[0] if files else data_path), "datasets"))
        except Exception as error:  # pyarrow's and datasets' many kinds of "not a parquet file", or none at all
            raise DataError(f"{data_path} (--data_path): not readable as parquet ({type(error).__name__}: "
                            f"{error})") from error
    else:
        table = datasets.load_dataset(data_path, subset or None, split=split)
    image_columns = [name for name, feature in table.features.items() if "Image(" in repr(feature)]
    entries = table.with_format("arrow").map(table_entries, batched=True, with_indices=True, features=entry_features(),
                                             remove_columns=table.column_names, fn_kwargs={"image_columns": image_columns},
                                             new_fingerprint=f"{table._fingerprint}-entries-{CACHE_FORMAT}")
    return entries.with_format(None), DatasetImages(table, paths)


def processor_stamp(processor) -> str:
    """What makes a processor's token ids and labels what they are: the tokenizer, the chat template, the system
    prompt, the end of turn and the image tokens."""
    digest = hashlib.sha1(processor.tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([processor.tokenizer.chat_template, processor.system_prompt, processor.end_of_turn,
                              processor.image_token, processor.num_image_tokens]).encode())
    return digest.hexdigest()[:16]


def encode_entries(conversations: list, problems: list, processor):
    """A batch of entries' token ids, targets (the labels that are not IGNORE_INDEX) and lengths, as an Arrow
    table built from processor.encode_flat's arrays (an unusable entry: none)."""
    import pyarrow as pa

    usable = np.array([not problem for problem in problems], dtype=bool)
    ids, labels, bounds = processor.encode_flat([llava_to_messages(turns, processor.image_placeholder)
                                                 for turns, ok in zip(conversations, usable) if ok])
    lengths = np.zeros(len(problems), dtype=np.int32)
    lengths[usable] = np.diff(bounds)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids.astype(np.int32)),
                     "targets": pa.ListArray.from_arrays(offsets, labels != IGNORE_INDEX), "length": lengths})


def tokenize(entries, processor, processes: int = 0):
    """The entries with their token ids, targets and lengths, computed once by processor.encode_flat with
    Dataset.map (batched, one process per core at scale) into a table of their own beside the entries, cached by
    processor_stamp (another tokenizer, chat template, system prompt or count of image tokens tokenizes again)."""
    import datasets

    processes = processes or (len(os.sched_getaffinity(0)) if len(entries) >= 20_000 else 1)
    tokens = entries.map(encode_entries, batched=True, input_columns=["conversations", "problem"], desc="tokenizing",
                         fn_kwargs={"processor": processor}, features=entry_features(tokens=True),
                         num_proc=processes if processes > 1 else None,
                         new_fingerprint=f"{entries._fingerprint}-tokens-{processor_stamp(processor)}")
    return datasets.concatenate_datasets([entries, tokens], axis=1)


def open_data(data_path: str, image_root: str, require_image: bool, subset: str = "", split: str = "train",
              processor=None):
    """A source's usable entries (tokenized, given a processor) in their order, the image source of their images,
    and the others counted by reason, with examples; stage 1 (require_image) skips those without an image.
    Without datasets (a bare GPU machine), a JSON file's entries come as a list (listed_entries)."""
    try:
        import pyarrow.compute as pc

        entries, images = source_entries(data_path, image_root, subset, split)
        entries = tokenize(entries, processor) if processor is not None else entries
        columns = entries.select_columns(["problem", "image"]).with_format("arrow")[:]  # Arrow columns, not rows
        problems, counts = columns["problem"].to_numpy().astype(object), pc.list_value_length(columns["image"]).to_numpy()
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in ("datasets", "pyarrow") or not data_path.endswith((".json", ".jsonl")):
            raise
        entries, images = listed_entries(data_path, image_root, processor)
        problems = np.array([entry["problem"] for entry in entries], dtype=object)
        counts = np.array([len(entry["image"]) for entry in entries], dtype=np.int64)
    examples = [f"entry {i} (id {entries[int(i)]['id'] or '?'}): {problems[i]}" for i in np.flatnonzero(problems != "")[:5]]
    if require_image:  # counted, not shown: a stage-2 set has many, and none is wrong
        problems[(problems == "") & (counts == 0)] = "no image"
    skipped, usable = Counter(problems[problems != ""].tolist()), np.flatnonzero(problems == "")
    if len(usable) < len(entries):
        entries = [entries[i] for i in usable] if isinstance(entries, list) else entries.select(usable)
    return entries, images, skipped, examples


def listed_entries(data_path: str, image_root: str, processor=None) -> tuple[list, object]:
    """A JSON file's entries as entry_row makes them, in a list, and their lengths in tokens (given a processor):
    what open_data gives where datasets is not installed. LLaVADataset tokenizes each sample again as it loads."""
    entries = [entry_row(row) for row in load_llava_json(data_path)]
    usable = [entry for entry in entries if not entry["problem"]]
    for start in range(0, len(usable), 1000) if processor is not None else ():
        batch = usable[start:start + 1000]
        for entry, (ids, _) in zip(batch, processor.encode_llava_many([entry["conversations"] for entry in batch])):
            entry["length"] = len(ids)
    return entries, open_image_source(image_root) if image_root else None


def split_entries(entries, val_size: int, seed: int) -> tuple:
    """A seeded, fixed train/validation split: the same seed always holds out the same entries, the others keep
    their order. Works on a list (gives lists) and on a Dataset (gives Datasets that select its rows)."""
    if not 0 < val_size < len(entries):
        raise ValueError(f"val_size={val_size} must be between 1 and the number of entries - 1 ({len(entries) - 1})")
    held_out = np.zeros(len(entries), dtype=bool)
    held_out[torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).numpy()[:val_size]] = True
    train, val = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    if isinstance(entries, list):
        return [entries[i] for i in train], [entries[i] for i in val]
    return entries.select(train), entries.select(val)


def without_long_samples(entries, max_length: int) -> tuple:
    """Tokenized entries without those longer than max_length tokens, and how many there were. The lengths are
    read from the table under the entries' selection (a split), at once: through one, datasets reads row by row."""
    if isinstance(entries, list):  # listed_entries
        short = [entry for entry in entries if entry["length"] <= max_length]
        return short, len(entries) - len(short)
    lengths = entries.data.column("length").to_numpy()
    lengths = lengths if entries._indices is None else lengths[entries._indices.column(0).to_numpy()]
    short = np.flatnonzero(lengths <= max_length)  # select() checks indices for a run one by one: skipped if all
    return entries if len(short) == len(entries) else entries.select(short), len(entries) - len(short)


def check_data_paths(data_path: str, image_root: str, val_data_path: str = "") -> None:
    """Fail fast, before any model loads: a local data file or image root that is missing or unreadable.
    A data_path that does not exist and does not look like a file is taken for a hub dataset id."""
    for path in (data_path, val_data_path):
        looks_local = path.endswith((".json", ".jsonl", ".parquet")) or path.startswith((".", "/", "~"))
        if path and (os.path.exists(path) or looks_local) and not readable(path):
            raise FileNotFoundError(f"data file not found or not readable: {path}")
    if image_root and not readable(image_root):
        raise FileNotFoundError(f"image_root not found or not readable: {image_root}")


def readable(path: str) -> bool:
    return os.access(path, os.R_OK | os.X_OK) if os.path.isdir(path) else os.path.isfile(path) and os.access(path, os.R_OK)
