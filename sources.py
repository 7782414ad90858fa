"""Where TinyVLM's data comes from, at any scale: LLaVA JSON (and JSONL, parquet, hub datasets in the
Cauldron's and the chat-messages schemas, all read as LLaVA entries), images from a folder, a zip read in
place or parquet rows, the checks that skip and count bad entries, and the stores built once beside the data
(entries, zip index, token ids) that every process shares. data.py turns them into training batches.
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
from array import array
from collections import Counter
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

IGNORE_INDEX = -100  # label of a token that carries no loss
IMAGE_MARKER = "<image>"  # where LLaVA data puts the image in a human turn
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA's speakers -> chat roles
LLAVA_ROLES = {role: speaker for speaker, role in ROLES.items()}  # chat roles -> LLaVA's speakers
class DataError(ValueError):
    """Data found bad while it loads (a file that is not what its setting says it is): the message names the
    file and the setting; the programs print it and exit with status 1, without a traceback."""


IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # PIL's on a bad image file
CACHE_FORMAT = 1  # bump when a cache's layout changes: old caches are then rebuilt


# ----------------------------------------------------------------------------------------------------------
# Caches beside the data: built once, reused by every later run and shared by every process


def cache_folder(source: str) -> str:
    """Beside `source`, or when that folder is read-only, in $TINYVLM_CACHE (default ~/.cache/tinyvlm)."""
    source = os.path.abspath(source)
    folder = os.path.join(os.path.dirname(source), ".tinyvlm_cache")
    if os.access(folder if os.path.isdir(folder) else os.path.dirname(source), os.W_OK):
        return folder
    fallback = os.environ.get("TINYVLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinyvlm")
    return os.path.join(fallback, hashlib.sha1(source.encode()).hexdigest()[:16])


def source_stamp(sources: list[str]) -> list:
    """What identifies the sources' contents cheaply: a changed file (size or modification time) rebuilds."""
    return [CACHE_FORMAT] + [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in sources]


def cached(sources: list[str], kind: str, names: tuple, build, folder: str | None = None) -> tuple[dict, dict]:
    """The paths of cache files `names` (each with its extension) derived from `sources`, and their metadata.
    build(paths) writes them and returns the metadata; it runs when the cache is missing or stale. Files are
    written under temporary names and renamed, the metadata last, so a crash never leaves a half cache. They
    go in folder, by default the cache folder of the first source (cache_folder)."""
    folder = folder or cache_folder(sources[0])
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(folder, f"{os.path.basename(sources[0])}.{kind}")
    paths = {name: f"{prefix}.{name}" for name in names}
    stamp = source_stamp(sources)
    try:
        with open(f"{prefix}.json") as f:
            meta = json.load(f)
        if meta.get("source") == stamp and all(os.path.isfile(p) for p in paths.values()):
            return paths, meta
    except (OSError, ValueError):
        pass
    temporary = {name: f"{prefix}.tmp{os.getpid()}.{name}" for name in names}
    meta = {**build(temporary), "source": stamp}
    for name in names:
        os.replace(temporary[name], paths[name])
    with open(f"{prefix}.tmp{os.getpid()}.json", "w") as f:
        json.dump(meta, f)
    os.replace(f"{prefix}.tmp{os.getpid()}.json", f"{prefix}.json")
    return paths, meta


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
    return image if image.mode == "RGB" else image.convert("RGB")


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
    """Images read straight from a zip file (LLaVA's images.zip) without unpacking it.

    The zip's central directory is read once and kept as a small index beside it (zip_index); every process
    then reads a member's bytes with os.pread on its own descriptor, so DataLoader workers share the index
    pages instead of each parsing 595K member records. Names may be stored under one top-level folder
    (images/GCC_train_x.jpg) while chat.json says GCC_train_x.jpg; both resolve.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image zip not found: {path}")
        self.path = path
        self._index = zip_index(path)  # built here, in the main process, so workers never race to build it
        self._fd, self._pid = None, None

    def _open(self):
        if self._fd is None or self._pid != os.getpid():
            self._index = self._index or zip_index(self.path)  # a spawned worker maps the cached index itself
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._index

    def read(self, name: str) -> bytes:
        index = self._open()
        for candidate in (name, index["prefix"] + name) if index["prefix"] else (name,):
            data = self._read_member(index, candidate)
            if data is not None:
                return data
        raise FileNotFoundError(f"{name} is not in {self.path}")

    def _read_member(self, index: dict, name: str) -> bytes | None:
        """The bytes of member `name`, or None if there is none. A 64-bit name hash finds the candidates; the
        name in the member's local header confirms the match, so a hash collision cannot return another file."""
        hashes = index["hashes"]
        key = np.uint64(name_hash(name))
        for row in range(np.searchsorted(hashes, key, "left"), np.searchsorted(hashes, key, "right")):
            offset, compressed_size, crc, method = (int(v) for v in index["members"][row])
            header = os.pread(self._fd, 30, offset)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise OSError(f"{self.path}: bad local header for {name}")
            flags, name_length, extra_length = struct.unpack("<H", header[6:8])[0], *struct.unpack("<HH", header[26:30])
            stored_name = os.pread(self._fd, name_length, offset + 30)
            if stored_name.decode("utf-8" if flags & 0x800 else "cp437") != name:
                continue
            data = os.pread(self._fd, compressed_size, offset + 30 + name_length + extra_length)
            if flags & 0x1:
                raise OSError(f"{name} in {self.path} is encrypted")
            if method == zipfile.ZIP_DEFLATED:
                data = zlib.decompress(data, -15)
            elif method != zipfile.ZIP_STORED:
                raise OSError(f"{name} in {self.path}: unsupported compression method {method}")
            if zlib.crc32(data) != crc:
                raise OSError(f"{name} in {self.path}: CRC mismatch (a corrupt zip?)")
            return data
        return None

    def __getstate__(self):  # DataLoader workers get the path, never an open descriptor or mapped index
        return {**self.__dict__, "_index": None, "_fd": None, "_pid": None}


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


