"""The built-in multitask photo dataset: determinism, caching, splits, and targets
checked on hand-made images."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("skimage")

from disparse_fx.data import (  # noqa: E402
    COLOR_PHOTOS,
    GRAY_PHOTOS,
    SEGMENT_CLASSES,
    TASKS,
    MultitaskPhotos,
    cache_dir,
    compute_targets,
    default_task_losses,
    load_photo,
    make_splits,
    segment_classes,
    split_photos,
)
from disparse_fx.data import multitask_photos as mp  # noqa: E402

SMALL = dict(n_train=24, n_val=6, n_test=6)


def _tensors(ds):
    return [ds[i] for i in range(len(ds))]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(_tensors(a), _tensors(b)):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return make_splits(cache_path=tmp_path_factory.mktemp("cache"), **SMALL)


def test_sample_format_and_collate(splits):
    sample = splits.train[0]
    assert {k: (tuple(v.shape), v.dtype) for k, v in sample.items()} == {
        "input": ((3, 64, 64), torch.float32),
        "edge": ((1, 64, 64), torch.float32),
        "keypoint": ((1, 64, 64), torch.float32),
        "segment": ((64, 64), torch.int64),
        "denoise": ((3, 64, 64), torch.float32),
    }
    batch = next(iter(DataLoader(splits.train, batch_size=4)))
    assert batch["input"].shape == (4, 3, 64, 64) and batch["segment"].shape == (4, 64, 64)
    for key in ("input", "keypoint", "denoise"):
        assert 0 <= batch[key].min() and batch[key].max() <= 1
    assert set(batch["edge"].unique().tolist()) <= {0.0, 1.0}
    assert 0 <= batch["segment"].min() and batch["segment"].max() < len(SEGMENT_CLASSES)
    assert len(splits.train) == 24 and len(splits.val) == 6 and len(splits.test) == 6


def test_same_seed_same_tensors_other_seed_differs(splits):
    again = make_splits(cache=False, **SMALL)
    for a, b in zip(splits, again):
        _assert_same(a, b)
    other = make_splits(cache=False, seed=1, **SMALL)
    assert not torch.equal(other.train[0]["denoise"], splits.train[0]["denoise"]) or other.train.photos != splits.train.photos


def test_rebuilt_from_cache_equals_fresh_build(tmp_path, monkeypatch):
    first = make_splits(cache_path=tmp_path, **SMALL)
    files = list(tmp_path.glob("multitask_photos-v*.pt"))
    assert len(files) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(mp, "_build_split", no_build)
    cached = make_splits(cache_path=tmp_path, **SMALL)
    for a, b in zip(first, cached):
        _assert_same(a, b)
    # other parameters -> another cache key -> a build
    with pytest.raises(AssertionError, match="should have loaded"):
        make_splits(cache_path=tmp_path, crop=32, **SMALL)


def test_corrupt_cache_is_rebuilt(tmp_path):
    make_splits(cache_path=tmp_path, **SMALL)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"not a torch file")
    again = make_splits(cache_path=tmp_path, **SMALL)
    assert len(again.train) == SMALL["n_train"]


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPARSE_FX_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("DISPARSE_FX_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "disparse_fx")


def test_splits_are_disjoint_by_source_photo(splits):
    photos = [set(s.photos) for s in splits]
    assert not (photos[0] & photos[1]) and not (photos[0] & photos[2]) and not (photos[1] & photos[2])
    assert set().union(*photos) == set(COLOR_PHOTOS + GRAY_PHOTOS)
    for ds in splits:
        assert set(ds.sources) == set(ds.photos)  # every photo of a split is used, no other


def test_split_photos_deterministic_and_stratified():
    a = split_photos(COLOR_PHOTOS + GRAY_PHOTOS, seed=3)
    assert a == split_photos(COLOR_PHOTOS + GRAY_PHOTOS, seed=3)
    for split in ("val", "test"):
        assert sum(p in COLOR_PHOTOS for p in a[split]) == 1 and len(a[split]) == 2
    with pytest.raises(ValueError, match="need >= 1 photo per split"):
        split_photos(["camera", "moon"])


def test_bundled_photos_load_offline():
    for name in COLOR_PHOTOS + GRAY_PHOTOS:
        image = load_photo(name)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.float32
        assert 0 <= image.min() and image.max() <= 1
    assert np.array_equal(load_photo("camera")[..., 0], load_photo("camera")[..., 2])


# --- targets on hand-made images ----------------------------------------------------


def _white_square(size=64, lo=20, hi=44):
    image = np.zeros((size, size, 3), np.float32)
    image[lo:hi, lo:hi] = 1.0
    return image


def test_edge_target_on_square_border():
    edge = compute_targets(_white_square())["edge"]
    ys, xs = np.nonzero(edge)
    assert edge.any()
    # every edge pixel lies within one pixel of the square's border ...
    on_border = (np.minimum(abs(ys - 19.5), abs(ys - 43.5)) <= 1) | (np.minimum(abs(xs - 19.5), abs(xs - 43.5)) <= 1)
    assert on_border.all()
    # ... and each of the four sides has edges along its middle
    for y, x in [(19, 32), (44, 32), (32, 19), (32, 44)]:
        assert edge[y - 1 : y + 2, x - 1 : x + 2].any(), (y, x)
    assert not edge[25:39, 25:39].any() and not edge[:10].any()


def test_keypoint_target_peaks_at_square_corners():
    heat = compute_targets(_white_square())["keypoint"]
    assert heat.dtype == np.float32 and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    corners = [(20, 20), (20, 43), (43, 20), (43, 43)]
    for y, x in corners:
        assert heat[y - 2 : y + 3, x - 2 : x + 3].max() > 0.9, (y, x)
    assert heat[28:36, 28:36].max() < 0.01  # flat interior
    assert heat[30:34, 18:22].max() < 0.1  # straight edge, not a corner
    flat = compute_targets(np.full((32, 32, 3), 0.5, np.float32))
    assert flat["keypoint"].max() == 0 and not flat["edge"].any()  # no corners or edges at the crop border


def test_segment_classes_fixed_meaning():
    seg = compute_targets(_white_square())["segment"]
    assert (seg[24:40, 24:40] == SEGMENT_CLASSES.index("light")).all()
    assert (seg[:10] == SEGMENT_CLASSES.index("dark")).all()
    colours = {
        "dark": (0.1, 0.1, 0.1),
        "gray": (0.5, 0.5, 0.5),
        "light": (0.9, 0.9, 0.9),
        "red_yellow": (0.9, 0.2, 0.1),
        "green_cyan": (0.1, 0.8, 0.2),
        "blue_magenta": (0.1, 0.2, 0.9),
    }
    for name, rgb in colours.items():
        patch = np.broadcast_to(np.array(rgb, np.float32), (8, 8, 3))
        assert (segment_classes(patch) == SEGMENT_CLASSES.index(name)).all(), name
    assert (segment_classes(np.broadcast_to(np.float32([0.9, 0.9, 0.1]), (4, 4, 3))) == 3).all()  # yellow is warm


def test_denoise_target_is_clean_and_input_is_noisy():
    gray = np.full((64, 64, 3), 0.5, np.float32)
    gray[16:48, 16:48] = 0.7
    ds = MultitaskPhotos.from_images({"square": gray}, n=3, noise_sigma=0.1, seed=5)
    for i in range(3):
        s = ds[i]
        assert torch.allclose(s["denoise"], torch.from_numpy(gray).permute(2, 0, 1), atol=1 / 255)
        noise = s["input"] - s["denoise"]
        assert 0.08 < float(noise.std()) < 0.12 and abs(float(noise.mean())) < 0.01
        assert torch.equal(s["input"], ds[i]["input"])  # fixed per sample
    assert not torch.equal(ds[0]["input"], ds[1]["input"])
    clean = MultitaskPhotos.from_images({"square": gray}, n=1, noise_sigma=0.0)[0]
    assert torch.equal(clean["input"], clean["denoise"])


def test_from_images_validates():
    with pytest.raises(ValueError, match="must be \\(H, W, 3\\)"):
        MultitaskPhotos.from_images({"small": np.zeros((16, 16, 3), np.float32)}, n=1, crop=32)


def test_default_losses_match_tasks(splits):
    losses = default_task_losses()
    assert set(losses) == set(TASKS)
    batch = next(iter(DataLoader(splits.val, batch_size=2)))
    perfect = {"keypoint": batch["keypoint"], "denoise": batch["denoise"]}
    for task, (_, channels) in TASKS.items():
        pred = perfect.get(task, torch.zeros(2, channels, 64, 64))
        value = losses[task](pred, batch)
        assert value.ndim == 0 and torch.isfinite(value)
        if task in perfect:
            assert value == 0
    assert losses["segment"](torch.zeros(2, 6, 64, 64), batch) == pytest.approx(np.log(6), rel=1e-5)


def test_zoo_default_tasks_match_dataset():
    from disparse_fx.zoo import DEFAULT_TASKS

    assert DEFAULT_TASKS == TASKS


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop"):
        make_splits(cache=False, crop=256)
    with pytest.raises(ValueError, match="photo must be one of"):
        load_photo("eagle")
