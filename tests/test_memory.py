"""Memory on the card: the estimate from fake tensors, the micro-batch chosen from it for the memory at hand, the
worst case run before the first step (an out-of-memory error there halves the micro-batch once), and the
DataLoader's items in flight within /dev/shm. A CPU stands in for the GPU: its memory is faked, and so is an
out-of-memory error."""

import dataclasses

import pytest
import torch
from helpers import CPU, checkpoint_weights, run
from transformers import LlamaForCausalLM

import main
import memory
from cli import expandable_segments
import synthetic
from model import ModelConfig, TinyVLM
from memory import (MARGIN, Layout, activation_bytes, estimator, fit_micro_batch, fit_shared_memory, largest_fitting,
                    peak_bytes, worst_case_batches)


@pytest.fixture(scope="module")
def six_layer_model(tiny_models):
    """The tiny TinyVLM (4 image tokens) in bf16, its language model with six layers: enough to extrapolate."""
    config = ModelConfig(**tiny_models, vision_feature_layer=-1, pixel_shuffle_factor=2, projector_hidden_dim=64)
    model = TinyVLM.from_config(config, torch.bfloat16, None, "varlen")
    torch.manual_seed(0)
    lm_config = synthetic.language_model_config(model.processor.tokenizer, True, num_hidden_layers=6,
                                                attn_implementation="varlen")
    model.lm = LlamaForCausalLM(lm_config).to(torch.bfloat16).requires_grad_(False)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("layout, size", [(Layout(False, False, 64, 8), 8), (Layout(True, True, 64, 16), 512)])
def test_the_estimate_from_two_and_four_layers_is_the_whole_models_peak(six_layer_model, layout, size):
    for batch in worst_case_batches(six_layer_model, layout, size):
        whole = peak_bytes(six_layer_model, batch, CPU, torch.bfloat16)
        assert activation_bytes(six_layer_model, batch, CPU, torch.bfloat16) == pytest.approx(whole, rel=1e-3)
    six_layer_model.lm.requires_grad_(True).float()  # stage 2: the LM trains, in float32
    try:
        batch = worst_case_batches(six_layer_model, layout, size)[0]
        whole = peak_bytes(six_layer_model, batch, CPU, torch.bfloat16)
        assert activation_bytes(six_layer_model, batch, CPU, torch.bfloat16) == pytest.approx(whole, rel=1e-3)
    finally:
        six_layer_model.lm.requires_grad_(False).to(torch.bfloat16)


def test_the_worst_micro_batches_fill_the_size_with_the_fewest_and_the_most_samples(six_layer_model):
    padded = worst_case_batches(six_layer_model, Layout(False, False, 64, 8), 4)
    assert len(padded) == 1 and padded[0]["input_ids"].shape == (4, 64) and padded[0]["pixels"].shape[0] == 4
    fewest, most = worst_case_batches(six_layer_model, Layout(True, True, 64, 16), 512)
    assert fewest["input_ids"].shape == most["input_ids"].shape == (1, 512)  # one row, every slot a real token
    assert (fewest["num_samples"], most["num_samples"]) == (8, 16)  # 8 of max_length; the step's 16
    assert fewest["num_targets"] > most["num_targets"] and fewest["pixels"].shape[0] < most["pixels"].shape[0]
    rows = worst_case_batches(six_layer_model, Layout(True, False, 64, 16), 256)[0]
    assert rows["input_ids"].shape == (4, 64)  # under a mask: rows as wide as the longest sample


def test_the_largest_fitting_size_is_found_with_few_estimates():
    asked = []

    def estimate(size):  # 1 GB and 10 MB per unit
        asked.append(size)
        return 1e9 + 1e7 * size

    sizes = list(range(1, 1001))
    for units in (1, 7, 350, 999):
        asked.clear()
        available = MARGIN * (1e9 + 1e7 * units) + 1
        assert largest_fitting(estimate, sizes, available) == units
        assert len(set(asked)) <= 5
    assert largest_fitting(estimate, sizes, 1e9) is None
    assert largest_fitting(estimate, sizes, 1e15) == 1000


