"""Attention for packed rows (conversations laid end to end, position ids restarting at each one), registered
with transformers' AttentionInterface: `varlen` on GPUs (torch's FlashAttention variable-length kernel, the
sequence bounds from the host), `sdpa_varlen` on CPUs, the masks of training batches, and the check a GPU run
makes of the varlen kernel before its first step. model.py picks one; nothing here knows TinyVLM.
"""

import inspect
from contextlib import contextmanager

import torch
import torch.nn as nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


def pick_attention(name: str, device: torch.device, packing: bool = False) -> str:
    """"auto": on GPUs varlen for packed batches (flash attention per conversation, no mask), sdpa otherwise
    (flash attention, causal, no mask: right-padded batches need none). On CPUs sdpa_varlen for packed batches
    (faster there than sdpa with the block-diagonal mask) and eager otherwise, where sdpa's backward is slower
    (bench.py --parts step and --parts packing; docs/measurements.md)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "varlen" if packing else "sdpa"
    return "sdpa_varlen" if packing else "eager"


# ----------------------------------------------------------------------------------------------------------
# varlen: torch's FlashAttention variable-length kernel (CUDA), or on CPUs a reference with its signature


def varlen_kernel(device: torch.device):
    """torch.nn.attention.varlen.varlen_attn on CUDA (torch 2.10 and later), None where this torch has none; on
    other devices reference_varlen_attn, which computes the same thing from the same arguments."""
    if device.type != "cuda":
        return reference_varlen_attn
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, scaling=None,
                     sliding_window=None, **kwargs):
    """Attention within each sequence of packed rows, causal, with no mask and no padding in the kernel: the
    rows are flattened and cut at cu_seq_lens_q (int32, the sequences' bounds in the flattened rows, from
    data.packed_batch), max_length_q (a host int) bounds the longest. Without bounds (padded batches,
    generation) it is sdpa. Grouped-query attention stays native: key and value keep their fewer heads.
    query: (B, heads, T, head_dim), key and value: (B, kv_heads, T, head_dim); returns (B, T, heads, head_dim)."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    batch, heads, length, head_dim = query.shape
    kernel = varlen_kernel(query.device)
    q, k, v = (x.transpose(1, 2).flatten(0, 1) for x in (query, key, value))  # (B*T, heads or kv_heads, head_dim)
    # torch 2.11's kernel takes fewer key/value heads as they come; later ones want to be told
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(kernel).parameters else {}
    window = (sliding_window - 1 if sliding_window else -1, 0)  # causal; Gemma's local layers look back a window
    out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                 window_size=window, **gqa)  # (B*T, heads, head_dim)
    return out.view(batch, length, heads, head_dim), None


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1), enable_gqa=False):
    """What torch's varlen_attn computes, with its signature, on any device: each sequence of the flattened
    tokens (bounds in cu_seq_q) attends to itself alone. A custom operator, as the kernel is, so that
    torch.compile treats it the same way (one opaque call, no graph break) and fake tensors see what the
    kernel's backward keeps (query, key, value, the output and the log-sum-exp). Dense and slow: for tests, and
    to run the GPU's path on a CPU. query: (T, heads, head_dim), key and value: (T, kv_heads, head_dim)."""
    out, lse = torch.ops.tinyvlm.varlen_reference(query, key, value, cu_seq_q, list(window_size), scale)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def reference_probabilities(query, key, cu_seq, window: list[int], scale: float | None):
    """The reference's attention weights, (heads, T, T) in float32, and their log-sum-exp, (heads, T): every
    token against every other, masked to its own sequence (and causal, and within the window, as window
    asks). Key and value heads are shared by groups of query heads (grouped-query attention)."""
    tokens, heads, head_dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # (T, heads, head_dim)
    position = torch.arange(tokens, device=query.device)
    sequence = torch.searchsorted(cu_seq[1:].long(), position, right=True)  # (T,): which sequence a token is in
    offset = position[:, None] - position[None, :]  # (T, T): how far back the key is
    allowed = sequence[:, None] == sequence[None, :]
    if window[1] >= 0:
        allowed &= offset >= -window[1]
    if window[0] >= 0:
        allowed &= offset <= window[0]
    scores = torch.einsum("qhd,khd->hqk", query.float(), key.float()) * (scale or head_dim**-0.5)  # (heads, T, T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)  # (heads, T)
    return (scores - lse[..., None]).exp(), lse


