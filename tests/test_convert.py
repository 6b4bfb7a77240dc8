"""`keras-sd3 convert` / `convert_to_gguf`: the MMDiT as a GGUF file in city96's layout.

The expected file is rebuilt independently: original-layout tensors from the diffusers safetensors
through test_checkpoints' own key map, quantised with `gguf.quants.quantize`; diffusers'
`from_single_file` loads the file and runs like the model it describes.
"""

import math
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import VARIANTS, assert_close, build_reference, random_inputs, reference_velocity
from safetensors.numpy import load_file
from test_checkpoints import TIMESTEPS
from test_checkpoints import to_original_mmdit as independent_map

from keras_sd3 import cli
from keras_sd3.cli import convert as cli_convert
from keras_sd3.quantization import convert
from keras_sd3.weights.checkpoint import open_checkpoint
from keras_sd3.weights.original_keys import mmdit_rules, rename, to_original_mmdit

Q = gguf.GGMLQuantizationType
PREFIX = "model.diffusion_model."
FLOAT_PARTS = ("final_layer.", "t_embedder.", "y_embedder.", "x_embedder.", "context_embedder.", "pos_embed")


@pytest.fixture(scope="module", params=["sd3", "sd35_medium"])
def tiny(request, tmp_path_factory):
    """(folder, diffusers transformer, its original-layout float32 tensors by the test map)."""
    folder = str(tmp_path_factory.mktemp(request.param))
    transformer, _ = build_reference(folder, request.param)
    state = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    original = independent_map(state, VARIANTS[request.param]["num_layers"])
    return folder, transformer, {k[len(PREFIX):]: v for k, v in original.items()}


def expected_type(name, shape, file_type):
    """city96's rule, written out: small -> F32, embedders / output -> F16, partial blocks -> F16; a BF16
    file has BF16 matrices everywhere (its conv kernel and pos_embed are F16, for diffusers)."""
    if len(shape) == 1 or math.prod(shape) <= 1024:
        return Q.F32
    if file_type == Q.BF16:
        return Q.BF16 if len(shape) == 2 else Q.F16
    if any(part in name for part in FLOAT_PARTS):
        return Q.F16
    block = gguf.GGML_QUANT_SIZES[file_type][0]
    return file_type if shape[-1] % block == 0 else Q.F16


@pytest.mark.parametrize("name, shape, file_type, expected", [
    ("joint_blocks.0.x_block.mlp.fc1.weight", (64, 48), Q.Q4_0, Q.F16),  # 48 values a row: not whole blocks
    ("joint_blocks.0.x_block.mlp.fc1.weight", (64, 64), Q.Q4_1, Q.Q4_1),
    ("joint_blocks.0.x_block.mlp.fc1.weight", (32, 32), Q.Q8_0, Q.F32),  # 1024 values
    ("joint_blocks.0.x_block.attn.ln_q.weight", (2048,), Q.Q8_0, Q.F32),
    ("t_embedder.mlp.0.weight", (64, 256), Q.Q5_0, Q.F16),
    ("x_embedder.proj.weight", (64, 16, 2, 2), Q.BF16, Q.F16),
])
def test_tensor_type_rule(name, shape, file_type, expected):
    assert convert.tensor_type(name, shape, file_type) == expected == expected_type(name, shape, file_type)


