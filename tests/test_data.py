"""Data: the chat template and label masking with the real SmolLM2 tokenizer, image sources, bad data."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import demo
from data import LLaVADataset, Processor, StreamSampler, collate, pack_step, padded_step
from sources import (IGNORE_INDEX, ImageFolder, ImageZip, check_entry, decode_image, llava_to_messages, load_llava_json,
                     open_data, split_entries, to_rgb)

CAPTION = "olive oil is a healthy ingredient used liberally ."
INSTRUCTION = "Provide a brief description of the given image."


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Processor(tokenizer, demo.SIGLIP_PREPROCESSING, "<image>", num_image_tokens=49)


def llava_turns(human: str, caption: str = CAPTION) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]


@pytest.mark.parametrize("human", [f"{INSTRUCTION}\n<image>", f"<image>\n{INSTRUCTION}"])
def test_labels_cover_exactly_the_caption_and_its_end_of_turn_token(processor, tokenizer, human):
    input_ids, labels = processor.encode_llava(llava_turns(human))
    targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert targets == list(range(targets[0], targets[-1] + 1))  # one contiguous span
    assert tokenizer.decode([input_ids[i] for i in targets]) == CAPTION + "<|im_end|>"
    assert input_ids[targets[-1]] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(labels[i] == input_ids[i] for i in targets)
    # what comes before: an empty system turn, the image, the instruction, the assistant's header
    assert tokenizer.decode(input_ids[:targets[0]]) == (
        f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{'<image>' * 49}\n{INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert input_ids.count(processor.image_token_id) == 49
    assert tokenizer.decode(input_ids[targets[-1] + 1:]) == "\n"  # the newline after the turn is no target


def test_system_prompt_none_keeps_the_chat_templates_default(tokenizer):
    processor = Processor(tokenizer, demo.SIGLIP_PREPROCESSING, "<image>", 4, system_prompt=None)
    input_ids, _ = processor.encode_llava(llava_turns("<image>\nHi"))
    assert tokenizer.decode(input_ids).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>")


def test_image_marker_before_or_after_the_instruction_gives_the_same_tokens(processor):
    before = processor.encode_llava(llava_turns(f"<image>\n{INSTRUCTION}"))
    after = processor.encode_llava(llava_turns(f"{INSTRUCTION}\n<image>"))
    assert before == after


def test_every_assistant_turn_is_a_target_in_a_multi_turn_conversation(processor, tokenizer):
    turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A circle."}]
    input_ids, labels = processor.encode_llava(turns)
    target_text = tokenizer.decode([t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX])
    assert target_text == "Red.<|im_end|>A circle.<|im_end|>"


def test_training_prompt_and_inference_prompt_are_token_for_token_the_same(processor):
    messages = llava_to_messages(llava_turns(f"{INSTRUCTION}\n<image>"), processor.image_placeholder)
    train_ids, labels = processor.encode(messages)
    prompt_ids = processor.encode_prompt(processor.prompt_messages(INSTRUCTION))
    first_target = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert train_ids[:first_target] == prompt_ids


def test_a_chat_template_that_hides_the_assistant_turn_is_refused(tokenizer):
    odd = Processor(tokenizer, demo.SIGLIP_PREPROCESSING, "<image>", 4)
    odd.render = lambda messages, add_generation_prompt: "".join(m["content"].upper() for m in messages)
    with pytest.raises(ValueError, match="cannot mask labels"):
        odd.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


def test_image_settings_come_from_the_preprocessor_config(tokenizer):
    settings = dict(demo.SIGLIP_PREPROCESSING, size={"height": 40, "width": 24}, image_mean=[0.1, 0.2, 0.3])
    processor = Processor(tokenizer, settings, "<image>", 4)
    assert processor.image_to_pixels(Image.new("RGB", (100, 50))).shape == (3, 40, 24)
    assert processor.image_mean == [0.1, 0.2, 0.3]


# -- image sources -------------------------------------------------------------------------------------------


def jpeg_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def photo_like_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG with what makes resizing filters differ: gradients, edges and thin lines."""
    rng = np.random.default_rng(seed)
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        draw.line((x, y, x + rng.integers(-60, 60), y + rng.integers(-60, 60)), width=2,
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(400, 300), (640, 480), (1024, 768)])
def test_pixels_stay_within_a_level_of_pils_bicubic_resize_of_the_whole_image(processor, size):
    """The training path (a large JPEG decoded at reduced scale, then torch's antialiased bilinear resize)
    against the encoder's own preprocessing (the whole JPEG, PIL's bicubic resize): a mean absolute
    difference under 1 of 255 (measured: 0.2-0.5), on images made to tell filters apart."""
    for seed in range(4):
        data = photo_like_jpeg(size, seed)
        reference = np.asarray(decode_image(data).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = processor.image_to_pixels(decode_image(data, (224, 224))).permute(1, 2, 0).numpy().astype(np.int16)
        difference = np.abs(pixels - reference).mean()
        assert difference < 1.0, (size, seed, difference)
        assert np.abs(pixels - reference).mean(axis=(0, 1)).max() < 2.0  # no colour shifted


def test_an_image_of_the_encoders_size_is_not_resampled(processor):
    image = decode_image(photo_like_jpeg((224, 224), 0))
    assert torch.equal(processor.image_to_pixels(image), torch.from_numpy(np.array(image)).permute(2, 0, 1))


def test_zip_and_folder_sources_give_identical_tensors(shapes_data, processor, tmp_path):
    entries = load_llava_json(f"{shapes_data}/chat.json")[:6]
    with zipfile.ZipFile(f"{shapes_data}/images.zip") as archive:
        archive.extractall(tmp_path / "images")
    from_zip = LLaVADataset(entries, ImageZip(f"{shapes_data}/images.zip"), processor)
    from_folder = LLaVADataset(entries, ImageFolder(str(tmp_path / "images")), processor)
    for i in range(len(entries)):
        a, b = from_zip[i], from_folder[i]
        assert torch.equal(a["pixels"], b["pixels"]) and a["input_ids"] == b["input_ids"]
        assert a["pixels"].dtype == torch.uint8 and a["pixels"].shape == (3, 224, 224)


def test_zip_with_a_top_level_folder_resolves_bare_names(tmp_path):
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("images/GCC_train_1.jpg", jpeg_bytes())
    source = ImageZip(str(tmp_path / "images.zip"))
    assert source.read("GCC_train_1.jpg") == jpeg_bytes()
    with pytest.raises(FileNotFoundError, match="GCC_train_2.jpg"):
        source.read("GCC_train_2.jpg")


@pytest.mark.slow
def test_each_dataloader_worker_opens_its_own_zip_handle(shapes_data, processor):
    source = ImageZip(f"{shapes_data}/images.zip")
    source.read("shape_000000.jpg")
    dataset = LLaVADataset(load_llava_json(f"{shapes_data}/chat.json"), source, processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2,
                                         collate_fn=lambda s: collate(s, pad_token_id=2))
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == 24 and all(not b["skipped"] for b in batches)


# -- bad data ------------------------------------------------------------------------------------------------


def rgb_of(image: Image.Image) -> tuple:
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    return converted.getpixel((0, 0))


def test_non_rgb_images_become_rgb():
    assert rgb_of(Image.new("L", (4, 4), 128)) == (128, 128, 128)
    assert rgb_of(Image.new("RGBA", (4, 4), (255, 0, 0, 0))) == (255, 255, 255)  # transparent: white
    assert rgb_of(Image.new("RGBA", (4, 4), (255, 0, 0, 255))) == (255, 0, 0)
    assert rgb_of(Image.new("LA", (4, 4), (0, 255))) == (0, 0, 0)
    assert rgb_of(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    assert rgb_of(palette) == (10, 20, 30)
    palette.info["transparency"] = 1
    assert rgb_of(palette) == (255, 255, 255)


def test_16_bit_images_are_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))  # (4, 16), a dark-to-bright ramp
    image = to_rgb(Image.fromarray(ramp))
    values = np.asarray(image)[0, :, 0]
    assert values[0] == 0 and values[-1] == 255 and 100 < values[8] < 160  # a ramp, not clipped to white


