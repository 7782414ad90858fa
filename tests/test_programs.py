"""The programs as a new user meets them, through their command lines: --help answers before torch loads, a bad
path or setting is one line and exit status 2, a typo that half-matches two flags is refused, a run folder that
holds a checkpoint is found before anything loads (the demo takes the next free one), and saved weights are
readable by others as the umask allows."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from helpers import CPU, ROOT

import demo
import generate
import main
from main import build_model

PROGRAMS = ["main.py", "generate.py", "serve.py", "eval.py", "export.py", "demo.py", "bench.py"]


def without_torch(folder) -> dict:
    """An environment whose Python processes cannot import torch (nor transformers, which imports it)."""
    (folder / "sitecustomize.py").write_text("import sys\nsys.modules.update(torch=None, transformers=None)\n")
    return dict(os.environ, PYTHONPATH=str(folder))


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_answers_before_torch_loads(program, tmp_path):
    result = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, env=without_torch(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("program, arguments, message", [
    ("main.py", ["--data_path", "nowhere.json", "--image_root", ""], "data file not found or not readable: nowhere.json"),
    ("generate.py", ["--checkpoint", "nowhere", "--image", "."], "--checkpoint 'nowhere': no TinyVLM in nowhere"),
    ("serve.py", ["--checkpoint", "nowhere"], "--checkpoint 'nowhere': no TinyVLM in nowhere"),
    ("eval.py", ["--checkpoint", "nowhere"], "--checkpoint 'nowhere': no TinyVLM in nowhere"),
    ("export.py", ["nowhere", "exported"], "checkpoint 'nowhere': no TinyVLM in nowhere"),
    ("demo.py", ["--stage", "finetune", "--init_from", "nowhere"], "the stage-2 demo starts from the stage-1 demo's"),
    ("bench.py", ["--parts", "train,nothing"], "--parts 'train,nothing': unknown nothing"),
])
def test_a_bad_path_or_setting_is_one_line_and_exit_status_2(program, arguments, message, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, program), *arguments], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if "Warning" not in line and line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"{program}: error: ") and message in lines[0], lines[0]


def test_a_typo_that_half_matches_two_flags_is_refused(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--max_step", "10"])  # --max_steps, not an abbreviation of it
    assert "unrecognized arguments: --max_step" in capsys.readouterr().err


def test_a_run_folder_holding_a_checkpoint_is_refused_before_anything_loads(tiny_config, monkeypatch, capsys):
    folder = os.path.join(tiny_config.out_dir, tiny_config.run_name, "checkpoint")
    os.makedirs(folder)
    open(os.path.join(folder, "training_state.pt"), "w").close()
    monkeypatch.setattr(main, "build_model", lambda *args: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit) as stopped:
        main.main(main.command_line(tiny_config))
    error = capsys.readouterr().err.strip().splitlines()
    run_dir = os.path.join(tiny_config.out_dir, tiny_config.run_name)
    assert stopped.value.code == 2 and len(error) == 1
    assert f"already holds a checkpoint: pass --resume {run_dir} to continue it, or another --run_name" in error[0]


def test_a_second_demo_goes_to_the_next_free_folder_and_stage_2_with_lora_to_its_own(tiny_model, tmp_path, capsys):
    assert demo.config([f"--out_dir={tmp_path}"]).run_name == "demo"
    for name in ("demo", "demo-2"):
        os.makedirs(tmp_path / name / "checkpoint")
        (tmp_path / name / "checkpoint" / "training_state.pt").write_bytes(b"")
    assert demo.config([f"--out_dir={tmp_path}"]).run_name == "demo-3"
    assert f"{tmp_path}/demo holds an earlier demo: this one goes to {tmp_path}/demo-3" in capsys.readouterr().out
    assert demo.config([f"--out_dir={tmp_path}", "--run_name", "mine"]).run_name == "mine"  # as asked
    tiny_model.save_pretrained(str(tmp_path / "stage1"))
    finetune = ["--stage", "finetune", f"--init_from={tmp_path}/stage1", f"--out_dir={tmp_path}"]
    assert demo.config(finetune).run_name == "demo-finetune"
    assert demo.config(finetune + ["--lora_rank", "16"]).run_name == "demo-finetune-lora"


def test_saved_weights_are_readable_by_others_as_the_umask_allows(tiny_config, tmp_path):
    model = build_model(dataclasses.replace(tiny_config, stage="finetune", init_from=""), CPU, torch.float32)
    previous = os.umask(0o022)
    try:
        model.save_pretrained(str(tmp_path / "model"), save_language_model=True)
        os.umask(0o077)
        model.save_pretrained(str(tmp_path / "private"))
    finally:
        os.umask(previous)
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "model") for name in names]
    assert any(path.endswith("projector.safetensors") for path in files)
    assert any(path.endswith("language_model/model.safetensors") for path in files)
    assert {oct(os.stat(path).st_mode & 0o777) for path in files} == {oct(0o644)}
    assert oct(os.stat(tmp_path / "private" / "projector.safetensors").st_mode & 0o777) == oct(0o600)


def test_a_missing_image_is_reported_once_before_the_model_loads(tiny_model, tmp_path, capsys, monkeypatch):
    tiny_model.save_pretrained(str(tmp_path / "model"))
    monkeypatch.setattr(generate, "load_for_inference", lambda *args: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit) as stopped:
        generate.main(["--checkpoint", str(tmp_path / "model"), "--image", str(tmp_path / "a.jpg")])
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [f"generate.py: error: --image '{tmp_path / 'a.jpg'}': not found"]
