"""Models: shapes, parameter counts, path conventions, functional BatchNorm, torchvision map."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bayes_transfer import models
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import flatten_with_paths

@functools.lru_cache(maxsize=None)
def _cached_abstract(arch, num_classes, in_channels, config):
    return _fresh_abstract(arch, num_classes, in_channels, **dict(config))


def _fresh_abstract(arch, num_classes=10, in_channels=1, **config):
    """The model with ShapeDtypeStruct leaves: structure and shapes, no initialisation."""
    return nnx.eval_shape(lambda: models.create(arch, num_classes, in_channels=in_channels,
                                                **config))


def _abstract(arch, num_classes=10, in_channels=1, **config):
    """Shared (cached) abstract model: do not mutate it; use _fresh_abstract for that."""
    return _cached_abstract(arch, num_classes, in_channels, tuple(sorted(config.items())))


@pytest.fixture(scope="module")
def small_cnn():
    # the one real initialisation of this file: JAX compiles the random initialiser
    # once per distinct parameter shape, which costs seconds on a small CPU
    return models.create("small_cnn", 10, seed=0)


# ----------------------------------------------------------------------------- shapes

def _abstract_forward(model, x_shape, train=False):
    """Shapes of (logits, feature maps) by tracing only: no init, no compute."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        return m(x, train=train), m.backbone.feature_maps(x)

    logits, maps = jax.eval_shape(run, state, x)
    return logits.shape, [m.shape for m in maps]