def reference_attention(query, key, value, cu_seq, window: list[int], scale: float | None):
    """The reference's output, (T, heads, head_dim), and log-sum-exp."""
    probabilities, lse = reference_probabilities(query, key, cu_seq, window, scale)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1).float()  # (T, heads, head_dim)
    return torch.einsum("hqk,khd->qhd", probabilities, value).to(query.dtype), lse


@torch.library.custom_op("tinyvlm::varlen_reference", mutates_args=())
def varlen_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq: torch.Tensor,
                     window: list[int], scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return reference_attention(query, key, value, cu_seq, window, scale)


@varlen_reference.register_fake
def _(query, key, value, cu_seq, window, scale):
    return torch.empty_like(query), query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32)


@torch.library.custom_op("tinyvlm::varlen_reference_backward", mutates_args=())
def varlen_reference_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              cu_seq: torch.Tensor, window: list[int], scale: float | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of reference_attention's output with respect to query, key and value: softmax attention's
    backward written out (a custom operator runs below autograd, so it cannot differentiate itself)."""
    tokens, heads, head_dim = query.shape
    group = heads // key.shape[1]  # query heads per key/value head
    probabilities, _ = reference_probabilities(query, key, cu_seq, window, scale)  # (heads, T, T)
    key, value = (x.repeat_interleave(group, dim=1).float() for x in (key, value))  # (T, heads, head_dim)
    grad = grad.float()
    grad_value = torch.einsum("hqk,qhd->khd", probabilities, grad)
    grad_probabilities = torch.einsum("qhd,khd->hqk", grad, value)
    grad_scores = probabilities * (grad_probabilities - (grad_probabilities * probabilities).sum(-1, keepdim=True))
    grad_scores = grad_scores * (scale or head_dim**-0.5)
    grad_query = torch.einsum("hqk,khd->qhd", grad_scores, key)
    grad_key = torch.einsum("hqk,qhd->khd", grad_scores, query.float())

    def per_kv_head(x):  # the gradients of a shared key/value head add up over its group of query heads
        return x.view(tokens, heads // group, group, head_dim).sum(2)

    return grad_query.to(query.dtype), per_kv_head(grad_key).to(query.dtype), per_kv_head(grad_value).to(query.dtype)


@varlen_reference_backward.register_fake
def _(grad, query, key, value, cu_seq, window, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _keep_for_backward(ctx, inputs, output):
    query, key, value, cu_seq, window, scale = inputs
    ctx.save_for_backward(query, key, value, cu_seq, *output)  # the output and lse too, as the kernel keeps them
    ctx.window, ctx.scale = window, scale


def _backward(ctx, grad_out, grad_lse):
    query, key, value, cu_seq, _, _ = ctx.saved_tensors
    grads = torch.ops.tinyvlm.varlen_reference_backward(grad_out, query, key, value, cu_seq, ctx.window, ctx.scale)
    return *grads, None, None, None


varlen_reference.register_autograd(_backward, setup_context=_keep_for_backward)


def varlen_problem(language_model: nn.Module, dtype: torch.dtype) -> str | None:
    """Why packed rows cannot use varlen on this device, or None: its kernel is missing (a torch before 2.10,
    a GPU before Ampere), fails, or disagrees with sdpa given the block-diagonal mask, on the language model's
    first layer and one row of three conversations, in the output and in the gradient. Runs eagerly, in a
    second or two, before a GPU run's first step."""
    kernel = varlen_kernel(language_model.device)
    if kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch 2.10 and later)"
    lengths = [5, 17, 42]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(language_model.device)  # (1, 64)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0)], dtype=torch.int32, device=language_model.device)
    generator = torch.Generator(language_model.device).manual_seed(0)
    token_ids = torch.randint(language_model.config.vocab_size, (1, sum(lengths)), generator=generator,
                              device=language_model.device)
    embeds = language_model.get_input_embeddings()(token_ids).detach().float()  # (1, 64, hidden)
    direction = torch.randn(embeds.shape, generator=generator, device=embeds.device)  # what the gradient is of
    mask = training_attention_mask(position_ids, position_ids, "sdpa", dtype)  # (1, 1, 64, 64)
    decoder, implementation = language_model.get_decoder(), language_model.config._attn_implementation
    results, layers = [], decoder.layers
    try:
        decoder.layers = layers[:1]
        for name, extra in (("varlen", dict(cu_seq_lens_q=bounds, max_length_q=max(lengths))),
                            ("sdpa", dict(attention_mask=mask))):
            language_model.config._attn_implementation = GIVEN_MASK + name
            inputs = embeds.clone().requires_grad_()
            with torch.compiler.set_stance("force_eager"), torch.autocast(embeds.device.type, dtype,
                                                                         enabled=dtype != torch.float32):
                out = decoder(inputs_embeds=inputs, position_ids=position_ids, use_cache=False, **extra)
            (out.last_hidden_state.float() * direction).sum().backward()
            results.append([out.last_hidden_state.float(), inputs.grad])
    except Exception as error:  # any failure of the kernel means: do not train with it
        return f"varlen_attn failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        decoder.layers, language_model.config._attn_implementation = layers, implementation
    for what, varlen, sdpa in zip(("output", "gradient"), *results):
        error = ((varlen - sdpa).norm() / sdpa.norm()).item()
        if not error < 0.02:
            return f"varlen_attn's {what} differs from sdpa's by {error:.1%} (relative)"
    return None


