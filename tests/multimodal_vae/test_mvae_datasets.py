"""MNIST-SVHN-Text, bimodal CelebA and CUB image-captions read from tiny fixtures written here in the released
layouts; their text encodings, likelihood weights, and a few training steps of each from the command line."""

import gzip
import json
import math

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from tiny_runs import WHEEL_CACHE

from applications.multimodal_vae.__main__ import main
from applications.multimodal_vae.data import LayoutError, Modality, load_dataset, reconstruction_weights, text
from applications.multimodal_vae.data.celeba import CelebA
from applications.multimodal_vae.data.cub import CUB
from applications.multimodal_vae.data.mnist_svhn_text import DIGIT_NAMES, MNISTSVHNText
from applications.multimodal_vae.evaluation.fid import default_weights
from applications.multimodal_vae.objectives import Likelihood
from applications.multimodal_vae.train import load_run

pytestmark = pytest.mark.usefixtures("float32_default")

def model_modalities(run):
    return load_dataset(load_run(run)[0], "test").modalities



def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_svhn(root, rng, pairs=(("train", 12), ("test", 6))):
    """MNIST idx files (train gzipped, test plain), SVHN .mat files (digit 0 stored as 10), MMVAE's index files."""
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "SVHN").mkdir()
    stored = {}
    for split, count in pairs:
        mnist = rng.integers(0, 256, (count + 3, 28, 28))
        mnist_labels = rng.integers(0, 10, count + 3)
        svhn = rng.integers(0, 256, (32, 32, 3, count + 5))
        svhn_labels = rng.integers(0, 10, count + 5)
        prefix = "train" if split == "train" else "t10k"
        for name, array in ((f"{prefix}-images-idx3-ubyte", mnist), (f"{prefix}-labels-idx1-ubyte", mnist_labels)):
            data = _idx(array)
            if split == "train":
                (root / "MNIST" / "raw" / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / "MNIST" / "raw" / name).write_bytes(data)
        scipy.io.savemat(root / "SVHN" / f"{split}_32x32.mat",
                         {"X": svhn.astype(np.uint8), "y": np.where(svhn_labels == 0, 10, svhn_labels)[:, None]})
        # pair every MNIST image with an SVHN image of the same digit, in a shuffled order
        mnist_index, svhn_index = [], []
        for i in rng.permutation(count + 3)[:count]:
            same = np.flatnonzero(svhn_labels == mnist_labels[i])
            if same.size:
                mnist_index.append(int(i))
                svhn_index.append(int(rng.choice(same)))
        torch.save(torch.tensor(mnist_index), root / f"{split}-ms-mnist-idx.pt")
        torch.save(torch.tensor(svhn_index), root / f"{split}-ms-svhn-idx.pt")
        stored[split] = (mnist, mnist_labels, svhn, mnist_index, svhn_index)
    return stored


def test_mnist_svhn_text_pairs_files_as_released(tmp_path):
    stored = write_mnist_svhn(tmp_path, np.random.default_rng(0))
    for split in ("train", "test"):
        mnist, labels, svhn, mnist_index, svhn_index = stored[split]
        data = MNISTSVHNText(tmp_path, split)
        assert [m.name for m in data.modalities] == ["mnist", "svhn", "text"] and len(data) == len(mnist_index)
        assert data.num_modalities == MNISTSVHNText.NUM_MODALITIES  # what the configuration is checked against
        x = data.gather(torch.arange(len(data)))
        assert x[0].shape == (len(data), 1, 28, 28) and x[1].shape == (len(data), 3, 32, 32)
        np.testing.assert_array_equal((x[0][:, 0] * 255).round().numpy(), mnist[mnist_index])
        np.testing.assert_array_equal((x[1] * 255).round().numpy(), svhn[..., svhn_index].transpose(3, 2, 0, 1))
        assert data.labels.tolist() == labels[mnist_index].tolist()
        for row, digit in zip(x[2], data.labels.tolist()):
            name = DIGIT_NAMES[digit]
            decoded = "".join(text.ALPHABET[i] for i in row.tolist())
            start = decoded.index(name)
            assert decoded.replace(text.PAD_CHARACTER, "") == name and 0 <= start <= 8 - 1 - len(name)
    again = MNISTSVHNText(tmp_path, "train")
    assert torch.equal(again.gather(torch.arange(len(again)))[2], MNISTSVHNText(tmp_path, "train").arrays[2])