ZIP_MEMBER = np.dtype([("offset", "<i8"), ("compressed_size", "<i8"), ("crc", "<u4"), ("method", "<u2")])


def zip_index(path: str) -> dict:
    """A zip's members as two memory-mapped arrays, sorted by name hash: hashes (uint64) and members
    (local header offset, compressed size, CRC, method); built from the central directory once, then cached."""
    def build(files: dict) -> dict:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
        hashes = np.array([name_hash(info.filename) for info in infos], dtype=np.uint64)
        members = np.array([(i.header_offset, i.compress_size, i.CRC, i.compress_type) for i in infos],
                           dtype=ZIP_MEMBER)
        order = np.argsort(hashes, kind="stable")
        np.save(files["hashes.npy"], hashes[order])
        np.save(files["members.npy"], members[order])
        names = [info.filename for info in infos]
        top_folders = {n.split("/", 1)[0] for n in names}
        one_folder = len(top_folders) == 1 and all("/" in n for n in names)
        return {"prefix": top_folders.pop() + "/" if one_folder else "", "members": len(infos)}

    try:
        files, meta = cached([path], "zipindex", ("hashes.npy", "members.npy"), build)
    except zipfile.BadZipFile as error:
        raise DataError(f"{path} (--image_root): not a readable zip file ({error})") from error
    return {"hashes": np.load(files["hashes.npy"], mmap_mode="r"), "prefix": meta["prefix"],
            "members": np.load(files["members.npy"], mmap_mode="r")}


def open_image_source(path: str):
    """A folder or a .zip of images, chosen by what `path` is."""
    return ImageZip(path) if path.endswith(".zip") else ImageFolder(path)


