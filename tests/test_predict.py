"""minidl predict and retrieve: the paper's Figure 4 from a checkpoint."""
import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from minidl.training.predict import features, nearest
from minidl.training.restore import Restored
from minidl.training.train import train
from test_cli import TINY_MODEL, dataset, image_dir, run  # noqa: F401 -- fixtures


def json_rows(output):
    """The JSON list in the output (progress lines may come before it)."""
    return json.loads(output[output.index("\n[") + 1 if not output.startswith("[") else 0:output.rindex("]") + 1])


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A tiny model trained two epochs on the 3-class dataset: (checkpoint, model file)."""
    root = tmp_path_factory.mktemp("trained")
    model = root / "tiny.py"
    model.write_text(TINY_MODEL)
    train(model, data=dataset, devices=("cpu", "cpu"), out_dir=root)
    return root / "last.h5", model


def test_features_are_the_input_of_the_last_linear_layer(trained):
    checkpoint, model = trained
    restored = Restored(checkpoint, model, "cpu")
    net = restored.model
    x = np.random.default_rng(0).standard_normal((3, 3, 19, 19)).astype(np.float32)
    got = features(net, x)
    # by hand, in NumPy: conv1 -> ReLU -> max-pool 3/2 -> flatten (the Tiny network)
    from minidl.functions import conv2d, max_pool2d
    from minidl import Tensor
    h = conv2d(Tensor(x), net.conv1.W, net.conv1.b, stride=2).numpy()
    h = max_pool2d(Tensor(np.maximum(h, 0)), 3, 2).numpy().reshape(3, -1)
    np.testing.assert_allclose(got, h, rtol=1e-6)
    assert net.training  # taken in eval mode, and the mode restored


def test_nearest_equals_brute_force_in_blocks():
    rng = np.random.default_rng(1)
    base, queries = rng.standard_normal((1000, 24)), rng.standard_normal((9, 24))
    indices, distances = nearest(queries, base, 7, block=128)
    full = np.sqrt(((queries[:, None] - base[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(indices, np.argsort(full, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :7], rtol=1e-9)


def test_predict_prints_top_classes_and_draws_bars_of_their_probability(trained, image_dir, tmp_path):
    checkpoint, model = trained
    png = tmp_path / "predictions.png"
    code, output = run("predict", checkpoint, image_dir / "squares", "--top", "3", "-o", png, "--json",
                       "--model", model)
    assert code == 0, output
    rows = json_rows(output)
    assert len(rows) == 8 and all(r["true"] == "squares" for r in rows)
    for r in rows:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    image = Image.open(png)
    assert image.size[0] > 400 and image.size[1] > 300
    code, plain = run("predict", checkpoint, image_dir / "circles" / "0.jpg", "--ten-crop", "-o", png, "--model", model)
    assert code == 0 and "0.jpg: " in plain and "(true: circles)" in plain, plain


def test_bar_lengths_follow_the_probabilities(tmp_path):
    from minidl.training.visualize import draw_predictions
    images = np.zeros((2, 32, 32, 3), np.uint8)
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    drawn = draw_predictions(images, ["a", "b"], np.array([[0, 1, 2], [2, 1, 0]]), probs, ["x", "y", "z"],
                             [0, None], tmp_path / "p.png")
    np.testing.assert_allclose(drawn, probs)


def test_retrieve_finds_neighbours_caches_features_and_draws_rows(trained, dataset, image_dir, tmp_path):
    checkpoint, model = trained
    png = tmp_path / "neighbours.png"
    code, output = run("retrieve", checkpoint, "--data", dataset, "--queries", "3", "-k", "4", "-o", png, "--json",
                       "--model", model)
    assert code == 0, output
    rows = json_rows(output)
    assert len(rows) == 3 and all(len(r["neighbours"]) == 4 for r in rows)
    for r in rows:
        distances = [n["distance"] for n in r["neighbours"]]
        assert distances == sorted(distances)
    cache = checkpoint.parent / "last.fc7-train.h5"
    assert cache.exists()
    before = os.stat(cache).st_mtime_ns
    code, _ = run("retrieve", checkpoint, "--data", dataset, "-k", "2", "-o", png, "--model", model)
    assert code == 0 and os.stat(cache).st_mtime_ns == before  # reused
    os.utime(checkpoint)  # keyed by content, not by modification time: still reused
    code, _ = run("retrieve", checkpoint, "--data", dataset, "-k", "2", "-o", png, "--model", model)
    assert code == 0 and os.stat(cache).st_mtime_ns == before
    with h5py.File(cache, "a") as f:  # an edited cache is not trusted: recomputed and rewritten
        f["features"][0, 0] += 1
    code, output = run("retrieve", checkpoint, "--data", dataset, "-k", "2", "-o", png, "--model", model)
    assert code == 0 and "note: ignoring the feature cache" in output, output
    assert os.stat(cache).st_mtime_ns != before
    before = os.stat(cache).st_mtime_ns
    with h5py.File(checkpoint, "a") as f:  # the checkpoint's bytes changed: recomputed
        f.attrs["touched"] = 1
    code, _ = run("retrieve", checkpoint, "--data", dataset, "-k", "2", "-o", png, "--model", model)
    assert code == 0 and os.stat(cache).st_mtime_ns != before
    assert Image.open(png).size[0] > 300
    (tmp_path / "empty").mkdir()
    code, output = run("retrieve", checkpoint, "--data", dataset, "--query", tmp_path / "empty", "-o", png,
                       "--model", model)
    assert code != 0 and "has no images" in output
    code, output = run("retrieve", checkpoint, "--data", dataset, "--query", image_dir / "circles" / "0.jpg", "-k", "3",
                       "-o", png, "--model", model)
    assert code == 0 and "0.jpg: " in output, output


def test_draw_neighbours_draws_a_row_per_query(tmp_path):
    from minidl.training.visualize import draw_neighbours
    tiles = draw_neighbours(np.zeros((3, 16, 16, 3), np.uint8), ["q1", "q2", "q3"],
                            np.zeros((3, 5, 16, 16, 3), np.uint8), [["l"] * 5] * 3, tmp_path / "n.png")
    assert tiles == 3 * 6 and Image.open(tmp_path / "n.png").size[0] > 300


def test_the_training_mean_of_the_checkpoint_is_subtracted_from_any_dataset(trained, dataset, tmp_path):
    checkpoint, model = trained
    restored = Restored(checkpoint, model)
    shifted = tmp_path / "shifted.h5"  # the same images, but a dataset whose own mean differs
    with h5py.File(dataset) as src, h5py.File(shifted, "w") as dst:
        for key in src:
            src.copy(key, dst)
        dst.attrs.update(src.attrs)
        dst["mean_image"][...] = dst["mean_image"][()] + 50
    (same, _), (other, _) = (next(restored.loader(d).epoch_batches(0)) for d in (dataset, shifted))
    np.testing.assert_array_equal(same, other)


@pytest.mark.parametrize("make_args, message", [
    (lambda c, d, t: ["predict", c, t / "not-an-image.jpg"], "is not an image"),
    (lambda c, d, t: ["predict", c, t / "empty"], "has no images"),
    (lambda c, d, t: ["predict", c, t / "nope.jpg"], "no such image or folder"),
    (lambda c, d, t: ["predict", c, t / "ok.png", "-o", t / "no" / "such" / "p.png"], "is not a writable folder"),
    (lambda c, d, t: ["predict", t / "old.h5", t / "ok.png"], "pass --data with the dataset it was trained on"),
    (lambda c, d, t: ["retrieve", c, "--data", d, "-k", "1000"], "larger than the training set"),
    (lambda c, d, t: ["retrieve", c, "--data", t / "four.h5"], "has 4 classes"),
    (lambda c, d, t: ["retrieve", c, "--data", t / "noval.h5"], "has no validation images to query: give --query"),
])
def test_bad_input_gives_one_line(trained, dataset, tmp_path, make_args, message):
    checkpoint, model = trained
    (tmp_path / "not-an-image.jpg").write_text("hello")
    (tmp_path / "empty").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "ok.png")
    with h5py.File(checkpoint) as src, h5py.File(tmp_path / "old.h5", "w") as dst:  # no class names, no mean
        for key in src:
            if key != "mean_image":
                src.copy(key, dst)
        dst.attrs.update({k: v for k, v in src.attrs.items() if k != "class_names"})
    with h5py.File(dataset) as src, h5py.File(tmp_path / "four.h5", "w") as dst:
        for key in src:
            src.copy(key, dst)
        dst.attrs.update(src.attrs)
        del dst["class_names"]
        dst["class_names"] = np.array(["a", "b", "c", "d"], dtype=h5py.string_dtype())
    with h5py.File(dataset) as src, h5py.File(tmp_path / "noval.h5", "w") as dst:
        for key in src:
            src.copy(key, dst)
        dst.attrs.update(src.attrs)
        dst["is_val"][...] = 0
    code, output = run(*make_args(checkpoint, dataset, tmp_path), "--model", model)
    lines = output.strip().splitlines()
    assert code != 0 and lines[-1].startswith("error:") and message in lines[-1], output
    assert "Traceback" not in output
