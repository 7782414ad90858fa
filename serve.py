"""Chat with a trained TinyVLM about your own images, in a web page (Gradio):
  uv run serve.py --checkpoint runs/demo                  # then open http://127.0.0.1:7860
  uv run serve.py --checkpoint runs/demo --host 0.0.0.0 --port 8000 --device cuda
"""

import argparse
import os
import signal
import sys
import threading
import traceback
from contextlib import closing

from cli import HelpFormatter, add_runtime_arguments, exit_if_problems

MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo decodes to 150 MB; larger images are refused unread


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a model folder, or a run folder (its best/)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=7860, help="the page's port")
    add_runtime_arguments(parser)
    parser.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="larger uploads are refused before they are decoded")
    parser.add_argument("--max_file_size", default="20mb", help="larger uploads are refused by the page")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and a mistyped flag answer here, before torch loads below
    parse_args(sys.argv[1:])

try:
    import gradio as gr
except ImportError:  # GPU machines' images often lack it; the programs that need no page still run there
    gr = None
import transformers
from PIL import Image

from sources import IMAGE_ERRORS, IMAGE_MARKER, conversation_to_llava, to_rgb
from model import TinyVLM, load_for_inference, runtime_problems

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # the default theme would fetch web fonts


def read_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An uploaded file as a decoded RGB image; ValueError, naming the file, if it is not an image, is cut
    short, or has more than max_pixels pixels (checked from the header, before anything is decoded)."""
    name = os.path.basename(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height <= max_pixels:
                image.load()  # decode now, so a truncated file fails here
                return to_rgb(image)
    except IMAGE_ERRORS as error:
        raise ValueError(f"cannot read {name} as an image ({error})") from None
    raise ValueError(f"{name} is {width} x {height} pixels, more than this server's limit of {max_pixels:,}")


class ChatServer:
    """The page's handlers, plain methods testable without a browser. A conversation is a list of
    {"role", "content"} messages kept in the page's state (each browser tab has its own); the model is
    shared, and its lock lets one generation run at a time, so requests wait their turn."""

    def __init__(self, model: TinyVLM, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.model, self.max_image_pixels = model, max_image_pixels
        self.lock = threading.Lock()

    def new_image(self, path: str | None) -> tuple:
        """A file was uploaded or removed: show the image, or why it cannot be used, and start a new
        conversation (the model sees one image per conversation, in its first turn). Returns the outputs
        (preview, chat, conversation, notice)."""
        if path is None:
            return None, [], [], ""
        try:
            image = read_image(path, self.max_image_pixels)
        except ValueError as error:
            return None, [], [], f"⚠️ {error}. Upload another image."
        return image, [], [], ""

    def respond(self, question: str, path: str | None, conversation: list, max_new_tokens: int,
                do_sample: bool, temperature: float, top_p: float):
        """Answer the question about the uploaded image (or without one), streaming: yields the outputs
        (chat, conversation, question box, notice) each time the answer grows."""
        question = (question or "").strip()
        if not question:
            yield conversation, conversation, "", "Type a question first."
            return
        turns = conversation + [{"role": "user", "content": question}]
        try:
            if IMAGE_MARKER in question:  # the tokenizer would read it as an image token
                raise ValueError(f"{IMAGE_MARKER} stands for the image in the model's prompt: leave it out")
            image = None if path is None else read_image(path, self.max_image_pixels)
            conversation_to_llava(turns, with_image=image is not None)  # refuses what the model cannot be asked
        except ValueError as error:
            yield conversation, conversation, question, f"⚠️ {error}"
            return
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else {}
        answer = ""
        yield turns, turns, "", ""
        try:
            # closing(): a cancelled request (the clear button, a closed tab) stops its generation before
            # the lock goes to the next one
            with self.lock, closing(self.model.chat_stream(turns, image, max_new_tokens=int(max_new_tokens),
                                                           **sampling)) as stream:
                for piece in stream:
                    answer += piece
                    shown = turns + [{"role": "assistant", "content": answer}]
                    yield shown, shown, "", ""
        except Exception as error:  # a failed generation must not take the server down
            traceback.print_exc()
            yield conversation, conversation, question, f"⚠️ generation failed: {error}"
            return
        shown = turns + [{"role": "assistant", "content": answer.strip()}]
        yield shown, shown, "", ""

    def clear(self) -> tuple:
        """The clear button: an empty chat, the image kept. Returns (chat, conversation, question, notice)."""
        return [], [], "", ""


def build_page(server: ChatServer, checkpoint: str) -> "gr.Blocks":
    with gr.Blocks(title="TinyVLM chat", analytics_enabled=False) as page:
        gr.Markdown(f"## TinyVLM chat\n`{checkpoint}`: upload an image, ask about it, follow up.")
        conversation = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="image", type="filepath", elem_id="upload")
                preview = gr.Image(label="what the model sees", interactive=False, height=240)
                with gr.Accordion("generation settings", open=False):
                    max_new_tokens = gr.Slider(1, 512, value=128, step=1, label="max new tokens")
                    do_sample = gr.Checkbox(False, label="sample (off: greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top p")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="conversation", height=420, elem_id="chat")
                notice = gr.Markdown(elem_id="notice")
                question = gr.Textbox(placeholder="Ask about the image, then press Enter", show_label=False,
                                      elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    clear = gr.Button("Clear chat")
        upload.change(server.new_image, upload, [preview, chat, conversation, notice])
        inputs = [question, upload, conversation, max_new_tokens, do_sample, temperature, top_p]
        outputs = [chat, conversation, question, notice]
        # one queue for both ways to ask: a second browser's question waits for the running answer
        asked = [trigger(server.respond, inputs, outputs, concurrency_limit=1, concurrency_id="model")
                 for trigger in (question.submit, send.click)]
        clear.click(server.clear, None, outputs, cancels=asked)
    return page


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    exit_if_problems("serve.py", runtime_problems(args.device, args.dtype, args.attn_implementation, args.checkpoint))
    if gr is None:
        exit_if_problems("serve.py", ["gradio is not installed: `uv sync` installs it, or `pip install gradio`"])
    transformers.utils.logging.disable_progress_bar()
    model, folder, device, dtype = load_for_inference(args.checkpoint, args.device, args.dtype,
                                                     args.attn_implementation)
    print(f"serving {folder} on {device} ({dtype}) at http://{args.host}:{args.port}", file=sys.stderr)
    page = build_page(ChatServer(model, args.max_image_pixels), folder)
    stop = threading.Event()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):  # gradio's own wait lets Ctrl-C go unheard for seconds
        signal.signal(stop_signal, lambda *_: stop.set())
    page.queue().launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size,
                        theme=gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"]),
                        ssr_mode=False, show_error=True, prevent_thread_lock=True)
    while not stop.wait(0.2):
        pass
    page.close()
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
