"""The model: pixel shuffle, projector, placeholder scatter, the position-only loss, freezing, saving."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from data import collate
from main import VLMConfig
from model import Projector, TinyVLM, autocast, pixel_shuffle
from sources import IGNORE_INDEX, llava_to_messages


def test_pixel_shuffle_tokens_are_2x2_spatial_blocks():
    side, dim = 14, 3
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    # each patch's features say where it is: (row, column, a constant)
    patches = torch.stack([rows, cols, torch.full_like(rows, 7)], dim=-1).reshape(1, side * side, dim).float()
    tokens = pixel_shuffle(patches, 2)  # (1, 49, 12)
    assert tokens.shape == (1, 49, 4 * dim)
    for i in range(7):
        for j in range(7):
            block = tokens[0, i * 7 + j].reshape(2, 2, dim)  # (dy, dx, D)
            for dy in range(2):
                for dx in range(2):
                    assert block[dy, dx].tolist() == [2 * i + dy, 2 * j + dx, 7]


def test_pixel_shuffle_is_not_a_merge_of_consecutive_raster_patches():
    patches = torch.arange(16.0).reshape(1, 16, 1)  # a 4 x 4 grid numbered in raster order
    assert pixel_shuffle(patches, 2)[0, 0].tolist() == [0, 1, 4, 5]  # not [0, 1, 2, 3]


def test_pixel_shuffle_rejects_a_grid_it_cannot_divide():
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 15, 4), 2)


def test_projector_shapes_and_parameter_count():
    projector = Projector(in_dim=768, hidden_dim=1536, out_dim=576, pixel_shuffle_factor=2)
    assert projector(torch.randn(2, 196, 768)).shape == (2, 49, 576)  # 14 x 14 patches -> 7 x 7 tokens
    layer_norm = 2 * 3072
    assert sum(p.numel() for p in projector.parameters()) == layer_norm + 2 * 3072 * 1536 + 1536 * 576


def test_default_model_is_about_300m_parameters():
    """SigLIP-base (no pooling head), SmolLM2-135M and the default projector, built on the meta device."""
    cfg = VLMConfig()
    with torch.device("meta"):
        vision = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False))
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True))
        projector = Projector(768, cfg.projector_hidden_dim, 576, cfg.pixel_shuffle_factor)
    total = sum(p.numel() for m in (vision, lm, projector) for p in m.parameters())
    assert 290e6 < total < 310e6, total


def image_batch(model, num_samples_with_images: int, num_text_only: int = 0):
    """A right-padded batch of conversations of different lengths, images first."""
    samples = []
    for i in range(num_samples_with_images + num_text_only):
        has_image = i < num_samples_with_images
        human = ("<image>\n" if has_image else "") + "Describe" + " this" * (3 * i)
        messages = llava_to_messages([{"from": "human", "value": human}, {"from": "gpt", "value": "a red circle."}],
                               model.processor.image_placeholder)
        input_ids, labels = model.processor.encode(messages)
        pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) if has_image else None
        samples.append({"input_ids": input_ids, "labels": labels, "pixels": pixels})
    return collate(samples, model.processor.tokenizer.pad_token_id)


def test_image_features_land_exactly_on_the_placeholders(tiny_model):
    torch.manual_seed(0)
    batch = image_batch(tiny_model, num_samples_with_images=3)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three different lengths, padded
    with torch.no_grad():
        embeds = tiny_model.embed(batch["input_ids"], batch["pixels"])  # (3, T, H)
        image_tokens = tiny_model.encode_images(batch["pixels"])  # (3, 4, H)
        text_embeds = tiny_model.lm.get_input_embeddings()(batch["input_ids"].clamp(max=49151))
    is_image = batch["input_ids"] == tiny_model.image_token_id
    assert is_image.sum(1).tolist() == [tiny_model.num_image_tokens] * 3
    for row in range(3):
        assert torch.equal(embeds[row][is_image[row]], image_tokens[row])
        assert torch.equal(embeds[row][~is_image[row]], text_embeds[row][~is_image[row]])


def test_text_only_samples_mix_with_image_samples(tiny_model):
    """Images fill the placeholders of the samples that have one, in order; a text-only row is untouched."""
    batch = image_batch(tiny_model, num_samples_with_images=2, num_text_only=1)
    assert batch["pixels"].shape[0] == 2
    with torch.no_grad():
        embeds = tiny_model.embed(batch["input_ids"], batch["pixels"])
        text_embeds = tiny_model.lm.get_input_embeddings()(batch["input_ids"].clamp(max=49151))
    assert torch.equal(embeds[2], text_embeds[2])


def test_position_only_loss_equals_full_logits_cross_entropy(tiny_model):
    batch = image_batch(tiny_model, num_samples_with_images=3)
    with torch.no_grad():
        loss = tiny_model(batch["input_ids"], batch["labels"], batch["pixels"])
        embeds = tiny_model.embed(batch["input_ids"], batch["pixels"])
        logits = tiny_model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert (batch["labels"] != IGNORE_INDEX).sum() > 10
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def masked_token_losses(model, batch) -> torch.Tensor:
    """The reference: transformers' own path with the padding mask, per target token."""
    embeds = model.embed(batch["input_ids"], batch["pixels"])
    logits = model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T-1, V)
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[targets != IGNORE_INDEX].float(), targets[targets != IGNORE_INDEX], reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_right_padded_training_without_a_mask_matches_the_masked_path(tiny_config, attention, stage, device):
    """Training passes no padding mask (sdpa runs causal); every token's loss and every trained weight's
    gradient (the projector; in stage 2 the language model too) are those of the masked path, to float noise."""
    from main import build_model

    model = build_model(dataclasses.replace(tiny_config, attn_implementation=attention), device, torch.float32)
    model.lm.requires_grad_(stage == "finetune")
    batch = image_batch(model, num_samples_with_images=3, num_text_only=1)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 4  # four lengths: three rows have pads
    trained = [p for p in model.parameters() if p.requires_grad]

    def losses_and_gradients(losses):
        gradients = torch.autograd.grad(losses.sum(), trained)
        return losses.detach(), torch.cat([g.flatten() for g in gradients])

    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    unmasked = losses_and_gradients(model(batch["input_ids"], batch["labels"], batch["pixels"], reduction="none"))
    masked = losses_and_gradients(masked_token_losses(model, batch))
    torch.testing.assert_close(unmasked[0], masked[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmasked[1], masked[1], rtol=1e-4, atol=1e-6)
    assert unmasked[1].abs().max() > 1e-3  # gradients to compare


def test_sdpa_training_runs_causal_with_grouped_query_heads_and_no_mask(tiny_model, monkeypatch):
    """What lets a GPU take its flash kernel: no attn_mask, is_causal, and the 2 key/value heads of 4 query heads
    passed as they are (enable_gqa), not repeated."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1], kwargs.get("attn_mask"), kwargs.get("is_causal"),
                      kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, *args, **kwargs)

    tiny_model.lm.set_attn_implementation("sdpa")
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    batch = image_batch(tiny_model, num_samples_with_images=3)
    tiny_model(batch["input_ids"], batch["labels"], batch["pixels"])
    language_model_calls = calls[-tiny_model.lm.config.num_hidden_layers:]
    assert language_model_calls == [(4, 2, None, True, True)] * tiny_model.lm.config.num_hidden_layers
    assert tiny_model.lm.config._attn_implementation == "sdpa"  # as it was before the forward, for generation


def test_only_the_projector_gets_gradients(tiny_model):
    batch = image_batch(tiny_model, num_samples_with_images=2)
    tiny_model(batch["input_ids"], batch["labels"], batch["pixels"]).backward()
    for name, parameter in tiny_model.named_parameters():
        if name.startswith("projector."):
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0
        else:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_save_and_load_round_trip(tiny_model, tmp_path):
    with torch.no_grad():
        for p in tiny_model.projector.parameters():
            p.add_(torch.randn_like(p))
    tiny_model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "projector.safetensors"]
    loaded = TinyVLM.from_pretrained(str(tmp_path / "saved"), attn_implementation="eager")  # as tiny_model
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = image_batch(tiny_model, num_samples_with_images=2)
    with torch.no_grad():
        assert torch.equal(tiny_model(**{k: batch[k] for k in ("input_ids", "labels", "pixels")}),
                           loaded(**{k: batch[k] for k in ("input_ids", "labels", "pixels")}))


def test_vision_feature_layer_picks_that_hidden_state_and_drops_later_layers(tiny_models):
    from main import build_model

    full = SiglipVisionModel.from_pretrained(tiny_models["vision_model"])
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    for layer, kept in ((-1, 2), (-2, 1), (0, 0)):
        cfg = VLMConfig(**tiny_models, vision_feature_layer=layer, projector_hidden_dim=8, device="cpu")
        model = build_model(cfg, torch.device("cpu"), torch.float32)
        assert len(model.vision.layers) == kept
        with torch.no_grad():
            features = full(pixel_values=(pixels.float() / 255 - 0.5) / 0.5, output_hidden_states=True)
            expected = model.projector(features.hidden_states[layer])
            torch.testing.assert_close(model.encode_images(pixels), expected)


def test_speed_switches_keep_the_loss(tiny_config):
    """bench.py's variants must compute the same loss: frozen weights in bf16 (within bf16 rounding) and
    eager or sdpa attention (within float rounding). Target-only logits: see the full-logits test above."""
    import dataclasses

    from main import build_model

    def loss_of(cfg, dtype):
        model = build_model(cfg, torch.device("cpu"), dtype)
        batch = image_batch(model, num_samples_with_images=3)
        with torch.no_grad(), autocast(torch.device("cpu"), dtype):
            return model(batch["input_ids"], batch["labels"], batch["pixels"]).item()

    torch.manual_seed(0)
    eager = loss_of(dataclasses.replace(tiny_config, attn_implementation="eager"), torch.float32)
    torch.manual_seed(0)
    sdpa = loss_of(dataclasses.replace(tiny_config, attn_implementation="sdpa"), torch.float32)
    torch.manual_seed(0)
    bf16 = loss_of(tiny_config, torch.bfloat16)
    assert sdpa == pytest.approx(eager, rel=1e-5)
    assert bf16 == pytest.approx(eager, rel=2e-2) and bf16 != eager
