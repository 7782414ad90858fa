"""Data at any scale and from any source: every source as one Dataset of checked entries and its cache, the zip index,
parquet sources in the LLaVA, Cauldron and chat-messages schemas, several images per entry, wrong types and
escaping paths, and the start-up checks."""

import glob
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import sources
import demo
from data import LLaVADataset, Processor, StreamSampler, collate
from sources import (IGNORE_INDEX, ImageFolder, ImageZip, check_data_paths, decode_image, load_llava_json, open_data,
                     split_entries, without_long_samples)

datasets.disable_progress_bars()
COLOURS = {"red.jpg": (220, 20, 20), "green.jpg": (20, 220, 20), "blue.jpg": (20, 20, 220)}


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Processor(tokenizer, dict(demo.SIGLIP_PREPROCESSING, size={"height": 16, "width": 16}), "<image>", 4)


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def mean_colour(pixels: torch.Tensor) -> list:
    return pixels.float().mean(dim=(-1, -2)).round().tolist()  # (3,) per image


@pytest.fixture
def image_folder(tmp_path) -> str:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in COLOURS.items():
        (folder / name).write_bytes(jpeg(colour))
    return str(folder)


@pytest.fixture
def image_zip(tmp_path) -> str:
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for name, colour in COLOURS.items():
            archive.writestr(name, jpeg(colour))
    return str(tmp_path / "images.zip")


def turns(human: str, answer: str = "A colour.") -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


# -- the entries and their cache ---------------------------------------------------------------------------------


def test_the_store_gives_the_same_samples_as_a_list_of_entries_for_the_same_seed_and_position(
        shapes_data, processor, tmp_path):
    entries = load_llava_json(f"{shapes_data}/chat.json")
    entries[3]["image"] = 7  # bad entries are dropped the same way by both paths
    entries[5]["conversations"][1]["value"] = ""
    (tmp_path / "chat.json").write_text(json.dumps(entries))
    source = ImageZip(f"{shapes_data}/images.zip")
    kept = [e for e in load_llava_json(str(tmp_path / "chat.json")) if sources.check_entry(e, require_image=True) is None]
    list_train, _ = split_entries(kept, 4, seed=5)
    store, images, skipped, _ = open_data(str(tmp_path / "chat.json"), f"{shapes_data}/images.zip", True)
    store_train, _ = split_entries(store, 4, seed=5)
    assert skipped == {"image is not a path": 1, "empty caption": 1} and len(store_train) == len(list_train) == 18
    from_list, from_store = LLaVADataset(list_train, source, processor), LLaVADataset(store_train, images, processor)
    positions = iter(StreamSampler(len(store_train), seed=9, start=13))  # a resumed run, into its second epoch
    for _ in range(8):
        index = next(positions)
        a, b = from_list[index], from_store[index]
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert torch.equal(a["pixels"], b["pixels"])


