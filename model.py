"""TinyVLM: a frozen SigLIP vision encoder and a causal language model (SmolLM2-135M-Instruct), joined by a
trainable SwiGLU modality projector. An image becomes 49 LM-sized tokens that replace 49 placeholder tokens
in the chat prompt. `TinyVLM.from_config(cfg)` loads the encoders (hub ids or local folders);
`save_pretrained` / `from_pretrained` keep a trained model in a folder (safetensors + config.json).
"""

import json
import os
import threading
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer,
                          SiglipVisionModel, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer)
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from data import IGNORE_INDEX, Processor, collate


# google/siglip-base-patch16-224's preprocessor_config.json: for encoders built from a config (tests, bench.py,
# the demo), which have none of their own
SIGLIP_PREPROCESSING = {
    "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


@dataclass
class ModelConfig:
    """What a saved TinyVLM is made of; written to config.json. Defaults live in main.py's VLMConfig."""

    vision_model: str  # hub id or local folder of a SiglipVisionModel and its preprocessor_config.json
    language_model: str  # hub id or local folder of a causal LM with a chat template
    vision_feature_layer: int  # index into the encoder's hidden states: 0 = patch embeddings, -1 = last layer
    pixel_shuffle_factor: int  # r: an r x r block of patches becomes one token of r*r*D dims
    projector_hidden_dim: int
    image_token: str = "<image>"  # placeholder token added to the tokenizer, one per image token
    system_prompt: str | None = ""  # the system turn of every prompt; None: the chat template's default


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto": the first of cuda (this process's GPU under torchrun), mps and cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16). Without it, torch falls
    back to a slow reference kernel: on an AVX2-only AMD EPYC a bf16 training step took 7-10x as long as fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on GPUs that have it, else float16; on CPUs bfloat16 where the CPU has bf16 matrix
    instructions, else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_matmul() else torch.float32


@torch.compiler.disable  # the conversations' bounds are data: a compiled layer would recompile for each batch
def sdpa_varlen(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """sdpa that runs once per conversation of packed rows (data.packed_batch), as flash-attention's varlen
    kernels do. Plain sdpa scores every token of a packed row against the whole row and masks out the other
    conversations; here a token costs only its own conversation. A conversation starts where the position ids
    restart at 0, and packed rows have no padding mask. Batches whose position ids do not restart (padded
    batches, generation with its cache) get plain sdpa. query: (B, heads, T, head_dim), key and value:
    (B, kv_heads, T, head_dim); returns (B, T, heads, head_dim), as sdpa does."""
    batch, heads, length, head_dim = query.shape
    if position_ids is None or key.shape[2] != length or not (position_ids[:, 1:] == 0).any():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    starts = position_ids.expand(batch, -1) == 0  # (B, T)
    starts[:, 0] = True  # a conversation never runs on into the next row
    bounds = [*starts.flatten().nonzero().flatten().tolist(), batch * length]
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]

    def conversations(x):  # (B, h, T, d) -> (h, B*T, d), rows end to end, split into conversations
        # split, not slicing: the backward of a slice would add a zero gradient as big as x for each one
        return x.transpose(0, 1).reshape(x.shape[1], batch * length, x.shape[3]).split(lengths, dim=1)

    out = torch.cat([sdpa_attention_forward(module, q[None], k[None], v[None], None, **kwargs)[0]  # causal
                     for q, k, v in zip(conversations(query), conversations(key), conversations(value))], dim=1)
    return out.view(batch, length, heads, head_dim), None


# transformers' documented way to add an attention implementation. Its mask is sdpa's, for batches that are not
# packed; for packed rows transformers still builds the block-diagonal mask, and sdpa_varlen leaves it unused.
AttentionInterface.register("sdpa_varlen", sdpa_varlen)
AttentionMaskInterface.register("sdpa_varlen", sdpa_mask)


def pick_attention(name: str, device: torch.device, packing: bool = False) -> str:
    """"auto": sdpa on GPUs. On CPUs, sdpa_varlen for packed batches (stage 2's packed rows: 1.12x the tokens/s
    of sdpa with the block-diagonal mask, measured) and eager otherwise, where sdpa's backward was about twice
    as slow (measured, stage 1)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "sdpa"
    return "sdpa_varlen" if packing else "eager"


def pick_compile(name: str, device: torch.device) -> bool:
    """"auto": torch.compile on CUDA, where it pays; eager elsewhere (no gain measured on CPUs, and minutes
    of compiling)."""
    if name == "auto":
        return device.type == "cuda"
    if name.lower() in ("1", "true", "yes", "on"):
        return True
    if name.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"compile must be auto, true or false, got {name!r}")


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for float32 weights (the projector) beside frozen weights already held in dtype."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Space-to-depth on a square grid of patch features: (B, S*S, D) -> (B, (S/r)^2, r*r*D), r = factor.

    Output token (i, j) holds the r x r block of patches with rows r*i..r*i+r-1 and columns r*j..r*j+r-1,
    in (row, column, channel) order. Adapted from nanoVLM's ModalityProjector.pixel_shuffle (Idefics3).
    """
    batch, num_patches, dim = x.shape
    side = int(num_patches**0.5)
    if side * side != num_patches or side % factor:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {factor}, got {num_patches} patches")
    out_side = side // factor
    x = x.reshape(batch, out_side, factor, out_side, factor, dim)  # (B, i, dy, j, dx, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, i, j, dy, dx, D)
    return x.reshape(batch, out_side * out_side, factor * factor * dim)  # (B, (S/r)^2, r*r*D)


class Projector(nn.Module):
    """LayerNorm, then a SwiGLU MLP: down(silu(gate(x)) * up(x)). The LayerNorm puts features from any encoder
    layer (unnormalised hidden states have large outlier channels) on one scale."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.gate = nn.Linear(in_dim, hidden_dim, bias=False)
        self.up = nn.Linear(in_dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.down(F.silu(self.gate(x)) * self.up(x))


def keep_vision_layers(vision: nn.Module, feature_layer: int) -> None:
    """Drop the encoder layers after the one whose output feeds the projector: they would be computed for
    nothing. After this, the last hidden state the encoder returns is hidden_states[feature_layer]."""
    encoder = getattr(vision, "vision_model", vision).encoder  # transformers < 5.20 wraps it in vision_model
    num_layers = len(encoder.layers)
    keep = feature_layer + num_layers + 1 if feature_layer < 0 else feature_layer
    if not 0 <= keep <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} is out of range for {num_layers} layers")
    encoder.layers = encoder.layers[:keep]


class TinyVLM(nn.Module):
    def __init__(self, config: ModelConfig, vision: nn.Module, language_model: nn.Module, tokenizer,
                 image_settings: dict):
        super().__init__()
        self.config = config
        keep_vision_layers(vision, config.vision_feature_layer)
        self.vision = vision.eval().requires_grad_(False)
        self.lm = language_model.requires_grad_(False)
        vision_config = vision.config
        grid = vision_config.image_size // vision_config.patch_size
        self.num_image_tokens = (grid // config.pixel_shuffle_factor) ** 2
        self.projector = Projector(
            vision_config.hidden_size * config.pixel_shuffle_factor**2,
            config.projector_hidden_dim,
            language_model.config.hidden_size,
        )
        self.processor = Processor(tokenizer, image_settings, config.image_token, self.num_image_tokens,
                                   config.system_prompt)
        self.image_token_id = self.processor.image_token_id
        # rescaled and normalised on the model's device: images travel as uint8
        self.register_buffer("pixel_mean", torch.tensor(self.processor.image_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(self.processor.image_std).view(1, 3, 1, 1), False)

    # -- loading and saving --------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32, language_model_path=None,
                    attn_implementation: str = "sdpa", lm_dtype: torch.dtype | None = None):
        """Load the pretrained encoders named in config (hub ids or local folders) and a fresh projector.
        dtype is for the encoders' weights (lm_dtype, if given, for the language model's); the projector is
        always kept in float32. attn_implementation is transformers' (sdpa, eager, flash_attention_2) or
        sdpa_varlen (see pick_attention)."""
        lm_path = language_model_path or config.language_model
        vision = SiglipVisionModel.from_pretrained(  # nothing packed there: sdpa_varlen would be plain sdpa
            config.vision_model, dtype=dtype,
            attn_implementation="sdpa" if attn_implementation == "sdpa_varlen" else attn_implementation)
        image_settings, _ = ImageProcessingMixin.get_image_processor_dict(config.vision_model)
        language_model = AutoModelForCausalLM.from_pretrained(lm_path, dtype=lm_dtype or dtype,
                                                              attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(lm_path)
        return cls(config, vision, language_model, tokenizer, image_settings)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                        lm_dtype: torch.dtype | None = None) -> "TinyVLM":
        """A model saved by save_pretrained: the encoders it names, its projector and, after stage 2, its
        finetuned language model (stored in the folder's language_model/)."""
        with open(os.path.join(path, "config.json")) as f:
            config = ModelConfig(**json.load(f))
        lm_folder = os.path.join(path, "language_model")
        model = cls.from_config(config, dtype, lm_folder if os.path.isdir(lm_folder) else None, attn_implementation,
                                lm_dtype)
        model.projector.load_state_dict(load_file(os.path.join(path, "projector.safetensors")))
        return model

    def save_pretrained(self, path: str, save_language_model: bool = False) -> None:
        """config.json and projector.safetensors; with save_language_model (after stage 2), the language model
        and its tokenizer in language_model/, a folder transformers can load on its own."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        projector = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        save_file(projector, os.path.join(path, "projector.safetensors"))
        if save_language_model:
            self.lm.save_pretrained(os.path.join(path, "language_model"))
            self.processor.tokenizer.save_pretrained(os.path.join(path, "language_model"))

    def load_weights(self, path: str) -> None:
        """Load into this model the trained weights of a folder that save_pretrained wrote: the projector, and
        the language model too when the folder has one."""
        self.projector.load_state_dict(load_file(os.path.join(path, "projector.safetensors")))
        lm_file = os.path.join(path, "language_model", "model.safetensors")
        if os.path.isdir(os.path.dirname(lm_file)) and not os.path.isfile(lm_file):
            raise FileNotFoundError(f"{lm_file} not found (a sharded save? TinyVLM writes one file)")
        if os.path.isfile(lm_file):
            weights = load_file(lm_file, device=str(self.pixel_mean.device))
            missing, unexpected = self.lm.load_state_dict(weights, strict=False)
            tied = {"lm_head.weight"} if self.lm.config.tie_word_embeddings else set()
            if unexpected or set(missing) - tied:
                raise ValueError(f"{lm_file} does not fit the language model: missing {missing}, "
                                 f"unexpected {unexpected}")

    def checkpoint_language_model(self) -> None:
        """Gradient (activation) checkpointing for the language model: its layers' activations are recomputed
        in the backward pass instead of kept. transformers 5.2x renamed the switch; older ones have the old."""
        enable = getattr(self.lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def compile_regions(self, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile where the time goes, one region at a time: the vision tower, the projector and each
        decoder layer of the language model. The decoder layers share their code, and since torch 2.5 their
        weights are graph inputs, so one compiled graph serves all 30 of them: compile time is that of one
        layer, not of the whole model (PyTorch's "regional compilation" recipe). The loss, the masked scatter
        and the LM head at target positions (shapes that depend on the data) stay eager. A batch of a new
        length or size recompiles once with that dimension marked dynamic (torch's automatic dynamic
        shapes), and never again (tests/test_compile.py counts). nn.Module.compile keeps parameter names, so
        checkpoints are the same with and without it."""
        for region in (self.vision, self.projector, *self.lm.get_decoder().layers):
            region.compile(backend=backend, mode=mode)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen, always in inference mode
        return self

    # -- forward ---------------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) -> projected image tokens (N, num_image_tokens, lm_hidden)."""
        with torch.no_grad():
            x = pixels.float() * self.processor.rescale_factor  # (N, 3, H, W)
            x = ((x - self.pixel_mean) / self.pixel_std).to(self.vision.dtype)
            hidden_states = self.vision(pixel_values=x, output_hidden_states=True).hidden_states
            if not hidden_states:  # transformers returns none from an encoder left with no layers
                hidden_states = [getattr(self.vision, "vision_model", self.vision).embeddings(x)]
            features = hidden_states[-1]  # (N, S*S, D): the feature layer, the encoder's last kept layer
        features = pixel_shuffle(features, self.config.pixel_shuffle_factor)  # (N, num_image_tokens, r*r*D)
        return self.projector(features.to(self.projector.gate.weight.dtype))  # (N, num_image_tokens, H)

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image tokens written over the placeholders, in one masked scatter:
        the k-th image fills the k-th run of placeholders in row-major order. (B, T) -> (B, T, H)."""
        is_image = input_ids == self.image_token_id  # (B, T)
        # the placeholder id may lie beyond the LM's vocabulary; its embedding is overwritten anyway
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, H)
        if pixels is None:
            return embeds
        image_embeds = self.encode_images(pixels)  # (N, num_image_tokens, H)
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, input_ids, attention_mask, labels, pixels=None, position_ids=None) -> torch.Tensor:
        """Summed cross-entropy over the target tokens (labels != IGNORE_INDEX). The caller divides by the
        number of target tokens in the whole optimizer step, so every token weighs the same however the
        step is split into micro-batches. The LM head runs only at target positions: image and prompt
        positions never get (vocab-sized) logits. A packed batch (data.packed_batch) comes with position_ids
        that restart at each sample and no attention_mask."""
        embeds = self.embed(input_ids, pixels)  # (B, T, H)
        # use_cache=False: with a cache (the config's default), transformers ignores restarting position ids and
        # lets packed samples attend to each other; training has no use for a cache anyway, and a compiled
        # decoder layer would guard on it
        hidden = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        is_target = targets != IGNORE_INDEX
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][is_target])  # (num_targets, vocab)
        return F.cross_entropy(logits.float(), targets[is_target], reduction="sum")

    # -- inference -----------------------------------------------------------------------------------------

    def prompt_batch(self, images: list, prompts) -> dict:
        """Left-padded generation prompts, built exactly as in training (Processor), on this model's device:
        `images` holds per prompt a PIL image, a list of them (several images, placed where the prompt's <image>
        markers are, else first) or None (text only); `prompts` is one string for all or one per image. A prompt
        may also be a whole conversation so far (a list of messages with one image, see Processor.chat_messages)."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        samples = []
        for image, prompt in zip(images, prompts):
            images_of_prompt = list(image) if isinstance(image, (list, tuple)) else [] if image is None else [image]
            messages = (self.processor.prompt_messages(prompt, len(images_of_prompt)) if isinstance(prompt, str)
                        else self.processor.chat_messages(prompt, bool(images_of_prompt)))
            input_ids = self.processor.encode_prompt(messages)
            pixels = self.processor.images_to_pixels(images_of_prompt)  # None, (3, H, W) or (k, 3, H, W)
            samples.append({"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids), "pixels": pixels})
        batch = collate(samples, self.processor.tokenizer.pad_token_id, padding_side="left")
        device = self.pixel_mean.device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                "pixels": None if batch["pixels"] is None else batch["pixels"].to(device)}

    @torch.no_grad()
    def generate(self, images: list, prompts, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, **generate_options) -> list[str]:
        """One answer per image (see prompt_batch). The LM's generate() decodes with its KV cache and stops at
        the end-of-turn token. generate_options go to transformers' generate() as they are (min_new_tokens,
        repetition_penalty, ...)."""
        batch = self.prompt_batch(images, prompts)
        tokenizer = self.processor.tokenizer
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        # a model compiled for training generates eagerly: each decoding step with its growing KV cache would
        # otherwise trigger recompilations, for a few captions now and then
        with torch.compiler.set_stance("force_eager"):
            embeds = self.embed(batch["input_ids"], batch["pixels"])  # (B, T, H)
            output = self.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                      max_new_tokens=max_new_tokens, eos_token_id=self.processor.end_of_turn_id,
                                      pad_token_id=tokenizer.pad_token_id, **sampling, **generate_options)
        # output: (B, new tokens); with inputs_embeds and no input_ids, generate() returns only new tokens
        return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

    def chat(self, conversation: list[dict], image=None, **generation) -> str:
        """The assistant's next turn in a conversation about one image (a PIL image, or None to chat without
        one). conversation: the turns so far, ending with the user's, as chat messages ({"role", "content"})
        or LLaVA turns; the image goes in the first user turn, as in LLaVA data (Processor.chat_messages).
        generation: generate()'s options (max_new_tokens, do_sample, temperature, top_p, ...). Runs in mixed
        precision when the language model's weights are half precision, as generate.py does."""
        with autocast(self.pixel_mean.device, self.lm.dtype):
            return self.generate([image], [conversation], **generation)[0]

    def chat_stream(self, conversation: list[dict], image=None, **generation):
        """chat(), as a generator of text pieces while they are decoded: generate() runs in a thread and feeds
        transformers' TextIteratorStreamer. Closing the generator early stops the generation at the next
        token and waits for it, so the model is free again when this returns."""
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        stopping_criteria = StoppingCriteriaList([*generation.pop("stopping_criteria", []), StopWhenSet(stop)])
        errors = []

        def run():
            try:
                self.chat(conversation, image, streamer=streamer, stopping_criteria=stopping_criteria, **generation)
            except BaseException as error:  # re-raised in the caller's thread, below
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]


class StopWhenSet(StoppingCriteria):
    """Stops generate() once the event is set (from another thread): the reader of a stream went away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def find_model_folder(path: str) -> str:
    """A folder written by save_pretrained, or in a training run's folder its best/ model (lowest validation
    loss), else its last checkpoint/."""
    for folder in (path, os.path.join(path, "best"), os.path.join(path, "checkpoint"),
                   os.path.join(path, "checkpoint.old")):
        if os.path.isfile(os.path.join(folder, "projector.safetensors")):
            return folder
    raise FileNotFoundError(f"no TinyVLM in {path}: expected projector.safetensors there or in its best/ "
                            "or checkpoint/ folder")


def load_for_inference(checkpoint: str, device: str = "auto", dtype: str = "auto", attention: str = "auto"):
    """What generate.py, eval.py and serve.py start with: the model of a model or run folder
    (find_model_folder) on the picked device, in eval mode. Returns (model, folder, device, dtype)."""
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    folder = find_model_folder(checkpoint)
    model = TinyVLM.from_pretrained(folder, dtype, pick_attention(attention, device)).to(device).eval()
    return model, folder, device, dtype