def test_decode_rejects_truncated_and_non_image_bytes():
    with pytest.raises(OSError):
        decode_image(jpeg_bytes(size=(64, 64))[:300])
    with pytest.raises(OSError):
        decode_image(b"this is not an image")


def test_bad_images_are_skipped_and_counted(processor, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg_bytes())
    (folder / "truncated.jpg").write_bytes(jpeg_bytes(size=(64, 64))[:300])
    (folder / "text.jpg").write_bytes(b"not an image")
    buffer = io.BytesIO()
    Image.new("I;16", (20, 20), 4000).save(buffer, format="PNG")
    (folder / "sixteen_bit.png").write_bytes(buffer.getvalue())
    names = ["good.jpg", "truncated.jpg", "text.jpg", "missing.jpg", "sixteen_bit.png"]
    entries = [{"id": name, "image": name, "conversations": llava_turns("<image>\nDescribe.")} for name in names]
    dataset = LLaVADataset(entries, ImageFolder(str(folder)), processor)
    batch = collate([dataset[i] for i in range(len(entries))], pad_token_id=2)
    assert len(batch["input_ids"]) == 2 and batch["pixels"].shape[0] == 2  # good.jpg and sixteen_bit.png
    assert batch["skipped"] == {"image unreadable": 2, "image missing": 1}


def test_skip_counts_survive_the_pin_memory_step_of_a_cuda_data_loader(processor, monkeypatch):
    """With pin_memory (on CUDA), the DataLoader copies each batch's dicts and update()s the copies with their
    pinned values: a Counter would come back with its counts doubled. Run here with pinning itself a no-op."""
    from collections import Counter

    from torch.utils.data._utils.pin_memory import pin_memory

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args, **kwargs: tensor)
    turns = llava_turns("<image>\nDescribe.")
    sample = {"pixels": torch.zeros(3, 8, 8, dtype=torch.uint8)}
    sample["input_ids"], sample["labels"] = processor.encode_llava(turns)
    samples = [sample, {"skipped": "image missing"}, {"skipped": "image missing"}, {"skipped": "too long"}]
    for step in (padded_step(samples, 2, 0, processor.image_token_id), pack_step(samples, 256, 512, 0)):
        assert pin_memory(step)[0]["skipped"] == {"image missing": 2, "too long": 1}
    assert pin_memory({"skipped": Counter({"image missing": 2})})["skipped"]["image missing"] == 4  # a Counter would


