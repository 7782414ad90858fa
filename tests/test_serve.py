"""serve.py: the chat page's handlers as plain functions, and the page itself in a real (headless) browser."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

import serve
from main import VLMConfig, build_model
from helpers import CPU, scramble, scripted_language_model, shape_images

GREEDY = dict(max_new_tokens=16, do_sample=False, temperature=1.0, top_p=1.0)


@pytest.fixture
def server(tiny_model):
    scramble(tiny_model)
    return serve.ChatServer(tiny_model.eval())


@pytest.fixture
def image_files(shapes_data, tmp_path) -> list[str]:
    paths = []
    for i, image in enumerate(shape_images(shapes_data, 2)):
        image.save(tmp_path / f"shape{i}.png")
        paths.append(str(tmp_path / f"shape{i}.png"))
    return paths


def ask(server, question, path, conversation) -> list[tuple]:
    """Every update one question sends to the page: (chat, conversation, question box, notice)."""
    return list(server.respond(question, path, conversation, *GREEDY.values()))


def test_a_three_turn_conversation_streams_each_answer_after_the_whole_history(server, image_files):
    conversation = []
    image = Image.open(image_files[0]).convert("RGB")
    for turn, question in enumerate(["What is in the image?", "What colour is it?", "And its shape?"], 1):
        updates = ask(server, question, image_files[0], conversation)
        chat, new_conversation, question_box, notice = updates[-1]
        assert chat == new_conversation and len(new_conversation) == 2 * turn
        assert new_conversation[:-1] == conversation + [{"role": "user", "content": question}]
        answer = new_conversation[-1]["content"]
        assert answer == server.model.chat(new_conversation[:-1], image, max_new_tokens=16)
        partial_answers = [u[0][-1]["content"] for u in updates if u[0][-1]["role"] == "assistant"]
        assert len(set(partial_answers)) > 2  # it streamed in
        assert all(answer.startswith(partial.strip()) for partial in partial_answers)
        assert question_box == "" and notice == ""
        conversation = new_conversation


def write_bad_uploads(folder) -> dict[str, str]:
    huge = Image.new("1", (8000, 8000))  # 64 million pixels, a few kB as a PNG
    huge.save(folder / "huge.png")
    Image.new("RGB", (64, 64), "red").save(folder / "whole.png")
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:100])
    (folder / "notes.jpg").write_text("a text file with an image's name")
    return {"not an image": "notes.jpg", "truncated": "truncated.png", "huge": "huge.png"}


@pytest.mark.parametrize("kind", ["not an image", "truncated", "huge"])
def test_a_bad_upload_gets_a_message_and_the_server_keeps_answering(server, image_files, tmp_path, kind):
    name = write_bad_uploads(tmp_path)[kind]
    preview, chat, conversation, notice = server.new_image(str(tmp_path / name))
    assert preview is None and chat == [] and name in notice
    chat, conversation, question_box, notice = ask(server, "What is it?", str(tmp_path / name), [])[-1]
    assert conversation == [] and question_box == "What is it?" and name in notice  # not asked, kept to retry
    preview, *_ = server.new_image(image_files[0])
    assert preview.mode == "RGB"
    chat, conversation, _, notice = ask(server, "What is it?", image_files[0], [])[-1]
    assert len(conversation) == 2 and conversation[-1]["content"] and notice == ""


def test_a_typed_image_marker_gets_a_message_instead_of_an_answer(server, image_files):
    chat, conversation, question_box, notice = ask(server, "What is <image>?", image_files[0], [])[-1]
    assert conversation == [] and "<image>" in notice
    conversation = ask(server, "What is it?", image_files[0], [])[-1][1]
    chat, follow_up, question_box, notice = ask(server, "And <image>?", image_files[0], conversation)[-1]
    assert follow_up == conversation and "<image>" in notice


def test_a_second_client_waits_for_the_running_answer_and_gets_its_own(server, image_files):
    alone = [ask(server, q, path, [])[-1][1] for q, path in (("Describe it.", image_files[0]),
                                                             ("What colour is it?", image_files[1]))]
    first = server.respond("Describe it.", image_files[0], [], *GREEDY.values())
    next(first), next(first)  # the question shown, then the first piece of the answer: the model is busy
    second_updates = []
    second = threading.Thread(target=lambda: second_updates.extend(
        server.respond("What colour is it?", image_files[1], [], *GREEDY.values())), daemon=True)
    second.start()
    while not second_updates:  # the second client's question is shown at once ...
        time.sleep(0.01)
    time.sleep(0.3)
    assert all(update[0][-1]["role"] == "user" for update in second_updates)  # ... its answer waits
    first_final = list(first)[-1][1]
    second.join(timeout=60)
    assert first_final == alone[0] and second_updates[-1][1] == alone[1]  # neither mixed into the other


def test_a_failed_generation_gets_a_message_and_frees_the_model(server, image_files, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")
        yield

    with monkeypatch.context() as patched:
        patched.setattr(server.model, "chat_stream", out_of_memory)
        chat, conversation, question_box, notice = ask(server, "What is it?", image_files[0], [])[-1]
    assert conversation == [] and question_box == "What is it?" and "out of memory" in notice
    assert len(ask(server, "What is it?", image_files[0], [])[-1][1]) == 2


def test_both_ways_to_ask_share_one_queue_that_runs_one_request_at_a_time(server):
    page = serve.build_page(server, "checkpoint")
    asking = [fn for fn in page.fns.values() if fn.name == "respond"]
    assert len(asking) == 2  # Enter in the question box, and the send button
    assert {(fn.concurrency_limit, fn.concurrency_id) for fn in asking} == {(1, "model")}


def test_clearing_empties_the_chat(server, image_files):
    chat, conversation, *_ = ask(server, "What is it?", image_files[0], [])[-1]
    assert conversation and server.clear() == ([], [], "", "")


# -- the page in a browser ------------------------------------------------------------------------------------

SCRIPTED_ANSWER = ["It", " is", " a", " red", " circle", " in", " the", " middle", "."]


@pytest.fixture
def scripted_checkpoint(tiny_models, tmp_path) -> str:
    """A tiny model whose greedy answer to anything is SCRIPTED_ANSWER, saved as serve.py loads it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["language_model"])
    script = [tokenizer.encode(word) for word in SCRIPTED_ANSWER]
    assert all(len(ids) == 1 for ids in script)
    script = [ids[0] for ids in script] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    scripted_language_model(tokenizer, script, str(tmp_path / "lm"))
    cfg = VLMConfig(vision_model=tiny_models["vision_model"], language_model=str(tmp_path / "lm"),
                    vision_feature_layer=-1, projector_hidden_dim=16)
    build_model(cfg, CPU, torch.float32).save_pretrained(str(tmp_path / "checkpoint"))
    return str(tmp_path / "checkpoint")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_page(scripted_checkpoint, tmp_path):
    """serve.py in its own process on a free local port; stopped however the test ends."""
    with serving(scripted_checkpoint, tmp_path) as (url, _):
        yield url