def decode_image(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes to a fully decoded RGB image; raises on a truncated or unreadable file. With size (width,
    height), a JPEG at least twice as large is decoded at 1/2, 1/4 or 1/8 scale, no smaller than size
    (libjpeg's DCT scaling: PIL's draft mode), which is much cheaper than decoding it whole to shrink it."""
    image = Image.open(io.BytesIO(data))
    if size is not None and image.format == "JPEG":
        image.draft("RGB", size)
    image.load()  # decode now, so a truncated file fails here and not later
    return to_rgb(image)


# ----------------------------------------------------------------------------------------------------------
# LLaVA conversations


def iter_json_entries(path: str):
    """The entries of a JSON list or JSON-lines file, one at a time: millions of entries never sit in memory
    as Python objects all at once (only the file's text does, while it is read)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        yield json.loads(line)
                return
            text = f.read()
        decoder, position = json.JSONDecoder(), skip_space(text, 0)
        if text[position:position + 1] != "[":
            kind = type(json.loads(text)).__name__ if text.strip() else "nothing"
            raise ValueError(f"expected a JSON list of entries, got {kind}")
        position = skip_space(text, position + 1)
        while text[position:position + 1] != "]":
            entry, position = decoder.raw_decode(text, position)
            yield entry
            position = skip_space(text, position)
            if text[position:position + 1] == ",":
                position = skip_space(text, position + 1)
            elif text[position:position + 1] != "]":
                raise ValueError(f"expected , or ] at character {position}")
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the data file {path}: {error}") from error


def skip_space(text: str, position: int) -> int:
    while text[position:position + 1] in (" ", "\n", "\r", "\t"):
        position += 1
    return position


def load_llava_json(path: str) -> list:
    """The raw list of entries in a LLaVA-format JSON file (a list, or JSON lines)."""
    return list(iter_json_entries(path))


def image_names(entry: dict) -> list | None:
    """An entry's images as a list of names ("image": one name or a list of them; absent, empty or null:
    none), or None when the field holds something else (a number, an object, a list of non-names)."""
    images = entry.get("image")
    if images is None or images == "" or images == []:
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(name, str) and name for name in images):
        return None
    return images


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
    if require_image and not images:
        return "no image"
    return None


def split_entries(entries, val_size: int, seed: int) -> tuple:
    """A seeded, fixed train/validation split: the same seed always holds out the same entries. Works on a
    list (gives lists) and on an EntryStore (gives stores that share its memory-mapped entries)."""
    if not 0 < val_size < len(entries):
        raise ValueError(f"val_size={val_size} must be between 1 and the number of entries - 1 ({len(entries) - 1})")
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).numpy()
    val = np.sort(order[:val_size])
    held_out = np.zeros(len(entries), dtype=bool)
    held_out[val] = True
    train = np.flatnonzero(~held_out)  # the others, in their original order
    if isinstance(entries, list):
        return [entries[i] for i in train], [entries[i] for i in val]
    return entries.select(train), entries.select(val)


def first_question(entry: dict) -> str:
    """The first human turn of a LLaVA entry without its <image> marker: the prompt to ask at inference."""
    turns = entry.get("conversations", [])
    question = next((t["value"] for t in turns if t.get("from") == "human"), "")
    return question.replace(IMAGE_MARKER, "").strip()


def first_answer(entry: dict) -> str | None:
    return next((t["value"] for t in entry.get("conversations", []) if t.get("from") == "gpt"), None)


def llava_to_messages(conversations: list, image_placeholder: str) -> list[dict]:
    """LLaVA turns as chat-template messages: human/gpt become user/assistant. A turn with one <image>
    marker, before or after the instruction, has it removed and the image placeholder put first, as LLaVA
    does; a turn with several (interleaved images) gets a placeholder at each marker, in place."""
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
    """A conversation so far, ending with the user's question, as LLaVA turns. It may be written as chat
    messages ({"role": "user"/"assistant"/"system", "content"}) or as LLaVA turns ({"from", "value"}). With an
    image and no <image> marker, the marker goes first in the first user turn, where LLaVA data has it.
    Raises ValueError on a conversation training would not accept, so a prompt never holds a stray marker."""
    turns = []
    for index, turn in enumerate(conversation):
        turn = turn if isinstance(turn, dict) else {}
        role = turn.get("from", LLAVA_ROLES.get(turn.get("role")))
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
# Other schemas: the Cauldron's texts + images, chat messages; each row becomes a LLaVA entry


