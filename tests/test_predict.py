"""predict: images of any size and kind become MNIST-like 28x28 digits; bad files are one line each.

The command tests use an untrained net (its digits are meaningless, its output format is not);
test_real_mnist.py checks that a trained net reads real digits saved as image files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_ok, assert_one_line_error, run_job, write_random_model
from PIL import Image, ImageDraw

from job.predict import ImageFileError, mnist_like, read_grey
from job.run_dir import RunDir


def drawn_seven(size: tuple[int, int] = (300, 400), ink: int = 20, paper: int = 235) -> Image.Image:
    """A hand-drawn-like 7: dark strokes on light paper, off centre, in a larger picture."""
    image = Image.new("L", size, paper)
    draw = ImageDraw.Draw(image)
    draw.line([(60, 80), (200, 80), (110, 330)], fill=ink, width=18)
    return image


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(digit.shape)
    mass = digit.astype(float).sum()
    return (ys * digit).sum() / mass, (xs * digit).sum() / mass


def ink_box(digit: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_a_drawing_becomes_an_mnist_digit():
    digit = mnist_like(np.asarray(drawn_seven(), dtype=np.float32))
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit.max() == 255 and digit[0].max() == 0 and digit[:, 0].max() == 0, "light ink on black"
    height, width = ink_box(digit)
    assert height == 20 and width < 20, "the longer side fills the 20x20 box, the aspect ratio is kept"
    row, col = centre_of_mass(digit)
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5, "centred by centre of mass"


def test_dark_on_light_and_light_on_dark_give_the_same_digit():
    dark_ink = np.asarray(drawn_seven(ink=0, paper=255), dtype=np.float32)
    light_ink = 255 - dark_ink
    assert np.array_equal(mnist_like(dark_ink), mnist_like(light_ink))


def test_grey_paper_becomes_black():
    grey_paper = mnist_like(np.asarray(drawn_seven(ink=60, paper=170), dtype=np.float32))
    white_paper = mnist_like(np.asarray(drawn_seven(ink=0, paper=255), dtype=np.float32))
    assert np.abs(grey_paper.astype(int) - white_paper.astype(int)).max() <= 1


def test_colour_alpha_and_16_bit_files_read_as_the_same_digit(tmp_path):
    reference = mnist_like(np.asarray(drawn_seven(ink=0, paper=255), dtype=np.float32))
    ink_mask = drawn_seven(ink=255, paper=0)  # 255 where the ink is

    colour = Image.merge("RGB", [drawn_seven(ink=0, paper=255)] * 3)
    colour.save(tmp_path / "colour.png")
    # Black ink on a transparent background: the transparent pixels are black too.
    transparent = Image.new("RGBA", ink_mask.size, (0, 0, 0, 0))
    transparent.putalpha(ink_mask)
    transparent.save(tmp_path / "transparent.png")
    sixteen = Image.fromarray((255 - np.asarray(ink_mask, dtype=np.uint16)) * 257)
    sixteen.save(tmp_path / "sixteen.png")
    for name in ("colour.png", "transparent.png", "sixteen.png"):
        assert np.array_equal(mnist_like(read_grey(tmp_path / name)), reference), name


def test_an_image_without_a_digit_is_refused():
    with pytest.raises(ImageFileError, match="one flat colour"):
        mnist_like(np.full((50, 50), 200, dtype=np.float32))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt of an untrained net, and the same weights as a training checkpoint."""
    return write_random_model(tmp_path_factory.mktemp("untrained"), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = {"png": folder / "seven.png", "jpeg": folder / "seven.jpg"}
    drawn_seven().save(paths["png"])
    Image.merge("RGB", [drawn_seven((1200, 1600))] * 3).save(paths["jpeg"], quality=85)
    return paths


@pytest.mark.processes
def test_predict_prints_digit_and_probability_per_file(untrained, images):
    result = run_job(["predict", "--checkpoint", str(RunDir(untrained).model), str(images["png"]), str(images["jpeg"])])
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(images["png"]), str(images["jpeg"])]
    for line in lines:
        assert line.split(": ")[1].split(" (probability ")[0] in "0123456789"


