"""torch.compile (VLMConfig.compile): compiled regions agree with eager, a real run compiles a fixed number of
graphs whatever its batches, generation works on a compiled model, and the compile switch resolves per device."""

import dataclasses
import json

import pytest
import torch
from helpers import CPU, run, samples, shape_images

from data import collate
from main import build_model, forward_backward
from model import pick_compile, pick_dtype


def gradients_of_one_step(model, batch, dtype=torch.bfloat16, device=CPU) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    loss_sum = forward_backward(model, [batch], device, dtype, torch.amp.GradScaler(device.type, enabled=False))
    gradient = torch.cat([p.grad.flatten().float() for p in model.projector.parameters()])
    return loss_sum.item() / batch["num_targets"], gradient


@pytest.mark.gpu
@pytest.mark.slow
def test_compiled_and_eager_losses_and_projector_gradients_agree(tiny_config, device):
    """In the run dtype of this device (main.py's auto: bf16 on a GPU or a CPU with AMX, fp32 on an AVX2-only
    CPU, where bf16 is emulated and slow). Under bf16 autocast inductor rounds differently from eager (it keeps
    fused intermediates in fp32), so the bar is bf16's own error: the compiled gradient is no further from the
    exact (fp32) one than 1.5x eager's; in fp32, float noise (1e-4 of the norm)."""
    dtype = pick_dtype("auto", device)
    cfg = dataclasses.replace(tiny_config, device=device.type)
    torch._dynamo.reset()
    eager = build_model(cfg, device, dtype)
    compiled = build_model(dataclasses.replace(cfg, compile="true"), device, dtype)
    batch = collate(samples(eager, 4), eager.processor.tokenizer.pad_token_id)
    exact_loss, exact_gradient = gradients_of_one_step(build_model(cfg, device, torch.float32), batch,
                                                       torch.float32, device)
    eager_loss, eager_gradient = gradients_of_one_step(eager, batch, dtype, device)
    loss, gradient = gradients_of_one_step(compiled, batch, dtype, device)
    assert loss == pytest.approx(exact_loss, rel=2e-2) and eager_loss == pytest.approx(exact_loss, rel=2e-2)
    rounding = (eager_gradient - exact_gradient).norm()
    assert rounding < 0.5 * exact_gradient.norm()  # the bar itself is sane
    assert (gradient - exact_gradient).norm() <= max(1.5 * rounding, 1e-4 * exact_gradient.norm())
    assert gradient.norm() > 0


def region_of(graph_module) -> str:
    """Which compiled region a graph is of, from the names of the weights it takes as inputs."""
    code = graph_module.code
    return "vision" if "patch_embedding" in code else "decoder layer" if "self_attn" in code else "projector"


def graphs_of_a_run(cfg, monkeypatch) -> dict:
    """main.py's loop with compile on, under a backend that counts the graphs torch.compile makes per region,
    and with dynamo told to fail instead of silently falling back to eager at its recompile limit."""
    from model import TinyVLM

    graphs = {}

    def counting_backend(graph_module, example_inputs):
        graphs[region_of(graph_module)] = graphs.get(region_of(graph_module), 0) + 1
        return graph_module.forward

    compile_regions = TinyVLM.compile_regions
    monkeypatch.setattr(TinyVLM, "compile_regions", lambda self, backend: compile_regions(self, backend=counting_backend))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        run(cfg)
    return graphs


@pytest.mark.gpu
@pytest.mark.slow
def test_a_compiled_run_makes_two_graphs_per_region_whatever_the_batches(tiny_config, shapes_data, tmp_path,
                                                                          monkeypatch, device):
    """Steps of varying lengths (each micro-batch as long as its longest sample), micro-batches that lost
    samples to missing images, down to one sample, validation passes, captions of held-out images and
    checkpoints: each region compiles two graphs, one dynamic from the first batch and one that dynamo
    specializes for a batch of one (sample or image), and never more."""
    entries = json.load(open(f"{shapes_data}/chat.json"))
    for entry in entries[::3]:
        entry["image"] = "missing.jpg"
    (tmp_path / "holes.json").write_text(json.dumps(entries))
    cfg = dataclasses.replace(tiny_config, compile="true", device=device.type, data_path=str(tmp_path / "holes.json"),
                              batch_size=3,
                              grad_accum_steps=2, max_steps=8, log_every=2, eval_every=4, save_every=4,
                              sample_every=4, num_sample_images=2)
    graphs = graphs_of_a_run(cfg, monkeypatch)
    assert graphs == {"vision": 2, "projector": 2, "decoder layer": 2}, graphs


@pytest.mark.gpu
@pytest.mark.slow
def test_a_compiled_packed_stage2_run_makes_two_graphs_per_region(finetune_config, monkeypatch, device):
    """Packed micro-batches of several rows and of one, text-only ones among them."""
    cfg = dataclasses.replace(finetune_config, compile="true", device=device.type, packing=True, attn_implementation="sdpa",
                              batch_size=2, grad_accum_steps=3, max_tokens_per_batch=256, max_steps=4, log_every=2,
                              eval_every=4, save_every=4, sample_every=0)
    graphs = graphs_of_a_run(cfg, monkeypatch)
    assert graphs == {"vision": 2, "projector": 2, "decoder layer": 2}, graphs


@pytest.mark.slow
def test_generate_works_on_a_compiled_model_and_answers_like_eager(tiny_config, shapes_data):
    """aot_eager: dynamo's tracing, guards and recompiles as in training and decoding, without inductor's minutes
    of C++ compiling on 2 cores (inductor's numerics are the test above's)."""
    torch._dynamo.reset()
    eager = build_model(tiny_config, CPU, torch.float32).eval()
    compiled = build_model(dataclasses.replace(tiny_config, compile="aot_eager"), CPU, torch.float32)
    gradients_of_one_step(compiled, collate(samples(compiled, 2), compiled.processor.tokenizer.pad_token_id))
    compiled.eval()  # compiled and run as in training (no optimizer step: the weights stay the eager model's)
    images = shape_images(shapes_data, 2)
    assert compiled.generate(images, "What is it?", max_new_tokens=6) == \
        eager.generate(images, "What is it?", max_new_tokens=6)


def test_compile_is_on_for_cuda_only_unless_asked():
    assert pick_compile("auto", torch.device("cuda", 0)) == "inductor" and pick_compile("auto", CPU) is None
    assert pick_compile("true", CPU) == "inductor" and pick_compile("false", torch.device("cuda", 0)) is None
    assert pick_compile("aot_eager", CPU) == "aot_eager"
    with pytest.raises(ValueError, match="compile must be"):
        pick_compile("sometimes", CPU)
