"""imagenet_utils: class names, decoding, preprocessing, augmentation, ILSVRC12 dataflows, top-k evaluation."""
import os

import cv2
import numpy as np
import pytest

from conftest import ROOT
from dorefanet.tf_setup import tf
from tensorpack.dataflow import DataFromList, imgaug

import imagenet_utils as iu

# tensorpack 0.11 threads call the deprecated Event.isSet()
pytestmark = pytest.mark.filterwarnings("ignore:isSet:DeprecationWarning")


# ---------------------------------------------------------------- class names
def test_shipped_class_names():
    names = iu.load_class_names()
    assert len(names) == 1000
    with open(os.path.join(ROOT, "data", "synset_words.txt")) as f:
        lines = f.read().splitlines()
    for i in (0, 1, 500, 999):
        wnid, words = lines[i].split(" ", 1)
        assert names[i] == (wnid, words)
    assert len({wnid for wnid, _ in names}) == 1000


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the class names file"),
    ("n01440764 tench\nbad line here\n", "line 2: expected 'nXXXXXXXX words'"),
    ("n01440764 tench\nn01443537\n", "line 2"),
    ("n01440764 tench\nn01440764 again\n", "already on line 1"),
    ("n01440764 tench\nn01443537 goldfish\n", "has 2 classes, expected 1000")])
def test_class_names_errors(tmp_path, content, message):
    path = tmp_path / "synsets.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(iu.ClassNamesError) as exc:
        iu.load_class_names(path)
    assert message in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_class_names_custom_count(tmp_path):
    path = tmp_path / "synsets.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    assert iu.load_class_names(path, num_classes=None) == [("n01440764", "tench, Tinca tinca"),
                                                           ("n01443537", "goldfish")]


# ---------------------------------------------------------------- decoding
def random_image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(h, w, 3)).astype(np.uint8)


def test_decode_by_content_png_named_jpeg(tmp_path):
    image = random_image(17, 23)
    path = tmp_path / "really_a_png.JPEG"
    ok, data = cv2.imencode(".png", image)
    path.write_bytes(data.tobytes())
    np.testing.assert_array_equal(iu.read_image(path), image)  # PNG is lossless: exact BGR round trip


def test_grayscale_becomes_three_channels(tmp_path):
    gray = np.arange(12 * 9, dtype=np.uint8).reshape(12, 9)
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), gray)
    image = iu.read_image(path)
    assert image.shape == (12, 9, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[:, :, c], gray)


@pytest.mark.parametrize("content, message", [
    (b"this is not an image", "not a decodable image"), (b"", "empty file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a decodable image"), (None, "cannot read file")])
def test_unreadable_image_error(tmp_path, content, message):
    path = tmp_path / "broken.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(iu.ImageReadError) as exc:
        iu.read_image(path)
    text = str(exc.value)
    assert message in text and str(path) in text and "\n" not in text
    assert isinstance(exc.value, ValueError)
    from dorefanet.image_io import ImageReadError

    assert iu.ImageReadError is ImageReadError  # the class --run catches


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("shape, resized", [
    ((300, 400), (256, 341)),    # 400 * 256 / 300 = 341.33
    ((400, 300), (341, 256)),
    ((257, 1000), (256, 996)),   # 996.11
    ((320, 450), (256, 360)),    # exactly 360
    ((200, 333), (256, 426)),    # 426.24, upscaled
    ((224, 224), (256, 256))])
def test_resize_shorter_side_sizes(shape, resized):
    image = random_image(*shape)
    out = iu.resize_shorter_side(image)
    assert out.shape == resized + (3,) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(image, resized[::-1], interpolation=cv2.INTER_CUBIC))