@pytest.mark.processes
def test_predict_json_and_training_checkpoints(untrained, images):
    outputs = []
    for checkpoint in ("model.pt", "step-000000938.pt"):
        result = run_job(["predict", "--checkpoint", str(untrained / checkpoint), "--json", str(images["png"])])
        assert_ok(result)
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1], "model.pt and a checkpoint with the same weights predict the same"
    (line,) = outputs[0].splitlines()
    record = json.loads(line)
    assert set(record) == {"file", "digit", "probability", "probabilities"}
    assert record["file"] == str(images["png"]) and len(record["probabilities"]) == 10
    assert sum(record["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert record["digit"] == int(np.argmax(record["probabilities"]))
    assert record["probability"] == max(record["probabilities"])


@pytest.mark.processes
def test_predict_and_evaluate_read_the_projects_own_safetensors_export(untrained, images, tmp_path, tiny_root):
    exported = tmp_path / "model.safetensors"
    export = ["export", "--checkpoint", str(RunDir(untrained).model), "--format", "safetensors", "--out", str(exported)]
    assert_ok(run_job(export))
    models = (RunDir(untrained).model, exported)
    outputs = [run_job(["predict", "--checkpoint", str(path), "--json", str(images["png"])]) for path in models]
    assert_ok(outputs[1])
    assert outputs[0].stdout == outputs[1].stdout
    on_data = [f"data.root={tiny_root}", "data.verify=false", "data.download=false"]
    figures = [run_job(["evaluate", "--checkpoint", str(p), *on_data]) for p in (RunDir(untrained).model, exported)]
    assert_ok(figures[1])
    assert figures[0].stdout == figures[1].stdout


@pytest.mark.processes
def test_bad_files_get_one_line_each_and_the_others_are_still_read(untrained, images, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images["png"].read_bytes()[:300])
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), "white").save(blank)
    missing = tmp_path / "missing.png"
    not_a_number = tmp_path / "nan.tiff"  # float TIFFs can hold pixels that are no grey level
    pixels = np.zeros((28, 28), np.float32)
    pixels[4:24, 12:16], pixels[0, 0] = 1.0, np.nan
    Image.fromarray(pixels, mode="F").save(not_a_number)
    bad = {
        not_an_image: "is not an image Pillow can read",
        truncated: "is damaged or unreadable",
        blank: "one flat colour",
        missing: "does not exist",
        tmp_path: "is a directory",
        not_a_number: "1 pixel(s) are NaN or infinite",
    }
    args = ["predict", "--checkpoint", str(RunDir(untrained).model), "--json", str(images["png"])]
    result = run_job([*args, *map(str, bad), str(images["jpeg"])])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    read = [json.loads(line)["file"] for line in result.stdout.splitlines()]
    assert read == [str(images["png"]), str(images["jpeg"])]
    errors = result.stderr.splitlines()
    assert len(errors) == len(bad), result.stderr
    for line, (path, needle) in zip(errors, bad.items(), strict=True):
        assert line.startswith(f"error: {path}") and needle in line, line


@pytest.mark.processes
def test_predict_refuses_missing_and_corrupt_checkpoints(images, tmp_path):
    missing = run_job(["predict", "--checkpoint", str(tmp_path / "nope.pt"), str(images["png"])])
    assert_one_line_error(missing, "nope.pt does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    result = run_job(["predict", "--checkpoint", str(corrupt), str(images["png"])])
    assert_one_line_error(result, "truncated or corrupt")


def write_onnx_of_another_shape(path: Path) -> None:
    """A valid onnx model that is no digit reader: (N, 3) -> (N, 3)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)


@pytest.mark.processes
def test_predict_model_refuses_what_is_not_an_onnx_digit_reader(untrained, images, tmp_path):
    """--model takes an onnx file (export --format onnx); test_real_mnist.py reads real digits with one."""
    png, model_pt = str(images["png"]), str(RunDir(untrained).model)
    both = run_job(["predict", "--checkpoint", model_pt, "--model", str(tmp_path / "m.onnx"), png])
    assert_one_line_error(both, "--model: not allowed with argument --checkpoint")
    not_onnx = run_job(["predict", "--model", model_pt, png])
    assert_one_line_error(not_onnx, f"model {model_pt} is not an onnx model onnxruntime can load")
    other = tmp_path / "identity.onnx"
    write_onnx_of_another_shape(other)
    result = run_job(["predict", "--model", str(other), png])
    assert_one_line_error(result, f"model {other} is not a digit reader", "not float (N, 1, 28, 28) -> (N, 10)")