def with_image_markers(text: str, num_images: int) -> str:
    """The text with an <image> marker per image before it, unless it places its images itself."""
    return text if IMAGE_MARKER in text else f"{IMAGE_MARKER}\n" * num_images + text


def cauldron_to_llava(texts) -> list | None:
    """The Cauldron's [{"user": ..., "assistant": ...}, ...] as LLaVA turns; None if it is not a list of dicts."""
    if not isinstance(texts, list) or not all(isinstance(pair, dict) for pair in texts):
        return None
    return [{"from": role, "value": pair.get(key)} for pair in texts
            for role, key in (("human", "user"), ("gpt", "assistant"))]


def message_content_text(content) -> str | None:
    """A chat message's content: a string, or a list of {"type": "text", "text": ...} and {"type": "image"}
    parts (an image part becomes an <image> marker, parts are joined by newlines); None if malformed."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        return None
    parts = [IMAGE_MARKER if part.get("type") == "image" else part.get("text") for part in content]
    return "\n".join(parts) if all(isinstance(part, str) for part in parts) else None


def messages_to_llava(messages) -> list | None:
    """Chat messages [{"role": "user" | "assistant" | "system", "content": ...}] as LLaVA turns."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return [{"from": LLAVA_ROLES.get(m.get("role"), m.get("role")) if isinstance(m.get("role"), str) else None,
             "value": message_content_text(m.get("content"))} for m in messages]


def row_to_llava(row) -> dict:
    """A row in any supported schema as a LLaVA entry {"id", "image", "conversations"}: LLaVA's own
    (conversations + image), the Cauldron's (texts + images) or chat messages (messages + images). Images of
    the last two without markers go first, as the Cauldron and LLaVA do. Wrong types are left for
    check_entry to name."""
    if not isinstance(row, dict):
        return row
    images = row.get("image") if row.get("image") is not None else row.get("images")
    entry = {"id": row.get("id"), "image": images}
    if "conversations" in row:
        return {**entry, "conversations": row["conversations"]}
    turns = cauldron_to_llava(row["texts"]) if "texts" in row else messages_to_llava(row.get("messages"))
    names = image_names(entry)
    if turns and names and all(isinstance(t["value"], str) and IMAGE_MARKER not in t["value"] for t in turns):
        first_human = next((t for t in turns if t["from"] == "human"), None)
        if first_human is not None:
            first_human["value"] = with_image_markers(first_human["value"], len(names))
    return {**entry, "conversations": turns}


# ----------------------------------------------------------------------------------------------------------
# Entries at any scale: parsed once into a memory-mapped store beside the data, shared by every process

STORE_FILES = ("entries.bin", "offsets.npy", "has_image.npy")
EMBEDDED = "embedded://"  # an image inside a parquet/hub row: embedded://<column>/<row>/<k-th image>


def build_entry_store(rows, files: dict) -> dict:
    """Check every row, write the usable ones as JSON texts into one file with an int64 offsets array, and
    count the others by reason. Only the file's pages a process touches are ever in its memory, and the OS
    shares them between processes, where 600K Python dicts would be copied into every DataLoader worker."""
    offsets, has_image, skipped, examples = array("q", [0]), array("b"), Counter(), []
    with open(files["entries.bin"], "wb") as out:
        for index, row in enumerate(rows):
            entry = row_to_llava(row)
            reason = check_entry(entry, require_image=False)
            if reason is not None:
                skipped[reason] += 1
                if len(examples) < 5:
                    entry_id = entry.get("id", "?") if isinstance(entry, dict) else "?"
                    examples.append(f"entry {index} (id {entry_id}): {reason}")
                continue
            text = json.dumps({k: v for k, v in entry.items() if v is not None}).encode()
            out.write(text)
            offsets.append(offsets[-1] + len(text))
            has_image.append(bool(image_names(entry)))
    np.save(files["offsets.npy"], np.frombuffer(offsets, dtype=np.int64))
    np.save(files["has_image.npy"], np.frombuffer(has_image, dtype=np.int8).astype(bool))
    return {"skipped": dict(skipped), "examples": examples, "entries": len(has_image)}


