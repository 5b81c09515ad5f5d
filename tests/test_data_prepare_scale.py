"""prepare-data at scale: storages, resuming an interrupted run, a worker that dies, a validation
folder with a labels file."""
import multiprocessing
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from minidl.data.dataset import dataset_info, open_dataset, storage_of, stored_images
from minidl.data.prepare import partial_path, prepare_image_folder
from minidl.errors import DataError


def smooth_image(rng, width, height):
    down, across = np.mgrid[0:1:height * 1j, 0:1:width * 1j]
    image = (down[..., None] * rng.uniform(0, 255, 3) + across[..., None] * rng.uniform(0, 255, 3)) / 2
    return image.astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls, count in (("ant", 5), ("bee", 4), ("cat", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(smooth_image(rng, 300, 280)).save(root / cls / f"{i}.jpg")
    (root / "bee" / "broken.jpg").write_bytes(b"no image")
    return root


def contents(path):
    """Every dataset and attribute of a file, as arrays: what two runs must agree on."""
    with h5py.File(path, "r") as f:
        values = {name: f[name][()] for name in f}
        return values, dict(f.attrs)


def assert_same_file(a, b):
    (values_a, attrs_a), (values_b, attrs_b) = contents(a), contents(b)
    assert attrs_a == attrs_b and values_a.keys() == values_b.keys()
    for name in values_a:
        if values_a[name].dtype == object:  # JPEG bytes
            assert [bytes(v) for v in values_a[name]] == [bytes(v) for v in values_b[name]], name
        else:
            np.testing.assert_array_equal(values_a[name], values_b[name], err_msg=name)


class Stop(BaseException):
    pass


@pytest.mark.parametrize("storage, workers", [("raw", 2), ("jpeg", 1), ("gzip", 1)])
def test_an_interrupted_run_resumes_to_the_same_file(image_folder, tmp_path, storage, workers):
    whole = tmp_path / "whole.h5"
    prepare_image_folder(image_folder, whole, workers=workers, storage=storage)
    out = tmp_path / "resumed.h5"

    def interrupt(stage, done, total):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_image_folder(image_folder, out, workers=workers, storage=storage, progress=interrupt)
    assert not out.exists() and os.path.exists(partial_path(out))
    calls = []
    result = prepare_image_folder(image_folder, out, workers=workers, storage=storage,
                                  progress=lambda *call: calls.append(call))
    assert calls[0][0] == "decoding images" and 5 <= calls[0][1] < 13  # it went on from where it stopped
    assert result.written == 12 and len(result.skipped) == 1
    assert not os.path.exists(partial_path(out))
    assert_same_file(whole, out)
    with open_dataset(out) as f:
        assert storage_of(f) == storage


def test_a_partial_file_of_other_options_is_begun_again(image_folder, tmp_path):
    out = tmp_path / "d.h5"

    def interrupt(stage, done, total):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_image_folder(image_folder, out, workers=1, progress=interrupt)
    calls = []
    prepare_image_folder(image_folder, out, workers=1, storage="gzip", progress=lambda *call: calls.append(call))
    assert calls[0][:2] == ("decoding images", 0)
    whole = tmp_path / "whole.h5"
    prepare_image_folder(image_folder, whole, workers=1, storage="gzip")
    assert_same_file(whole, out)


def test_a_worker_that_dies_ends_the_run_in_one_line_and_the_next_run_resumes(image_folder, tmp_path):
    out = tmp_path / "d.h5"

    def kill_a_worker(stage, done, total):
        if done >= 3:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)

    with pytest.raises(DataError, match="^a decoding worker process died .*: run the same command again"):
        prepare_image_folder(image_folder, out, workers=2, progress=kill_a_worker)
    assert os.path.exists(partial_path(out))
    assert prepare_image_folder(image_folder, out, workers=2).written == 12


def test_the_statistics_are_exactly_those_of_one_process(image_folder, tmp_path):
    prepare_image_folder(image_folder, tmp_path / "one.h5", workers=1)
    prepare_image_folder(image_folder, tmp_path / "two.h5", workers=2)
    assert_same_file(tmp_path / "one.h5", tmp_path / "two.h5")


@pytest.fixture
def validation_folder(tmp_path):
    root = tmp_path / "val"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(smooth_image(rng, 260, 300)).save(root / f"v{i}.JPEG")
    return root


@pytest.mark.parametrize("lines", [["cat", "ant", "2", "bee"],  # one label per line, sorted file order
                                   ["v2.JPEG cat", "v0.JPEG cat", "v1.JPEG 0", "v3.JPEG bee"]])
def test_a_flat_folder_and_a_labels_file_make_a_validation_file(image_folder, validation_folder, tmp_path, lines):
    train = tmp_path / "train.h5"
    prepare_image_folder(image_folder, train, workers=1)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "val.h5"
    result = prepare_image_folder(validation_folder, out, workers=1, labels_file=labels, classes_from=train)
    assert result.written == 4
    info = dataset_info(out)
    assert info.class_names == ("ant", "bee", "cat") and info.num_val == 4 and info.num_train == 0
    with open_dataset(out) as f, open_dataset(train) as t:
        np.testing.assert_array_equal(f["labels"][()], [2, 0, 2, 1])  # the files in sorted order
        for name in ("mean_image", "mean_rgb", "pca_eigvals", "pca_eigvecs"):
            np.testing.assert_array_equal(f[name][()], t[name][()])
        with Image.open(validation_folder / "v0.JPEG") as image:
            from minidl.data.prepare import square_image
            np.testing.assert_array_equal(stored_images(f)[0], square_image(image))


@pytest.mark.parametrize("lines, message", [
    (["cat", "ant"], "has 2 labels, one per line, but .* has 4 files"),
    (["v0.JPEG wolf"], r"line 1: 'wolf' is neither a class name nor a class index 0..2"),
    (["v0.JPEG 3"], r"line 1: '3' is neither"),
    (["v9.JPEG cat"], "line 1: no file v9.JPEG in"),
    (["v0.JPEG cat extra"], "line 1: expected FILENAME LABEL"),
    ([], "is empty"),
])
def test_a_bad_labels_file_is_refused_in_one_line(image_folder, validation_folder, tmp_path, lines, message):
    train = tmp_path / "train.h5"
    prepare_image_folder(image_folder, train, workers=1)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(lines))
    with pytest.raises(DataError, match=message):
        prepare_image_folder(validation_folder, tmp_path / "val.h5", workers=1, labels_file=labels,
                             classes_from=train)