@pytest.mark.parametrize("arch", ["small_cnn", "resnet20", "resnet32", "resnet56"])
@pytest.mark.parametrize("hw,c", [(28, 1), (32, 3)])
def test_output_shapes(arch, hw, c):
    model = _abstract(arch, 10, c)
    bb = model.backbone
    logits, maps = _abstract_forward(model, (2, hw, hw, c), train=arch in ("small_cnn",
                                                                        "resnet20"))
    assert logits == (2, 10)
    assert [m[-1] for m in maps] == list(bb.feature_channels)
    assert maps[-1][-1] == bb.num_features == model.head.in_features
    assert [m[1:3] for m in maps] == [(-(-hw // s),) * 2 for s in bb.feature_strides]


@pytest.mark.parametrize("hw,c", [(28, 1), (32, 3), (224, 3)])
def test_resnet18_shapes(hw, c):
    logits, maps = _abstract_forward(_abstract("resnet18", 5, c), (1, hw, hw, c))
    assert logits == (1, 5)
    assert [m[-1] for m in maps] == [64, 64, 128, 256, 512]
    # torch arithmetic: 7x7/2 pad 3, max-pool 3x3/2 pad 1, then 3x3/2 pad 1 per stage
    size = (hw + 6 - 7) // 2 + 1
    sizes = [size]
    for _ in range(4):
        size = (size + 2 - 3) // 2 + 1
        sizes.append(size)
    assert [m[1] for m in maps] == sizes
    if hw == 224:
        assert sizes == [112, 56, 28, 14, 7]


def test_resnet50_shapes():
    logits, maps = _abstract_forward(_abstract("resnet50", 1000, 3), (1, 64, 64, 3))
    assert logits == (1, 1000)
    assert [m[1:] for m in maps] == [(32, 32, 64), (16, 16, 256), (8, 8, 512), (4, 4, 1024),
                                     (2, 2, 2048)]


def test_small_cnn_forward_values(small_cnn):
    @nnx.jit
    def run(m, x):
        return m(x), m.features(x), m.backbone.feature_maps(x), m(x[:1])

    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    logits, feats, maps, first = run(small_cnn, x)
    assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(feats, maps[-1].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, feats @ small_cnn.head.kernel[...] +
                               small_cnn.head.bias[...], rtol=1e-5, atol=1e-5)
    # eval mode uses running statistics: an example's logits do not depend on its batch
    np.testing.assert_allclose(logits[:1], first, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- parameters

def test_param_counts():
    n = models.count_params(_abstract("small_cnn"))
    assert 100_000 <= n <= 300_000, n
    assert n == 131_178
    # ResNet-20, option-A shortcuts: 0.27M (269,722 for RGB input, 288 fewer for grey)
    assert models.count_params(_abstract("resnet20", in_channels=3)) == 269_722
    assert models.count_params(_abstract("resnet20")) == 269_434
    assert models.count_params(_abstract("resnet32", in_channels=3)) == 464_154
    assert models.count_params(_abstract("resnet56", in_channels=3)) == 853_018
    # torchvision totals (with the 1000-class fc)
    assert models.count_params(_abstract("resnet18", 1000, 3)) == 11_689_512
    assert models.count_params(_abstract("resnet50", 1000, 3)) == 25_557_032


def test_resnet50_backbone_param_count():
    model = _abstract("resnet50", 1000, 3)
    assert models.count_params(model, models.BACKBONE_RULE) == 23_508_032


@pytest.mark.parametrize("arch", ["small_cnn", "resnet20", "resnet18", "resnet50"])
def test_paths_and_head(arch):
    model = _abstract(arch, 1000, 3)
    paths = list(flatten_with_paths(nnx.state(model)))
    assert paths and all(p.startswith(("backbone/", "head/")) for p in paths)
    assert isinstance(model.head, nnx.Linear)
    assert model.head.in_features == model.backbone.num_features
    assert model.head.out_features == 1000
    head = [p for p in flatten_with_paths(nnx.state(model, nnx.Param)) if p.startswith("head/")]
    assert sorted(head) == ["head/bias", "head/kernel"]


def test_cifar_resnet_bad_depth():
    with pytest.raises(BayesTransferError, match="6n\\+2"):
        models.create("cifar_resnet", 10, depth=21)


# ----------------------------------------------------------------------------- functional BN

def test_jit_split_merge_updates_batch_stats_only_in_train_mode(small_cnn):
    model = small_cnn
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1)) * 2.0 + 1.0

    @jax.jit
    def forward(params, rest, x, train):
        m = nnx.merge(graphdef, params, rest)
        return m(x, train=train), nnx.state(m, nnx.Not(nnx.Param))

    before = flatten_with_paths(rest)
    _, rest_train = jax.jit(forward.__wrapped__, static_argnums=3)(params, rest, x, True)
    _, rest_eval = jax.jit(forward.__wrapped__, static_argnums=3)(params, rest, x, False)
    after_train = flatten_with_paths(rest_train)
    after_eval = flatten_with_paths(rest_eval)
    assert set(before) == set(after_train) and all("/bn/" in p for p in before)
    assert any(p.endswith("/mean") for p in before) and any(p.endswith("/var") for p in before)
    for p in before:
        assert not np.allclose(before[p], after_train[p]), p
        np.testing.assert_array_equal(before[p], after_eval[p])
    # the model object itself is untouched by the functional calls
    np.testing.assert_array_equal(flatten_with_paths(nnx.state(model, nnx.BatchStat))
                                  ["backbone/stages/0/0/bn/mean"],
                                  before["backbone/stages/0/0/bn/mean"])


def test_sgd_loss_falls_small_cnn(small_cnn):
    # functional training on the shared model's arrays (the model object is untouched)
    graphdef, params, rest = nnx.split(small_cnn, nnx.Param, ...)
    # learnable synthetic task: the class says which quadrant is bright
    rng = np.random.default_rng(0)
    y = np.arange(32) % 4
    x = rng.normal(size=(32, 16, 16, 1)).astype(np.float32) * 0.5
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 8 * r:8 * r + 8, 8 * q:8 * q + 8] += 1.5
    x, y = jnp.asarray(x), jnp.asarray(y)
    tx = optax.sgd(0.1, momentum=0.9)
    opt = tx.init(params)

    @jax.jit
    def step(params, rest, opt):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(m(x, train=True), y).mean()
            return loss, nnx.state(m, nnx.Not(nnx.Param))
        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), rest, opt, loss

    losses = []
    for _ in range(10):
        params, rest, opt, loss = step(params, rest, opt)
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert not np.allclose(flatten_with_paths(rest)["backbone/stages/0/0/bn/mean"], 0.0)


# ----------------------------------------------------------------------------- registry

@pytest.mark.parametrize("arch,config", [("small_cnn", {"width": 0.5}), ("resnet20", {}),
                                         ("resnet32", {"shortcut": "B"}), ("resnet18", {}),
                                         ("cifar_resnet", {"depth": 14, "width": 2})])
def test_create_model_config_roundtrip(arch, config):
    model = _abstract(arch, 3, 2, **config)
    cfg = models.model_config(model)
    assert cfg["arch"] == arch and cfg["num_classes"] == 3 and cfg["in_channels"] == 2
    for k, v in config.items():
        assert cfg[k] == v
    import json
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = nnx.eval_shape(lambda: models.create(**cfg))
    assert models.model_config(rebuilt) == cfg
    shapes = lambda m: {p: tuple(v.shape) for p, v in flatten_with_paths(nnx.state(m)).items()}
    assert shapes(rebuilt) == shapes(model)


def test_resnet_convenience_classes_match_registry():
    a = nnx.eval_shape(lambda: models.ResNet(10, depth=20, rngs=nnx.Rngs(0)))
    b = nnx.eval_shape(lambda: models.ResNet20(10, rngs=nnx.Rngs(0)))
    assert models.model_config(a) == models.model_config(b)
    assert models.model_config(a)["arch"] == "resnet20"