def test_mnist_svhn_text_files_of_the_wrong_shape_or_digits_name_the_file(tmp_path):
    """MNIST images of 32 x 32 loaded as (N, 1, 32, 32) for a (1, 28, 28) modality; an SVHN label 11 read as the digit
    1 (% 10); MNIST labels in the images' place, or an IDX file cut inside its header, raised errors naming no file."""
    write_mnist_svhn(tmp_path, np.random.default_rng(2))
    raw = tmp_path / "MNIST" / "raw"
    images, labels = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    good_images, good_labels = images.read_bytes(), labels.read_bytes()
    images.write_bytes(_idx(np.zeros((9, 32, 32))))
    with pytest.raises(LayoutError, match=r"images-idx3-ubyte: expected \(N, 28, 28\) images, got shape \(9, 32, 32\)"):
        MNISTSVHNText(tmp_path, "test")
    images.write_bytes(good_images)
    labels.write_bytes(good_images)
    with pytest.raises(LayoutError, match=r"t10k-labels-idx1-ubyte: expected \(N,\) digits, got shape \(9, 28, 28\)"):
        MNISTSVHNText(tmp_path, "test")
    labels.write_bytes(_idx(np.full(9, 12)))
    with pytest.raises(LayoutError, match=r"t10k-labels-idx1-ubyte: digits must lie in 0..9, found 12"):
        MNISTSVHNText(tmp_path, "test")
    labels.write_bytes(good_images[:6])
    with pytest.raises(LayoutError, match=r"t10k-labels-idx1-ubyte: cut short inside its header \(6 bytes"):
        MNISTSVHNText(tmp_path, "test")
    labels.write_bytes(good_labels)
    scipy.io.savemat(tmp_path / "SVHN" / "test_32x32.mat",
                     {"X": np.zeros((32, 32, 3, 11), dtype=np.uint8), "y": np.full((11, 1), 11)})
    with pytest.raises(LayoutError, match=r"test_32x32.mat: y must hold digits 1..10 \(10 for 0\), found \[11, 11"):
        MNISTSVHNText(tmp_path, "test")


def test_mnist_svhn_text_rejects_pairs_of_different_digits_and_missing_files(tmp_path):
    stored = write_mnist_svhn(tmp_path, np.random.default_rng(1))
    _, labels, _, mnist_index, svhn_index = stored["test"]
    other = next(i for i in range(len(labels)) if labels[i] != labels[mnist_index[0]])
    torch.save(torch.tensor([other] + mnist_index[1:]), tmp_path / "test-ms-mnist-idx.pt")
    with pytest.raises(LayoutError, match=r"test-ms-svhn-idx.pt: 1 pairs join different digits .*\[\(0, "):
        MNISTSVHNText(tmp_path, "test")
    # row numbers that are not 1-D integers: floats were truncated (2.9 read as 2), booleans read as 0 and 1
    for bad in (torch.tensor(mnist_index, dtype=torch.float64) + 0.9, torch.ones(len(mnist_index), dtype=torch.bool),
                torch.tensor(mnist_index).reshape(1, -1)):
        torch.save(bad, tmp_path / "test-ms-mnist-idx.pt")
        with pytest.raises(LayoutError, match=r"test-ms-mnist-idx.pt: expected a 1-D tensor of integer row numbers, "
                                              rf"got {bad.dtype} of shape \({bad.shape[0]},"):
            MNISTSVHNText(tmp_path, "test")
    torch.save(list(mnist_index), tmp_path / "test-ms-mnist-idx.pt")
    with pytest.raises(LayoutError, match="test-ms-mnist-idx.pt: expected a tensor, got a list"):
        MNISTSVHNText(tmp_path, "test")
    (tmp_path / "SVHN" / "train_32x32.mat").unlink()
    with pytest.raises(LayoutError, match="expected the SVHN file .*train_32x32.mat"):
        MNISTSVHNText(tmp_path, "train")
    with pytest.raises(LayoutError, match=r"expected .*t10k-images-idx3-ubyte \(or .*\.gz\) in the torchvision MNIST"):
        MNISTSVHNText(tmp_path / "elsewhere", "test")
    # fewer MNIST images than labels: refused on loading, not by an IndexError in some batch of training
    mnist = stored["test"][0]
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(_idx(mnist[:-2]))
    with pytest.raises(LayoutError, match=r"t10k-images-idx3-ubyte holds 7 images but t10k-labels-idx1-ubyte 9 labels"):
        MNISTSVHNText(tmp_path, "test")