# ----------------------------------------------------------------------------------------------------------
# sdpa_varlen: sdpa once per conversation, for CPUs


@torch.compiler.disable  # the conversations' bounds are data: a compiled layer would recompile for each batch
def sdpa_varlen(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """sdpa that runs once per conversation of packed rows (data.packed_batch), as flash-attention's varlen
    kernels do. Plain sdpa scores every token of a packed row against the whole row and masks out the other
    conversations; here a token costs only its own conversation. A conversation starts where the position ids
    restart at 0; the block-diagonal mask of packed rows (training_attention_mask) is then not needed. Batches
    whose position ids do not restart (padded batches, generation with its cache) get plain sdpa. For CPUs:
    the conversations' bounds are read back from the device in every layer, which on a GPU would stall its
    queue 30 times a step (GPUs get varlen). query: (B, heads, T, head_dim), key and value:
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


# transformers' documented way to add an attention implementation. Their mask is sdpa's, for batches that are
# not packed (generation); packed rows come with their bounds (varlen) or the block-diagonal mask (sdpa_varlen
# leaves it unused).
for name, function in (("varlen", varlen_attention), ("sdpa_varlen", sdpa_varlen)):
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


# ----------------------------------------------------------------------------------------------------------
# Masks: a training batch knows its own


def training_attention_mask(input_ids: torch.Tensor, position_ids, implementation: str, dtype: torch.dtype):
    """The attention mask of a training batch, (B, 1, T, T), built on the device, or None:
    - a right-padded batch needs none: every real token comes before every pad and, attending causally, sees
      only real tokens; the pads carry no targets. sdpa then runs its causal kernels (flash attention and
      native grouped-query attention on GPUs). Eager attention is not causal by itself: it gets the causal mask.
    - packed rows (position ids given, restarting at 0 where a conversation starts) get the block-diagonal
      causal mask, so that no conversation sees another: booleans for sdpa, additive floats for eager; varlen
      is given the conversations' bounds instead (TinyVLM.forward) and flash-attention kernels find them in
      position_ids themselves."""
    if implementation.startswith("flash") or implementation == "varlen" or (
            position_ids is None and implementation != "eager"):
        return None
    length = input_ids.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None]  # (1, T, T)
    if position_ids is not None:
        conversation = (position_ids == 0).cumsum(-1)  # (B, T): which conversation of its row a token is in
        allowed = allowed & (conversation[:, :, None] == conversation[:, None, :])  # (B, T, T)
    allowed = allowed.expand(input_ids.shape[0], -1, -1)[:, None]  # (B, 1, T, T)
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


# transformers builds an LM's attention mask from the padding mask or the position ids it is given, and reads
# one of them back on the host to decide whether the mask can be skipped: a sync in every forward. TinyVLM's
# training forward knows its mask already (training_attention_mask), so it runs the LM under these names, for
# which no mask function is registered: transformers then builds no mask and passes on the one given, or none.
# (A 4D mask, as packed rows and eager attention get, is passed on as it is under any name.)
GIVEN_MASK = "tinyvlm_given_mask:"
for name, function in (("sdpa", sdpa_attention_forward), ("sdpa_varlen", sdpa_varlen), ("varlen", varlen_attention)):
    AttentionInterface.register(GIVEN_MASK + name, function)


@contextmanager
def given_masks(language_model: nn.Module):
    """Within: the language model takes its attention mask as given (see GIVEN_MASK), under the alias of its
    attention implementation; outside, it is its usual self (generation, export)."""
    implementation = language_model.config._attn_implementation
    if GIVEN_MASK + implementation not in AttentionInterface._global_mapping:
        yield
        return
    language_model.config._attn_implementation = GIVEN_MASK + implementation
    try:
        yield
    finally:
        language_model.config._attn_implementation = implementation