def test_same_seed_same_weights():
    a = flatten_with_paths(nnx.state(models.create("small_cnn", 10, seed=3)))
    b = flatten_with_paths(nnx.state(models.create("small_cnn", 10, seed=3)))
    c = flatten_with_paths(nnx.state(models.create("small_cnn", 10, seed=4)))
    k = "backbone/stages/1/0/conv/kernel"
    np.testing.assert_array_equal(a[k], b[k])
    assert not np.allclose(a[k], c[k])


def test_unknown_arch_error_lists_known_names():
    with pytest.raises(models.UnknownArchitectureError) as e:
        models.create("resnet21", 10)
    assert isinstance(e.value, BayesTransferError)
    for name in models.ARCHITECTURES:
        assert name in str(e.value)
    assert set(models.ARCHITECTURES) >= {"small_cnn", "resnet20", "resnet32", "resnet56",
                                         "resnet18", "resnet50"}
    assert models.BACKBONE_RULE == r"^backbone/"


def test_unknown_option_is_a_clear_error():
    with pytest.raises(models.ModelConfigError, match="'widht'.*width"):
        models.create("resnet20", 10, widht=2)
    assert models.architecture_options("small_cnn") == {"width": 1.0}


# ----------------------------------------------------------------------------- torchvision

def _torchvision_resnet_keys(block: str, layers):
    """{key: shape} of torchvision's resnet state dict, written from the architecture."""
    keys = {}

    def conv(name, o, i, k):
        keys[f"{name}.weight"] = (o, i, k, k)

    def bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{leaf}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    expansion = 4 if block == "bottleneck" else 1
    inplanes = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(n):
            pre = f"layer{li}.{b}"
            if block == "bottleneck":
                conv(f"{pre}.conv1", planes, inplanes, 1)
                bn(f"{pre}.bn1", planes)
                conv(f"{pre}.conv2", planes, planes, 3)
                bn(f"{pre}.bn2", planes)
                conv(f"{pre}.conv3", planes * 4, planes, 1)
                bn(f"{pre}.bn3", planes * 4)
            else:
                conv(f"{pre}.conv1", planes, inplanes, 3)
                bn(f"{pre}.bn1", planes)
                conv(f"{pre}.conv2", planes, planes, 3)
                bn(f"{pre}.bn2", planes)
            if b == 0 and (li > 1 or inplanes != planes * expansion):
                conv(f"{pre}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{pre}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    keys["fc.weight"] = (1000, 512 * expansion)
    keys["fc.bias"] = (1000,)
    return keys


def _torch_shape_to_flax(shape, transform):
    if transform == "oihw_to_hwio":
        o, i, h, w = shape
        return (h, w, i, o)
    if transform == "transpose":
        return tuple(reversed(shape))
    assert transform == "identity"
    return shape


@pytest.mark.parametrize("arch,block,layers,n_keys,n_bn", [
    ("resnet50", "bottleneck", (3, 4, 6, 3), 320, 53),
    ("resnet18", "basic", (2, 2, 2, 2), 122, 20),
])
def test_torchvision_mapping_is_a_bijection(arch, block, layers, n_keys, n_bn):
    model = _abstract(arch, 1000, 3)
    expected = _torchvision_resnet_keys(block, layers)
    assert len(expected) == n_keys       # len(torchvision.models.<arch>().state_dict())
    torch_keys = {k: s for k, s in expected.items()
                  if not k.endswith(models.IGNORED_TORCH_SUFFIXES)}
    assert len(torch_keys) == n_keys - n_bn      # minus one num_batches_tracked per BN

    state = nnx.state(model)
    flat = flatten_with_paths(state)
    names = models.torchvision_names(state)
    assert set(names) == set(flat)                              # covers params + BN stats
    mapped = [t for t, _ in names.values()]
    assert len(set(mapped)) == len(mapped)                      # injective
    assert set(mapped) == set(torch_keys)                       # onto
    for path, (key, transform) in names.items():
        assert transform in models.TRANSFORMS
        assert tuple(flat[path].shape) == _torch_shape_to_flax(torch_keys[key], transform), key
    # BatchNorm statistics map to running_mean / running_var, trainable params elsewhere
    stats = flatten_with_paths(nnx.state(model, nnx.BatchStat))
    assert {names[p][0].rsplit(".", 1)[1] for p in stats} == {"running_mean", "running_var"}
    assert names["head/kernel"] == ("fc.weight", "transpose")
    assert names["backbone/conv1/kernel"] == ("conv1.weight", "oihw_to_hwio")
    # parameter-only mapping (no running stats) is the trainable subset
    params_only = models.torchvision_names(nnx.state(model, nnx.Param))
    assert len(stats) == 2 * n_bn
    assert len(params_only) == len(torch_keys) - len(stats)
    # the backbone is everything but fc
    backbone_numel = sum(int(np.prod(s)) for k, s in torch_keys.items()
                         if not k.startswith("fc.") and "running" not in k)
    assert models.count_params(model, models.BACKBONE_RULE) == backbone_numel


def test_torchvision_state_dict_roundtrip():
    # a random torchvision-layout state dict loaded into an abstract ResNet-18 (no init)
    expected = _torchvision_resnet_keys("basic", (2, 2, 2, 2))
    rng = np.random.default_rng(0)
    sd = {k: (rng.normal(size=s).astype(np.float32) if s else np.zeros((), np.int64))
          for k, s in expected.items()}
    model = _fresh_abstract("resnet18", 1000, 3)
    models.load_torchvision_state_dict(model, sd)
    flat = flatten_with_paths(nnx.state(model))
    np.testing.assert_array_equal(flat["backbone/conv1/kernel"],
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["head/kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(flat["backbone/layer3/0/downsample/1/mean"],
                                  sd["layer3.0.downsample.1.running_mean"])
    back = models.to_torchvision_state_dict(model)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k])

    # RGB weights into a grey model with its own 10-class head
    grey = _fresh_abstract("resnet18", 10, 1)
    with pytest.raises(BayesTransferError, match="include_head=False"):
        models.load_torchvision_state_dict(grey, sd)
    models.load_torchvision_state_dict(grey, sd, include_head=False)
    g = flatten_with_paths(nnx.state(grey))
    np.testing.assert_allclose(g["backbone/conv1/kernel"],
                               sd["conv1.weight"].transpose(2, 3, 1, 0).sum(2, keepdims=True),
                               rtol=1e-6)
    np.testing.assert_array_equal(g["backbone/layer4/1/bn2/var"], sd["layer4.1.bn2.running_var"])
    assert isinstance(grey.head.kernel.get_value(), jax.ShapeDtypeStruct)   # head left alone

    # strict loading names what is missing
    partial = dict(sd)
    del partial["layer1.0.bn1.running_var"]
    with pytest.raises(BayesTransferError, match="layer1.0.bn1.running_var"):
        models.load_torchvision_state_dict(_fresh_abstract("resnet18", 1000, 3), partial)


