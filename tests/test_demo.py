"""The offline demo, shortened: it trains with main.py's loop and reports what generate.py answers."""

import json
import os

import generate
import main
from demo import DEMO_CONFIG, PROMPT


def test_demo_reports_the_captions_generate_py_gives_for_its_checkpoint(tmp_path, smollm2_dir):
    main.main(["--demo", "--max_steps=6", "--eval_every=6", "--save_every=6", "--sample_every=0",
               "--wandb_mode=disabled", f"--out_dir={tmp_path}"])
    run_dir = tmp_path / "demo"
    reported = json.loads((run_dir / "heldout_answers.json").read_text())
    assert len(reported) == 72 and all(r["answer"] for r in reported)
    output = tmp_path / "predictions.json"
    status = generate.main(["--checkpoint", str(run_dir), "--data", DEMO_CONFIG["val_data_path"],
                            "--image_root", DEMO_CONFIG["image_root"], "--prompt", PROMPT, "--output", str(output),
                            "--batch_size", "24", "--max_new_tokens", "24", "--dtype", "bfloat16"])
    predictions = json.loads(output.read_text())
    assert status == 0
    assert [p["answer"] for p in predictions] == [r["answer"] for r in reported]
    assert os.path.isfile(run_dir / "loss.png")
