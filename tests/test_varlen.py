"""varlen attention: packed rows on torch's FlashAttention variable-length kernel, each conversation attending to
itself with no mask and no padding, its bounds from the host. The kernel is CUDA's; on a CPU a reference with
its signature (attention.reference_varlen_attn) stands in, and everything around it is tested here: the same
losses and gradients as padded batches, one compiled graph for changing bounds, the check a GPU run makes
before its first step, and the fallback to masked sdpa when the kernel is missing or wrong."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU, conversations
from helpers import samples as captions
from transformers import LlamaForCausalLM

import attention
import main
import synthetic
from attention import reference_varlen_attn, varlen_problem
from data import collate, pack_step
from main import build_model, forward_backward
from model import Projector


def per_sequence_sdpa(query, key, value, lengths, window=None):
    """Each sequence of (T, heads, head_dim) tensors alone through sdpa, causal (within window tokens)."""
    out, start = [], 0
    for n in lengths:
        q, k, v = (x[start:start + n].transpose(0, 1) for x in (query, key, value))  # (heads, n, head_dim)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if window:
            mask &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("window", [None, 4])
def test_the_reference_kernel_attends_within_each_sequence_as_sdpa_does(window):
    lengths = [3, 9, 1, 7]
    torch.manual_seed(0)
    query = torch.randn(sum(lengths), 9, 16, requires_grad=True)  # SmolLM2's 9 query heads over 3 key/value heads
    key, value = (torch.randn(sum(lengths), 3, 16, requires_grad=True) for _ in range(2))
    bounds = torch.tensor([0, 3, 12, 13, 20], dtype=torch.int32)
    out = reference_varlen_attn(query, key, value, bounds, bounds, 9, 9, enable_gqa=True,
                                window_size=(window - 1 if window else -1, 0))
    expected = per_sequence_sdpa(query, key, value, lengths, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    direction = torch.randn_like(out)
    gradients = torch.autograd.grad((out * direction).sum(), (query, key, value))
    expected_gradients = torch.autograd.grad((expected * direction).sum(), (query, key, value))
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def smollm2_attention_model(cfg, kv_heads: int, implementation: str):
    """cfg's tiny model with a language model of SmolLM2-135M's attention (hidden 576, 9 heads of 64) with
    kv_heads key/value heads (3: SmolLM2's grouped-query attention; 9: none), two layers."""
    model = build_model(dataclasses.replace(cfg, attn_implementation=implementation), CPU, torch.float32)
    torch.manual_seed(0)
    config = synthetic.language_model_config(model.processor.tokenizer, True, hidden_size=576, num_attention_heads=9,
                                             num_key_value_heads=kv_heads, head_dim=64, intermediate_size=256,
                                             initializer_range=0.05, attn_implementation=implementation)
    model.lm = LlamaForCausalLM(config).requires_grad_(cfg.stage == "finetune")
    model.projector = Projector(model.vision.config.hidden_size, 64, 576, cfg.pixel_shuffle_factor)
    return model


@pytest.mark.parametrize("kv_heads", [3, 9])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_packed_varlen_rows_give_the_padded_steps_losses_and_gradients(tiny_config, finetune_config, stage,
                                                                       kv_heads):
    """Stage 1: the projector's gradient; stage 2: the projector's and the language model's, text-only
    conversations among the samples. Float noise only (1e-4 relative): the two compute the same sums."""
    cfg = finetune_config if stage == "finetune" else tiny_config
    varlen = smollm2_attention_model(cfg, kv_heads, "varlen")
    padded = smollm2_attention_model(cfg, kv_heads, "eager")
    padded.load_state_dict(varlen.state_dict())
    samples = conversations(cfg, varlen, 10) if stage == "finetune" else captions(varlen, 10)
    pad, image = varlen.processor.tokenizer.pad_token_id, varlen.image_token_id
    slots = max(cfg.max_length, sum(len(s["input_ids"]) for s in samples))
    rows = pack_step(samples, cfg.max_length, slots, pad, slots, image)
    assert len(rows) == 1 and rows[0]["input_ids"].shape[0] == 1  # one row: every slot a real token
    assert rows[0]["num_tokens"] == rows[0]["input_ids"].numel()
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def loss_and_gradient(model, batches):
        model.zero_grad()
        loss = forward_backward(model, batches, CPU, torch.float32, scaler)
        return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    packed_loss, packed_gradient = loss_and_gradient(varlen, rows)
    padded_loss, padded_gradient = loss_and_gradient(padded, [collate(samples, pad, image)])
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    assert (packed_gradient - padded_gradient).norm() < 1e-4 * padded_gradient.norm()
    assert packed_gradient.numel() > sum(p.numel() for p in varlen.projector.parameters()) or stage == "pretrain"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_compiled_varlen_run_compiles_each_region_once_for_changing_bounds(tiny_config, finetune_config, stage,
                                                                             monkeypatch, device):
    """Packed steps of changing lengths and bounds, one row each (a batch of one, which dynamo specializes
    from the first), validation and checkpoints: no region compiles more than once, none breaks its graph."""
    from test_compile import graphs_of_a_run

    cfg = dataclasses.replace(finetune_config if stage == "finetune" else tiny_config, compile="true",
                              device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
                              packing="true", attn_implementation="varlen", batch_size=3, grad_accum_steps=2,
                              max_tokens_per_batch=256, max_steps=5, log_every=2, eval_every=4, save_every=4,
                              sample_every=0)
    torch._dynamo.utils.counters.clear()
    graphs = graphs_of_a_run(cfg, monkeypatch)
    assert graphs == {"vision": 1, "projector": 1, "decoder layer": 1}, graphs
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.gpu
def test_the_varlen_kernel_of_this_device_agrees_with_masked_sdpa(tiny_config, device):
    """On a GPU torch's FlashAttention varlen kernel, on a CPU the reference: what a GPU run checks first."""
    cfg = dataclasses.replace(tiny_config, device=device.type, attn_implementation="varlen")
    model = build_model(cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    assert varlen_problem(model.lm, torch.bfloat16 if device.type == "cuda" else torch.float32) is None


def test_the_check_refuses_a_kernel_that_is_missing_fails_leaks_or_is_not_causal(tiny_config, monkeypatch):
    model = build_model(dataclasses.replace(tiny_config, attn_implementation="varlen"), CPU, torch.float32)
    assert varlen_problem(model.lm, torch.float32) is None
    wrong = {
        "has no torch.nn.attention.varlen": None,
        "failed: RuntimeError": lambda *args, **kwargs: torch.ops.aten.to_dense(torch.ones(1)),  # not sparse
        "output differs from sdpa's": lambda *args, window_size, **kwargs: reference_varlen_attn(  # not causal
            *args, window_size=(-1, -1), **kwargs),
        "differs from sdpa's by": lambda query, key, value, bounds, bounds_k, *args, **kwargs: reference_varlen_attn(
            query, key, value, bounds[[0, -1]], bounds_k[[0, -1]], *args, **kwargs),  # one sequence: it leaks
    }
    for message, kernel in wrong.items():
        monkeypatch.setattr(attention, "varlen_kernel", lambda device, kernel=kernel: kernel)
        problem = varlen_problem(model.lm, torch.float32)
        assert problem and message in problem, (message, problem)


@pytest.mark.slow
def test_a_gpu_run_without_the_kernel_trains_on_masked_sdpa_and_says_so(finetune_config, monkeypatch):
    lines = []
    monkeypatch.setattr(main, "checks_before_training", lambda device: True)
    monkeypatch.setattr(main.tqdm, "write", lambda text, *args, **kwargs: lines.append(text))
    monkeypatch.setattr(attention, "varlen_kernel", lambda device: None)
    cfg = dataclasses.replace(finetune_config, packing="true", attn_implementation="varlen", batch_size=4,
                              max_tokens_per_batch=256, max_steps=2, sample_every=0)
    model = build_model(cfg, CPU, torch.float32)
    run_dir = main.train(cfg, model, CPU, torch.float32)
    fallback = [line for line in lines if line.startswith("varlen attention:")]
    assert len(fallback) == 1 and "has no torch.nn.attention.varlen" in fallback[0]
    assert fallback[0].endswith("packed rows use sdpa with a block-diagonal mask instead")
    assert model.lm.config._attn_implementation == "sdpa"
    assert any(line.startswith("step 2: saved") for line in lines) and run_dir