def read_gguf(path):
    """{name: (ggml type, values' shape, raw data)} and the architecture of a GGUF file."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (t.tensor_type, tuple(int(d) for d in t.shape[::-1]), np.asarray(t.data))
               for t in reader.tensors}
    return tensors, reader.fields["general.architecture"].contents()


def test_inverse_key_map_round_trips_and_agrees_with_the_test_map(tiny):
    folder, _, original = tiny
    mmdit = open_checkpoint(folder).mmdit
    ours = to_original_mmdit(mmdit.tensors, mmdit.config)
    assert sorted(ours.keys()) == sorted(original)
    for name in ours.keys():
        assert ours.shapes[name] == original[name].shape, name
        np.testing.assert_array_equal(ours.read(name), original[name], err_msg=name)
    back = rename(ours, mmdit_rules(mmdit.config.num_layers - 1), "x")
    assert sorted(back.keys()) == sorted(mmdit.tensors.keys())
    for key in back.keys():
        assert back.shapes[key] == mmdit.tensors.shapes[key], key
        np.testing.assert_array_equal(back.read(key), mmdit.tensors.read(key), err_msg=key)


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_0"])
def test_file_holds_the_original_tensors_quantized_per_type(tiny, file_type, tmp_path):
    folder, _, original = tiny
    out = str(tmp_path / "mmdit.gguf")
    assert convert.convert_to_gguf(folder, out, file_type) == out
    assert os.listdir(tmp_path) == ["mmdit.gguf"]
    tensors, architecture = read_gguf(out)
    assert architecture == "sd3" and sorted(tensors) == sorted(original)
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == getattr(gguf.LlamaFileType,
                                                                                 f"MOSTLY_{file_type}")
    types = {t: 0 for t in (Q.F32, Q.F16, Q[file_type])}
    for name, value in original.items():
        ggml_type, shape, data = tensors[name]
        assert (ggml_type, shape) == (expected_type(name, value.shape, Q[file_type]), value.shape), name
        assert data.tobytes() == gguf.quants.quantize(value.astype(np.float32), ggml_type).tobytes(), name
        types[ggml_type] += 1
    assert all(types.values()), types  # each kind of tensor is there
    assert tensors["joint_blocks.0.x_block.attn.qkv.weight"][0] == Q[file_type]


def test_bf16_file_keeps_the_float_matrices_in_bf16(tiny, tmp_path):
    folder, _, original = tiny
    tensors, _ = read_gguf(convert.convert_to_gguf(folder, str(tmp_path / "bf16.gguf"), "BF16"))
    for name, value in original.items():
        ggml_type, _, data = tensors[name]
        assert ggml_type == expected_type(name, value.shape, Q.BF16), name
        assert data.tobytes() == gguf.quants.quantize(value.astype(np.float32), ggml_type).tobytes(), name
    assert tensors["y_embedder.mlp.0.weight"][0] == tensors["joint_blocks.0.x_block.mlp.fc1.weight"][0] == Q.BF16
    assert tensors["pos_embed"][0] == tensors["x_embedder.proj.weight"][0] == Q.F16


def dequantized_in_diffusers_names(path, model, num_layers):
    """The file's tensors dequantised by gguf-py, renamed by inverting the test map (a permutation of values).

    Block-quantised tensors are rounded to float16 as diffusers' dequantisation does (its block functions
    multiply the float16 scales, `d.view(torch.float16) * x`, even with a float32 compute dtype): without
    that rounding its Q8_0 outputs differ from gguf-py's dequantised weights by 3e-4 relative.
    """
    ids, start = {}, 0
    for key, tensor in model.state_dict().items():
        ids[key] = np.arange(start, start + tensor.numel()).reshape(tuple(tensor.shape))
        start += tensor.numel()
    values = np.empty(start, np.float32)
    tensors, _ = read_gguf(path)
    for name, index in independent_map(ids, num_layers).items():
        ggml_type, _, data = tensors[name[len(PREFIX):]]
        value = gguf.quants.dequantize(data, ggml_type)
        if gguf.GGML_QUANT_SIZES[ggml_type][0] > 1:  # Q8_0, Q4_0 (F32, F16 and BF16 blocks are 1 value)
            value = value.astype(np.float16)
        values[index.ravel()] = value.ravel()
    return {key: torch.from_numpy(values[index]) for key, index in ids.items()}


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_0", "BF16", "F16"])
def test_diffusers_loads_the_file(tiny, file_type, tmp_path):
    """diffusers' GGUF loader (offline, config from the local folder) runs as the model of the dequantised
    weights; an F16 file runs as the float model."""
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel

    folder, transformer, _ = tiny
    out = convert.convert_to_gguf(folder, str(tmp_path / "mmdit.gguf"), file_type)
    loaded = SD3Transformer2DModel.from_single_file(
        out, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=folder,
        subfolder="transformer", torch_dtype=torch.float32)
    inputs = (*random_inputs(), TIMESTEPS)
    reference = SD3Transformer2DModel.from_config(transformer.config).eval()
    reference.load_state_dict(dequantized_in_diffusers_names(out, reference, transformer.config.num_layers))
    assert_close(reference_velocity(loaded, *inputs), reference_velocity(reference, *inputs), rel=1e-5)  # measured: 0
    if file_type == "F16":
        assert_close(reference_velocity(loaded, *inputs), reference_velocity(transformer, *inputs), rel=1e-3)


def test_cli_converts_the_embedded_model(tmp_path, capsys):
    out = str(tmp_path / "x.gguf")
    assert cli.main(["convert", "sd3_tiny_shapes", "-o", out, "--type", "Q4_0"]) == 0
    assert capsys.readouterr().out.strip() == out
    tensors, architecture = read_gguf(out)
    assert architecture == "sd3" and tensors["joint_blocks.0.x_block.attn.qkv.weight"][0] == Q.Q4_0
    assert cli_convert.TYPES == tuple(convert.FILE_TYPES)


@pytest.fixture
def never_opened(monkeypatch):
    def fail(source):
        raise AssertionError("the checkpoint was opened before the arguments were checked")

    monkeypatch.setattr(convert, "open_checkpoint", fail)


def test_bad_type_or_folder_fails_before_reading_and_writes_nothing(tmp_path, capsys, never_opened):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "sd3_tiny_shapes", "-o", str(tmp_path / "x.gguf"), "--type", "Q3_K"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == ("keras-sd3: error: --type: invalid choice: 'Q3_K' (choose from 'Q8_0', 'Q5_1', 'Q5_0', 'Q4_1', "
                    "'Q4_0', 'F16', 'BF16')")
    with pytest.raises(ValueError, match=r"unknown GGUF type 'Q3_K': choose one of Q8_0, Q5_1, .*, BF16"):
        convert.convert_to_gguf("sd3_tiny_shapes", str(tmp_path / "x.gguf"), "Q3_K")
    assert cli.main(["convert", "sd3_tiny_shapes", "-o", str(tmp_path / "no" / "x.gguf")]) == 2
    assert f"the output folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_missing_source_is_named(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "nothing' is neither a diffusers folder, a .safetensors file nor a preset" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error, code", [(OSError("disk full"), 2), (KeyboardInterrupt(), 130)])
def test_an_error_midway_leaves_no_partial_file(error, code, tmp_path, monkeypatch, capsys):
    quantize, calls = gguf.quants.quantize, []

    def fail_at_the_tenth(data, qtype):
        calls.append(qtype)
        if len(calls) == 10:
            raise error
        return quantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", fail_at_the_tenth)
    assert cli.main(["convert", "sd3_tiny_shapes", "-o", str(tmp_path / "x.gguf")]) == code
    assert len(calls) == 10 and os.listdir(tmp_path) == []
    assert capsys.readouterr().err.strip().splitlines()[-1] in ("keras-sd3: error: disk full", "keras-sd3: interrupted")
