"""main.py checks every setting before anything loads, reports all problems at once (one line each, exit
status 2), refuses to train on nothing (exit status 1, the skip counts and what to change), and answers --help
at once with a line and a default for every flag."""

import dataclasses
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
from helpers import ROOT, metrics

import main
from main import VLMConfig, command_line


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if main.py gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")
    monkeypatch.setattr(main, "build_model", refuse)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        main.main(argv)
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--stage", "foo"], "--stage 'foo': must be one of pretrain, finetune"),
    (["--batch_size", "0"], "--batch_size 0: must be 1 or more, or -1"),
    (["--dtype", "float64"], "--dtype 'float64': must be one of auto, float32, bfloat16, float16"),
    (["--vision_model", "/nonexistent"], "--vision_model '/nonexistent': not found"),
    (["--max_length", "10"], "--max_length 10: leaves no room for the 4 image tokens and a prompt"),
    (["--pixel_shuffle_factor", "3"], "--pixel_shuffle_factor 3 does not divide the encoder's 4 x 4 patches"),
    (["--min_lr_ratio", "2"], "--min_lr_ratio 2.0: must be between 0 and 1"),
    (["--lr", "0"], "--lr 0.0: must be more than 0"),
    (["--device", "gpu"], "--device 'gpu': must be auto, cpu, cuda, cuda:N or mps"),
    (["--compile", "turbo"], "--compile 'turbo': compile must be auto, true, false or a torch.compile backend"),
    (["--wandb_mode", "quiet"], "--wandb_mode 'quiet': must be one of online, offline, disabled"),
    (["--stage", "finetune"], "--stage finetune: needs --init_from"),
    (["--packing", "true", "--max_tokens_per_batch", "64"], "--max_tokens_per_batch 64: must hold one row"),
    (["--val_size", "0", "--val_data_path", ""], "--val_size 0: must be 1 or more, or pass --val_data_path"),
    (["--init_from", "runs/none"], "--init_from: no TinyVLM in runs/none"),
    (["--data_path", "missing.json"], "data file not found or not readable: missing.json"),
])
def test_a_bad_setting_is_one_line_naming_it_and_exit_status_2_before_anything_loads(
        tiny_config, flags, message, nothing_loads, capsys):
    status, err = run_main(command_line(tiny_config) + flags, capsys)
    assert status == 2 and message in err, err
    assert "Traceback" not in err and all(line.startswith("main.py: error: ") for line in err.splitlines()), err


def test_every_problem_is_reported_at_once(tiny_config, nothing_loads, capsys):
    status, err = run_main(command_line(tiny_config) + ["--batch_size", "0", "--stage", "foo", "--lr", "-1"], capsys)
    assert status == 2 and len(err.splitlines()) == 3, err


def test_a_local_model_folder_without_a_config_and_a_resume_without_a_checkpoint_say_so(
        tiny_config, tmp_path, nothing_loads, capsys):
    (tmp_path / "empty").mkdir()
    status, err = run_main(command_line(tiny_config) + ["--language_model", str(tmp_path / "empty")], capsys)
    assert status == 2 and "no config.json in this folder" in err, err
    status, err = run_main(command_line(tiny_config) + ["--resume", str(tmp_path / "empty")], capsys)
    assert status == 2 and f"no checkpoint to resume in {tmp_path / 'empty'}" in err, err


def test_an_image_root_that_is_a_file_but_not_a_zip_is_refused(tiny_config, shapes_data, nothing_loads, capsys):
    status, err = run_main(command_line(tiny_config) + ["--image_root", f"{shapes_data}/chat.json"], capsys)
    assert status == 2 and "a file that is not a .zip" in err, err


@pytest.mark.slow
def test_data_found_bad_while_loading_names_the_file_and_exits_1(tiny_config, tmp_path, capsys):
    (tmp_path / "images.zip").write_bytes(b"not a zip at all")
    status, err = run_main(command_line(tiny_config) + ["--image_root", str(tmp_path / "images.zip")], capsys)
    assert status == 1 and f"{tmp_path / 'images.zip'} (--image_root): not a readable zip file" in err, err
    (tmp_path / "chat.json").write_text("{this is not json")
    status, err = run_main(command_line(tiny_config) + ["--data_path", str(tmp_path / "chat.json")], capsys)
    assert status == 1 and f"cannot read the data file {tmp_path / 'chat.json'}" in err, err
    (tmp_path / "data.parquet").write_bytes(b"PAR1 but nothing else")
    status, err = run_main(command_line(tiny_config) + ["--data_path", str(tmp_path / "data.parquet"),
                                                        "--val_data_path", ""], capsys)
    assert status == 1 and "(--data_path): not readable as parquet" in err, err
    assert "Traceback" not in err


def test_a_run_whose_every_sample_is_too_long_refuses_and_says_what_to_change(tiny_config, capsys):
    # room for the 4 image tokens and the turn markers, not for a caption as well
    status, err = run_main(command_line(tiny_config) + ["--max_length", "22"], capsys)
    assert status == 1 and "nothing to train on" in err and "'too long'" in err, err
    assert "raise --max_length (now 22)" in err
    assert not os.path.exists(os.path.join(tiny_config.out_dir, tiny_config.run_name, "checkpoint"))