def test_long_samples_are_dropped_through_the_splits_selection_as_row_by_row(tmp_path, shapes_data, processor):
    entries = json.load(open(f"{shapes_data}/chat.json"))
    entries[1]["conversations"][0]["value"] = "no marker here"  # skipped: the usable entries are a selection
    for i in (3, 8, 13):
        entries[i]["conversations"][1]["value"] = "a long caption " * (5 * i)
    (tmp_path / "chat.json").write_text(json.dumps(entries))
    store, _, _, _ = open_data(str(tmp_path / "chat.json"), f"{shapes_data}/images.zip", True, processor=processor)
    train, _ = split_entries(store, 4, seed=5)  # a selection of a selection
    max_length = sorted(row["length"] for row in train)[len(train) // 2]
    short, dropped = without_long_samples(train, max_length)
    expected = [row["id"] for row in train if row["length"] <= max_length]
    assert [row["id"] for row in short] == expected and dropped == len(train) - len(expected) > 0


def test_without_datasets_a_json_files_entries_are_a_list_that_trains_on_the_same_samples(
        tmp_path, shapes_data, processor, monkeypatch):
    entries = json.load(open(f"{shapes_data}/chat.json"))
    entries[2]["conversations"], entries[6]["image"] = "not turns", 7  # skipped and counted alike
    for i in (3, 9, 14):
        entries[i]["conversations"][1]["value"] = "a long caption " * 40  # dropped as too long alike
    (tmp_path / "chat.json").write_text(json.dumps(entries))

    def opened() -> tuple:
        entries, images, skipped, examples = open_data(str(tmp_path / "chat.json"), f"{shapes_data}/images.zip", True,
                                                       processor=processor)
        (train, too_long), (val, val_too_long) = (without_long_samples(part, 80) for part in split_entries(entries, 4, 5))
        samples = [LLaVADataset(part, images, processor).__getitems__(list(range(len(part)))) for part in (train, val)]
        return [[(np.asarray(s["input_ids"]).tolist(), np.asarray(s["labels"]).tolist(), s["pixels"].tolist())
                 for s in part] for part in samples], skipped, examples, too_long + val_too_long, type(entries)

    *from_datasets, datasets_type = opened()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a bare GPU machine
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    *from_list, list_type = opened()
    assert datasets_type is datasets.Dataset and list_type is list
    assert from_list == from_datasets and from_list[1] == {"malformed entry": 1, "image is not a path": 1}
    assert from_list[3] == 3 and len(from_list[0][0]) + len(from_list[0][1]) == len(entries) - 5


def test_a_batch_read_at_once_gives_the_samples_read_one_by_one(shapes_data, processor):
    store, images, _, _ = open_data(f"{shapes_data}/chat.json", f"{shapes_data}/images.zip", True, processor=processor)
    train, _ = split_entries(store, 4, seed=5)  # rows picked through an indices mapping, as in a run
    dataset = LLaVADataset(train, images, processor)
    for indices in ([3, 4, 5, 6], [11, 0, 7, 7, 2]):  # a contiguous slice of the table, and a scattered take
        for index, sample in zip(indices, dataset.__getitems__(indices)):
            alone = dataset[index]
            assert sample["input_ids"].tolist() == alone["input_ids"].tolist()
            assert sample["labels"].tolist() == alone["labels"].tolist() and torch.equal(sample["pixels"], alone["pixels"])


def test_the_entries_are_built_once_and_again_when_the_source_changes(tmp_path, image_folder, monkeypatch):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"id": "r", "image": "red.jpg", "conversations": turns("<image>")}]))
    assert len(open_data(str(path), image_folder, True)[0]) == 1
    reads, load = [], sources.load_llava_json
    monkeypatch.setattr(sources, "load_llava_json", lambda path: reads.append(path) or load(path))
    assert len(open_data(str(path), image_folder, True)[0]) == 1 and reads == []  # the cache was reused
    entries = [{"id": name, "image": name, "conversations": turns("<image>")} for name in COLOURS]
    path.write_text(json.dumps(entries))
    store = open_data(str(path), image_folder, True)[0]
    assert reads == [str(path)] and [e["id"] for e in store] == list(COLOURS)
    assert os.path.isdir(tmp_path / ".tinyvlm_cache")  # beside the data


def test_the_cache_goes_to_a_writable_folder_when_the_data_folder_is_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYVLM_CACHE", str(tmp_path / "cache"))
    read_only = str(tmp_path / "ro")
    monkeypatch.setattr(sources.os, "access", lambda path, mode: not str(path).startswith(read_only))
    assert sources.cache_folder(f"{read_only}/chat.json").startswith(str(tmp_path / "cache"))
    assert sources.cache_folder(str(tmp_path / "rw" / "chat.json")) == str(tmp_path / "rw" / ".tinyvlm_cache")


def test_a_spawned_worker_reads_the_same_samples(tmp_path, image_folder, processor):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"id": n, "image": n, "conversations": turns("<image>")} for n in COLOURS]))
    store, images, _, _ = open_data(str(path), image_folder, True, processor=processor)
    dataset = LLaVADataset(store, images, processor)
    spawned = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    for i in range(3):
        assert spawned[i]["input_ids"].tolist() == dataset[i]["input_ids"].tolist()
        assert torch.equal(spawned[i]["pixels"], dataset[i]["pixels"])


# -- the zip index -------------------------------------------------------------------------------------------


def test_the_zip_index_reads_stored_and_deflated_members_exactly(tmp_path):
    payloads = {"a/stored.jpg": jpeg((1, 2, 3)), "a/déflaté.jpg": jpeg((200, 100, 0)), "a/b/deep.jpg": b"x" * 5000}
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for i, (name, payload) in enumerate(payloads.items()):
            archive.writestr(name, payload, compress_type=zipfile.ZIP_DEFLATED if i else zipfile.ZIP_STORED)
        member = zipfile.ZipInfo("a/long extra field.jpg")  # more than the bytes read with the header at once
        member.extra = struct.pack("<HH", 0xCAFE, 300) + bytes(300)
        archive.writestr(member, payloads.setdefault(member.filename, jpeg((9, 9, 9))))
    source = ImageZip(str(tmp_path / "images.zip"))
    assert all(source.read(name) == payload for name, payload in payloads.items())
    assert source.read("stored.jpg") == payloads["a/stored.jpg"]  # names under the one top folder resolve
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        source.read("a/missing.jpg")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:  # two top folders: a name resolves as written only
        archive.writestr("a/x.jpg", b"x")
        archive.writestr("b/y.jpg", b"y")
    with pytest.raises(FileNotFoundError, match="x.jpg"):
        ImageZip(str(tmp_path / "two.zip")).read("x.jpg")


