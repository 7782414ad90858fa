"""The chat API: TinyVLM.chat and TinyVLM.chat_stream, multi-turn conversations about one image."""

import threading

import pytest
import torch
from transformers import AutoTokenizer, StoppingCriteria

from sources import IGNORE_INDEX
from main import VLMConfig, build_model
from helpers import CPU, scramble, scripted_language_model, shape_images

LLAVA_CONVERSATION = [  # as in LLaVA-Instruct: the image marker after the first question, in that turn only
    {"from": "human", "value": "What colour is the shape?\n<image>"},
    {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "Is there a circle in the image?"},
    {"from": "gpt", "value": "No."},
    {"from": "human", "value": "What shape is it, then?"},
    {"from": "gpt", "value": "A square."},
]


def as_chat(turns: list[dict]) -> list[dict]:
    """LLaVA turns as a chat API user writes them: roles, and no image marker (the image is passed apart)."""
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"].replace("<image>", "").strip()} for t in turns]


@pytest.mark.parametrize("written_as", ["chat messages", "llava turns"])
def test_chat_prompt_tokens_equal_the_training_tokens_up_to_each_answer(tiny_model, shapes_data, written_as):
    processor = tiny_model.processor
    input_ids, labels = processor.encode_llava(LLAVA_CONVERSATION)
    image = shape_images(shapes_data, 1)[0]
    for answer_index in (1, 3, 5):
        so_far = LLAVA_CONVERSATION[:answer_index]
        conversation = as_chat(so_far) if written_as == "chat messages" else so_far
        prompt = tiny_model.prompt_batch([image], [conversation])["input_ids"][0].tolist()
        assert prompt == input_ids[:len(prompt)]
        # and training's next tokens are this answer's targets: the prompt ends where the answer starts
        answer_end = labels.index(IGNORE_INDEX, len(prompt))
        assert labels[len(prompt) - 1] == IGNORE_INDEX
        answer = processor.tokenizer.decode(labels[len(prompt):answer_end])
        assert answer == LLAVA_CONVERSATION[answer_index]["value"] + "<|im_end|>"


REFUSED = [  # (conversation, with an image): what training never has
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>"},
      {"role": "user", "content": "What is it?"}], True),  # an image in an answer
    ([{"role": "user", "content": "<image> and <image>: which is larger?"}], True),  # two markers, one image
    ([{"role": "user", "content": "<image> what is it?"}], False),  # a marker with no image
    ([{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A dog."}], True),  # no question
    ([{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is it?"}], True),
    ([{"role": "narrator", "content": "What is it?"}], True),
]


def test_chat_refuses_a_conversation_training_would_not_have(tiny_model, shapes_data):
    image = shape_images(shapes_data, 1)[0]
    for conversation, with_image in REFUSED:
        with pytest.raises(ValueError):
            tiny_model.chat(conversation, image if with_image else None, max_new_tokens=2)


def test_streaming_yields_the_same_text_as_greedy_chat_and_generate(tiny_model, shapes_data):
    scramble(tiny_model)
    image = shape_images(shapes_data, 1)[0]
    conversation = as_chat(LLAVA_CONVERSATION[:3])
    pieces = list(tiny_model.chat_stream(conversation, image, max_new_tokens=24))
    answer = tiny_model.chat(conversation, image, max_new_tokens=24)
    assert len(pieces) > 1 and answer
    assert "".join(pieces).strip() == answer
    assert tiny_model.generate([image], [conversation], max_new_tokens=24) == [answer]


def test_streaming_stops_at_the_end_of_turn_token(tiny_models, tmp_path, shapes_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["language_model"])
    words = [tokenizer.encode(word)[0] for word in ("It", " is", " red")]
    end_of_text, end_of_turn = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    # after <|im_end|> the script would start over: "It is red It is red ..."
    scripted_language_model(tokenizer, [*words, end_of_text, end_of_turn], str(tmp_path / "lm"))
    cfg = VLMConfig(vision_model=tiny_models["vision_model"], language_model=str(tmp_path / "lm"),
                    vision_feature_layer=-1, projector_hidden_dim=16)
    model = build_model(cfg, CPU, torch.float32).eval()
    image = shape_images(shapes_data, 1)[0]
    pieces = list(model.chat_stream([{"role": "user", "content": "What colour?"}], image, max_new_tokens=20))
    assert "".join(pieces).strip() == "It is red"
    assert len(pieces) >= 2  # the words came as they were decoded, not as one final string


class CountSteps(StoppingCriteria):
    def __init__(self):
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_closing_a_stream_early_stops_its_generation(tiny_model, shapes_data):
    scramble(tiny_model)
    steps, threads_before = CountSteps(), threading.active_count()
    stream = tiny_model.chat_stream([{"role": "user", "content": "Describe it at length."}],
                                    shape_images(shapes_data, 1)[0], min_new_tokens=400, max_new_tokens=400,
                                    stopping_criteria=[steps])
    next(stream)
    stream.close()  # as a web page does when its user clears the chat mid-answer
    assert threading.active_count() == threads_before  # the generation thread has ended
    assert steps.steps < 400


def test_an_error_in_the_generation_thread_reaches_the_reader(tiny_model):
    with pytest.raises(ValueError, match="not_an_option"):  # generate() refuses an unknown option
        list(tiny_model.chat_stream([{"role": "user", "content": "Hi"}], None, not_an_option=1))