def test_steps_whose_images_are_all_unreadable_stop_the_run_instead_of_training_on_nothing(
        tiny_config, shapes_data, tmp_path, capsys):
    with zipfile.ZipFile(f"{shapes_data}/images.zip") as archive, zipfile.ZipFile(tmp_path / "broken.zip", "w") as out:
        for name in archive.namelist():
            out.writestr(name, b"\xff\xd8 not a jpeg")  # the names are there, the images are not
    cfg = dataclasses.replace(tiny_config, image_root=str(tmp_path / "broken.zip"), log_every=2, max_steps=6,
                              eval_every=100, save_every=100, sample_every=0)
    status, err = run_main(command_line(cfg), capsys)
    assert status == 1 and "the steps up to step 2 held no sample to train on" in err, err
    assert "'image unreadable'" in err and "check --image_root" in err
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    logged = metrics(run_dir) if os.path.exists(f"{run_dir}/metrics.jsonl") else []
    assert not any("train/loss" in m for m in logged)  # no loss of 0 logged


def test_a_small_set_of_ones_own_gets_a_held_out_split_that_fits(tiny_config, shapes_data, tmp_path, capsys):
    entries = json.load(open(f"{shapes_data}/chat.json"))[:20]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    cfg = dataclasses.replace(tiny_config, data_path=str(tmp_path / "mine.jsonl"), val_data_path="",
                              val_size=VLMConfig.val_size, max_steps=2)
    main.main(command_line(cfg))
    assert "20 entries, fewer than val_size 1024: 2 held out for validation" in capsys.readouterr().out
    status, err = run_main(command_line(dataclasses.replace(cfg, val_size=30, run_name="asked")), capsys)
    assert status == 1 and "--val_size 30: " in err and "has 20 usable entries" in err, err


@pytest.mark.slow
def test_automatic_micro_batches_train_on_samples(tiny_config, capsys):
    main.main(command_line(dataclasses.replace(tiny_config, batch_size=-1, grad_accum_steps=-1, max_steps=1)))
    logged = [m for m in metrics(os.path.join(tiny_config.out_dir, tiny_config.run_name)) if "train/loss" in m]
    assert logged and logged[0]["train/loss"] > 0 and logged[0]["train/samples_per_s"] > 0


def option_helps(text: str) -> dict[str, str]:
    """--help's options and their help text (wrapped lines joined)."""
    helps, flag = {}, None
    for line in text.split("options:")[1].splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            helps[flag] = " ".join(line.split()[2:])
        elif flag and line.startswith("      "):
            helps[flag] += " " + line.strip()
    return helps


@pytest.mark.parametrize("program", ["generate", "serve", "eval"])
def test_the_other_programs_answer_help_before_torch_loads(program):
    loaded = subprocess.run([sys.executable, "-c", f"import json, runpy, sys; sys.argv = ['{program}.py', '--help']\n"
                             f"try:\n    runpy.run_path('{program}.py', run_name='__main__')\n"
                             "except SystemExit:\n    print(json.dumps(sorted(sys.modules)))"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.splitlines()[-1]
    assert "torch" not in json.loads(loaded) and "gradio" not in json.loads(loaded)


@pytest.mark.parametrize("program", ["generate", "serve", "eval"])
def test_every_option_of_the_other_programs_has_help_and_a_default(program):
    result = subprocess.run([sys.executable, f"{program}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, COLUMNS="200"))  # serve.py's help needs no gradio
    assert result.returncode == 0, result.stderr
    helps = option_helps(result.stdout)
    assert "--checkpoint" in helps and "--dtype" in helps
    assert all("(default: " in text and len(text.split("(default: ")[0]) > 5 for text in helps.values()), helps


def test_the_programs_check_their_shared_settings_before_loading(capsys, tmp_path):
    import generate

    with pytest.raises(SystemExit) as stopped:
        generate.main(["--checkpoint", str(tmp_path), "--image", "a.jpg", "--dtype", "float64", "--device", "tpu"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 4, err
    assert all(line.startswith("generate.py: error: ") for line in err.splitlines())
    assert "--dtype 'float64'" in err and "--device 'tpu'" in err and f"--checkpoint '{tmp_path}': no TinyVLM" in err
    assert "--image 'a.jpg': not found" in err


def test_help_answers_at_once_with_a_line_and_the_default_of_every_flag():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, COLUMNS="200"))
    seconds = time.perf_counter() - start
    assert result.returncode == 0
    helps = option_helps(result.stdout)
    assert set(helps) == {f"--{f.name}" for f in dataclasses.fields(VLMConfig)}
    assert all(len(text.split("(default: ")[0]) > 10 and "(default: " in text for text in helps.values()), helps
    loaded = subprocess.run([sys.executable, "-c", "import json, runpy, sys; sys.argv = ['main.py', '--help']\n"
                             "try:\n    runpy.run_path('main.py', run_name='__main__')\n"
                             "except SystemExit:\n    print(json.dumps(sorted(sys.modules)))"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.splitlines()[-1]
    assert "torch" not in json.loads(loaded) and "transformers" not in json.loads(loaded)
    assert seconds < 30  # a bound that only a hang would break; the point is that torch was not imported
