"""torchrun: two CPU processes (gloo, DistributedDataParallel) train like one process with the same global
batch, their run resumes in one process, and they survive a process with nothing to train on."""

import dataclasses
import json
import os

import pytest

from helpers import assert_same_updates, checkpoint_weights, initial_weights, run, torchrun


@pytest.mark.slow
def test_a_process_whose_samples_were_all_skipped_does_not_hang_the_others(tiny_config, tmp_path):
    """Batch 1 per process and two entries whose image is missing: in some steps a process has nothing left
    to train on and runs an idle forward and backward instead, so the all-reduce completes."""
    entries = json.load(open(tiny_config.data_path))[:4]
    entries += [dict(entries[0], id="gone1", image="gone1.jpg"), dict(entries[1], id="gone2", image="gone2.jpg")]
    (tmp_path / "holes.json").write_text(json.dumps(entries))
    cfg = dataclasses.replace(tiny_config, data_path=str(tmp_path / "holes.json"), max_steps=3, eval_every=3,
                              save_every=3, sample_every=0)
    one = run(dataclasses.replace(cfg, run_name="one", batch_size=2))
    two = torchrun(dataclasses.replace(cfg, run_name="two", batch_size=1), processes=2)
    assert_same_updates(initial_weights(cfg), checkpoint_weights(one), checkpoint_weights(two))
    logged = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
    assert logged[-2]["data/skipped image missing"] == 2  # summed over the two processes


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch_and_their_run_resumes_in_one(tiny_config):
    cfg = dataclasses.replace(tiny_config, max_steps=4, lr_decay_steps=4, eval_every=2, save_every=4,
                              sample_every=0, batch_size=4)
    straight = run(dataclasses.replace(cfg, run_name="straight"))
    halves = torchrun(dataclasses.replace(cfg, run_name="halves", batch_size=2, max_steps=2), processes=2)
    logged = {run: [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in (straight, halves)}
    assert len(logged[halves]) == 3  # 2 train lines + 1 val line: one process logged
    # the first step starts from the same weights: same loss and the same gradient, not N times it
    for key in ("train/loss", "train/grad_norm"):
        assert logged[halves][0][key] == pytest.approx(logged[straight][0][key], rel=1e-4), key
    assert logged[halves][2]["val/loss"] == pytest.approx(logged[straight][2]["val/loss"], rel=1e-3)
    run(dataclasses.replace(cfg, run_name="halves", resume=halves))
    assert_same_updates(initial_weights(cfg), checkpoint_weights(straight), checkpoint_weights(halves))