@pytest.mark.slow
def test_the_micro_batch_chosen_is_the_largest_whose_worst_case_fits_the_card(six_layer_model):
    layout = Layout(False, False, 64, 16)  # padded: 1, 2, 4, 8 or 16 samples of 64 tokens
    estimate = estimator(six_layer_model, layout, CPU, torch.bfloat16)
    card = MARGIN * estimate(4) * 1.001  # holds 4 samples but not 8
    size, line = fit_micro_batch(six_layer_model, layout, CPU, torch.bfloat16, card, "a fake card")
    assert size == 4 and MARGIN * estimate(8) > card
    assert "micro-batches of 4 samples of up to 64 tokens" in line and "a fake card" in line
    assert fit_micro_batch(six_layer_model, layout, CPU, torch.bfloat16, 1e15, "a big card")[0] == 16
    with pytest.raises(memory.DoesNotFit, match="--max_length"):
        fit_micro_batch(six_layer_model, layout, CPU, torch.bfloat16, estimate(1), "a small card")


def as_if_on_a_gpu(monkeypatch, card_bytes: float) -> list[str]:
    """The run behaves as on a GPU of card_bytes (checks before training, micro-batch sized for the card);
    returns the lines it prints."""
    lines = []
    monkeypatch.setattr(main, "checks_before_training", lambda device: True)
    monkeypatch.setattr(main, "available_memory", lambda device: (card_bytes, "a fake card"))
    monkeypatch.setattr(main.tqdm, "write", lambda text, *args, **kwargs: lines.append(text))
    return lines


def test_a_card_too_small_for_any_micro_batch_is_one_line_before_data_loads(tiny_config, monkeypatch, capsys):
    as_if_on_a_gpu(monkeypatch, 1e6)
    monkeypatch.setattr(main, "load_data", lambda *args: pytest.fail("data loaded"))
    cfg = dataclasses.replace(tiny_config, batch_size=-1, grad_accum_steps=-1, packing="true")
    with pytest.raises(SystemExit) as stop:
        main.main(main.command_line(cfg))
    error = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(error) == 1
    assert error[0].startswith("main.py: error: the smallest micro-batch") and "--max_length" in error[0]


def failing_above(monkeypatch, tokens: int) -> tuple[list, list]:
    """The worst case run first (memory.rehearse) runs out of memory on micro-batches of more than `tokens`
    token slots, as a GPU's forward would; returns the sizes it ran, and those of the training steps after."""
    rehearsed, trained = [], []

    def rehearse_with_little_memory(model, batch, *args):
        rehearsed.append(batch["input_ids"].numel())
        if batch["input_ids"].numel() > tokens:
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return memory.rehearse(model, batch, *args)

    def forward_backward(trainer, micro_batches, *args):
        trained.extend(batch["input_ids"].numel() for batch in micro_batches)
        return train_step(trainer, micro_batches, *args)

    train_step = main.forward_backward
    monkeypatch.setattr(main, "rehearse", rehearse_with_little_memory)
    monkeypatch.setattr(main, "forward_backward", forward_backward)
    return rehearsed, trained


@pytest.mark.slow
def test_an_out_of_memory_on_the_worst_case_halves_the_micro_batch_once_and_says_so(tiny_config, monkeypatch):
    lines = as_if_on_a_gpu(monkeypatch, 1e12)  # the estimate lets the whole step through: 4 x 128 slots
    rehearsed, trained = failing_above(monkeypatch, 300)
    cfg = dataclasses.replace(tiny_config, batch_size=-1, grad_accum_steps=-1, global_batch=4, packing="true",
                              attn_implementation="varlen", max_steps=2, sample_every=0)
    run_dir = run(cfg)
    assert rehearsed[0] == 512 and set(rehearsed[1:]) == {256}
    assert any("halved to 256 token slots" in line for line in lines)
    assert checkpoint_weights(run_dir) and 0 < max(trained) <= 256  # it trained, in micro-batches of 256 at most

    failing_above(monkeypatch, 100)  # halving once is not enough: the setting to lower is named
    with pytest.raises(main.DoesNotFit, match="lower --max_tokens_per_batch"):
        run(dataclasses.replace(cfg, run_name="again"))