@pytest.mark.parametrize("shape, window, stride, padding", [
    ((4, 28, 28, 3), 2, 2, 0), ((2, 7, 9, 5), 2, 2, 0), ((2, 15, 15, 4), 3, 2, 1),
    ((2, 16, 16, 4), 3, 2, 1)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_equals_flax_max_pool_values_and_gradient(shape, window, stride, padding,
                                                           ties):
    """The strided-slice max-pool (fast to differentiate on XLA:CPU) against flax's
    reduce_window one: the same values and the same gradient, also where windows hold
    tied maxima (ReLU zeros, flat image backgrounds): the first maximum takes it."""
    from bayes_transfer.models._base import max_pool

    x = np.random.RandomState(0).randn(*shape).astype(np.float32)
    x = jnp.asarray(np.maximum(np.round(x), 0) if ties else x)
    pad = ((padding, padding), (padding, padding)) if padding else "VALID"

    def flax_pool(x):
        return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=pad)

    def ours(x):
        return max_pool(x, window, stride, padding)

    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(flax_pool(x)))
    grad = [jax.grad(lambda x, f=f: jnp.sum(f(x) * jnp.arange(f(x).size).reshape(f(x).shape)))
            for f in (ours, flax_pool)]
    np.testing.assert_array_equal(np.asarray(grad[0](x)), np.asarray(grad[1](x)))


def test_max_pool_gradient_inside_a_jitted_model_equals_flax_max_pool(monkeypatch):
    """Regression: finding each window's maximum again in the backward pass (x == out)
    lost gradients under jit, where XLA recomputed the ReLU output rounded differently
    from the forward pass. The whole network's jitted gradient must match flax's pool."""
    import bayes_transfer.models.small_cnn as small_cnn
    from bayes_transfer.training.predict import make_apply, split_model

    x = jax.random.normal(jax.random.key(1), (20, 8, 8, 1))
    y = jnp.arange(20) % 10

    def gradient():
        graphdef, params, rest = split_model(models.create("small_cnn", 10, in_channels=1))
        apply = make_apply(graphdef)

        def loss(p):
            logits, _ = apply(p, rest, x, train=True)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(20), y])
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    ours = gradient()
    monkeypatch.setattr(small_cnn, "max_pool", lambda x, window, stride: nnx.max_pool(
        x, (window, window), strides=(stride, stride)))
    for a, b in zip(ours, gradient(), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