@contextlib.contextmanager
def serving(checkpoint: str, tmp_path):
    """serve.py in its own process on a free local port, answering: its URL and process."""
    port, log = free_port(), open(tmp_path / "serve.log", "w")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", checkpoint, "--port", str(port),
                                "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 240  # a loaded 2-core machine needs minutes to import gradio
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "serve.py did not start in 240 s"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def headless_chromium():
    """Debian's chromium and its chromedriver (apt-get install chromium chromium-driver; .ci/run does)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are not installed: .ci/run should have installed them")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


RECORD_ANSWERS = """
window.answers = [];
new MutationObserver(() => {
  const bot = document.querySelectorAll('#chat .bot');
  const text = bot.length ? bot[bot.length - 1].innerText.trim() : '';
  if (text && text !== window.answers[window.answers.length - 1]) window.answers.push(text);
}).observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true});
"""


@pytest.mark.slow
def test_the_page_streams_an_answer_about_an_uploaded_image_in_a_real_browser(served_page, image_files):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = headless_chromium()
    try:
        browser.get(served_page)
        wait = WebDriverWait(browser, 120)
        upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
        upload.send_keys(image_files[0])
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "img"))  # the preview of what the model sees
        browser.execute_script(RECORD_ANSWERS)
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("What is in the image?\n")
        final = "".join(SCRIPTED_ANSWER)
        wait.until(lambda b: b.execute_script("return window.answers.slice(-1)[0]") == final)
        seen = browser.execute_script("return window.answers")
    finally:
        browser.quit()
    growing = [text for text in seen if final.startswith(text)]  # not Gradio's "Loading content" placeholder
    assert len(growing) >= 3 and growing == sorted(growing, key=len)  # it grew in the page, piece by piece


@pytest.mark.slow
def test_ctrl_c_stops_the_server(scripted_checkpoint, tmp_path):
    with serving(scripted_checkpoint, tmp_path) as (url, process):
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)  # a server that ignores Ctrl-C fails here
        assert process.returncode == 0, (tmp_path / "serve.log").read_text()
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)
