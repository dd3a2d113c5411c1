"""Segmentation: model paths vs a classification prior, loss, metrics, data, fine-tuning."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bayes_transfer import data, models
from bayes_transfer import segmentation as seg
from bayes_transfer.data.errors import DatasetNotFoundError
from bayes_transfer.data.scenes import make_scenes
from bayes_transfer.data.seg_dataset import SegmentationDataset, split_by_image
from bayes_transfer.errors import SpecMismatchError
from bayes_transfer.models import segmentation_model_from_prior
from bayes_transfer.models.segmentation import (SegmentationModel, create_segmentation,
                                                segmentation_config)
from bayes_transfer.params import ParamSpec, flatten_with_paths, map_with_paths
from bayes_transfer.prior import Prior
from bayes_transfer.training import split_model

ARCH = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "width": 0.25}


def quick_init(make, seed=0):
    """``make()``'s model with He-normal kernels drawn in numpy: the same structure as a real
    initialisation without compiling an initialiser per parameter shape (slow on 2 CPUs)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path.rsplit("/", 1)[-1]
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(x.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)
        return (jnp.ones if name in ("scale", "var") else jnp.zeros)(x.shape, x.dtype)

    return nnx.merge(graphdef, map_with_paths(fill, state))


@pytest.fixture(scope="module")
def classification_prior():
    """A low-rank prior over a classification model's backbone (the spec is what matters)."""
    clf = quick_init(lambda: models.create("small_cnn", 10, width=0.25), seed=3)
    _, params, _ = split_model(clf)
    spec = ParamSpec.from_params(params)
    rng = np.random.default_rng(0)
    return Prior.lowrank(spec, spec.ravel(params), np.full(spec.size, 1e-3, np.float32),
                         rng.normal(0, 1e-2, (3, spec.size)).astype(np.float32)
                         ).with_metadata({"architecture": ARCH})


def seg_model_for(prior, num_classes):
    return quick_init(lambda: segmentation_model_from_prior(prior, num_classes,
                                                            decoder_channels=8))


@pytest.fixture(scope="module")
def seg_model(classification_prior):
    return seg_model_for(classification_prior, 3)


# ----------------------------------------------------------------------------- model

def test_encoder_paths_match_a_classification_prior(classification_prior, seg_model):
    _, params, _ = split_model(seg_model)
    classification_prior.spec.check(params)           # same backbone/... paths and shapes
    paths = list(flatten_with_paths(params))
    assert all(p.startswith(("backbone/", "decoder/")) for p in paths)
    assert any(p.startswith("decoder/") for p in paths)
    started = classification_prior.init_params(params)  # encoder = θ̄, decoder untouched
    np.testing.assert_allclose(classification_prior.spec.ravel(started),
                               classification_prior.mean, rtol=1e-6)
    assert segmentation_config(seg_model) == {"arch": "small_cnn", "num_classes": 3,
                                              "in_channels": 1, "decoder_channels": 8,
                                              "width": 0.25}


def test_prior_of_another_architecture_fails_naming_the_path(seg_model):
    other = nnx.eval_shape(lambda: models.create("resnet20", 10, width=0.25))
    spec = ParamSpec.from_params(nnx.state(other, nnx.Param))
    with pytest.raises(SpecMismatchError, match=f"'{spec.paths[0]}'"):
        spec.check(nnx.state(seg_model, nnx.Param))
    wider = nnx.eval_shape(lambda: models.create("small_cnn", 10, width=0.5))
    with pytest.raises(SpecMismatchError, match="backbone/stages/0/0/"):
        ParamSpec.from_params(nnx.state(wider, nnx.Param)).check(nnx.state(seg_model, nnx.Param))


def test_logits_at_input_resolution_for_any_size(seg_model):
    for shape in ((2, 16, 16, 1), (1, 13, 18, 1)):
        out = seg_model(jnp.zeros(shape), train=False)
        assert out.shape == shape[:3] + (3,)
    abstract = nnx.eval_shape(lambda: SegmentationModel("resnet18", 2, decoder_channels=8))
    assert {p.split("/")[0] for p in flatten_with_paths(nnx.state(abstract, nnx.Param))} == {
        "backbone", "decoder"}


def test_segmentation_model_needs_architecture_metadata():
    spec = ParamSpec(("backbone/w",), ((2,),), ("float32",))
    with pytest.raises(models.ModelConfigError, match="architecture"):
        segmentation_model_from_prior(Prior.isotropic(spec, jnp.zeros(2)), 2)
    with pytest.raises(models.UnknownArchitectureError):
        create_segmentation("no_such_net", 2)


# ----------------------------------------------------------------------------- loss, metrics

def _fixed_logits_apply():
    return lambda params, rest, x, train=True, method=None: (params["logits"], rest)


