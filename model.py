"""TinyVLM: a frozen SigLIP vision encoder and a causal language model (SmolLM2-135M-Instruct), joined by a
trainable SwiGLU modality projector. An image becomes 49 LM-sized tokens that replace 49 placeholder tokens
in the chat prompt. `TinyVLM.from_config(cfg)` loads the encoders (hub ids or local folders);
`save_pretrained` / `from_pretrained` keep a trained model in a folder (safetensors + config.json).
"""

import json
import os
import re
import threading
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, SiglipVisionModel,
                          StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer)
from transformers.image_processing_utils import ImageProcessingMixin

from attention import given_masks, pick_attention, training_attention_mask
from cli import ATTENTIONS, DTYPES, as_bool
from data import Processor, collate, encoder_image_size, model_positions
from sources import IGNORE_INDEX


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
    lora_rank: int = 0  # stage 2: low-rank adapters on the LM's linear layers instead of all its weights; 0: none
    lora_alpha: float = 32.0  # the adapters' scale is lora_alpha / lora_rank


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
    back to a slow reference kernel, many times slower than fp32 (docs/measurements.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def looks_local(path: str) -> bool:
    """Whether a model or data setting names a local path rather than a hub id (org/name)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.path.exists(path)


def model_folder_problems(setting: str, path: str) -> list[str]:
    """What is wrong with a local model folder setting, before anything loads from it (a hub id: nothing)."""
    if not looks_local(path):
        return []
    if not os.path.isdir(path):
        return [f"--{setting} {path!r}: not found (a local folder; a hub id looks like org/name)"]
    if not os.path.isfile(os.path.join(path, "config.json")):
        return [f"--{setting} {path!r}: no config.json in this folder (save_pretrained writes one)"]
    return []


def runtime_problems(device: str, dtype: str, attention: str, checkpoint: str | None = None) -> list[str]:
    """What is wrong with the settings every program shares (and its --checkpoint), before anything loads."""
    problems = []
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is None:
        problems.append(f"--device {device!r}: must be auto, cpu, cuda, cuda:N or mps")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    if attention not in ATTENTIONS:
        problems.append(f"--attn_implementation {attention!r}: must be one of {', '.join(ATTENTIONS)}")
    if checkpoint is not None:
        try:
            find_model_folder(checkpoint)
        except FileNotFoundError as error:
            problems.append(f"--checkpoint {checkpoint!r}: {error}")
    return problems


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on GPUs that have it, else float16; on CPUs bfloat16 where the CPU has bf16 matrix
    instructions, else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_matmul() else torch.float32


def pick_compile(name: str, device: torch.device) -> str | None:
    """The torch.compile backend to compile with, or None for eager. "auto": inductor on CUDA, where it pays;
    eager elsewhere (no gain measured on CPUs, and minutes of compiling). "true": inductor; a backend's name
    (aot_eager, say, which traces and runs autograd like inductor without generating kernels): that one."""
    if name == "auto":
        return "inductor" if device.type == "cuda" else None
    if as_bool(name) is not None:
        return "inductor" if as_bool(name) else None
    if name in torch._dynamo.list_backends(exclude_tags=()):
        return name
    raise ValueError(f"compile must be auto, true, false or a torch.compile backend "
                     f"({', '.join(torch._dynamo.list_backends())}), got {name!r}")


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
    """The modality projector: pixel shuffle, a LayerNorm, then a SwiGLU MLP: down(silu(gate(x)) * up(x)).
    The LayerNorm puts features from any encoder layer (unnormalised hidden states have large outlier
    channels) on one scale. (N, S*S, D) -> (N, (S/r)^2, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, pixel_shuffle_factor: int):
        super().__init__()
        self.pixel_shuffle_factor = pixel_shuffle_factor
        self.norm = nn.LayerNorm(in_dim * pixel_shuffle_factor**2)
        self.gate = nn.Linear(in_dim * pixel_shuffle_factor**2, hidden_dim, bias=False)
        self.up = nn.Linear(in_dim * pixel_shuffle_factor**2, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(features, self.pixel_shuffle_factor)  # (N, (S/r)^2, r*r*D)
        x = self.norm(x.to(self.norm.weight.dtype))  # float32 weights; autocast runs the linears in its dtype
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (N, (S/r)^2, out_dim)


class VisionEncoder(nn.Module):
    """The frozen vision encoder with its own preprocessing: uint8 images in, the feature layer's patch
    features out, (N, 3, H, W) -> (N, S*S, D). The layers after the feature layer are dropped, and so are the
    final norms and pooling heads (SigLIP's post-layernorm and head, DINOv2's layernorm: their outputs are not
    the feature layer's), so nothing is computed for nothing; the class token and registers (CLIP, DINOv2)
    are dropped from the output. Rescaling and normalising happen here, on the device, inside the compiled
    region (one fused kernel instead of five passes over the batch's pixels)."""

    def __init__(self, model: nn.Module, feature_layer: int, rescale_factor: float, mean: list, std: list):
        super().__init__()
        transformer = getattr(model, "vision_model", model)  # SigLIP before transformers 5.20, CLIP: wrapped
        keep_vision_layers(transformer.encoder, feature_layer)
        for final_norm in ("post_layernorm", "layernorm"):  # SigLIP's and CLIP's; DINOv2's
            if hasattr(transformer, final_norm):
                setattr(transformer, final_norm, nn.Identity())
        if getattr(transformer, "use_head", False):
            transformer.use_head = False
            del transformer.head
        # tokens before the patches: CLIP's and DINOv2's class token, DINOv2's registers; SigLIP has none
        self.prefix_tokens = int(model.config.model_type != "siglip_vision_model") + getattr(
            model.config, "num_register_tokens", 0)
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        # x * scale + shift == (x * rescale_factor - mean) / std, per channel
        self.register_buffer("scale", rescale_factor / torch.tensor(std).view(1, 3, 1, 1), False)
        self.register_buffer("shift", -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1), False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def layers(self) -> nn.ModuleList:
        return encoder_layers(getattr(self.model, "vision_model", self.model).encoder)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = (pixels.float() * self.scale + self.shift).to(self.dtype)  # (N, 3, H, W)
            hidden = self.model(pixel_values=x).last_hidden_state  # (N, prefix + S*S, D): the feature layer's
            return hidden[:, self.prefix_tokens:]  # (N, S*S, D)


ADAPTERS = "adapters.safetensors"  # a stage-2 model's LoRA adapters, in its language_model/
# the linear layers LoRA adapts: attention and MLP projections, as Llama, Qwen and Gemma name them
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# A checkpoint of a whole CLIP or SigLIP (image and text towers) loads as its vision tower alone
VISION_TOWERS = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}


def load_vision_model(path: str, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The vision encoder of a hub id or folder, through transformers' auto classes: SigLIP and SigLIP 2 at a
    fixed resolution, CLIP's vision tower, DINOv2 (with or without registers), or any encoder with a patch grid."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "siglip2":
        raise ValueError(f"{path}: SigLIP 2 NaFlex takes each image at its own resolution, which TinyVLM's square "
                         "patch grid does not; use a fixed-resolution SigLIP 2 (model type siglip)")
    tower = VISION_TOWERS.get(config.model_type, AutoModel)
    model = tower.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    if not hasattr(model.config, "patch_size"):
        raise ValueError(f"{path}: a {config.model_type} model has no patch grid for TinyVLM's projector")
    return model


def image_token_count(image_size: tuple[int, int], patch_size: int, pixel_shuffle_factor: int) -> int:
    """Image tokens per image: the encoder's patch grid, r x r patches to a token; an error where it does not fit."""
    height, width = image_size
    if height != width or height % patch_size:
        raise ValueError(f"the encoder's {height} x {width} images are not a square grid of {patch_size} px patches")
    grid = height // patch_size
    if grid % pixel_shuffle_factor:
        raise ValueError(f"pixel_shuffle_factor {pixel_shuffle_factor} does not divide the encoder's {grid} x {grid} "
                         "patches: pick a factor that does (1 keeps every patch)")
    return (grid // pixel_shuffle_factor) ** 2


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer  # DINOv2 names them layer


def keep_vision_layers(encoder: nn.Module, feature_layer: int) -> None:
    """Drop the encoder layers after the one whose output feeds the projector: they would be computed for
    nothing. After this, the last hidden state the encoder returns is hidden_states[feature_layer]."""
    layers = encoder_layers(encoder)
    keep = feature_layer + len(layers) + 1 if feature_layer < 0 else feature_layer
    if not 0 <= keep <= len(layers):
        raise ValueError(f"vision_feature_layer={feature_layer} is out of range for {len(layers)} layers")
    setattr(encoder, "layers" if hasattr(encoder, "layers") else "layer", layers[:keep])


class TinyVLM(nn.Module):
    def __init__(self, config: ModelConfig, vision: nn.Module, language_model: nn.Module, tokenizer,
                 image_settings: dict):
        super().__init__()
        self.config = config
        self.lm = language_model.requires_grad_(False)
        vision_config = vision.config
        self.num_image_tokens = image_token_count(encoder_image_size(image_settings), vision_config.patch_size,
                                                  config.pixel_shuffle_factor)
        self.processor = Processor(tokenizer, image_settings, config.image_token, self.num_image_tokens,
                                   config.system_prompt)
        self.image_token_id = self.processor.image_token_id
        # images travel as uint8 (4x fewer bytes to the device) and are normalised there, in the encoder
        self.vision = VisionEncoder(vision, config.vision_feature_layer, self.processor.rescale_factor,
                                    self.processor.image_mean, self.processor.image_std)
        self.projector = Projector(vision_config.hidden_size, config.projector_hidden_dim,
                                   language_model.config.hidden_size, config.pixel_shuffle_factor)

    @property
    def device(self) -> torch.device:
        return self.projector.down.weight.device

    # -- loading and saving --------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32, language_model_path=None,
                    attn_implementation: str = "sdpa", lm_dtype: torch.dtype | None = None):
        """Load the pretrained encoders named in config (hub ids or local folders) and a fresh projector.
        dtype is for the encoders' weights (lm_dtype, if given, for the language model's); the projector is
        always kept in float32. attn_implementation is transformers' (sdpa, eager, flash_attention_2) or
        sdpa_varlen (see pick_attention)."""
        lm_path = language_model_path or config.language_model
        vision = load_vision_model(config.vision_model, dtype,  # nothing packed there: sdpa
                                   "sdpa" if attn_implementation in ("sdpa_varlen", "varlen") else attn_implementation)
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
        finetuned = os.path.isfile(os.path.join(lm_folder, "config.json"))  # else the base LM, maybe with adapters
        model = cls.from_config(config, dtype, lm_folder if finetuned else None, attn_implementation, lm_dtype)
        model.projector.load_state_dict(load_file(os.path.join(path, "projector.safetensors")))
        if os.path.isfile(os.path.join(lm_folder, ADAPTERS)):
            model.load_adapters(os.path.join(lm_folder, ADAPTERS))
        return model

    def add_lora(self) -> None:
        """Low-rank adapters (peft's LoRA) on the language model's attention and MLP projections; only they train.
        The adapters start as a no-op (B = 0), so the model computes what it did. They are float32 whatever the
        frozen LM's dtype: peft makes them in their base layer's dtype, and in bf16 an AdamW step of 2e-5 is
        below half a rounding step of most weights, so they would barely move (peft's PeftModel upcasts too)."""
        from peft import LoraConfig, inject_adapter_in_model  # here: runs without LoRA do not need peft

        config = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha, lora_dropout=0.0,
                            target_modules=LORA_TARGETS)
        self.lm = inject_adapter_in_model(config, self.lm.requires_grad_(False))
        for name, parameter in self.lm.named_parameters():
            parameter.requires_grad_("lora_" in name)
            if "lora_" in name:
                parameter.data = parameter.data.float()

    def load_adapters(self, path: str) -> None:
        """LoRA adapters that save_pretrained wrote, into this model's language model (added first if need be)."""
        if not self.config.lora_rank:
            raise ValueError(f"{path}: LoRA adapters, and the model's config has no lora_rank")
        if not any("lora_" in name for name, _ in self.lm.named_parameters()):
            self.add_lora()
        adapters = load_file(path, device=str(self.device))
        _, unexpected = self.lm.load_state_dict(adapters, strict=False)
        if unexpected:
            raise ValueError(f"{path} does not fit the language model: unexpected {unexpected}")

    def language_model_state(self) -> dict:
        """The language model's weights as a plain model of its class holds them: adapters, if any, merged in."""
        state = self.lm.state_dict()
        if not self.config.lora_rank:
            return state
        from peft.tuners.lora import LoraLayer

        merged = {}
        for name, module in self.lm.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer().weight
                merged[f"{name}.weight"] = base + module.get_delta_weight("default").to(base.dtype)
        plain = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
        return {**plain, **merged}

    def save_pretrained(self, path: str, save_language_model: bool = False) -> None:
        """config.json and projector.safetensors; with save_language_model (after stage 2), the language model
        and its tokenizer in language_model/, a folder transformers can load on its own; with LoRA, only the
        adapters there (language_model/adapters.safetensors: the base is the config's language_model)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        projector = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        save_file(projector, os.path.join(path, "projector.safetensors"))
        if save_language_model and self.config.lora_rank:
            os.makedirs(os.path.join(path, "language_model"), exist_ok=True)
            adapters = {k: v.detach().contiguous().cpu() for k, v in self.lm.state_dict().items() if "lora_" in k}
            save_file(adapters, os.path.join(path, "language_model", ADAPTERS))
        elif save_language_model:
            self.lm.save_pretrained(os.path.join(path, "language_model"))
            self.processor.tokenizer.save_pretrained(os.path.join(path, "language_model"))
        readable_by_all(path)

    def load_weights(self, path: str) -> None:
        """Load into this model the trained weights of a folder that save_pretrained wrote: the projector, and
        the language model too when the folder has one."""
        self.projector.load_state_dict(load_file(os.path.join(path, "projector.safetensors")))
        adapters_file = os.path.join(path, "language_model", ADAPTERS)
        if os.path.isfile(adapters_file):
            return self.load_adapters(adapters_file)
        lm_file = os.path.join(path, "language_model", "model.safetensors")
        if os.path.isdir(os.path.dirname(lm_file)) and not os.path.isfile(lm_file):
            raise FileNotFoundError(f"{lm_file} not found (a sharded save? TinyVLM writes one file)")
        if os.path.isfile(lm_file):
            weights = load_file(lm_file, device=str(self.device))
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
        """torch.compile where the time goes, one region at a time: the vision encoder (with its pixel
        normalisation), the projector (with its pixel shuffle) and each decoder layer of the language model.
        The decoder layers share their code, and their weights are graph inputs, so one compiled graph serves
        all of them: compile time is that of one layer, not of the whole model (PyTorch's "regional
        compilation" recipe). Shapes are dynamic from the first batch (dynamic=True): micro-batches of every
        length and size run the same graph; only a batch of one sample (or one image) gets a second, which
        dynamo specializes for size 1. So no region recompiles for a new shape or nears dynamo's recompile
        limit (8), past which it would silently run eagerly (tests/test_compile.py counts the graphs of a
        real run). The loss and the gather of target positions stay eager. Validation and generation run
        eagerly (torch.compiler.set_stance), so eval mode compiles nothing either. nn.Module.compile keeps
        parameter names, so checkpoints are the same with and without it."""
        for region in (self.vision, self.projector, *self.lm.get_decoder().layers):
            region.compile(backend=backend, mode=mode, dynamic=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen, always in inference mode
        return self

    # -- forward ---------------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, H, W) -> projected image tokens (N, num_image_tokens, lm_hidden)."""
        torch._dynamo.maybe_mark_dynamic(pixels, 0)  # a batch of 3 images is not the 3 colour channels
        return self.projector(self.vision(pixels))  # (N, S*S, D) features -> (N, num_image_tokens, H)

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None,
              image_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image tokens written over the placeholders: the k-th image fills the
        k-th run of placeholders in row-major order. image_positions (data.model_positions, computed on the
        host) are the placeholders' flat indices into B * T; without them they are found here, which reads
        their number back from the device. (B, T) -> (B, T, H)."""
        is_image = input_ids == self.image_token_id  # (B, T)
        # the placeholder id may lie beyond the LM's vocabulary; its embedding is overwritten anyway
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, H)
        if pixels is None:
            return embeds
        if image_positions is None:
            image_positions = is_image.flatten().nonzero().flatten()
        image_embeds = self.encode_images(pixels).to(embeds.dtype)  # (N, num_image_tokens, H)
        # index_put at given positions, not masked_scatter: its backward gathers at the same positions, where
        # masked_scatter's is a masked_select, whose output size the device would have to report to the host.
        # Out of place and in (B, T) indices, so that the result is a tensor of its own and not a view (the
        # first decoder layer would otherwise compile a graph of its own for its view input)
        rows, columns = image_positions // input_ids.shape[1], image_positions % input_ids.shape[1]
        return embeds.index_put((rows, columns), image_embeds.flatten(0, 1))  # (B, T, H)

    def forward(self, input_ids, labels, pixels=None, position_ids=None, image_positions=None,
                target_positions=None, cu_seq_lens=None, max_seq_length=None, reduction: str = "sum") -> torch.Tensor:
        """Summed cross-entropy over the target tokens (labels != IGNORE_INDEX; per token with reduction
        "none"). The caller divides by the number of target tokens in the whole optimizer step, so every token
        weighs the same however the step is split into micro-batches. The LM head runs only at target
        positions: image and prompt positions never get (vocab-sized) logits.

        A padded batch (right-padded) needs no attention mask. Packed rows (data.packed_batch: position ids that
        restart at each sample) give varlen attention their sequences' bounds (cu_seq_lens, max_seq_length)
        and the other implementations their block-diagonal mask (training_attention_mask). image_positions,
        target_positions and the bounds come from the host (data.model_positions), so that the step reads
        nothing back from the device."""
        embeds = self.embed(input_ids, pixels, image_positions)  # (B, T, H)
        implementation = self.lm.config._attn_implementation
        bounds = {}
        if implementation == "varlen" and cu_seq_lens is not None:
            bounds = dict(cu_seq_lens_q=cu_seq_lens, max_length_q=max_seq_length)
        mask = None if bounds else training_attention_mask(  # None or (B, 1, T, T)
            input_ids, position_ids, "sdpa" if implementation == "varlen" else implementation, embeds.dtype)
        # use_cache=False: with a cache (the config's default), transformers ignores restarting position ids;
        # training has no use for a cache anyway, and a compiled decoder layer would guard on it
        with given_masks(self.lm):
            hidden = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                           use_cache=False, **bounds).last_hidden_state  # (B, T, H)
        if target_positions is None:
            target_positions = model_positions(input_ids, labels, None)["target_positions"].to(input_ids.device)
        hidden = hidden.flatten(0, 1).index_select(0, target_positions)  # (num_targets, H)
        targets = labels.flatten().index_select(0, target_positions + 1)  # (num_targets,): the next tokens
        logits = self.lm.get_output_embeddings()(hidden)  # (num_targets, vocab)
        return F.cross_entropy(logits.float(), targets, reduction=reduction)

    # -- inference -----------------------------------------------------------------------------------------

    def prompt_batch(self, images: list, prompts) -> dict:
        """Left-padded generation prompts, built exactly as in training (Processor), on this model's device:
        `images` holds per prompt a PIL image, a list of them (several images, placed where the prompt's <image>
        markers are, else first) or None (text only); `prompts` is one string for all or one per image. A prompt
        may also be a whole conversation so far (a list of messages with one image, see Processor.conversation_messages)."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        samples = []
        for image, prompt in zip(images, prompts):
            images_of_prompt = list(image) if isinstance(image, (list, tuple)) else [] if image is None else [image]
            messages = (self.processor.prompt_messages(prompt, len(images_of_prompt)) if isinstance(prompt, str)
                        else self.processor.conversation_messages(prompt, bool(images_of_prompt)))
            input_ids = self.processor.encode_prompt(messages)
            pixels = self.processor.images_to_pixels(images_of_prompt)  # None, (3, H, W) or (k, 3, H, W)
            samples.append({"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids), "pixels": pixels})
        batch = collate(samples, self.processor.tokenizer.pad_token_id, self.image_token_id, padding_side="left")
        return {key: None if batch[key] is None else batch[key].to(self.device)
                for key in ("input_ids", "attention_mask", "pixels", "image_positions")}

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
            embeds = self.embed(batch["input_ids"], batch["pixels"], batch["image_positions"])  # (B, T, H)
            output = self.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                      max_new_tokens=max_new_tokens, eos_token_id=self.processor.end_of_turn_id,
                                      pad_token_id=tokenizer.pad_token_id, **sampling, **generate_options)
        # output: (B, new tokens); with inputs_embeds and no input_ids, generate() returns only new tokens
        return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

    def chat(self, conversation: list[dict], image=None, **generation) -> str:
        """The assistant's next turn in a conversation about one image (a PIL image, or None to chat without
        one). conversation: the turns so far, ending with the user's, as chat messages ({"role", "content"})
        or LLaVA turns; the image goes in the first user turn, as in LLaVA data (Processor.conversation_messages).
        generation: generate()'s options (max_new_tokens, do_sample, temperature, top_p, ...). Runs in mixed
        precision when the language model's weights are half precision, as generate.py does."""
        with autocast(self.device, self.lm.dtype):
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


def readable_by_all(folder: str) -> None:
    """The files under folder readable as the process's umask allows (safetensors writes them for their owner
    alone, 0600): a run shared with others, or served as another user, can be read."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


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