def test_a_micro_batch_that_was_asked_for_is_not_halved(tiny_config, monkeypatch):
    as_if_on_a_gpu(monkeypatch, 1e12)
    failing_above(monkeypatch, 300)
    with pytest.raises(main.DoesNotFit, match=r"lower --batch_size \(now 4\)"):
        run(dataclasses.replace(tiny_config, batch_size=4, packing="false", max_steps=1))


@pytest.mark.slow
def test_the_worst_case_run_first_leaves_the_training_as_it_was(tiny_config, monkeypatch):
    without = run(dataclasses.replace(tiny_config, run_name="without", max_steps=2, save_every=2))
    lines = as_if_on_a_gpu(monkeypatch, 1e12)
    checked = run(dataclasses.replace(tiny_config, run_name="checked", max_steps=2, save_every=2))
    a, b = checkpoint_weights(without), checkpoint_weights(checked)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not any("varlen attention" in line for line in lines)  # padded: nothing to check there


def test_the_loaders_items_in_flight_fit_a_small_dev_shm(tiny_config, monkeypatch):
    assert fit_shared_memory(8, 38.5e6, 64e9) == (8, 2, "")
    workers, prefetch, line = fit_shared_memory(8, 38.5e6, 500e6)
    assert (workers, prefetch) == (8, 1) and "--shm-size" in line and "--num_workers" in line
    assert fit_shared_memory(8, 38.5e6, 64e6)[:2] == (1, 1)
    assert fit_shared_memory(8, 38.5e6, 20e6)[:2] == (0, 1)  # the main process loads the data itself
    lines = []
    monkeypatch.setattr(main, "shared_memory_free", lambda: 1e3)
    cfg = dataclasses.replace(tiny_config, num_workers=2)
    model = main.build_model(cfg, CPU, torch.float32)
    train_set, val_set, _ = main.load_data(cfg, model.processor, print)
    loader, _ = main.build_loaders(cfg, train_set, val_set, model.processor, 0, 0, 1, CPU, log=lines.append)
    assert loader.num_workers == 0 and "/dev/shm" in lines[0]
    assert next(iter(loader))[0]["num_samples"] == 4


def test_cuda_memory_grows_in_expandable_segments_unless_the_allocator_was_configured():
    environ = {}
    expandable_segments(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for configured in ({"PYTORCH_CUDA_ALLOC_CONF": "backend:native"}, {"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}):
        environ = dict(configured)
        expandable_segments(environ)
        assert environ == configured
    source = open(main.__file__).read()  # set before torch loads, which reads it
    assert source.index("expandable_segments(os.environ)") < source.index("import torch")


def test_stage_2_on_a_gpu_is_sized_for_the_card_not_batch_size_times_max_length(finetune_config, monkeypatch):
    """The default that did not fit an A40: 16 x 2048 token slots whatever the card. Now the slots are what the
    card holds, the global batch of 128 kept."""
    lines = as_if_on_a_gpu(monkeypatch, 0)
    cfg = main.resolve_config({"stage": "finetune", "init_from": finetune_config.init_from})
    cfg = dataclasses.replace(cfg, **{k: getattr(finetune_config, k) for k in ("data_path", "image_root",
                              "val_data_path", "device", "dtype")}, max_length=256, attn_implementation="varlen")
    model = main.build_model(cfg, CPU, torch.float32)
    estimate = estimator(model, main.micro_batch_layout(cfg, model, CPU, 1), CPU, torch.float32)
    monkeypatch.setattr(main, "available_memory", lambda device: (MARGIN * estimate(1024) * 1.001, "a small card"))
    sized = main.with_micro_batches(cfg, model, CPU, torch.float32, 1, lines.append)
    assert sized.max_tokens_per_batch == 1024 < 16 * cfg.max_length and sized.batch_size * sized.grad_accum_steps == 128
    assert lines == [f"micro-batches of 1,024 token slots (packed, one row): the most whose worst case fits "
                     f"{MARGIN * estimate(1024) * 1.001 / 1e9:.1f} GB of a small card with 25% to spare (estimated "
                     f"{estimate(1024) / 1e9:.1f} GB)"]