def test_center_crop_offsets():
    # Pixel values encode their coordinates, so the crop window can be read off.
    h, w = 256, 301
    rows, cols = np.mgrid[0:h, 0:w]
    image = np.stack([rows % 256, cols % 256, (cols // 256)], axis=-1).astype(np.uint8)
    crop = iu.center_crop(image)
    assert crop.shape == (224, 224, 3)
    row = crop[:, :, 0].astype(int)
    col = crop[:, :, 1].astype(int) + 256 * crop[:, :, 2].astype(int)
    assert row[0, 0] == 16 and col[0, 0] == 38  # (256 - 224) // 2, (301 - 224) // 2
    assert row[-1, -1] == 16 + 223 and col[-1, -1] == 38 + 223
    with pytest.raises(ValueError, match="cannot center-crop"):
        iu.center_crop(image[:100])


def test_preprocess_image_by_hand():
    image = random_image(300, 410, seed=3)
    # by hand: shorter side 300 -> 256, longer int(410 * 256 / 300 + 0.5) = int(350.37 + 0.5) = 350;
    # crop offsets (256 - 224) // 2 = 16 and (350 - 224) // 2 = 63
    expected = cv2.resize(image, (350, 256), interpolation=cv2.INTER_CUBIC)[16:240, 63:287]
    out = iu.preprocess_image(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_load_image(tmp_path):
    image = random_image(260, 240, seed=4)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), image)
    np.testing.assert_array_equal(iu.load_image(path), iu.preprocess_image(image))


# ---------------------------------------------------------------- training augmentation
@pytest.mark.parametrize("shape", [(300, 400), (64, 50), (5, 600)])
def test_training_augmentor_output(shape):
    augs = imgaug.AugmentorList(iu.fbresnet_augmentor(True))
    augs.reset_state()
    image = random_image(*shape, seed=5)
    outs = [augs.augment(image) for _ in range(3)]
    for out in outs:
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert not np.array_equal(outs[0], outs[1])  # random


def test_random_sized_crop_area_and_aspect():
    """Every crop has 8%-100% of the area and aspect 3/4..4/3 (within rounding); tiny tries fall back."""
    aug = iu.RandomSizedCrop(size=32)
    aug.reset_state()
    image = random_image(200, 300)
    crops = 0
    for _ in range(50):
        transform = aug.get_transform(image)
        crop = transform.tfms[0]
        if type(crop).__name__ != "CropTransform":
            continue
        area = crop.h * crop.w / (200 * 300)
        assert 0.08 - 0.01 <= area <= 1.0
        assert 0.75 - 0.02 <= crop.w / crop.h <= 4 / 3 + 0.02
        assert crop.y0 + crop.h <= 200 and crop.x0 + crop.w <= 300
        crops += 1
    assert crops > 40  # the fallback is rare for this shape
    # 2x1000: no crop of >= 8% area with aspect <= 4/3 fits, so the fallback (resize + center crop) runs
    out = aug.augment(random_image(2, 1000))
    assert out.shape == (32, 32, 3)


def test_validation_augmentor_is_preprocess_image():
    augs = imgaug.AugmentorList(iu.fbresnet_augmentor(False))
    image = random_image(300, 350, seed=6)
    np.testing.assert_array_equal(augs.augment(image), iu.preprocess_image(image))


# ---------------------------------------------------------------- ILSVRC12 layout and dataflows
CLASSES = iu.load_class_names()
PICKED = [0, 7, 999]   # class indices used by the tiny dataset


def class_color(label):
    """A solid BGR colour per class that survives resizing and JPEG well enough to identify it."""
    return np.array([(label * 37) % 256, (label * 91) % 256, 40 + (label * 13) % 200], dtype=np.uint8)


def write_image(path, label, shape=(40, 50), png=False):
    image = np.empty(shape + (3,), np.uint8)
    image[:] = class_color(label)
    ok, data = cv2.imencode(".png" if png else ".jpg", image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


def label_of(image):
    mean = image.reshape(-1, 3).mean(axis=0)
    dists = [np.abs(mean - class_color(label)).max() for label in PICKED]
    assert min(dists) < 6
    return PICKED[int(np.argmin(dists))]


@pytest.fixture
def ilsvrc(tmp_path):
    """DIR/train/<wnid>/ with JPEGs and PNGs named .JPEG; DIR/val/<wnid>/ (per-class validation)."""
    for label in PICKED:
        wnid = CLASSES[label][0]
        for i in range(2):
            write_image(tmp_path / "train" / wnid / "{}_{}.JPEG".format(wnid, i), label, png=i == 1)
        write_image(tmp_path / "val" / wnid / "v{}.JPEG".format(label), label, shape=(30 + label % 7, 60))
    (tmp_path / "train" / CLASSES[0][0] / "notes.txt").write_text("not an image, ignored")
    (tmp_path / "train" / CLASSES[0][0] / ".hidden.JPEG").write_text("ignored")
    return tmp_path


def flat_val(root, label_file):
    """A flat DIR/val/ with 5 images and a label file (index or wnid labels)."""
    lines = []
    for i, label in enumerate([0, 999, 7, 7, 0]):
        name = "ILSVRC2012_val_{:08d}.JPEG".format(i + 1)
        write_image(root / "val" / name, label, shape=(45, 35), png=i == 2)
        lines.append("{} {}".format(name, CLASSES[label][0] if i == 3 else label))
    (root / label_file).write_text("\n".join(lines) + "\n")
    return root


def collect(ds):
    ds.reset_state()
    images, labels, sizes = [], [], []
    for batch_images, batch_labels in ds:
        sizes.append(len(batch_labels))
        images.extend(batch_images)
        labels.extend(batch_labels.tolist())
    return images, labels, sizes


def test_list_train_files(ilsvrc):
    files = iu.list_imagenet_files(ilsvrc, "train")
    assert len(files) == 6
    assert sorted(label for _, label in files) == sorted(PICKED * 2)
    for path, label in files:
        assert os.path.basename(os.path.dirname(path)) == CLASSES[label][0]


@pytest.mark.parametrize("parallel", [0, 2])
def test_val_dataflow_per_class_dirs(ilsvrc, parallel):
    ds = iu.get_imagenet_dataflow(ilsvrc, "val", batch_size=2, parallel=parallel)
    images, labels, sizes = collect(ds)
    assert sizes == [2, 1]  # the partial last batch is kept
    assert sorted(labels) == sorted(PICKED)
    for image, label in zip(images, labels):
        assert image.shape == (224, 224, 3) and image.dtype == np.uint8
        assert label_of(image) == label


@pytest.mark.parametrize("label_file", ["val/val.txt", "val.txt"])
def test_val_dataflow_flat_with_label_file(ilsvrc, tmp_path, label_file):
    import shutil

    shutil.rmtree(tmp_path / "val")  # replace the per-class layout by the flat one
    flat_val(tmp_path, label_file)
    ds = iu.get_imagenet_dataflow(tmp_path, "val", batch_size=2, parallel=2)
    images, labels, sizes = collect(ds)
    assert sizes == [2, 2, 1]
    assert sorted(labels) == sorted([0, 999, 7, 7, 0])
    assert all(label_of(image) == label for image, label in zip(images, labels))


@pytest.mark.parametrize("parallel", [0, 1])
def test_train_dataflow(ilsvrc, parallel):
    ds = iu.get_imagenet_dataflow(ilsvrc, "train", batch_size=4, parallel=parallel,
                                  augmentors=[imgaug.Resize((8, 8))])
    ds.reset_state()
    seen = []
    for i, (images, labels) in zip(range(3), ds):
        assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (4,)
        assert [label_of(image) for image in images] == labels.tolist()
        seen.extend(labels.tolist())
    assert set(seen) <= set(PICKED) and len(set(seen)) >= 2


def test_train_dataflow_default_augmentation(ilsvrc):
    ds = iu.get_imagenet_dataflow(ilsvrc, "train", batch_size=3, parallel=0)
    ds.reset_state()
    images, labels = next(iter(ds))
    assert images.shape == (3, 224, 224, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) <= set(PICKED)
    assert len(ds) == 2  # 6 images, full batches only


def expect_data_error(root, split, *fragments):
    with pytest.raises(iu.ImageNetDataError) as exc:
        iu.get_imagenet_dataflow(root, split, batch_size=2, parallel=0)
    text = str(exc.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text
    return text


def test_missing_directories(tmp_path):
    expect_data_error(tmp_path / "nope", "train", "does not exist", str(tmp_path / "nope"))
    expect_data_error(tmp_path, "train", str(tmp_path / "train"), "<wnid>")
    expect_data_error(tmp_path, "val", str(tmp_path / "val"), "val.txt")
    with pytest.raises(iu.ImageNetDataError, match="--data"):
        iu.list_imagenet_files(None, "train")
    with pytest.raises(ValueError, match="'train' or 'val'"):
        iu.list_imagenet_files(tmp_path, "test")


def test_unknown_wnid(ilsvrc):
    (ilsvrc / "train" / "n99999999").mkdir()
    expect_data_error(ilsvrc, "train", "n99999999", "synset_words.txt")
    (ilsvrc / "val" / "cats").mkdir()
    expect_data_error(ilsvrc, "val", str(ilsvrc / "val" / "cats"), "is not a class")


def test_flat_val_without_label_file(tmp_path):
    write_image(tmp_path / "val" / "a.JPEG", 0)
    expect_data_error(tmp_path, "val", "no <wnid>/ class directories", "val.txt")


@pytest.mark.parametrize("line, fragment", [
    ("missing.JPEG 3", "does not exist"), ("a.JPEG 1000", "neither a class index"),
    ("a.JPEG n99999999", "neither a class index"), ("a.JPEG", "expected 'filename label'")])
def test_bad_label_file(tmp_path, line, fragment):
    write_image(tmp_path / "val" / "a.JPEG", 0)
    (tmp_path / "val.txt").write_text("a.JPEG 0\n" + line + "\n")
    expect_data_error(tmp_path, "val", fragment, str(tmp_path / "val.txt") + " line 2")


def test_empty_class_dirs(tmp_path):
    (tmp_path / "train" / CLASSES[3][0]).mkdir(parents=True)
    expect_data_error(tmp_path, "train", "no images found")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("split, parallel", [("val", 0), ("val", 2), ("train", 0), ("train", 1)])
def test_corrupt_image_raises_instead_of_hanging(ilsvrc, split, parallel):
    """A worker that fails must surface the error (naming the file) in the consumer, not hang it."""
    bad = ilsvrc / split / CLASSES[7][0] / "corrupt.JPEG"
    bad.write_bytes(b"garbage")
    ds = iu.get_imagenet_dataflow(ilsvrc, split, batch_size=1, parallel=parallel)
    ds.reset_state()
    with pytest.raises(iu.ImageReadError, match="corrupt.JPEG"):
        for _ in zip(range(200), ds):
            pass


def test_fake_dataflow():
    ds = iu.fake_dataflow(3, image_size=16, size=4)
    images, labels, sizes = collect(ds)
    assert sizes == [3] * 4
    batch = next(iter(ds))
    assert batch[0].shape == (3, 16, 16, 3) and batch[0].dtype == np.uint8
    assert batch[1].shape == (3,) and batch[1].dtype == np.int32
    assert all(0 <= label < 1000 for label in labels)
    floats = iu.fake_dataflow(2, dtype="float32", size=1)
    floats.reset_state()
    assert next(iter(floats))[0].dtype == np.float32


# ---------------------------------------------------------------- top-k evaluation
def test_topk_wrong_matches_tf_in_top_k(session):
    rng = np.random.RandomState(8)
    probs = rng.randint(0, 6, size=(64, 12)).astype(np.float32)  # many ties
    labels = rng.randint(0, 12, size=64)
    for k in (1, 5):
        expected = ~session.run(tf.nn.in_top_k(probs, labels, k))
        np.testing.assert_array_equal(iu.topk_wrong(probs, labels, k), expected)


def test_evaluate_topk_counts_every_image_including_the_partial_last_batch():
    # 11 images in batches of 4, 4, 3; image i's label has rank RANKS[i] among 10 classes.
    ranks = [0, 0, 1, 4, 5, 0, 7, 2, 0, 0, 6]
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    batches = []
    for start in (0, 4, 8):
        idx = np.arange(start, min(start + 4, 11))
        batches.append([idx.astype(np.float32).reshape(-1, 1), labels[idx]])  # the "image" is its index

    def predict(images):
        out = []
        for i in images[:, 0].astype(int):
            order = [c for c in range(10) if c != labels[i]]
            order.insert(ranks[i], labels[i])                 # classes from best to worst
            scores = np.empty(10)
            scores[order] = np.linspace(1.0, 0.1, 10)
            out.append(scores / scores.sum())
        return np.array(out)

    result = iu.evaluate_topk(predict, DataFromList(batches, shuffle=False), progress=False)
    # by hand: rank >= 1 for images 2, 3, 4, 6, 7, 10 -> 6 of 11; rank >= 5 for 4, 6, 10 -> 3 of 11
    assert result.count == 11
    assert result.top1 == pytest.approx(6 / 11) and result.top5 == pytest.approx(3 / 11)


def test_evaluate_topk_on_an_imagenet_val_flow(ilsvrc):
    """End to end: a predictor that recognises the class colours makes no error over the whole set."""
    def predict(images):
        probs = np.zeros((len(images), 1000))
        probs[np.arange(len(images)), [label_of(image) for image in images]] = 1.0
        return probs

    ds = iu.get_imagenet_dataflow(ilsvrc, "val", batch_size=2, parallel=1)
    assert iu.evaluate_topk(predict, ds, progress=False) == iu.TopKError(0.0, 0.0, 3)


def test_evaluate_topk_rejects_bad_predictions():
    ds = DataFromList([[np.zeros((2, 1)), np.array([0, 1])]], shuffle=False)
    with pytest.raises(ValueError, match="expected"):
        iu.evaluate_topk(lambda images: np.zeros((3, 10)), ds, progress=False)
    with pytest.raises(ValueError, match="no images"):
        iu.evaluate_topk(lambda images: images, DataFromList([], shuffle=False), progress=False)


def test_evaluate_topk_prefetches_in_order_and_hands_over_reader_errors():
    from dorefanet.inference import _prefetched

    class Flow:
        def __init__(self, n, fail_at=None):
            self.n, self.fail_at, self.read = n, fail_at, 0

        def __iter__(self):
            for i in range(self.n):
                if i == self.fail_at:
                    raise OSError("disk gone at batch {}".format(i))
                self.read += 1
                yield [np.full((1, 1), i, np.float32), np.array([i % 10])]

    seen = [int(images[0, 0]) for images, _ in _prefetched(Flow(7), 2)]
    assert seen == list(range(7))
    with pytest.raises(OSError, match="batch 3"):
        list(_prefetched(Flow(7, fail_at=3), 1))
    # a consumer that stops early stops the reader (no thread left blocked on a full queue)
    flow = Flow(1000)
    batches = _prefetched(flow, 1)
    next(batches)
    batches.close()
    assert flow.read < 10
    # the same result with and without reading ahead
    data = [[np.eye(10)[[i % 10]], np.array([(i * 3) % 10])] for i in range(9)]
    ahead = iu.evaluate_topk(lambda images: images, DataFromList(data, shuffle=False), progress=False)
    assert ahead == iu.evaluate_topk(lambda images: images, DataFromList(data, shuffle=False), progress=False,
                                     prefetch=0)