def test_the_zip_index_is_cached_and_no_process_reads_the_central_directory_again(image_zip, monkeypatch):
    ImageZip(image_zip).read("red.jpg")  # builds the index
    monkeypatch.setattr(sources.zipfile, "ZipFile", None)  # any ZipFile from here on would fail
    assert decode_image(ImageZip(image_zip).read("green.jpg")).getpixel((12, 12))[1] > 200


def test_a_corrupt_zip_member_is_an_unreadable_image(tmp_path, processor):
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("red.jpg", jpeg(COLOURS["red.jpg"]))
    raw = bytearray((tmp_path / "images.zip").read_bytes())
    raw[200] ^= 0xFF  # a flipped byte inside the JPEG: the CRC no longer matches
    (tmp_path / "images.zip").write_bytes(bytes(raw))
    entries = [{"id": "r", "image": "red.jpg", "conversations": turns("<image>")}]
    assert LLaVADataset(entries, ImageZip(str(tmp_path / "images.zip")), processor)[0] == {
        "skipped": "image unreadable"}


# -- sources and schemas -------------------------------------------------------------------------------------


def embedded(*names) -> list[dict]:
    return [{"bytes": jpeg(COLOURS[name]), "path": None} for name in names]


def write_parquet(path, rows: dict, features: dict) -> str:
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))
    return str(path)