def test_ignored_pixels_do_not_change_the_loss():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (2, 5, 6)).astype(np.int32)
    mask[0, :2] = 255
    mask[1, :, 4:] = 255
    logits = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), jnp.float32)
    batch = {"image": jnp.zeros((2, 5, 6, 1)), "mask": jnp.asarray(mask)}
    loss_fn = seg.segmentation_loss(2, ignore_index=255)
    apply = _fixed_logits_apply()
    key = jax.random.PRNGKey(0)

    def loss(lg):
        return loss_fn(apply, {"logits": lg}, {}, batch, key, None)[0]

    ignored = jnp.asarray(mask == 255)[..., None]
    changed = jnp.where(ignored, logits + 100 * jnp.arange(3.0), logits)
    np.testing.assert_allclose(loss(changed), loss(logits), rtol=1e-6)
    assert float(loss(jnp.where(ignored, logits, logits + 5 * jnp.arange(3.0)))) != \
        pytest.approx(float(loss(logits)))
    # per-image mean over the valid pixels, then mean over images
    lp = jax.nn.log_softmax(logits)
    ce = -np.take_along_axis(np.asarray(lp), np.where(mask == 255, 0, mask)[..., None], -1)[..., 0]
    valid = mask != 255
    expected = np.mean([ce[i][valid[i]].mean() for i in range(2)])
    np.testing.assert_allclose(loss(logits), expected, rtol=1e-5)
    # the gradient at ignored pixels is exactly zero
    g = jax.grad(loss)(logits)
    assert float(jnp.abs(jnp.where(ignored, g, 0)).max()) == 0.0


def test_segmentation_metrics_by_hand():
    truth = np.array([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    pred = np.array([[[0, 1, 1, 1], [0, 2, 1, 0]]])
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = seg.segmentation_metrics(probs, truth, 3, ignore_index=255,
                                 class_names=("a", "b", "c"))
    # class 0: TP 2, FP 0, FN 1 → 2/3; class 1: TP 2, FP 2, FN 0 → 1/2; class 2: 1/2
    assert m["iou/a"] == pytest.approx(2 / 3)
    assert m["iou/b"] == pytest.approx(1 / 2)
    assert m["iou/c"] == pytest.approx(1 / 2)
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)       # the 255 pixel is left out
    assert m["nll"] == pytest.approx(-(5 * np.log(0.8 + 0.2 / 3) + 2 * np.log(0.2 / 3)) / 7,
                                     rel=1e-5)
    assert m["ece"] == pytest.approx(abs(5 / 7 - (0.8 + 0.2 / 3)), rel=1e-5)


# ----------------------------------------------------------------------------- data

def _objects(n=12, size=8, seed=0):
    rng = np.random.default_rng(seed)
    objs = rng.integers(0, 256, (n, size, size)).astype(np.uint8)
    objs[:, :2] = 0                                  # some off pixels in every object
    return objs, np.arange(n) % 3


def test_scenes_are_deterministic_and_masks_match_the_pasted_pixels():
    objs, labels = _objects()
    a = make_scenes(objs, labels, 6, seed=4, canvas=20, threshold=10, return_layout=True)
    b = make_scenes(objs, labels, 6, seed=4, canvas=20, threshold=10, return_layout=True)
    c = make_scenes(objs, labels, 6, seed=5, canvas=20, threshold=10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    images, masks, layouts = a
    for s, layout in enumerate(layouts):
        assert 2 <= len(layout) <= 4
        expect_img = np.zeros((20, 20), np.uint8)
        expect_mask = np.zeros((20, 20), np.int32)
        for p in layout:                              # re-paste: later objects on top
            on = objs[p.index] > 10
            expect_img[p.y:p.y + 8, p.x:p.x + 8][on] = objs[p.index][on]
            expect_mask[p.y:p.y + 8, p.x:p.x + 8][on] = labels[p.index] + 1
        np.testing.assert_array_equal(images[s, ..., 0], expect_img)
        np.testing.assert_array_equal(masks[s], expect_mask)
        np.testing.assert_array_equal(masks[s] > 0, images[s, ..., 0] > 10)


def test_fashion_scenes_splits_deterministic_classes_5_to_9():
    try:
        a = seg.load_task("fashion_scenes", 3, seed=1, num_val=2, num_test=2,
                          classes=range(5, 10))
    except DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    b = seg.load_task("fashion_scenes", 3, seed=1, num_val=2, num_test=2, classes=range(5, 10))
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.train.masks, b.train.masks)
    assert a.train.num_classes == 6 and a.train.class_names[0] == "background"
    assert a.train.masks.max() <= 5 and a.test.images.shape == (2, 64, 64, 1)
    batch = next(data.batches(a.train, 8, seed=0, epoch=0))
    assert set(batch) == {"image", "mask"} and batch["image"].dtype == np.float32


def test_crops_are_deterministic_per_seed_and_epoch_and_aligned():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, (3, 16, 12)).astype(np.int32)
    images = (masks[..., None] * 200 + 10).astype(np.uint8)   # image encodes its mask
    ds = SegmentationDataset(images, masks, 2, "toy").with_crops(8, per_image=2, flip=True)
    b1 = list(data.batches(ds, 2, seed=0, epoch=0))
    b2 = list(data.batches(ds, 2, seed=0, epoch=0))
    b3 = list(data.batches(ds, 2, seed=0, epoch=1))
    assert len(b1) == 1 and b1[0]["image"].shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(b1[0]["image"], b2[0]["image"])
    assert not np.array_equal(b1[0]["mask"], b3[0]["mask"])
    for b in b1 + b3:
        np.testing.assert_array_equal(b["image"][..., 0] > 0.5, b["mask"] == 1)
    whole = next(data.batches(ds.whole(), 3, seed=0, epoch=0, shuffle=False))
    np.testing.assert_array_equal(whole["mask"], masks)