class EntryStore:
    """A sequence of LLaVA entries read from a store that build_entry_store wrote: entry i is decoded from
    its bytes on each access. `rows` picks and orders the stored entries (a split) without copying them.
    Texts are read with os.pread on each process's own descriptor (as ImageZip reads images): they pass
    through the OS page cache, shared by all, and are never mapped into a worker, where every page of
    entries.bin it had touched would count in its memory. Only the offsets are mapped."""

    def __init__(self, files: dict, rows: np.ndarray, tokens: dict | None = None):
        self.files, self.rows, self.tokens = files, rows, tokens  # tokens: a token store's files (tokenized)
        self._fd, self._pid, self._offsets, self._token_files = None, None, None, None

    def _open(self):
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.files["entries.bin"], os.O_RDONLY), os.getpid()
            self._offsets = np.load(self.files["offsets.npy"], mmap_mode="r")
            self._token_files = None if self.tokens is None else (
                {name: os.open(self.tokens[name], os.O_RDONLY) for name in ("input_ids.bin", "targets.bin", "images.bin")},
                np.load(self.tokens["token_offsets.npy"], mmap_mode="r"),
                np.load(self.tokens["image_offsets.npy"], mmap_mode="r"))
        return self._fd, self._offsets

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(index)
        fd, offsets = self._open()
        start, end = (int(v) for v in offsets[self.rows[index]:self.rows[index] + 2])
        return json.loads(os.pread(fd, end - start, start))

    def encoded(self, index: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Entry index as tokenize() stored it: its input ids and labels (int64 arrays) and image names,
        read without parsing JSON or rendering a chat template."""
        self._open()
        descriptors, token_offsets, image_offsets = self._token_files
        row = self.rows[index]
        start, end = (int(v) for v in token_offsets[row:row + 2])
        input_ids = np.frombuffer(os.pread(descriptors["input_ids.bin"], 4 * (end - start), 4 * start), np.int32)
        targets = np.frombuffer(os.pread(descriptors["targets.bin"], end - start, start), np.bool_)
        start, end = (int(v) for v in image_offsets[row:row + 2])
        names = os.pread(descriptors["images.bin"], end - start, start).decode()
        input_ids = input_ids.astype(np.int64)
        return input_ids, np.where(targets, input_ids, IGNORE_INDEX), names.split("\0") if names else []

    def lengths(self) -> np.ndarray:
        """Each entry's length in tokens (tokenized stores only)."""
        return np.diff(np.load(self.tokens["token_offsets.npy"], mmap_mode="r"))[self.rows]

    def select(self, positions: np.ndarray) -> "EntryStore":
        return EntryStore(self.files, self.rows[positions], self.tokens)

    def __getstate__(self):  # a spawned worker opens the files itself instead of receiving a copy
        return {**self.__dict__, "_fd": None, "_pid": None, "_offsets": None, "_token_files": None}


TOKEN_FILES = ("input_ids.bin", "targets.bin", "token_offsets.npy", "images.bin", "image_offsets.npy")


def processor_stamp(processor) -> str:
    """What makes a processor's token ids and labels what they are: the tokenizer (vocabulary, merges, added
    tokens), the chat template, the system prompt, the end-of-turn token, the image token and how many of
    them an image takes."""
    digest = hashlib.sha1(processor.tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([processor.tokenizer.chat_template, processor.system_prompt, processor.end_of_turn,
                              processor.image_token, processor.num_image_tokens]).encode())
    return digest.hexdigest()[:16]


def encode_rows(store: "EntryStore", processor, rows: range) -> tuple:
    """The token ids, targets and lengths of stored entries `rows` (a chunk of tokenize()), and their image
    names, NUL-separated, one bytes object for all."""
    entries = [store[i] for i in rows]
    encoded = processor.encode_llava_many([e["conversations"] for e in entries])
    input_ids = np.array([t for ids, _ in encoded for t in ids], dtype=np.int32)
    targets = np.array([label != IGNORE_INDEX for _, labels in encoded for label in labels], dtype=np.bool_)
    names = [("\0".join(image_names(e))).encode() for e in entries]
    return input_ids, targets, np.array([len(ids) for ids, _ in encoded]), np.array([len(n) for n in names]), b"".join(names)


_BUILDING = {}  # what the processes of a tokenize() build work on: set before they fork, inherited


def encode_chunk(rows: range) -> tuple:
    return encode_rows(_BUILDING["store"], _BUILDING["processor"], rows)


def tokenize(store: "EntryStore", processor, chunk: int = 2048) -> "EntryStore":
    """The store with every entry's token ids and labels computed once, by processor.encode_llava_many
    (data.Processor), and kept
    beside it (keyed by processor_stamp, rebuilt with the store): later runs and every DataLoader worker read
    them back. The first time, the entries are tokenized in parallel, one process per core this process may
    use, with a progress bar."""
    everything = EntryStore(store.files, np.arange(len(np.load(store.files["has_image.npy"], mmap_mode="r"))))

    def build(files: dict) -> dict:
        chunks = [range(start, min(start + chunk, len(everything))) for start in range(0, len(everything), chunk)]
        processes = min(len(os.sched_getaffinity(0)), len(chunks))
        token_lengths, image_lengths = [], []
        bar = tqdm(total=len(everything), desc="tokenizing", unit=" entries",
                   disable=len(everything) < 10_000, dynamic_ncols=True)
        with open(files["input_ids.bin"], "wb") as ids_file, open(files["targets.bin"], "wb") as targets_file, \
                open(files["images.bin"], "wb") as names_file, processing_pool(processes, everything, processor) as pool:
            for input_ids, targets, lengths, name_lengths, names in pool(encode_chunk, chunks):
                ids_file.write(input_ids.tobytes())
                targets_file.write(targets.tobytes())
                names_file.write(names)
                token_lengths.append(lengths)
                image_lengths.append(name_lengths)
                bar.update(len(lengths))
        bar.close()
        for name, lengths in (("token_offsets.npy", token_lengths), ("image_offsets.npy", image_lengths)):
            np.save(files[name], np.concatenate([[0], np.cumsum(np.concatenate(lengths or [[]]))]).astype(np.int64))
        return {"entries": len(everything), "tokens": int(sum(map(sum, token_lengths)))}

    entries_file = store.files["entries.bin"]
    files, _ = cached([entries_file], f"tokens-{processor_stamp(processor)}", TOKEN_FILES, build,
                      folder=os.path.dirname(entries_file))
    return EntryStore(store.files, store.rows, files)


@contextmanager
def processing_pool(processes: int, store: "EntryStore", processor):
    """map() over a pool of forked processes that share store and processor, or in this one for a single
    process (or where fork is not available)."""
    if processes < 2 or "fork" not in multiprocessing.get_all_start_methods():
        _BUILDING.update(store=store, processor=processor)
        yield map
        return
    _BUILDING.update(store=store, processor=processor)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield lambda function, chunks: pool.imap(function, chunks)
    _BUILDING.clear()


def without_long_samples(store: "EntryStore", max_length: int) -> tuple["EntryStore", int]:
    """A tokenized store without its entries longer than max_length tokens, and how many there were."""
    short = np.flatnonzero(store.lengths() <= max_length)
    return store.select(short), len(store) - len(short)


def is_image_feature(feature) -> bool:
    """A datasets Image column, or a list of images."""
    import datasets

    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    return isinstance(feature, datasets.Image) or isinstance(inner, datasets.Image)


def image_references(column, name: str, first_row: int) -> list:
    """Per row of an Arrow image column (a struct of bytes and path, or a list of them): a name for each
    image, EMBEDDED for stored bytes, else its path. The image bytes themselves are not read."""
    import pyarrow as pa

    is_list = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    images = column.flatten() if is_list else column
    lengths = (column.value_lengths().to_pylist() if is_list
               else [1 if valid else None for valid in column.is_valid().to_pylist()])
    fields = dict(zip([field.name for field in images.type], images.flatten()))
    has_bytes, paths = fields["bytes"].is_valid().to_pylist(), fields["path"].to_pylist()
    references, k = [], 0
    for row, length in enumerate(lengths):
        if length is None:
            references.append(None)
            continue
        references.append([f"{EMBEDDED}{name}/{first_row + row}/{i}" if has_bytes[k + i] else paths[k + i]
                           for i in range(length)])
        k += length
    return references


def dataset_rows(dataset):
    """The rows of a datasets Dataset as dicts, with names in place of image columns (image_references)."""
    image_columns = [name for name, feature in dataset.features.items() if is_image_feature(feature)]
    table, first_row = dataset.data.table, 0  # a dataset as load_dataset gives it: no indices mapping
    for batch in table.to_batches(max_chunksize=4096):
        references = {name: image_references(batch.column(name), name, first_row) for name in image_columns}
        texts = batch.select([n for n in batch.schema.names if n not in image_columns]).to_pylist()
        for i, row in enumerate(texts):
            yield {**row, **{name: references[name][i] for name in image_columns}}
        first_row += batch.num_rows


class DatasetImages:
    """The images of a parquet or hub dataset: embedded ones from its memory-mapped Arrow table, paths from
    image_root (a folder or zip, or None)."""

    def __init__(self, dataset, paths=None):
        self.dataset, self.paths = dataset, paths

    def read(self, name: str) -> bytes:
        if not name.startswith(EMBEDDED):
            if self.paths is None:
                raise FileNotFoundError(f"{name}: an image path, and no image_root was given")
            return self.paths.read(name)
        column, row, k = name[len(EMBEDDED):].rsplit("/", 2)
        value = self.dataset.data.table.column(column)[int(row)].as_py()
        return (value[int(k)] if isinstance(value, list) else value)["bytes"]


def load_hf_dataset(data_path: str, subset: str = "", split: str = "train"):
    """A parquet file, a folder of parquet files, or a hub dataset (with an optional subset and split),
    through `datasets`: converted once into memory-mapped Arrow files, in a cache beside local files."""
    import datasets  # here: runs on LLaVA JSON do not pay for importing it

    if not os.path.exists(data_path):
        return datasets.load_dataset(data_path, subset or None, split=split)
    files = [data_path] if os.path.isfile(data_path) else sorted(
        glob.glob(os.path.join(data_path, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no parquet files in {data_path}")
    try:
        return datasets.load_dataset("parquet", data_files=files, split="train",
                                     cache_dir=os.path.join(cache_folder(files[0]), "datasets"))
    except Exception as error:  # pyarrow's and datasets' many kinds of "not a parquet file"
        raise DataError(f"{data_path} (--data_path): not readable as parquet ({type(error).__name__}: {error})") \
            from error


def open_data(data_path: str, image_root: str, require_image: bool, subset: str = "", split: str = "train"):
    """The usable entries of a data source as an EntryStore, the image source to read their images from,
    and the skipped entries counted by reason with a few examples. data_path: a JSON or JSONL file (LLaVA,
    Cauldron or messages schema, images under image_root), a parquet file or folder, or a hub dataset id
    (images embedded, or paths under image_root). The store is built on the first run and reused."""
    paths = open_image_source(image_root) if image_root else None
    if data_path.endswith((".json", ".jsonl")):
        sources, rows, images = [data_path], lambda: iter_json_entries(data_path), paths
    else:
        dataset = load_hf_dataset(data_path, subset, split)
        sources, rows = [f["filename"] for f in dataset.cache_files], lambda: dataset_rows(dataset)
        images = DatasetImages(dataset, paths)
    files, meta = cached(sources, "entries", STORE_FILES, lambda f: build_entry_store(rows(), f))
    has_image = np.load(files["has_image.npy"])
    kept = np.flatnonzero(has_image) if require_image else np.arange(len(has_image))
    skipped = Counter(meta["skipped"])
    if len(kept) < len(has_image):
        skipped["no image"] += len(has_image) - len(kept)
    return EntryStore(files, kept), images, skipped, meta["examples"]


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
    if os.path.isdir(path):
        return os.access(path, os.R_OK | os.X_OK)
    return os.path.isfile(path) and os.access(path, os.R_OK)