def test_parquet_in_the_llava_schema_with_embedded_images(tmp_path, processor):
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    path = write_parquet(tmp_path / "llava.parquet", {
        "id": ["r", "g"], "image": embedded("red.jpg", "green.jpg"),
        "conversations": [turns("<image>\nWhat colour?", "Red."), turns("What colour?\n<image>", "Green.")]},
        {"id": datasets.Value("string"), "image": datasets.Image(), "conversations": datasets.List(turn)})
    store, images, skipped, _ = open_data(path, "", True)
    dataset = LLaVADataset(store, images, processor)
    assert not skipped and [e["id"] for e in store] == ["r", "g"]
    assert mean_colour(dataset[0]["pixels"])[0] > 200 and mean_colour(dataset[1]["pixels"])[1] > 200
    answer = [t for t, label in zip(dataset[1]["input_ids"], dataset[1]["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer) == "Green.<|im_end|>"


def test_parquet_in_the_cauldron_schema_puts_its_images_before_the_first_question(tmp_path, processor):
    pair = {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}
    path = write_parquet(tmp_path / "cauldron.parquet", {
        "images": [embedded("red.jpg"), embedded("green.jpg", "blue.jpg")],
        "texts": [[{"user": "Colour?", "assistant": "Red.", "source": "x"}],
                  [{"user": "Colours?", "assistant": "Green, blue.", "source": "x"},
                   {"user": "Which is first?", "assistant": "Green.", "source": "x"}]]},
        {"images": datasets.List(datasets.Image()), "texts": datasets.List(pair)})
    store, images, skipped, _ = open_data(path, "", True)
    sample = LLaVADataset(store, images, processor)[1]
    assert not skipped and sample["pixels"].shape == (2, 3, 16, 16)
    assert [round(c) for c in mean_colour(sample["pixels"])[1]][2] > 200  # the second image is blue
    text = processor.tokenizer.decode(sample["input_ids"])
    assert "<|im_start|>user\n" + "<image>" * 4 + "\n" + "<image>" * 4 + "\nColours?<|im_end|>" in text
    targets = processor.tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"])
                                          if label != IGNORE_INDEX])
    assert targets == "Green, blue.<|im_end|>Green.<|im_end|>"


def test_parquet_in_the_messages_schema_places_image_parts_and_reads_paths_under_image_root(
        tmp_path, processor, image_zip):
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": datasets.List(part)}
    path = write_parquet(tmp_path / "messages.parquet", {
        "images": [["red.jpg", "blue.jpg"]],
        "messages": [[{"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "image", "text": None},
                                                   {"type": "text", "text": "then"}, {"type": "image", "text": None}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Red, then blue."}]}]]},
        {"images": datasets.List(datasets.Value("string")), "messages": datasets.List(message)})
    store, images, skipped, _ = open_data(path, image_zip, True)
    sample = LLaVADataset(store, images, processor)[0]
    assert not skipped and [c.index(max(c)) for c in mean_colour(sample["pixels"])] == [0, 2]  # red, blue
    text = processor.tokenizer.decode(sample["input_ids"])
    assert "user\nFirst\n" + "<image>" * 4 + "\nthen\n" + "<image>" * 4 + "<|im_end|>" in text


def test_jsonl_in_the_messages_schema_with_string_content(tmp_path, image_folder, processor):
    rows = [{"messages": [{"role": "user", "content": "<image>\nColour?"},
                          {"role": "assistant", "content": "Green."}], "image": "green.jpg"},
            {"messages": [{"role": "robot", "content": "Hi"}], "image": "red.jpg"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store, images, skipped, _ = open_data(str(tmp_path / "chat.jsonl"), image_folder, True)
    assert len(store) == 1 and skipped == {"unknown role": 1}
    assert mean_colour(LLaVADataset(store, images, processor)[0]["pixels"])[1] > 200


# -- tokenized once ------------------------------------------------------------------------------------------


def reference_encode(processor, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Processor.encode as it was written first: the whole text, every placeholder in it, tokenized with
    offsets, and the tokens inside the assistant turns' spans made targets."""
    text = processor.render(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(processor.render(messages[:i], add_generation_prompt=True))
            spans.append((start, start + len(message["content"] + processor.end_of_turn)))
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(a <= offset < b for a, b in spans) else IGNORE_INDEX
              for token, (offset, _) in zip(encoding["input_ids"], encoding["offset_mapping"])]
    return encoding["input_ids"], labels


def every_schema(tmp_path, image_folder) -> list[str]:
    """Data files in each schema the sources read: LLaVA JSON (the marker before or after, several turns, text
    only, several images), JSONL chat messages, and parquet in the Cauldron's and the messages schema."""
    llava = [{"id": "a", "image": "red.jpg", "conversations": turns("<image>\nWhat colour?", "Red.")},
             {"id": "b", "image": "blue.jpg", "conversations": turns("What colour is it?\n<image>", "Blue, mostly.")},
             {"id": "c", "image": "green.jpg", "conversations": turns("<image>\nHi", "Green.") + turns("Sure?", "Yes.")},
             {"id": "d", "conversations": turns("Say something.", "Something.")},
             {"id": "e", "image": ["red.jpg", "blue.jpg"], "conversations": turns("<image> or <image>?", "The first.")}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nColour?"},
                              {"role": "assistant", "content": "Green."}], "image": "green.jpg"}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in messages))
    pair = {"user": datasets.Value("string"), "assistant": datasets.Value("string")}
    cauldron = write_parquet(tmp_path / "cauldron.parquet", {
        "images": [embedded("red.jpg"), embedded("green.jpg", "blue.jpg")],
        "texts": [[{"user": "Colour?", "assistant": "Red."}],
                  [{"user": "Colours?", "assistant": "Green, blue."}, {"user": "First?", "assistant": "Green."}]]},
        {"images": datasets.List(datasets.Image()), "texts": datasets.List(pair)})
    return [str(tmp_path / "llava.json"), str(tmp_path / "chat.jsonl"), cauldron]


def test_tokenized_samples_are_those_the_chat_template_gives_on_every_schema(tmp_path, image_folder, processor):
    for path in every_schema(tmp_path, image_folder):
        store, images, skipped, _ = open_data(path, image_folder, require_image=False)
        tokenized = sources.tokenize(store, processor)
        assert not skipped and len(tokenized) == len(store) > 0
        for i in range(len(store)):
            row = tokenized[i]
            expected = reference_encode(processor, sources.llava_to_messages(store[i]["conversations"],
                                                                    processor.image_placeholder))
            labels = [t if target else IGNORE_INDEX for t, target in zip(row["input_ids"], row["targets"])]
            assert (row["input_ids"], labels) == expected and row["length"] == len(labels), (path, i)
            assert row["image"] == sources.image_names(store[i])
            from_store, from_tokens = LLaVADataset(store, images, processor)[i], LLaVADataset(tokenized, images,
                                                                                              processor)[i]
            assert list(from_store["input_ids"]) == list(from_tokens["input_ids"])
            assert (from_store["pixels"] is None and from_tokens["pixels"] is None) or \
                torch.equal(from_store["pixels"], from_tokens["pixels"])


@pytest.mark.slow
def test_tokens_are_built_once_in_parallel_and_again_for_another_tokenizer_setting(tmp_path, image_folder,
                                                                                      processor, tokenizer, monkeypatch):
    entries = [{"id": str(i), "image": "red.jpg", "conversations": turns("<image>\nColour" + "?" * i, "Red.")}
               for i in range(40)]
    (tmp_path / "chat.json").write_text(json.dumps(entries))
    store = open_data(str(tmp_path / "chat.json"), image_folder, True)[0]
    serial = sources.tokenize(store, processor, processes=1)["input_ids"]
    for path in set(glob.glob(str(tmp_path / ".tinyvlm_cache" / "**" / "*.arrow"), recursive=True)) - {
            f["filename"] for f in store.cache_files}:
        os.remove(path)  # the tokens, not the entries
    assert sources.tokenize(store, processor, processes=2)["input_ids"] == serial  # two processes
    monkeypatch.setattr(sources, "encode_entries", lambda *args: pytest.fail("tokenized again"))
    assert sources.tokenize(store, processor)["input_ids"] == serial  # read back
    monkeypatch.undo()
    other = Processor(tokenizer, dict(demo.SIGLIP_PREPROCESSING, size={"height": 16, "width": 16}), "<image>", 4,
                      system_prompt="You describe images.")
    assert sources.tokenize(store, other)["input_ids"][0] != serial[0]  # another system prompt: other tokens
    assert sources.tokenize(store, processor)["input_ids"][0] == serial[0]  # each setting keeps its own


# -- several images per entry --------------------------------------------------------------------------------


def test_several_images_each_get_their_own_run_of_tokens_at_their_marker(processor, image_folder):
    entry = {"id": "m", "image": ["red.jpg", "blue.jpg"],
             "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
                               {"from": "human", "value": "And this one?\n<image>"}, {"from": "gpt", "value": "Blue."}]}
    assert sources.check_entry(entry, require_image=True) is None
    dataset = LLaVADataset([entry, {"id": "g", "image": "green.jpg", "conversations": turns("<image>")}],
                           ImageFolder(image_folder), processor)
    sample = dataset[0]
    text = processor.tokenizer.decode(sample["input_ids"])
    assert text.count("<image>" * 4) == 2 and "user\n" + "<image>" * 4 + "\nAnd this one?" in text
    targets = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(targets) == "Red.<|im_end|>Blue.<|im_end|>"
    batch = collate([dataset[1], sample], pad_token_id=2)
    assert batch["pixels"].shape == (3, 3, 16, 16)  # green, then the second sample's red and blue
    assert [c.index(max(c)) for c in mean_colour(batch["pixels"])] == [1, 0, 2]


def test_the_model_puts_the_kth_image_at_the_kth_marker(tiny_model, image_folder):
    processor = tiny_model.processor
    red, blue = (decode_image(open(f"{image_folder}/{n}", "rb").read()) for n in ("red.jpg", "blue.jpg"))
    batch = tiny_model.prompt_batch([[red, blue], blue], ["<image> or <image>?", "Which?"])
    assert batch["pixels"].shape[0] == 3
    with torch.no_grad():
        embeds = tiny_model.embed(batch["input_ids"], batch["pixels"])  # (2, T, H)
        expected = tiny_model.encode_images(batch["pixels"])  # (3, num_image_tokens, H)
    runs = embeds[batch["input_ids"] == processor.image_token_id].view(3, tiny_model.num_image_tokens, -1)
    assert torch.allclose(runs, expected.to(runs.dtype))
    assert not torch.allclose(expected[0], expected[1])  # red and blue differ, so the order is checked
    with pytest.raises(ValueError, match="2 <image> markers for 1 images"):
        tiny_model.prompt_batch([red], "<image> or <image>?")


def test_generate_py_takes_comma_joined_images_as_one_prompt(image_folder):
    from generate import image_jobs, image_loader

    jobs = image_jobs([f"{image_folder}/red.jpg,{image_folder}/blue.jpg", f"{image_folder}/green.jpg"], "Colours?")
    assert [len(j["image"]) if isinstance(j["image"], list) else 1 for j in jobs] == [2, 1]
    assert len(image_loader(None)(jobs[0])) == 2


# -- wrong types and escaping paths, with every image source -------------------------------------------------

BAD_ENTRIES = [
    ({"id": 1, "image": 5, "conversations": turns("<image>")}, "image is not a path"),
    ({"id": 2, "image": {"path": "red.jpg"}, "conversations": turns("<image>")}, "image is not a path"),
    ({"id": 3, "image": ["red.jpg", None], "conversations": turns("<image><image>")}, "image is not a path"),
    ({"id": 4, "image": "red.jpg", "conversations": [{"from": "human", "value": 3},
                                                    {"from": "gpt", "value": "x"}]}, "malformed entry"),
    ({"id": 5, "image": "red.jpg", "conversations": [{"from": ["human"], "value": "<image>"},
                                                    {"from": "gpt", "value": "x"}]}, "unknown role"),
    ({"id": 6, "image": "red.jpg", "conversations": None}, "malformed entry"),
    ({"id": 7, "image": "../images/red.jpg", "conversations": turns("<image>")}, "image path outside image_root"),
    ({"id": 8, "image": "/etc/passwd", "conversations": turns("<image>")}, "image path outside image_root"),
]


@pytest.mark.parametrize("source", ["folder", "zip"])
def test_wrong_types_and_escaping_paths_are_skipped_and_counted(source, tmp_path, image_folder, image_zip, processor):
    rows = [{"id": 0, "image": "red.jpg", "conversations": turns("<image>")}] + [entry for entry, _ in BAD_ENTRIES]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    store, images, skipped, examples = open_data(str(tmp_path / "chat.json"),
                                                 image_zip if source == "zip" else image_folder, True)
    expected = {reason: sum(r == reason for _, r in BAD_ENTRIES) for _, reason in BAD_ENTRIES}
    assert dict(skipped) == expected and len(store) == 1 and len(examples) == 5
    assert LLaVADataset(store, images, processor)[0]["pixels"] is not None


def test_nulls_and_escaping_paths_in_parquet_are_skipped_and_counted(tmp_path, image_zip, processor):
    """Parquet columns have one type each, so there a wrong type arrives as a null."""
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    path = write_parquet(tmp_path / "bad.parquet", {
        "image": [["red.jpg"], ["red.jpg", None], ["../red.jpg"], ["blue.jpg"], ["green.jpg"]],
        "conversations": [turns("<image>"), turns("<image><image>"), turns("<image>"),
                          [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}],
                          [{"from": None, "value": "<image>"}, {"from": "gpt", "value": "x"}]]},
        {"image": datasets.List(datasets.Value("string")), "conversations": datasets.List(turn)})
    store, images, skipped, _ = open_data(path, image_zip, True)
    assert dict(skipped) == {"image is not a path": 1, "image path outside image_root": 1, "malformed entry": 1,
                             "unknown role": 1}
    assert len(store) == 1 and LLaVADataset(store, images, processor)[0]["pixels"] is not None


def test_an_image_folder_never_reads_outside_its_root(image_folder, tmp_path):
    (tmp_path / "secret.jpg").write_bytes(jpeg((0, 0, 0)))
    for name in ("../secret.jpg", str(tmp_path / "secret.jpg")):
        with pytest.raises(FileNotFoundError, match="outside"):
            ImageFolder(image_folder).read(name)


# -- fail fast -----------------------------------------------------------------------------------------------


def test_missing_data_is_reported_before_any_model_loads(tiny_config, monkeypatch, tmp_path, capsys):
    import main

    monkeypatch.setattr(main, "build_model", lambda *args: pytest.fail("the model was loaded first"))
    arguments = ["--vision_model", tiny_config.vision_model, "--language_model", tiny_config.language_model,
                 "--device", "cpu", "--wandb_mode", "disabled"]
    nowhere, no_images = str(tmp_path / "nowhere.json"), str(tmp_path / "no_images")
    for flags, message in ((["--data_path", nowhere, "--image_root", tiny_config.image_root],
                            f"data file not found or not readable: {nowhere}"),
                           (["--data_path", tiny_config.data_path, "--image_root", no_images],
                            f"image_root not found or not readable: {no_images}")):
        with pytest.raises(SystemExit) as stopped:
            main.main(arguments + flags)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_hub_id_passes_the_start_up_check_and_a_bad_local_path_does_not(tmp_path):
    check_data_paths("HuggingFaceM4/the_cauldron", "")
    with pytest.raises(FileNotFoundError, match="data.parquet"):
        check_data_paths(str(tmp_path / "data.parquet"), "")
