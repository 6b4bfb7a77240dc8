"""The `keras-sd3` command line: each subcommand on the embedded model, metadata, and bad arguments."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from keras_sd3 import __version__, cli, media
from keras_sd3.models import StableDiffusion3Inpaint, StableDiffusion3TextToImage
from keras_sd3.presets import EMBEDDED


def run_cli(*args):
    return cli.main(list(args))


def error_line(capsys):
    """The one line a failed command prints (and nothing else)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_generate_writes_a_png_with_its_parameters(tmp_path):
    out = str(tmp_path / "circle.png")
    assert run_cli("generate", "a red circle on a blue background", "--steps", "2", "--seed", "3", "-o", out) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3)
    metadata = media.read_metadata(out)
    assert metadata["prompt"] == "a red circle on a blue background" and metadata["seed"] == 3
    assert metadata["steps"] == 2 and metadata["model"] == "sd3_tiny_shapes" and metadata["size"] == [64, 64]
    from keras_sd3.presets import PRESETS

    assert metadata["guidance"] == PRESETS["sd3_tiny_shapes"].guidance_scale  # the preset's default


def test_several_images_use_consecutive_seeds_and_each_can_be_made_alone(tmp_path):
    out = str(tmp_path / "shapes.png")
    assert run_cli("generate", "a green square on a red background", "--steps", "3", "--num-images", "2",
                   "--negative", "blue", "--guidance", "2", "--seed", "5", "-o", out) == 0
    assert sorted(os.listdir(tmp_path)) == ["shapes-1.png", "shapes-2.png"]
    second = media.read_metadata(tmp_path / "shapes-2.png")
    assert second["image_index"] == 1 and second["negative_prompt"] == "blue" and second["guidance"] == 2.0
    assert second["seed"] == 6 and media.read_metadata(tmp_path / "shapes-1.png")["seed"] == 5
    assert Image.open(tmp_path / "shapes-2.png").text["seed"] == "6"  # a readable PNG text chunk
    alone = str(tmp_path / "alone.png")
    assert run_cli("generate", "a green square on a red background", "--steps", "3", "--negative", "blue",
                   "--guidance", "2", "--seed", "6", "-o", alone) == 0
    batched, single = (np.asarray(Image.open(p), int) for p in (tmp_path / "shapes-2.png", alone))
    assert np.abs(batched - single).max() <= 2, "image 2 of a batch differs from its seed made alone"
    assert np.abs(batched - np.asarray(Image.open(tmp_path / "shapes-1.png"), int)).mean() > 1  # seeds differ


@pytest.fixture
def picture(tmp_path):
    y, x = np.mgrid[0:64, 0:64]
    image = np.zeros((64, 64, 3), np.uint8)
    image[...] = (30, 70, 220)
    image[(x - 32) ** 2 + (y - 32) ** 2 < 300] = (220, 30, 30)
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(((x > 32) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return str(tmp_path / "in.png"), str(tmp_path / "mask.png")


def test_img2img_and_inpaint_keep_the_unmasked_pixels(tmp_path, picture):
    image, mask = picture
    out = str(tmp_path / "i2i.png")
    assert run_cli("img2img", "a red square", "--image", image, "--strength", "0.5", "--steps", "2", "-o", out) == 0
    assert media.read_metadata(out)["strength"] == 0.5 and media.read_metadata(out)["task"] == "img2img"
    original = np.asarray(Image.open(image)).astype(int)
    results = {}
    for flag in ("--keep-unmasked", "--no-keep-unmasked", None):
        out = str(tmp_path / f"inpaint{flag}.png")
        extra = [flag] if flag else []
        assert run_cli("inpaint", "a yellow circle", "--image", image, "--mask", mask, "--steps", "2", "--seed", "0", "-o", out,
                       *extra) == 0
        results[flag] = np.asarray(Image.open(out)).astype(int)
    # Mask: x > 32 repaints. Columns 0..28 are more than 4 pixels from it: exactly the input by default.
    np.testing.assert_array_equal(results[None][:, :29], original[:, :29])
    np.testing.assert_array_equal(results["--keep-unmasked"], results[None])
    assert np.abs(results["--no-keep-unmasked"][:, :29] - original[:, :29]).max() > 0  # the VAE round trip
    assert np.abs(results[None][:, 33:] - original[:, 33:]).mean() > 5  # the masked half was repainted
    assert media.read_metadata(out)["strength"] == 0.6 and media.read_metadata(out)["keep_unmasked"] is True


def test_a_mask_of_another_size_is_resized_and_said(tmp_path, picture, capsys):
    image, _ = picture
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(tmp_path / "small_mask.png")
    out = str(tmp_path / "out.png")
    assert run_cli("inpaint", "a red circle", "--image", image, "--mask", str(tmp_path / "small_mask.png"),
                   "--steps", "1", "-o", out) == 0
    assert "the mask is 48 x 32 pixels; resized to the image's 64 x 64" in capsys.readouterr().err


def test_an_all_black_mask_warns_and_gives_back_the_input(tmp_path, picture, capsys):
    image, _ = picture
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    out = str(tmp_path / "out.png")
    assert run_cli("inpaint", "a red circle", "--image", image, "--mask", str(tmp_path / "black.png"), "-o", out) == 0
    assert "keras-sd3: warning: nothing to repaint" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(image)))


