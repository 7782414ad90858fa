"""torchrun: two CPU processes (gloo, DistributedDataParallel) train like one process with the same global
batch, survive a process with nothing to train on, and a run resumes with another number of processes."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from main import build_model, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(cfg, processes: int) -> str:
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v != ""]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", "main.py", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return os.path.join(cfg.out_dir, cfg.run_name)


def single_process(cfg) -> str:
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    return train(cfg, model, torch.device("cpu"), torch.float32)


def projector(run_dir: str) -> dict:
    return load_file(os.path.join(run_dir, "checkpoint", "projector.safetensors"))


def initial_weights(cfg, part: str = "projector") -> dict:
    return getattr(build_model(cfg, torch.device("cpu"), torch.float32), part).state_dict()


def assert_same_updates(initial: dict, a: dict, b: dict) -> None:
    """Two runs moved the weights the same way, to 1% of how far they moved. Bit equality is not to be had:
    one batch of 4 and two of 2 pad to different lengths, and Adam magnifies the rounding differences of
    near-zero gradients."""
    for name in a:
        update, difference = (a[name] - initial[name]).norm(), (a[name] - b[name]).norm()
        assert update > 0 and difference < 0.01 * update, (name, difference / update)


def test_two_processes_match_one_with_the_same_global_batch(tiny_config):
    cfg = dataclasses.replace(tiny_config, max_steps=3, eval_every=3, save_every=3, sample_every=0)
    one = single_process(dataclasses.replace(cfg, run_name="one", batch_size=4))
    two = torchrun(dataclasses.replace(cfg, run_name="two", batch_size=2), processes=2)
    assert_same_updates(initial_weights(cfg), projector(one), projector(two))
    logged = {run: [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in (one, two)}
    assert len(logged[two]) == 4  # 3 train lines + 1 val line: one process logged
    # the first step starts from the same weights: same loss and the same gradient, not N times it
    for key in ("train/loss", "train/grad_norm"):
        assert logged[two][0][key] == pytest.approx(logged[one][0][key], rel=1e-4), key
    assert logged[two][-1]["val/loss"] == pytest.approx(logged[one][-1]["val/loss"], rel=1e-3)


def test_a_process_whose_samples_were_all_skipped_does_not_hang_the_others(tiny_config, tmp_path):
    """Batch 1 per process and two entries whose image is missing: in some steps a process has nothing left
    to train on and runs an idle forward and backward instead, so the all-reduce completes."""
    entries = json.load(open(tiny_config.data_path))[:4]
    entries += [dict(entries[0], id="gone1", image="gone1.jpg"), dict(entries[1], id="gone2", image="gone2.jpg")]
    (tmp_path / "holes.json").write_text(json.dumps(entries))
    cfg = dataclasses.replace(tiny_config, data_path=str(tmp_path / "holes.json"), max_steps=3, eval_every=3,
                              save_every=3, sample_every=0)
    one = single_process(dataclasses.replace(cfg, run_name="one", batch_size=2))
    two = torchrun(dataclasses.replace(cfg, run_name="two", batch_size=1), processes=2)
    assert_same_updates(initial_weights(cfg), projector(one), projector(two))
    logged = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
    assert logged[-2]["data/skipped image missing"] == 2  # summed over the two processes


def test_a_two_process_run_resumes_in_one_process(tiny_config):
    cfg = dataclasses.replace(tiny_config, max_steps=4, lr_decay_steps=4, eval_every=4, save_every=4,
                              sample_every=0, batch_size=4)
    straight = single_process(dataclasses.replace(cfg, run_name="straight"))
    halves = torchrun(dataclasses.replace(cfg, run_name="halves", batch_size=2, max_steps=2), processes=2)
    single_process(dataclasses.replace(cfg, run_name="halves", resume=halves))
    assert_same_updates(initial_weights(cfg), projector(straight), projector(halves))