def test_a_labels_file_needs_its_classes(validation_folder, tmp_path):
    with pytest.raises(DataError, match="a labels file needs the training dataset"):
        prepare_image_folder(validation_folder, tmp_path / "val.h5", labels_file=tmp_path / "labels.txt")


def _prepare_then_die(image_folder, out, storage):
    """In a forked child: prepare-data, checkpointing after every task, killed outright (SIGKILL) midway."""
    import minidl.data.prepare
    minidl.data.prepare.CHECKPOINT_SECONDS = 0

    def die(stage, done, total):
        if done >= 6:
            os.kill(os.getpid(), signal.SIGKILL)

    prepare_image_folder(image_folder, out, workers=1, storage=storage, progress=die)


@pytest.mark.parametrize("storage", ["raw", "jpeg"])
def test_a_run_killed_outright_resumes_to_the_same_file(image_folder, tmp_path, storage):
    out = tmp_path / "d.h5"
    child = multiprocessing.get_context("fork").Process(target=_prepare_then_die, args=(image_folder, out, storage))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL and not out.exists() and os.path.exists(partial_path(out))
    calls = []
    prepare_image_folder(image_folder, out, workers=2, storage=storage, progress=lambda *call: calls.append(call))
    assert 0 < calls[0][1] < 13  # it went on from the last checkpoint
    whole = tmp_path / "whole.h5"
    prepare_image_folder(image_folder, whole, workers=1, storage=storage)
    assert_same_file(whole, out)


FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from minidl.cpu.memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    keep_freed_host_memory()
def image_buffers():  # two 3 MB buffers freed together, as decoding one image allocates and frees
    a, b = np.ones(3 * 2**20, np.uint8), np.ones(3 * 2**20, np.uint8)
    del a, b
image_buffers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    image_buffers()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_decoding_processes_reuse_freed_memory_instead_of_faulting_it_back_in():
    """glibc gives freed multi-megabyte buffers back to the kernel and faults them in again, zeroed, for the next
    image (a third of prepare-data's CPU); with keep_freed_host_memory(), which prepare-data's processes call, the
    next image reuses the same pages."""
    def page_faults(how):
        return int(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, how], capture_output=True, text=True,
                                  check=True).stdout)
    pages = 20 * 2 * 3 * 2 ** 20 // 4096
    assert page_faults("default") > pages // 2  # what the default costs: most pages faulted in again
    assert page_faults("keep") < pages // 100