def test_words_the_embedded_model_never_saw_are_listed(tmp_path, capsys):
    out = str(tmp_path / "out.png")
    assert run_cli("generate", "a big yellow square in the center with a dog", "--steps", "1", "-o", out) == 0
    assert "it does not know 'center', 'with', 'dog'" in capsys.readouterr().err
    assert run_cli("generate", "a small red circle in the top left on a blue background", "--steps", "1",
                   "-o", out) == 0
    assert "does not know" not in capsys.readouterr().err


@pytest.mark.parametrize("extension", [".jpg", ".webp"])
def test_jpeg_and_webp_outputs_carry_the_parameters(tmp_path, extension):
    out = str(tmp_path / f"out{extension}")
    assert run_cli("generate", "a red circle", "--steps", "1", "--seed", "9", "-o", out) == 0
    with Image.open(out) as image:
        assert image.format == {".jpg": "JPEG", ".webp": "WEBP"}[extension]
    metadata = media.read_metadata(out)
    assert metadata["seed"] == 9 and metadata["prompt"] == "a red circle"


def test_a_copied_embedded_folder_keeps_its_recommended_settings(tmp_path):
    folder = shutil.copytree(os.path.join(EMBEDDED, "sd3_tiny_shapes"), tmp_path / "my_copy")
    out = str(tmp_path / "out.png")
    assert run_cli("generate", "a red circle", "--model", str(folder), "-o", out, "--seed", "1") == 0
    metadata = media.read_metadata(out)
    assert (metadata["steps"], metadata["guidance"]) == (20, 4.0)


def test_missing_output_folders_are_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "x.png"
    assert run_cli("generate", "a blue circle", "--steps", "1", "-o", str(out)) == 0
    assert out.is_file()


