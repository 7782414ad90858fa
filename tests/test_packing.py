"""Packed batches: whole conversations end to end in rows, position ids restarting at each one, no attention
across them. They train exactly like padded batches of the same conversations, in one process or several,
and resume exactly."""

import dataclasses
import json
import os
from collections import Counter

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward as sdpa

from data import collate, model_positions, pack_rows, pack_step, packed_batch
from main import build_model
from helpers import (CPU, assert_same_updates, checkpoint_weights, conversations, gradient, initial_weights, run,
                     straight_and_resumed, torchrun)


def token_losses(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of every next-token prediction through the model's own forward (a packed batch's mask
    built from its position ids, a padded one's with none), (rows, width - 1); 0 where the label is IGNORE."""
    positions = model_positions(batch["input_ids"], batch["labels"], None)["target_positions"]
    losses = model(batch["input_ids"], batch["labels"], batch["pixels"], batch.get("position_ids"),
                   target_positions=positions, reduction="none")  # (num_targets,)
    rows, width = batch["input_ids"].shape
    return torch.zeros(rows * width).index_copy(0, positions, losses).view(rows, width)[:, :-1]


def packed_spans(rows: list[list[int]], lengths: list[int]) -> dict:
    """Where each sample lies in a packed batch: index -> (row, first column)."""
    spans = {}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            spans[i] = (r, start)
            start += lengths[i]
    return spans


def test_packed_and_padded_batches_give_the_same_token_losses_and_gradient(finetune_config):
    model = build_model(finetune_config, CPU, torch.float32)
    samples = conversations(finetune_config, model, 12)
    lengths = [len(s["input_ids"]) for s in samples]
    pad = model.processor.tokenizer.pad_token_id
    padded = collate(samples, pad)
    rows = pack_rows(lengths, finetune_config.max_length)
    packed = packed_batch([[samples[i] for i in row] for row in rows], pad)
    assert len(rows) < len(samples) and any(len(row) > 1 for row in rows)  # really packed
    with torch.no_grad():
        padded_losses, packed_losses = token_losses(model, padded), token_losses(model, packed)
    for i, (r, start) in packed_spans(rows, lengths).items():
        # position t predicts token t+1: sample i's predictions are columns start .. start + n - 2
        torch.testing.assert_close(packed_losses[r, start:start + lengths[i] - 1],
                                   padded_losses[i, :lengths[i] - 1], rtol=1e-4, atol=1e-5)
    # the same gradients, projector and language model, whether padded in two micro-batches or packed in one
    padded_gradient = gradient(model, [collate(samples[:6], pad), collate(samples[6:], pad)])
    packed_gradient = gradient(model, pack_step(samples, finetune_config.max_length,
                                                 2 * finetune_config.max_length, pad))
    # float noise only: torch 2.11 rounds a few of 3.2M near-zero entries 6e-6 apart
    torch.testing.assert_close(packed_gradient, padded_gradient, rtol=1e-4, atol=1e-5)
    # rows filled only up to the median length: the longer half alone in rows, micro-batches of other widths
    short_rows = pack_step(samples, finetune_config.max_length, 2 * finetune_config.max_length, pad,
                           fill_length=sorted(lengths)[len(lengths) // 2])
    assert len({b["input_ids"].shape[1] for b in short_rows}) > 1
    torch.testing.assert_close(gradient(model, short_rows), padded_gradient, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa", "sdpa_varlen"])
def test_changing_one_packed_conversation_leaves_its_neighbours_losses_alone(finetune_config, attention):
    model = build_model(dataclasses.replace(finetune_config, attn_implementation=attention), CPU, torch.float32)
    first, middle, last, other = conversations(finetune_config, model, 12)[8:12]
    pad = model.processor.tokenizer.pad_token_id
    with torch.no_grad():
        before = token_losses(model, packed_batch([[first, middle, last]], pad))[0]
        after = token_losses(model, packed_batch([[first, other, last]], pad))[0]
        # the same rows with one position count running through: plain causal attention, no isolation
        leaky = packed_batch([[first, other, last]], pad)
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
        leaked = token_losses(model, leaky)[0]
    a, m = len(first["input_ids"]), len(middle["input_ids"])
    n = len(other["input_ids"])
    # float noise only: the conversation after sits elsewhere in the row, and sdpa's kernel rounds by position
    # (torch 2.11: 1.9e-6 on a loss of 19); a leak moves it by more than 1e-3
    torch.testing.assert_close(after[:a - 1], before[:a - 1], rtol=1e-6, atol=1e-6)  # the conversation before
    torch.testing.assert_close(after[a + n:], before[a + m:], rtol=1e-6, atol=1e-6)  # the conversation after
    assert (leaked[a + n:] - before[a + m:]).abs().max() > 1e-3  # the test can tell attention leaking


def test_sdpa_varlen_attends_within_each_conversation_alone_and_matches_eager(finetune_config, monkeypatch):
    eager = build_model(dataclasses.replace(finetune_config, packing=False), CPU, torch.float32)
    varlen = build_model(dataclasses.replace(finetune_config, packing=True), CPU, torch.float32)
    # attn_implementation "auto" on a CPU: eager, or sdpa_varlen with packing
    assert (eager.lm.config._attn_implementation, varlen.lm.config._attn_implementation) == ("eager", "sdpa_varlen")
    samples = conversations(finetune_config, eager, 12)
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack_rows(lengths, finetune_config.max_length)
    packed = packed_batch([[samples[i] for i in row] for row in rows], eager.processor.tokenizer.pad_token_id)
    attended = []  # the length of each sdpa call's sequence
    monkeypatch.setattr("attention.sdpa_attention_forward", lambda module, query, *args, **kwargs: (
        attended.append(query.shape[2]) or sdpa(module, query, *args, **kwargs)))
    with torch.no_grad():
        torch.testing.assert_close(token_losses(varlen, packed), token_losses(eager, packed), rtol=1e-4, atol=1e-5)
    # in every layer, one call per conversation and one for the padding that ends a shorter row
    width = packed["input_ids"].shape[1]
    calls = [n for row in rows for n in [lengths[i] for i in row] + [width - sum(lengths[i] for i in row)] if n]
    assert len(rows) > 1 and attended == calls * varlen.lm.config.num_hidden_layers


def test_pack_step_places_every_sample_once_within_the_budget(finetune_config):
    samples = [{"input_ids": [7] * n, "labels": [7] * n, "pixels": None} for n in (90, 20, 128, 60, 5, 70, 40)]
    samples.insert(3, {"skipped": "image missing"})
    batches = pack_step(samples, row_length=128, max_tokens_per_batch=256, pad_token_id=0)
    assert [b["skipped"] for b in batches] == [{"image missing": 1}] + [{}] * (len(batches) - 1)
    assert sum(b["num_samples"] for b in batches) == 7 and sum(b["num_tokens"] for b in batches) == 413
    assert all(b["input_ids"].numel() <= 256 and b["input_ids"].shape[1] <= 128 for b in batches)
    real_share = 413 / sum(b["input_ids"].numel() for b in batches)
    assert real_share > 0.95 and len(batches) == 3  # rows of 128 | 115, 110 | 60: none padded by a third
    again = pack_step(samples, row_length=128, max_tokens_per_batch=256, pad_token_id=0)
    assert all(torch.equal(a["position_ids"], b["position_ids"]) for a, b in zip(batches, again))


def test_pack_step_fills_rows_up_to_fill_length_and_gives_longer_samples_a_row_each():
    lengths = (90, 20, 128, 60, 5, 70, 40, 66)
    samples = [{"input_ids": [n] * n, "labels": [n] * n, "pixels": None} for n in lengths]
    batches = pack_step(samples, row_length=128, max_tokens_per_batch=256, pad_token_id=0, fill_length=64)
    rows = [[n for n in row.tolist() if n] for b in batches for row in b["input_ids"]]  # a row's tokens
    samples_in_rows = [sorted(Counter(row).items()) for row in rows]  # (length, its tokens) per sample
    assert sorted(n for row in samples_in_rows for n, count in row if count == n) == sorted(lengths)  # all, once
    assert all(sum(n for n, _ in row) <= 64 or len(row) == 1 for row in samples_in_rows)
    assert sorted(n for row in samples_in_rows if len(row) == 1 for n, _ in row if n > 64) == [66, 70, 90, 128]
    # widest rows first; a micro-batch ends at the budget or where rows get narrower than 90% of its width:
    # 128 | 90 | 70, 66 | 60, 60 (40 + 20) | 5
    assert [tuple(b["input_ids"].shape) for b in batches] == [(1, 128), (1, 90), (2, 70), (2, 60), (1, 5)]


def test_pack_step_with_every_sample_skipped_gives_one_empty_batch_that_counts_them():
    batches = pack_step([{"skipped": "too long"}] * 2, row_length=64, max_tokens_per_batch=64, pad_token_id=0)
    assert len(batches) == 1 and batches[0]["input_ids"].numel() == 0
    assert batches[0]["skipped"] == {"too long": 2} and batches[0]["num_samples"] == 0


def test_a_budget_smaller_than_max_length_is_refused():
    with pytest.raises(ValueError, match="max_tokens_per_batch=100 must be at least max_length=128"):
        pack_step([], row_length=128, max_tokens_per_batch=100, pad_token_id=0)


@pytest.fixture
def packed_config(finetune_config, tmp_path):
    """Stage 2, packed: 8 conversations per step in rows of 128 tokens, one row per micro-batch, so a step
    takes several micro-batches (how many depends on the lengths); 4 validation conversations."""
    val = json.load(open(finetune_config.val_data_path))[:4]
    (tmp_path / "val.json").write_text(json.dumps(val))
    return dataclasses.replace(finetune_config, packing=True, max_tokens_per_batch=128, grad_accum_steps=2,
                               max_steps=2, eval_every=2, save_every=2, sample_every=0,
                               val_data_path=str(tmp_path / "val.json"))


@pytest.mark.slow
def test_packed_training_updates_the_weights_like_padded_training(packed_config):
    packed = run(dataclasses.replace(packed_config, run_name="packed"))
    padded = run(dataclasses.replace(packed_config, run_name="padded", packing=False))
    initial = {**initial_weights(packed_config, "projector"), **initial_weights(packed_config, "lm")}
    assert_same_updates(initial, checkpoint_weights(packed), checkpoint_weights(padded))
    logged = {run_dir: [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
              for run_dir in (packed, padded)}
    for key in ("train/loss", "val/loss"):
        assert [m[key] for m in logged[packed] if key in m] == pytest.approx(
            [m[key] for m in logged[padded] if key in m], rel=1e-4), key


@pytest.mark.slow
def test_packed_resume_with_data_loader_workers_is_exact(packed_config):
    cfg = dataclasses.replace(packed_config, num_workers=2, lr_decay_steps=2)
    straight, resumed = straight_and_resumed(cfg, first_steps=1)
    a, b = checkpoint_weights(straight), checkpoint_weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_two_processes_packing_their_own_shares_train_like_one(packed_config):
    """Each process packs its own 4 conversations of a step; in the second step one process needs 3
    micro-batches and the other 2: the one that finishes first waits in the gradient all-reduce, not forever."""
    one = run(dataclasses.replace(packed_config, run_name="one", batch_size=4))
    two = torchrun(dataclasses.replace(packed_config, run_name="two", batch_size=2), processes=2)
    initial = {**initial_weights(packed_config, "projector"), **initial_weights(packed_config, "lm")}
    assert_same_updates(initial, checkpoint_weights(one), checkpoint_weights(two))
