"""Vision encoders of several families through transformers' auto classes (tiny and random): each one's
feature layer, without its class token and registers, feeds the projector, its images are prepared as its
preprocessor config says, and a model built on it trains and answers."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import CPU, losses, run
from PIL import Image
from transformers import AutoModel

import synthetic
from main import build_model


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> dict:
    folder = str(tmp_path_factory.mktemp("encoders"))
    return {family: synthetic.family_vision_model(folder, family) for family in synthetic.ENCODER_FAMILIES}


@pytest.mark.parametrize("family, prefix", [("clip", 1), ("dinov2", 5)])
def test_the_projector_gets_the_feature_layers_patches_without_the_class_token_and_registers(
        family, prefix, encoders, tiny_config):
    cfg = dataclasses.replace(tiny_config, vision_model=encoders[family], vision_feature_layer=-2)
    model = build_model(cfg, CPU, torch.float32)
    assert model.vision.prefix_tokens == prefix and model.num_image_tokens == 4 and len(model.vision.layers) == 1
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    reference = AutoModel.from_pretrained(encoders[family])  # all its layers, its final norm
    normalised = pixels.float() * model.vision.scale + model.vision.shift
    expected = reference(pixel_values=normalised, output_hidden_states=True).hidden_states[-2][:, prefix:]
    torch.testing.assert_close(model.vision(pixels), expected)  # (2, 16, 32): the 4 x 4 patches


def test_an_encoder_that_resizes_the_shorter_side_crops_the_centre_as_its_own_processor_does(encoders, tiny_config):
    from transformers import CLIPImageProcessor

    model = build_model(dataclasses.replace(tiny_config, vision_model=encoders["clip"]), CPU, torch.float32)
    y, x = np.mgrid[0:40, 0:64]
    image = Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8))  # smooth, 64 x 40
    ours = model.processor.image_to_pixels(image).float()
    theirs = CLIPImageProcessor.from_pretrained(encoders["clip"])(image, do_normalize=False, do_rescale=False)
    theirs = torch.tensor(np.array(theirs["pixel_values"][0]))
    assert ours.shape == theirs.shape == (3, 32, 32) and (ours - theirs).abs().mean() < 2.0  # bilinear vs bicubic


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_a_model_on_each_encoder_trains_and_answers(family, encoders, tiny_config):
    cfg = dataclasses.replace(tiny_config, vision_model=encoders[family], max_steps=3, eval_every=3, save_every=3)
    run_dir = run(cfg)
    assert len(losses(run_dir)) == 3 and all(np.isfinite(losses(run_dir)))
    model = build_model(dataclasses.replace(cfg, init_from=run_dir), CPU, torch.float32)
    answer = model.generate([Image.new("RGB", (50, 40), "red")], "Describe it.", max_new_tokens=3)
    assert isinstance(answer[0], str)


def test_a_grid_the_pixel_shuffle_cannot_divide_is_refused_with_the_numbers(encoders, tiny_config):
    with pytest.raises(ValueError, match="pixel_shuffle_factor 3 does not divide the encoder's 4 x 4 patches"):
        build_model(dataclasses.replace(tiny_config, vision_model=encoders["dinov2"], pixel_shuffle_factor=3), CPU,
                    torch.float32)


def test_export_refuses_an_encoder_that_aya_vision_would_prepare_differently(encoders, tiny_config, tmp_path):
    import export

    model = build_model(dataclasses.replace(tiny_config, vision_model=encoders["clip"]), CPU, torch.float32)
    with pytest.raises(ValueError, match="SigLIP-family encoders"):
        export.export(model, str(tmp_path / "exported"))