def test_an_over_long_sample_is_skipped(tokenizer, shapes_data):
    processor = Processor(tokenizer, demo.SIGLIP_PREPROCESSING, "<image>", 49)
    entries = [{"id": "long", "image": "shape_000000.jpg",
                "conversations": llava_turns("<image>\nDescribe.", "a very long caption " * 20)}]
    dataset = LLaVADataset(entries, ImageZip(f"{shapes_data}/images.zip"), processor, max_length=100)
    assert dataset[0] == {"skipped": "too long"}


@pytest.mark.parametrize("entry, reason", [
    ({"id": "a", "image": "a.jpg", "conversations": llava_turns("Describe.")}, "no <image> marker"),
    ({"id": "b", "image": "b.jpg", "conversations": llava_turns("<image> and <image>")},
     "<image> markers do not match the images"),
    ({"id": "b2", "image": ["b.jpg", "c.jpg"], "conversations": llava_turns("<image> only one")},
     "<image> markers do not match the images"),
    ({"id": "b3", "image": "b.jpg", "conversations": llava_turns("<image>", "<image> in the answer")},
     "<image> outside a human turn"),
    ({"id": "c", "image": "c.jpg", "conversations": llava_turns("<image>\nDescribe.", "  ")}, "empty caption"),
    ({"id": "d", "conversations": llava_turns("<image>\nDescribe.")}, "<image> marker without image"),
    ({"id": "e", "conversations": llava_turns("Say hi.")}, "no image"),
    ({"id": "f", "image": "f.jpg", "conversations": [{"from": "human", "value": "<image>"}]}, "no assistant turn"),
    ({"id": "g", "image": "g.jpg", "conversations": [{"from": "robot", "value": "<image>"}]}, "unknown role"),
    ({"id": "i", "image": "i.jpg", "conversations": [{"from": "gpt", "value": "Hi."},
                                                      {"from": "human", "value": "<image>"},
                                                      {"from": "gpt", "value": "A cat."}]},
     "does not start with a human turn"),
    ({"id": "j", "image": "j.jpg", "conversations": [{"from": "gpt", "value": "<image> A cat."}]},
     "does not start with a human turn"),
    ({"id": "h", "image": "h.jpg"}, "malformed entry"),
    ("not a dict", "malformed entry"),
])
def test_unusable_entries_are_named_and_counted(entry, reason, tmp_path):
    assert check_entry(entry, require_image=True) == reason
    (tmp_path / "chat.json").write_text(json.dumps([entry]))
    store, _, skipped, examples = open_data(str(tmp_path / "chat.json"), "", require_image=True)
    assert len(store) == 0 and skipped == {reason: 1}
    assert examples == [] if reason == "no image" else reason in examples[0]  # counted after the checks


def test_a_text_only_entry_is_fine_when_images_are_not_required():
    assert check_entry({"id": "t", "conversations": llava_turns("Say hi.", "Hi!")}, require_image=False) is None


def test_an_unreadable_json_file_is_named_in_the_error(tmp_path):
    (tmp_path / "chat.json").write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="chat.json"):
        load_llava_json(str(tmp_path / "chat.json"))
    (tmp_path / "dict.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_llava_json(str(tmp_path / "dict.json"))


# -- split and order -----------------------------------------------------------------------------------------


def test_split_is_seeded_and_disjoint():
    entries = [{"id": i} for i in range(100)]
    train, val = split_entries(entries, 10, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert {e["id"] for e in train}.isdisjoint(e["id"] for e in val)
    assert split_entries(entries, 10, seed=3) == (train, val)
    assert split_entries(entries, 10, seed=4)[1] != val


def first(sampler: StreamSampler, n: int) -> list[int]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(n)]


def test_stream_sampler_resumes_at_any_position_and_reshuffles_each_epoch():
    stream = first(StreamSampler(10, seed=0), 30)
    assert sorted(stream[:10]) == list(range(10)) and stream[:10] != stream[10:20]
    assert first(StreamSampler(10, seed=0, start=13), 17) == stream[13:]


def test_stream_sampler_ranks_split_each_global_batch():
    single = first(StreamSampler(50, seed=1, batch_size=8), 32)
    rank0 = first(StreamSampler(50, seed=1, batch_size=4, rank=0, world_size=2), 16)
    rank1 = first(StreamSampler(50, seed=1, batch_size=4, rank=1, world_size=2), 16)
    for step in range(4):
        both_ranks = rank0[4 * step:4 * step + 4] + rank1[4 * step:4 * step + 4]
        assert sorted(both_ranks) == sorted(single[8 * step:8 * step + 8])
