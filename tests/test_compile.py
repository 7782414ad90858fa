"""torch.compile (VLMConfig.compile): compiled regions agree with eager, batches of new lengths and sizes do not
recompile every step, generation works on a compiled model, and the compile switch resolves per device."""

import dataclasses

import pytest
import torch

from data import collate
from main import build_model, forward_backward
from model import pick_compile, pick_dtype
from test_train import samples

CPU = torch.device("cpu")


def gradients_of_one_step(model, batch, dtype=torch.bfloat16) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    loss, _, _ = forward_backward(model, [batch], CPU, dtype, torch.amp.GradScaler("cpu", enabled=False))
    return loss.item(), torch.cat([p.grad.flatten().float() for p in model.projector.parameters()])


def test_compiled_and_eager_losses_and_projector_gradients_agree(tiny_config):
    """In the run dtype of this CPU (main.py's auto: bf16 with AMX, fp32 on an AVX2-only CPU, where bf16 is
    emulated and slow). Under bf16 autocast inductor rounds differently from eager (it keeps fused
    intermediates in fp32), so the bar is bf16's own error: the compiled gradient is no further from the exact
    (fp32) one than 1.5x eager's; in fp32, float noise (1e-4 of the norm)."""
    dtype = pick_dtype("auto", CPU)
    torch._dynamo.reset()
    eager = build_model(tiny_config, CPU, dtype)
    compiled = build_model(dataclasses.replace(tiny_config, compile="true"), CPU, dtype)
    batch = collate(samples(eager, 4), eager.processor.tokenizer.pad_token_id)
    exact_loss, exact_gradient = gradients_of_one_step(build_model(tiny_config, CPU, torch.float32), batch,
                                                       torch.float32)
    eager_loss, eager_gradient = gradients_of_one_step(eager, batch, dtype)
    loss, gradient = gradients_of_one_step(compiled, batch, dtype)
    assert loss == pytest.approx(exact_loss, rel=2e-2) and eager_loss == pytest.approx(exact_loss, rel=2e-2)
    rounding = (eager_gradient - exact_gradient).norm()
    assert rounding < 0.5 * exact_gradient.norm()  # the bar itself is sane
    assert (gradient - exact_gradient).norm() <= max(1.5 * rounding, 1e-4 * exact_gradient.norm())
    assert gradient.norm() > 0


def test_batches_of_new_lengths_and_sizes_recompile_once_then_never(tiny_config):
    """A counting backend sees every graph torch.compile makes. The first batch compiles each region; a batch
    of another length and size recompiles once with those dimensions dynamic; ten more batches of other
    lengths and sizes compile nothing."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = build_model(tiny_config, CPU, torch.float32)
    model.compile_regions(backend=counting_backend)
    pad = model.processor.tokenizer.pad_token_id
    data = samples(model, 14)
    plan = [(0, 4), (8, 2), (1, 3), (5, 4), (3, 3), (9, 4), (2, 2), (6, 3), (4, 4), (10, 2), (7, 3), (11, 3)]
    batches = [collate(data[start:start + size], pad) for start, size in plan]  # (first sample, batch size)
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    assert len(set(shapes)) >= 8 and all(a != b for a, b in zip(shapes[0], shapes[1]))  # both dimensions change
    counts = []
    for batch in batches:
        gradients_of_one_step(model, batch)
        counts.append(len(graphs))
    regions = 2 + len(model.lm.get_decoder().layers)  # the vision tower, the projector and the decoder layers
    assert 0 < counts[0] <= regions  # the decoder layers may share one graph: their code is the same
    assert counts[1] <= 2 * counts[0]
    assert counts[-1] == counts[1], counts  # no recompilation after the second batch


def test_generate_works_on_a_compiled_model_and_answers_like_eager(tiny_config, shapes_data):
    from test_generate import shape_images

    torch._dynamo.reset()
    eager = build_model(tiny_config, CPU, torch.float32).eval()
    compiled = build_model(dataclasses.replace(tiny_config, compile="true"), CPU, torch.float32)
    gradients_of_one_step(compiled, collate(samples(compiled, 2), compiled.processor.tokenizer.pad_token_id))
    compiled.eval()  # compiled and run as in training (no optimizer step: the weights stay the eager model's)
    images = shape_images(shapes_data, 2)
    assert compiled.generate(images, "What is it?", max_new_tokens=6) == \
        eager.generate(images, "What is it?", max_new_tokens=6)


def test_compile_is_on_for_cuda_only_unless_asked():
    assert pick_compile("auto", torch.device("cuda", 0)) and not pick_compile("auto", CPU)
    assert pick_compile("true", CPU) and not pick_compile("false", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="compile"):
        pick_compile("sometimes", CPU)