ATTRIBUTES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling", "Wearing_Hat"]


def write_celeba(root, rng, count=6):
    """178x218 JPEGs whose centre 148x148 square has one colour and the border another; attribute and partition
    lists in CelebA's formats (partition 0, 1, 2 in turn)."""
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    colours, attributes = [], rng.integers(0, 2, (count, len(ATTRIBUTES)))
    for i in range(count):
        colour = rng.integers(0, 256, 3)
        image = np.zeros((218, 178, 3), dtype=np.uint8)
        image[:] = 255 - colour
        top, left = (218 - 148) // 2, (178 - 148) // 2
        image[top:top + 148, left:left + 148] = colour
        Image.fromarray(image).save(folder / f"{i + 1:06d}.jpg", quality=100)
        colours.append(colour)
    lines = [str(count), " ".join(ATTRIBUTES)]
    lines += [f"{i + 1:06d}.jpg " + " ".join("1" if a else "-1" for a in row) for i, row in enumerate(attributes)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {i % 3}\n" for i in range(count)))
    return np.array(colours), attributes


def test_celeba_reads_the_released_files(tmp_path):
    colours, attributes = write_celeba(tmp_path, np.random.default_rng(2))
    data = CelebA(tmp_path, "train")
    chosen = [0, 3]  # partition 0
    assert len(data) == 2 and data.labels.tolist() == attributes[chosen].tolist()
    assert data.num_modalities == CelebA.NUM_MODALITIES
    image, tokens = data.gather(torch.arange(2))
    assert image.shape == (2, 3, 64, 64) and tokens.shape == (2, 256)
    # the centre crop holds only the inner colour (JPEG-level error)
    np.testing.assert_allclose((image * 255).mean((2, 3)).numpy(), colours[chosen], atol=3)
    for row, attrs in zip(tokens, attributes[chosen]):
        expected = ", ".join(name.lower().replace("_", " ") for name, on in zip(ATTRIBUTES, attrs) if on)
        assert text.decode_characters(row) == expected
    assert len(CelebA(tmp_path, "test")) == 2  # partition 1, the split the papers evaluate on
    caches = sorted((tmp_path / "img_align_celeba").glob(".decoded-*.pt"))
    assert [p.name.rpartition("-")[0] for p in caches] == [".decoded-celeba_test", ".decoded-celeba_train"]
    assert torch.equal(CelebA(tmp_path, "train").arrays[0], data.arrays[0])  # from the cache
    assert sorted((tmp_path / "img_align_celeba").glob(".decoded-*.pt")) == caches  # the splits keep each other's
    for cache in (tmp_path / "img_align_celeba").glob(".decoded-*.pt"):
        cache.unlink()
    (tmp_path / "img_align_celeba" / "000005.jpg").unlink()
    with pytest.raises(LayoutError, match="000005.jpg is listed in list_attr_celeba.txt but missing"):
        CelebA(tmp_path, "test")
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(LayoutError, match="expected .*list_eval_partition.txt"):
        CelebA(tmp_path, "train")


def test_celeba_lists_that_are_malformed_or_cut_short_name_the_file(tmp_path):
    """A partition line of three fields or a non-number raised Python's own errors (no file), an empty attribute list
    an IndexError, and an attribute list cut at a line's end loaded fewer faces without complaint."""
    write_celeba(tmp_path, np.random.default_rng(3))
    attributes, partition = tmp_path / "list_attr_celeba.txt", tmp_path / "list_eval_partition.txt"
    good_attributes, good_partition = attributes.read_text(), partition.read_text()
    partition.write_text(good_partition + "000009.jpg 0 extra\n")
    with pytest.raises(LayoutError, match=r"list_eval_partition.txt:7: expected a file name and a partition number"):
        CelebA(tmp_path, "train")
    partition.write_text(good_partition.replace("000002.jpg 1", "000002.jpg a"))
    with pytest.raises(LayoutError, match=r"list_eval_partition.txt:2: expected .*'000002.jpg a'"):
        CelebA(tmp_path, "train")
    partition.write_text(good_partition)
    attributes.write_text("")
    with pytest.raises(LayoutError, match=r"list_attr_celeba.txt: expected the count of faces on line 1"):
        CelebA(tmp_path, "train")
    attributes.write_text("\n".join(good_attributes.split("\n")[:-2]) + "\n")  # the last face's line gone
    with pytest.raises(LayoutError, match=r"list_attr_celeba.txt: line 1 gives 6 faces, the file lists 5"):
        CelebA(tmp_path, "train")


CAPTIONS = ["this bird is red with a short beak.", "a small bird with red wings.", "the bird's beak is short.",
            "red bird, black tail.", "a bird with a black crown."]


def write_cub(root, rng, images=(("train", 2), ("test", 1))):
    captions = {}
    for split, count in images:
        for k in range(count):
            folder = root / split / f"{k + 1:03d}.Class_{k}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(folder / f"bird_{k}.jpg")
        lines = [CAPTIONS[(i * 3 + len(split)) % len(CAPTIONS)] for i in range(10 * count)]
        name = "text_trainvalclasses.txt" if split == "train" else "text_testclasses.txt"
        (root / name).write_text("\n".join(lines) + "\n")
        captions[split] = lines
    return captions


def test_cub_builds_its_vocabulary_from_the_training_captions(tmp_path):
    captions = write_cub(tmp_path, np.random.default_rng(3))
    # words seen exactly 3 and 4 times: the vocabulary keeps those seen more than 3 times (the fixture's other
    # words are seen a multiple of 4 times, which cannot tell "more than 3" from "at least 3")
    captions["train"][1] += " thrice thrice thrice fourfold fourfold fourfold fourfold"
    (tmp_path / "text_trainvalclasses.txt").write_text("\n".join(captions["train"]) + "\n")
    data = CUB(tmp_path, "train")
    assert data.num_modalities == CUB.NUM_MODALITIES
    counts = {}
    for line in captions["train"]:
        for word in text.tokenise(line):
            counts[word] = counts.get(word, 0) + 1
    assert set(data.vocabulary[3:]) == {w for w, c in counts.items() if c > 3}
    assert "fourfold" in data.vocabulary and "thrice" not in data.vocabulary
    assert data.vocabulary[:3] == ("<exc>", "<pad>", "<eos>")
    assert len(data) == 20 and data.labels.tolist() == [k // 10 for k in range(20)]
    image, tokens = data.gather(torch.tensor([0, 9, 10, 19]))
    assert image.shape == (4, 3, 64, 64)
    assert torch.equal(image[0], image[1]) and torch.equal(image[2], image[3]) and not torch.equal(image[0], image[2])
    assert tokens.shape == (4, 32)
    assert text.decode_words(tokens[0], data.vocabulary) == " ".join(
        w if w in data.vocabulary else "<exc>" for w in text.tokenise(captions["train"][0]))
    test = CUB(tmp_path, "test")
    assert test.vocabulary == data.vocabulary and len(test) == 10
    assert text.tokenise("The bird's wings, 2 of them.") == ["the", "bird", "'s", "wings", ",", "2", "of", "them", "."]
    (tmp_path / "text_testclasses.txt").write_text("\n".join(captions["test"][:9]) + "\n")
    with pytest.raises(LayoutError, match="has 9 captions but .* has 1 images; expected 10 captions per image"):
        CUB(tmp_path, "test")


def test_text_encodings_are_checked():
    assert text.decode_characters(text.encode_characters("Smiling, hat", 16)) == "smiling, hat"
    with pytest.raises(ValueError, match="does not fit length 4"):
        text.encode_characters("smiling", 4)
    with pytest.raises(ValueError, match=r"characters \['é'\]"):
        text.encode_characters("café", 8)
    vocabulary = text.build_vocabulary(["a b b c c c"] * 3, more_than=3)
    assert vocabulary == ("<exc>", "<pad>", "<eos>", "c", "b")  # by frequency; "a", seen 3 times, is not kept
    ids = text.encode_words("c a b b b", vocabulary, 4)
    assert ids.tolist() == [3, 0, 4, 2]  # three words, unknown as <exc>, then <eos>
    assert text.encode_words("b", vocabulary, 4).tolist() == [4, 2, 1, 1]
    # a length of 0 gave every word and <eos> (5 ids for "(length,)"); negative ids read from the end
    with pytest.raises(ValueError, match="length must be a positive integer .* got 0"):
        text.encode_words("c a b b b", vocabulary, 0)
    with pytest.raises(ValueError, match=r"ids must be integers in \[0, 5\), got \[-1\]"):
        text.decode_words(torch.tensor([-1, 3]), vocabulary)
    with pytest.raises(ValueError, match=r"ids must be integers in \[0, \d+\), got \[-1\]"):
        text.decode_characters(torch.tensor([-1, 1, 2]))


def test_categorical_likelihood_and_weights_by_relative_dimensionality():
    modalities = [Modality("mnist", (1, 28, 28)), Modality("svhn", (3, 32, 32)), Modality("text", (8,), text.ALPHABET)]
    weights = reconstruction_weights(modalities)
    v = len(text.ALPHABET)
    # MoPoE's mnistsvhntext rec_weights: SVHN's 3 x 32 x 32 values over each modality's, a text counted as its
    # 8 characters (its data_size), not its one-hot array
    torch.testing.assert_close(weights, torch.tensor([3072 / 784, 1.0, 3072 / 8]))
    likelihood = Likelihood(weights, text=[False, False, True])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, v, generator=g, dtype=torch.float64)
    ids = torch.randint(v, (5, 8), generator=g)
    expected = torch.distributions.Categorical(logits=logits).log_prob(ids).sum(-1)
    torch.testing.assert_close(likelihood.log_prob(ids, logits, 2), expected)
    with pytest.raises(ValueError, match="3 weights but 2 text flags"):
        Likelihood(weights, text=[False, True])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mnist_svhn_text", "celeba", "cub"])
def test_each_dataset_trains_from_the_command_line(tmp_path, dataset, capsys):
    rng = np.random.default_rng(4)
    root = tmp_path / dataset
    {"mnist_svhn_text": write_mnist_svhn, "celeba": write_celeba, "cub": write_cub}[dataset](root, rng)
    m = 3 if dataset == "mnist_svhn_text" else 2
    main(["train", "--preset", f"{dataset}-helvae", "--set", f"data.root={root}", f"output_dir={tmp_path / 'runs'}",
          "name=run", "train.batch_size=2", "train.max_steps=2", "train.device=cpu", "model.latent_dim=4",
          "data.drop_rate=0.5", "train.tensorboard=false"])
    run = tmp_path / "runs" / "run"
    for name in ("checkpoint.pt", "metrics.csv", "samples.png", "samples.txt", "pooling.csv"):
        assert (run / name).stat().st_size > 0, name
    assert "input:" in (run / "samples.txt").read_text()
    config, model = load_run(run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(model.encoders) == m and config.data.dataset == dataset
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())
    # evaluation: coherence and probes where a digit is shared (MNIST-SVHN-Text), likelihoods everywhere, FID
    # for the image modalities (MNIST's grey images repeated to three channels)
    weights = default_weights(WHEEL_CACHE)
    main(["evaluate", "--run", str(run), "--set", "eval.test_examples=4", "eval.likelihood_samples=3",
          "eval.likelihood_examples=3", "eval.probe_examples=-1", "eval.unconditional_samples=10",
          "eval.fid_samples=2", f"eval.fid_weights={weights}"])
    metrics = json.loads((run / "metrics.json").read_text())
    report = (run / "report.md").read_text()
    assert metrics["modalities"] == [modality.name for modality in model_modalities(run)]
    likelihood = metrics["log_likelihood"]
    assert math.isfinite(likelihood["joint"]) and likelihood["examples"] == min(3, metrics["test_examples"])
    assert metrics["fid"]["targets"] == [n for n in metrics["modalities"] if n not in ("text", "caption")]
    if dataset == "mnist_svhn_text":
        assert len(metrics["classifier_accuracy"]) == 3 and 0 <= metrics["coherence"]["overall"] <= 1
        assert set(metrics["latent_probe"]) == {"{mnist}", "{svhn}", "{text}", "{mnist,svhn}", "{mnist,text}",
                                                "{svhn,text}", "{mnist,svhn,text}"}
        assert "| from \\ to | mnist | svhn | text |" in report
        assert (root / ".digit-classifiers-mnist_svhn_text-v1.pt").exists()
    else:
        assert "coherence" not in metrics and f"{dataset} has none" in metrics["not_computed"]
        assert "Not computed: coherence and the latent probe" in report
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a one-line command-line error, before the data is read
        main(["train", "--preset", f"{dataset}-helvae", "--set", f"data.root={root}", "data.num_modalities=5",
              f"output_dir={tmp_path / 'runs'}", "name=other"])
    assert f"data.num_modalities must be {m} for data.dataset '{dataset}', got 5" in capsys.readouterr().err