@pytest.fixture
def model_never_loads(monkeypatch):
    """Fails the test if a command gets as far as loading weights."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    for task in (StableDiffusion3TextToImage, StableDiffusion3Inpaint):
        monkeypatch.setattr(task, "from_preset", classmethod(fail))


@pytest.mark.parametrize(
    "args, message",
    [
        (["img2img", "x", "--image", "{image}", "--strength", "1.5"], "--strength must be a number in [0, 1], got '1.5'"),
        (["generate", "x", "--size", "50"], "--size 50x50: sd3_tiny_shapes makes images whose height and width are "
                                            "multiples of 8 up to 256"),
        (["generate", "x", "--size", "100000"], "multiples of 8 up to 256"),
        (["generate", "x", "--size", "big"], "--size must be N or HxW in pixels"),
        (["generate", "x", "--steps", "0"], "--steps must be an integer >= 1, got '0'"),
        (["generate", "x", "--steps", "abc"], "--steps must be an integer >= 1, got 'abc'"),
        (["generate", "x", "--seed", "-1"], "--seed must be an integer in [0, 4294967295], got '-1'"),
        (["generate", "x", "--seed", "4294967295", "--num-images", "2"], "--seed + --num-images - 1 must be at most"),
        (["generate", "x", "--guidance", "-2"], "--guidance must be a number >= 0, got '-2'"),
        (["generate", "x", "--guidance", "high"], "--guidance must be a number >= 0, got 'high'"),
        (["generate", "x", "--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
        (["img2img", "x"], "the following arguments are required: --image"),
        (["inpaint", "x", "--image", "{image}", "--mask", "missing.png"], "--mask 'missing.png' does not exist"),
        (["img2img", "x", "--image", "{text}"], "is not a readable image"),
        (["generate", "x", "-o", "out.gif"], "-o/--output must end in .png, .jpg, .jpeg, .webp, got 'out.gif'"),
        (["generate", "x", "-o", "{folder}/made.png"], "is a folder; give a file name"),
        (["generate", "x", "--backend", "numpy"], "--backend: invalid choice: 'numpy'"),
        (["generate", "x", "--model", "{folder}/nothing"], "neither a diffusers folder, a .safetensors file nor a preset"),
        (["img2img", "x", "--image", "{odd}"], "is 50x50 pixels and sd3_tiny_shapes makes images"),
        (["paint", "x"], "invalid choice: 'paint'"),
        (["generate", "x", "--sampler", "ddim"], "--sampler: invalid choice: 'ddim'"),
        (["img2img", "x", "--image", "{image}", "--shift", "0"], "--shift must be a number > 0, got '0'"),
        (["generate", "x", "--mesh", "2y1"], "--mesh: A mesh is 'BxM' with B images at a time"),
        (["walk", "x", "--to", "y", "--kind", "circular"], "--to goes with --kind interpolate"),
        (["walk", "x", "--kind", "interpolate"], "--to goes with --kind interpolate (and it needs --to)"),
        (["walk", "x", "-o", "walk.jpg"], "-o/--output must end in .gif, .mp4, .webm, .mov, .png, got 'walk.jpg'"),
        (["walk", "x", "--frames", "1"], "--frames must be an integer >= 2, got '1'"),
        (["generate", "x", "--quantize", "int3"], "--quantize must be int8 or int4, or PART=MODE pairs"),
        (["walk", "x", "--quantize", "vae=int8"], "PART one of mmdit, clip_l, clip_g, t5"),
        (["generate", "x", "--transformer", "{text}"], "--transformer must be a .gguf or .safetensors file, got"),
        (["walk", "x", "--t5", "{folder}/t5.gguf"], "t5.gguf' does not exist"),
        (["generate", "x", "--vae-tiling", "60"], "--vae-tiling must be a tile size in pixels, a positive multiple of 8"),
        (["walk", "x", "--vae-tiling", "big"], "--vae-tiling must be a tile size in pixels"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_before_loading(args, message, picture, tmp_path, capsys,
                                                           model_never_loads):
    (tmp_path / "text.png").write_text("not a picture")
    Image.new("RGB", (50, 50)).save(tmp_path / "odd.png")
    (tmp_path / "made.png").mkdir()
    names = {"{image}": picture[0], "{text}": str(tmp_path / "text.png"), "{odd}": str(tmp_path / "odd.png"),
             "{folder}": str(tmp_path)}
    for old, new in names.items():
        args = [a.replace(old, new) for a in args]
    try:
        code = run_cli(*args)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    line = error_line(capsys)
    assert line.startswith("keras-sd3: error: ") and message in line
    assert "positive_int" not in line and "Traceback" not in line


def test_ctrl_c_exits_130_with_one_line_and_no_file(tmp_path, capsys, monkeypatch):
    def interrupted(args, size, paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate", interrupted)
    out = tmp_path / "new_folder" / "x.png"
    assert run_cli("generate", "a red circle", "-o", str(out)) == 130
    assert error_line(capsys) == "keras-sd3: interrupted"
    assert os.listdir(tmp_path) == []  # neither the image nor the folder made for it


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        run_cli("--version")
    assert capsys.readouterr().out.strip() == f"keras-sd3 {__version__}"
    with pytest.raises(SystemExit):
        run_cli("img2img", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: image.png)" in text and "(default: 0.8)" in text


def test_console_script_runs_quietly_in_a_fresh_process(tmp_path):
    """tensorflow's C++ start-up log is silenced unless -v is given (and the first-import message is
    there to be silenced: the verbose run shows it)."""
    out = str(tmp_path / "x.png")
    command = [sys.executable, "-m", "keras_sd3.cli", "generate", "a blue triangle", "--steps", "1",
               "--backend", "tensorflow", "-o", out]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert media.read_metadata(out)["backend"] == "tensorflow"
    assert quiet.stderr.replace("\r", "\n").split() == ["[##############################]", "step", "1/1"]
    verbose = subprocess.run(command + ["-v"], capture_output=True, text=True, env=env, timeout=300)
    assert verbose.returncode == 0 and "I0000" in verbose.stderr


def test_control_runs_a_controlnet_on_the_embedded_model(tmp_path, picture, capsys):
    """`keras-sd3 control` with a random diffusers ControlNet shaped for the embedded model; the same call
    with scale 0 gives the plain text-to-image picture (the ControlNet then adds nothing)."""
    from conftest import embedded_controlnet

    embedded_controlnet(tmp_path / "net")
    image, _ = picture
    common = ["a red circle on a blue background", "--steps", "2", "--seed", "4"]
    outputs = {}
    for scale in ("1", "0"):
        outputs[scale] = str(tmp_path / f"control{scale}.png")
        assert run_cli("control", *common, "--controlnet", f"{tmp_path / 'net'}:{scale}", "--control-image", image,
                       "-o", outputs[scale]) == 0
    plain = str(tmp_path / "plain.png")
    assert run_cli("generate", *common, "-o", plain) == 0
    controlled, unscaled, reference = (np.asarray(Image.open(p), int) for p in (outputs["1"], outputs["0"], plain))
    assert np.abs(unscaled - reference).max() <= 2 and np.abs(controlled - reference).mean() > 1
    metadata = media.read_metadata(outputs["1"])
    assert metadata["task"] == "control" and metadata["controlnets"] == [[str(tmp_path / "net"), 1.0]]
    assert run_cli("control", "x", "--controlnet", str(tmp_path / "net"), "--control-image", image,
                   "--control-image", image) == 2
    assert "got 1 --controlnet but 2 --control-image" in capsys.readouterr().err


def test_lora_option_loads_each_file_with_its_scale(tmp_path, capsys):
    """A diffusers-format LoRA on two projections of the embedded model: scale 0 gives the plain image
    exactly, scale 1 a different one; two files at once; a missing file is refused before loading."""
    from conftest import embedded_lora

    embedded_lora(tmp_path / "style.safetensors")
    common = ["generate", "a red circle on a blue background", "--steps", "2", "--seed", "4"]
    out = {name: str(tmp_path / f"{name}.png") for name in ("plain", "zero", "one", "two")}
    assert run_cli(*common, "-o", out["plain"]) == 0
    assert run_cli(*common, "--lora", f"{tmp_path / 'style.safetensors'}:0", "-o", out["zero"]) == 0
    assert run_cli(*common, "--lora", str(tmp_path / "style.safetensors"), "-o", out["one"]) == 0
    assert run_cli(*common, "--lora", f"{tmp_path / 'style.safetensors'}:0.5", "--lora",
                   f"{tmp_path / 'style.safetensors'}:0.5", "-o", out["two"]) == 0
    plain, zero, one, two = (np.asarray(Image.open(out[k]), int) for k in ("plain", "zero", "one", "two"))
    np.testing.assert_array_equal(zero, plain)
    assert np.abs(one - plain).mean() > 1 and np.abs(two - one).max() <= 2  # 0.5 + 0.5 = 1
    assert media.read_metadata(out["one"])["loras"] == [[str(tmp_path / "style.safetensors"), 1.0]]
    assert run_cli(*common, "--lora", str(tmp_path / "missing.safetensors")) == 2
    assert "--lora" in capsys.readouterr().err.splitlines()[-1]


def test_sampler_and_shift_options_give_the_api_image(tmp_path):
    from keras_sd3 import sampling

    assert cli.SAMPLERS == sampling.SAMPLERS
    out = str(tmp_path / "dpm.png")
    assert run_cli("generate", "a red circle on a blue background", "--steps", "4", "--seed", "2",
                   "--sampler", "dpmpp_2m", "--shift", "2.5", "-o", out) == 0
    metadata = media.read_metadata(out)
    assert metadata["sampler"] == "dpmpp_2m" and metadata["shift"] == 2.5
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    expected = task.generate({"prompts": "a red circle on a blue background", "negative_prompts": ""}, num_steps=4,
                             seed=2, sampler="dpmpp_2m", shift=2.5)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_quantize_option_gives_the_api_image(tmp_path):
    out = str(tmp_path / "int8.png")
    assert run_cli("generate", "a red circle on a blue background", "--steps", "3", "--seed", "2",
                   "--quantize", "mmdit=int8,t5=int4", "-o", out) == 0
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", quantize={"mmdit": "int8", "t5": "int4"})
    assert task.backbone.diffuser.transformer_blocks[0].attn.to_q.quantization_mode == "int8"
    expected = task.generate({"prompts": "a red circle on a blue background", "negative_prompts": ""}, num_steps=3,
                             seed=2)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_transformer_option_gives_the_api_image(tmp_path):
    """The embedded MMDiT converted to Q8_0, then `--transformer` on the command line and in Python."""
    from keras_sd3.quantization.convert import convert_to_gguf

    path, out = convert_to_gguf("sd3_tiny_shapes", str(tmp_path / "mmdit.gguf"), "Q8_0"), str(tmp_path / "q8.png")
    assert run_cli("generate", "a red circle on a blue background", "--steps", "3", "--seed", "2",
                   "--transformer", path, "-o", out) == 0
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", transformer=path)
    assert task.backbone.diffuser.transformer_blocks[0].attn.to_q.weight_format.name == "Q8_0"
    expected = task.generate({"prompts": "a red circle on a blue background", "negative_prompts": ""}, num_steps=3,
                             seed=2)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_vae_tiling_option_gives_the_api_image(tmp_path):
    """`--vae-tiling 32` decodes the embedded model's 64 x 64 pictures on 3 x 3 overlapping tiles, as the API;
    `--text-encoders-on-cpu` changes no pixel."""
    out = str(tmp_path / "tiled.png")
    assert run_cli("generate", "a red circle on a blue background", "--steps", "3", "--seed", "2",
                   "--vae-tiling", "32", "-o", out) == 0
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", vae_tiling=32)
    assert run_cli("generate", "a red circle on a blue background", "--steps", "3", "--seed", "2",
                   "--vae-tiling", "32", "--text-encoders-on-cpu", "-o", str(tmp_path / "cpu.png")) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cpu.png")), np.asarray(Image.open(out)))
    assert task.backbone.vae_tiling.tile_sample_size == 32 and task.backbone.uses_vae_tiles((1, 16, 16, 16))
    inputs = {"prompts": "a red circle on a blue background", "negative_prompts": ""}
    expected = task.generate(inputs, num_steps=3, seed=2)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)
    task.backbone.disable_vae_tiling()
    assert np.abs(task.generate(inputs, num_steps=3, seed=2).astype(int) - expected.astype(int)).max() > 0


def test_mesh_needs_the_devices_and_jax(tmp_path, capsys, model_never_loads):
    import keras

    code = run_cli("generate", "x", "--mesh", "2x1", "-o", str(tmp_path / "x.png"))
    assert code == 2
    expected = "needs 2 devices; there are 1" if keras.config.backend() == "jax" else "feature of Keras' jax backend"
    assert expected in error_line(capsys)


def test_walk_writes_the_frames_of_the_library(tmp_path):
    """`walk` = `keras_sd3.explore` on the same settings (a lossless .png contact sheet)."""
    from keras_sd3 import explore

    out = str(tmp_path / "walk.png")
    prompt = "a red circle on a blue background"
    assert run_cli("walk", prompt, "--to", "a green square on a white background", "--frames", "3", "--steps", "2",
                   "--seed", "5", "-o", out) == 0
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    frames = explore.interpolate_prompts(task, prompt, "a green square on a white background", 3, seed=5, num_steps=2)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), media.make_grid(frames, padding=2))
    assert media.read_metadata(out)["kind"] == "interpolate"