def test_split_by_image_fixed_test_block_nested_train():
    tr2, va, te = split_by_image(30, 2, num_test=6, seed=0, num_val=4)
    tr6, _, te6 = split_by_image(30, 6, num_test=6, seed=0)
    np.testing.assert_array_equal(te, np.arange(24, 30))
    np.testing.assert_array_equal(te, te6)
    assert set(tr2) <= set(tr6) and not set(va) & set(tr2) and len(va) == 4
    assert len(split_by_image(30, 24, num_test=6, seed=1)[0]) == 24
    with pytest.raises(ValueError):
        split_by_image(30, 22, num_test=6, seed=0, num_val=4)


def test_isbi_split_by_image_with_strip_validation():
    try:
        splits = seg.load_task("isbi", 2, seed=0, crop=64, crops_per_image=2)
    except DatasetNotFoundError as e:
        pytest.skip(f"ISBI-2012 data not available: {e}")
    assert splits.train.images.shape == (2, 384, 512, 1)     # top rows of 2 images
    assert splits.val.images.shape == (2, 128, 512, 1)       # their bottom strips
    assert splits.test.images.shape == (6, 512, 512, 1)      # sections 24-29
    assert splits.num_classes == 2 and set(np.unique(splits.test.masks)) == {0, 1}
    batch = next(data.batches(splits.train, 2, seed=0, epoch=0))
    assert batch["image"].shape == (4, 64, 64, 1) and batch["mask"].shape == (4, 64, 64)


# ----------------------------------------------------------------------------- fine-tuning

def test_finetuning_on_tiny_scenes_lowers_the_loss(classification_prior, tmp_path):
    objs, labels = _objects(n=12, size=8)
    images, masks = make_scenes(objs, labels, 8, seed=0, canvas=16, max_objects=3)
    vi, vm = make_scenes(objs, labels, 4, seed=1, canvas=16, max_objects=3)
    train = SegmentationDataset(images, masks, 4, "toy_scenes")
    val = SegmentationDataset(vi, vm, 4, "toy_scenes")
    splits = data.Splits(train=train, val=val, test=val)
    model = seg_model_for(classification_prior, 4)
    config, _ = seg.default_config(batch_size=8, learning_rate=3e-3, variances=(1e-3, 1.0))
    # two λ of one prior kind: one compiled step for both runs
    config = dataclasses.replace(config, include_no_prior=False)
    res = seg.finetune_segmentation(model, splits, classification_prior, "l2sp", steps=12,
                                    config=config)
    assert [r["variance"] for r in res.sweep] == pytest.approx([1e-3, 1.0])
    best = max(res.sweep, key=lambda r: r["val"]["miou"])       # mIoU is maximised
    assert res.scale == best["scale"]
    for run in (res.result.history,):
        assert run[-1]["nll"] < 0.8 * run[0]["nll"]
    assert res.test_probs.shape == (4, 16, 16, 4)
    assert {"miou", "pixel_accuracy", "nll", "ece", "iou/0"} <= set(res.metrics)
    png = seg.save_overlays(val, res.test_probs, tmp_path / "overlay.png", max_images=2,
                            window=12)
    assert (tmp_path / "overlay.png").stat().st_size > 1000 and png.endswith("overlay.png")


def test_cli_options_merge_into_an_existing_finetune_parser():
    import argparse

    from bayes_transfer.cli import build_parser
    from bayes_transfer.cli.segmentation import add_finetune_args

    p = argparse.ArgumentParser()
    p.add_argument("--prior", required=True)
    p.add_argument("--dataset", default="mnist_5k")
    p.add_argument("--method", nargs="+", default=["lowrank"])
    add_finetune_args(p)                   # no clash with the options p already has
    args = p.parse_args(["--prior", "x", "--task", "segmentation", "--dataset", "isbi",
                         "--num-train", "2", "--steps", "10", "--method", "l2sp", "lowrank"])
    assert (args.task, args.dataset, args.num_train, args.steps, args.crop) == (
        "segmentation", "isbi", 2, 10, 128)
    args = build_parser().parse_args(["evaluate", "--task", "segmentation", "--model", "m"])
    assert args.seed is None and args.split == "test"
