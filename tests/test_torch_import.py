"""Reference-format torch priors: the safe .pt reader and the importer.

The reader tests build .pt zips by hand (no torch needed), including malicious ones.
The importer tests write real files with ``torch.save`` from a torchvision-layout
ResNet written out below (torchvision itself is not installed) and are skipped without
torch: ``pip install torch==2.13.0`` (the ``[torch]`` extra).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bayes_transfer import models
from bayes_transfer.artifacts import read_prior
from bayes_transfer.cli.import_torch import add_import_parser
from bayes_transfer.errors import (BayesTransferError, LegacyTorchFormatError, TorchFormatError,
                                   TorchImportError, UnsafePickleError)
from bayes_transfer.interop import (ParamMap, ReferenceLayout, convert_reference,
                                    import_torch_prior, import_torch_weights, reference_layout,
                                    torch_reader)
from bayes_transfer.params import flatten_with_paths
from bayes_transfer.prior import Prior

TORCH_REASON = ("torch is not installed: `pip install torch==2.13.0` (the [torch] extra) to run "
                "the importer tests against real torch.save files")


def _torch():
    return pytest.importorskip("torch", reason=TORCH_REASON)


# ============================================================================ hand-made .pt
def _pk_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _pk_int(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    nbytes = (n.bit_length() + 8) // 8
    return b"\x8a" + bytes([nbytes]) + n.to_bytes(nbytes, "little", signed=True)


def _pk_tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _pk_tensor(key, numel, offset, shape, stride, storage="FloatStorage") -> bytes:
    """The opcodes torch.save emits for one tensor (protocol 2)."""
    pid = _pk_tuple([_pk_str("storage"), f"ctorch\n{storage}\n".encode(), _pk_str(key),
                     _pk_str("cpu"), _pk_int(numel)])
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + _pk_int(offset)
            + _pk_tuple(map(_pk_int, shape)) + _pk_tuple(map(_pk_int, stride))
            + b"\x89ccollections\nOrderedDict\n)RtR")


def _pk_dict(entries: dict) -> bytes:
    return b"\x80\x02}(" + b"".join(_pk_str(k) + v for k, v in entries.items()) + b"u."


def _write_zip(path, pkl: bytes, storages: dict, *, root="archive", byteorder=b"little"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", pkl)
        z.writestr(f"{root}/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"{root}/data/{key}", data)
        z.writestr(f"{root}/version", b"3\n")
    return path


def _write_pt(path, arrays: dict):
    """A minimal torch.save-compatible writer for {name: contiguous float32 array}."""
    entries, storages = {}, {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.ascontiguousarray(a, np.float32)
        stride = tuple(s // 4 for s in a.strides) if a.ndim else ()
        entries[name] = _pk_tensor(str(i), a.size, 0, a.shape, stride)
        storages[str(i)] = a.tobytes()
    return _write_zip(path, _pk_dict(entries), storages)


def test_reader_reads_handmade_files_and_views(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(4, 3, 2, 2)), "b": rng.normal(size=(5,)), "s": np.float32(2)}
    out = torch_reader.load(_write_pt(tmp_path / "a.pt", arrays))
    assert list(out) == ["w", "b", "s"]
    for k, a in arrays.items():
        np.testing.assert_array_equal(out[k], np.asarray(a, np.float32))
        assert out[k].dtype == np.float32
    # offset + non-contiguous strides (a transposed slice) and a shared storage
    base = np.arange(24, dtype=np.float32)
    pkl = _pk_dict({"t": _pk_tensor("0", 24, 2, (3, 4), (1, 3)),
                    "v": _pk_tensor("0", 24, 4, (2, 5), (5, 1))})
    out = torch_reader.load(_write_zip(tmp_path / "v.pt", pkl, {"0": base.tobytes()}))
    np.testing.assert_array_equal(out["t"], [[base[2 + i + 3 * j] for j in range(4)]
                                             for i in range(3)])
    np.testing.assert_array_equal(out["v"], base[4:14].reshape(2, 5))
    # bfloat16 and big-endian storages
    bf = np.array([1.5, -2.0, 3.25], dtype=jnp.bfloat16)
    pkl = _pk_dict({"x": _pk_tensor("0", 3, 0, (3,), (1,), "BFloat16Storage"),
                    "y": _pk_tensor("1", 2, 0, (2,), (1,), "DoubleStorage")})
    out = torch_reader.load(_write_zip(tmp_path / "be.pt", pkl, {
        "0": bf.view(np.uint16).astype(">u2").tobytes(),
        "1": np.array([1.0, -7.5], ">f8").tobytes()}, byteorder=b"big"))
    assert out["x"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out["x"].astype(np.float32), [1.5, -2.0, 3.25])
    np.testing.assert_array_equal(out["y"], [1.0, -7.5])


# ============================================================================ malicious files
class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _payloads(marker):
    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    valid = _pk_tensor("0", 4, 0, (4,), (1,))
    ord_dict = b"ccollections\nOrderedDict\n)R"
    return {
        # GLOBAL posix.system + REDUCE (what pickle.dumps writes for os.system)
        "global_reduce": pickle.dumps(_Evil(os.system, touch), protocol=2),
        # STACK_GLOBAL builtins.exec + REDUCE (protocol 4)
        "stack_global": pickle.dumps(_Evil(exec, code), protocol=4),
        # INST and OBJ: instantiate a non-allowlisted callable directly
        "inst": b"(" + _pk_str(touch) + b"ios\nsystem\n.",
        "obj": b"(cos\nsystem\n" + _pk_str(touch) + b"o.",
        # a plausible state dict with one evil entry after a valid tensor
        "nested": b"\x80\x02}(" + _pk_str("w") + valid + _pk_str("evil")
                  + b"cbuiltins\neval\n(" + _pk_str(code) + b"tRu.",
        # BUILD: give an OrderedDict a __setstate__, then BUILD again; BUILD on a tensor
        "build_dict": b"\x80\x02" + ord_dict + b"}" + _pk_str("__setstate__") + ord_dict
                      + b"sb}b.",
        "build_tensor": b"\x80\x02" + valid + b"}" + _pk_str("x") + _pk_int(1) + b"sb.",
        # NEWOBJ of a forbidden class
        "newobj": b"\x80\x02csubprocess\nPopen\n(" + _pk_str(touch) + b"t\x81.",
    }


def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    # positive control: the payload is real (plain pickle runs it)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(os.system, f"touch {control}"), protocol=2))
    assert control.exists()
    storage = np.ones(4, np.float32).tobytes()
    for name, pkl in _payloads(marker).items():
        path = _write_zip(tmp_path / f"{name}.pt", pkl, {"0": storage})
        with pytest.raises(UnsafePickleError) as e:
            torch_reader.load(path)
        assert isinstance(e.value, TorchFormatError) and isinstance(e.value, BayesTransferError)
        msg = str(e.value)
        if name in ("global_reduce", "inst", "obj"):
            assert "system" in msg and "Nothing in the file was executed" in msg, msg
        if name == "stack_global":
            assert "builtins.exec" in msg
        if name == "nested":
            assert "builtins.eval" in msg
        if name == "newobj":
            assert "subprocess.Popen" in msg
        if name.startswith("build"):
            assert "BUILD" in msg
        assert not marker.exists(), name
    # REDUCE on an allowlisted object that is not callable: malformed, still nothing runs
    pkl = b"\x80\x02ctorch\nFloatStorage\n)R."
    with pytest.raises(TorchFormatError):
        torch_reader.load(_write_zip(tmp_path / "r.pt", pkl, {}))
    assert not marker.exists()


def test_legacy_and_broken_files_raise_typed_errors(tmp_path):
    # legacy (pre-1.6) files: a pickle stream starting with torch's magic number
    legacy = tmp_path / "legacy.pt"
    magic = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
    legacy.write_bytes(b"\x80\x02\x8a\x0a" + magic + b".")
    with pytest.raises(LegacyTorchFormatError, match="re-save|save it\\s+again|torch.save"):
        torch_reader.load(legacy)
    bare = tmp_path / "bare.pt"
    bare.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(LegacyTorchFormatError):
        torch_reader.load(bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(TorchFormatError, match="not a PyTorch file"):
        torch_reader.load(junk)
    with pytest.raises(TorchFormatError, match="does not exist"):
        torch_reader.load(tmp_path / "nope.pt")

    good = _write_pt(tmp_path / "good.pt", {"w": np.arange(64, dtype=np.float32)})
    data = good.read_bytes()
    # truncated zip
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFormatError, match="truncated"):
        torch_reader.load(cut)
    # flipped bytes inside a storage: the zip CRC catches it
    i = data.index(np.arange(64, dtype=np.float32).tobytes()) + 40
    bad = tmp_path / "crc.pt"
    bad.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    with pytest.raises(TorchFormatError, match="corrupt"):
        torch_reader.load(bad)

    four = np.ones(4, np.float32).tobytes()
    cases = {
        # storage declared with 10 floats, file holds 4
        "size": (_pk_tensor("0", 10, 0, (10,), (1,)), four, "declared as 10"),
        # offset outside the storage
        "offset": (_pk_tensor("0", 4, 7, (1,), (1,)), four, "reads up to element"),
        # strides that would read out of bounds
        "stride": (_pk_tensor("0", 4, 0, (2, 2), (3, 1)), four, "reads up to element"),
        # absurd size through a zero stride (an 'expanded' tensor of 10^12 elements)
        "absurd": (_pk_tensor("0", 4, 0, (10**12,), (0,)), four, "absurd"),
        "huge_numel": (_pk_tensor("0", 2**61, 0, (4,), (1,)), four, "declared as"),
        "negative": (_pk_tensor("0", 4, 0, (-1,), (1,)), four, "negative"),
        "missing_storage": (_pk_tensor("9", 4, 0, (4,), (1,)), four, "no archive/data/9"),
        "dtype": (_pk_tensor("0", 4, 0, (4,), (1,), "QInt8Storage"), four, "torch.QInt8Storage"),
    }
    for name, (tensor, storage, match) in cases.items():
        path = _write_zip(tmp_path / f"{name}.pt", _pk_dict({"x": tensor}), {"0": storage})
        with pytest.raises(TorchFormatError, match=match):
            torch_reader.load(path)
    # not one top-level folder / no data.pkl
    with zipfile.ZipFile(tmp_path / "nodata.pt", "w") as z:
        z.writestr("archive/other", b"x")
    with pytest.raises(TorchFormatError, match="data.pkl"):
        torch_reader.load(tmp_path / "nodata.pt")


# ============================================================================ conversion math
def _toy_layout():
    """Two tensors: a conv kernel (HWIO (2,2,3,4) <- OIHW (4,3,2,2)) and a bias (4,)."""
    from bayes_transfer.params import ParamSpec

    spec = ParamSpec(paths=("backbone/a/bias", "backbone/b/kernel"),
                     shapes=((4,), (2, 2, 3, 4)), dtypes=("float32", "float32"))
    # torch order: conv first (offset 0, 48 values), then the bias (offset 48)
    params = (ParamMap("b.weight", "backbone/b/kernel", "oihw_to_hwio", (4, 3, 2, 2),
                       (2, 2, 3, 4), 0, 4),
              ParamMap("a.bias", "backbone/a/bias", "identity", (4,), (4,), 48, 0))
    return ReferenceLayout("toy", spec, params)


def _toy_perm(layout):
    """perm with x_spec = x_torch[perm], built from models.torch_to_flax on index arrays."""
    idx = np.arange(layout.dim)
    parts = {p.path: models.torch_to_flax(idx[p.torch_offset:p.torch_offset + p.size]
                                          .reshape(p.torch_shape), p.transform).ravel()
             for p in layout.params}
    return np.concatenate([parts[path] for path in layout.spec.paths])


@pytest.mark.parametrize("scale,eps,rank,slr", [
    (1.0, 0.0, None, True), (3.0, 0.1, 2, True), (1e4, 1e-3, 3, True), (0.25, 0.0, 1, True),
    (5.0, 0.2, 2, False), (2.0, 0.1, 0, True)])
def test_reference_conversion_reproduces_the_reference_density(scale, eps, rank, slr):
    layout = _toy_layout()
    d = layout.dim
    rng = np.random.default_rng(1)
    mean_t = rng.normal(size=d).astype(np.float32)
    var_t = rng.uniform(0.1, 1.0, size=d).astype(np.float32)
    cov_t = (0.3 * rng.normal(size=(4, d))).astype(np.float32)
    conv = convert_reference(mean_t, var_t, cov_t, layout, scale=scale, floor=eps, rank=rank,
                             scale_low_rank=slr, dtype=np.float64)
    # the reference: N(mean, diag(λ v + ε) + m C_k^T C_k), in torch order
    k = 4 if rank is None else rank
    m = scale ** 2 if slr else 1.0
    ck = cov_t[:k].astype(np.float64)
    sigma_t = np.diag(scale * var_t.astype(np.float64) + eps) + m * ck.T @ ck
    perm = _toy_perm(layout)
    sigma_spec = sigma_t[np.ix_(perm, perm)]
    with jax.enable_x64(True):
        if conv["kind"] == "diag":
            prior = Prior.diagonal(layout.spec, conv["mean"], conv["var"], scale=conv["scale"],
                                   floor=conv["floor"])
        else:
            prior = Prior.lowrank(layout.spec, conv["mean"], conv["var"], conv["deviations"],
                                  scale=conv["scale"], floor=conv["floor"])
        np.testing.assert_allclose(np.asarray(prior.covariance()), sigma_spec, rtol=1e-10,
                                   atol=1e-12 * np.abs(sigma_spec).max())
        np.testing.assert_array_equal(np.asarray(prior.mean), mean_t[perm])
        theta = mean_t[perm] + rng.normal(size=d)
        r = theta - mean_t[perm]
        _, logdet = np.linalg.slogdet(sigma_spec)
        expected = -0.5 * (d * math.log(2 * math.pi) + logdet + r @ np.linalg.solve(sigma_spec, r))
        np.testing.assert_allclose(float(prior.log_prob(jnp.asarray(theta))), expected, rtol=1e-9)
    if conv["kind"] == "lowrank":
        assert conv["scale"] == 2 * scale          # the reference has no SWAG ½
        np.testing.assert_array_equal(conv["var"], var_t[perm])
        assert ("λ²·CₖᵀCₖ" if slr else "+ CₖᵀCₖ)") in conv["note"]


def test_swag_convention_stores_the_swag_posterior():
    layout = _toy_layout()
    rng = np.random.default_rng(2)
    d = layout.dim
    mean_t, var_t = rng.normal(size=d), rng.uniform(0.1, 1, size=d)
    raw = rng.normal(size=(5, d))                      # raw deviations D̂
    perm = _toy_perm(layout)
    for covmat, stored in (("normalized", raw / 2.0), ("raw", raw)):   # √(K−1) = 2
        conv = convert_reference(mean_t, var_t, stored, layout, scale=7.0, convention="swag",
                                 covmat=covmat, dtype=np.float64)
        np.testing.assert_allclose(conv["deviations"], raw[:, perm], rtol=1e-12)
        assert conv["scale"] == 7.0 and "not the density" in conv["note"]
    with pytest.raises(TorchImportError):
        convert_reference(mean_t, var_t, raw, layout, convention="other")
    with pytest.raises(TorchImportError):
        convert_reference(mean_t, var_t, raw, layout, scale=-1.0)


# ============================================================================ torch: ResNet-18
def _torch_resnet(torch, arch):
    """torchvision's ResNet module layout (fc = Identity, as in the reference backbone)."""
    nn = torch.nn

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + idt)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride, downsample):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU()
            self.downsample = downsample

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + idt)

    block, layers = {"resnet18": (Basic, (2, 2, 2, 2)),
                     "resnet50": (Bottleneck, (3, 4, 6, 3))}[arch]

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._layer(64, layers[0], 1)
            self.layer2 = self._layer(128, layers[1], 2)
            self.layer3 = self._layer(256, layers[2], 2)
            self.layer4 = self._layer(512, layers[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Identity()

        def _layer(self, planes, n, stride):
            out_ch = planes * block.expansion
            down = None
            if stride != 1 or self.inplanes != out_ch:
                down = nn.Sequential(nn.Conv2d(self.inplanes, out_ch, 1, stride, bias=False),
                                     nn.BatchNorm2d(out_ch))
            blocks = [block(self.inplanes, planes, stride, down)]
            self.inplanes = out_ch
            blocks += [block(out_ch, planes, 1, None) for _ in range(n - 1)]
            return nn.Sequential(*blocks)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet()


def _independent_reorder(torch_model, vec_t):
    """(d,) or (K, d) in torch parameters() order -> spec order, from torch's own names."""
    model = nnx.eval_shape(lambda: models.create("resnet18", 10, in_channels=3))
    state = nnx.state(model, nnx.Param)
    key_to_path = {k: (p, t) for p, (k, t) in models.torchvision_names(state).items()}
    spec_paths = [p for p in flatten_with_paths(state) if p.startswith("backbone/")]
    vec_t = np.atleast_2d(vec_t)
    parts, o = {}, 0
    for name, param in torch_model.named_parameters():
        n = param.numel()
        path, transform = key_to_path[name]
        parts[path] = np.stack([models.torch_to_flax(row[o:o + n].reshape(param.shape),
                                                     transform).ravel() for row in vec_t])
        o += n
    assert o == vec_t.shape[1]
    return np.concatenate([parts[p] for p in spec_paths], axis=1)


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    torch = _torch()
    torch.manual_seed(0)
    net = _torch_resnet(torch, "resnet18").eval()
    with torch.no_grad():       # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    mean = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    d = mean.numel()
    gen = torch.Generator().manual_seed(1)
    variance = torch.rand(d, generator=gen) * 1e-3 + 1e-6
    covmat = torch.randn(3, d, generator=gen) * 1e-2
    root = tmp_path_factory.mktemp("ref18")
    prefix = root / "resnet18_ssl_prior"
    torch.save(net.state_dict(), f"{prefix}_model.pt")
    torch.save(mean, f"{prefix}_mean.pt")
    torch.save(variance, f"{prefix}_variance.pt")
    torch.save(covmat, f"{prefix}_covmat.pt")
    return dict(torch=torch, net=net, prefix=prefix, mean=mean.numpy(),
                variance=variance.numpy(), covmat=covmat.numpy())


@pytest.fixture(scope="module")
def resnet18_cli_import(resnet18_files, tmp_path_factory):
    """`import-torch PREFIX --arch resnet18 --out DIR` at λ = 3, ε = 1e-3, k = 2."""
    out_dir = tmp_path_factory.mktemp("cli") / "prior"
    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "import-torch", str(resnet18_files["prefix"]), "--arch", "resnet18", "--out",
        str(out_dir), "--num-classes", "10", "--method", "simclr", "--scale", "3",
        "--eps", "1e-3", "--rank", "2"])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        args.func(args)
    return out_dir, stdout.getvalue(), (3.0, 1e-3, 2)


def test_resnet18_import_reorders_and_reproduces_the_reference(resnet18_files,
                                                               resnet18_cli_import):
    f = resnet18_files
    torch = f["torch"]
    out_dir, stdout, (lam, eps, k) = resnet18_cli_import
    # the CLI says what was converted
    assert "converted from: reference-torch (2 of 3 covmat rows" in stdout
    assert "reference λ = 3, ε = 0.001 -> stored scale 6" in stdout
    assert "model file: matches the mean" in stdout and "scale note:" in stdout
    prior = read_prior(out_dir)
    assert prior.kind == "lowrank" and prior.rank == k and prior.dim == 11_176_512
    abstract = nnx.eval_shape(lambda: models.create("resnet18", 10, in_channels=3))
    params_state = nnx.state(abstract, nnx.Param)
    spec_paths = list(prior.spec.paths)
    assert spec_paths == [p for p in flatten_with_paths(params_state) if p[:9] == "backbone/"]
    prior.spec.check(params_state)

    # 1. each parameter at its Flax path with the right transpose (per-path arrays)
    sd = f["net"].state_dict()
    names = models.torchvision_names(params_state)
    mean_tree = prior.spec.unravel(prior.mean)
    for path in spec_paths:
        key, transform = names[path]
        np.testing.assert_array_equal(np.asarray(mean_tree[path]),
                                      models.torch_to_flax(sd[key], transform), err_msg=path)

    # 2. the same permutation for mean, variance and every deviation row
    np.testing.assert_array_equal(np.asarray(prior.mean),
                                  _independent_reorder(f["net"], f["mean"])[0])
    np.testing.assert_array_equal(np.asarray(prior.var),
                                  _independent_reorder(f["net"], f["variance"])[0])
    factor = math.sqrt(max(k - 1, 1) * lam)            # √((k−1)·λ): the reference's λ²
    np.testing.assert_allclose(np.asarray(prior.deviations),
                               factor * _independent_reorder(f["net"], f["covmat"][:k]),
                               rtol=1e-6)
    assert float(prior.scale) == 2 * lam and float(prior.floor) == pytest.approx(eps)

    # 3. log-density against torch's LowRankMultivariateNormal as the reference built it
    dist = torch.distributions.LowRankMultivariateNormal(
        torch.from_numpy(f["mean"]).double(),
        cov_factor=(lam * torch.from_numpy(f["covmat"][:k]).double()).T,
        cov_diag=lam * torch.from_numpy(f["variance"]).double() + eps)
    gen = torch.Generator().manual_seed(5)
    theta_t = torch.from_numpy(f["mean"]).double() + 0.02 * torch.randn(
        f["mean"].shape[0], generator=gen, dtype=torch.float64)
    ref_lp = float(dist.log_prob(theta_t))
    theta = _independent_reorder(f["net"], theta_t.numpy())[0]
    with jax.enable_x64(True):
        ours = float(prior.log_prob(jnp.asarray(theta, jnp.float64)))
    assert ours == pytest.approx(ref_lp, rel=1e-6), (ours, ref_lp)

    # 4. the metadata says what was converted
    meta = prior.metadata
    assert meta["converted_from"] == "reference-torch"
    assert "λ²" in meta["scale_note"] and "2λ" in meta["scale_note"]
    assert meta["architecture"] == {"arch": "resnet18", "num_classes": 10, "in_channels": 3}
    assert meta["source"]["method"] == "simclr"
    assert meta["source"]["name"] == "imagenet (reference torch prior)"
    ref = meta["reference"]
    assert ref["prior_scale"] == lam and ref["prior_eps"] == eps and ref["rows_used"] == k
    assert ref["rows_in_file"] == 3 and ref["model_check"]["matches"] is True
    assert set(ref["files"]) == {"model", "mean", "variance", "covmat"}


def test_resnet18_weights_compute_the_torch_function(resnet18_files):
    f = resnet18_files
    torch = f["torch"]
    params, batch_stats = import_torch_weights(f"{f['prefix']}_model.pt", arch="resnet18")
    assert set(params) == set(batch_stats) == {"backbone"}
    # every backbone leaf of an abstract (uninitialised) model is replaced by the torch values
    model = nnx.eval_shape(lambda: models.create("resnet18", 10, in_channels=3))
    nnx.update(model, params)
    nnx.update(model, batch_stats)
    x = np.random.default_rng(0).normal(size=(2, 3, 48, 48)).astype(np.float32)
    with torch.no_grad():
        want = f["net"](torch.from_numpy(x)).numpy()
    features = nnx.jit(lambda backbone, images: backbone(images, train=False))
    got = np.asarray(features(model.backbone, jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the weights are the prior mean's backbone, in the prior's spec order
    spec = reference_layout("resnet18", 10).spec
    np.testing.assert_array_equal(np.asarray(spec.ravel(nnx.state(model, nnx.Param))),
                                  _independent_reorder(f["net"], f["mean"])[0])


def test_resnet18_model_mismatch_and_errors(resnet18_files, tmp_path):
    f = resnet18_files
    torch = f["torch"]
    prefix = tmp_path / "bad_prior"
    for role in ("mean", "variance", "covmat"):
        os.link(f"{f['prefix']}_{role}.pt", f"{prefix}_{role}.pt")
    sd = {k: v.clone() for k, v in f["net"].state_dict().items()}
    sd["layer2.1.conv2.weight"] += 0.5
    torch.save(sd, f"{prefix}_model.pt")
    with pytest.raises(TorchImportError, match="layer2.1.conv2.weight") as e:
        import_torch_prior(prefix, arch="resnet18")
    assert "1 of 60 parameters differ" in str(e.value)
    with pytest.warns(UserWarning, match="layer2.1.conv2.weight"):
        prior = import_torch_prior(prefix, arch="resnet18", check_model="warn", rank=0)
    assert prior.kind == "diag" and prior.metadata["reference"]["model_check"]["matches"] is False
    # wrong architecture: the error says which one fits
    with pytest.raises(TorchImportError, match="arch='resnet18'"):
        import_torch_prior(f["prefix"], arch="resnet50", check_model="ignore")
    with pytest.raises(TorchImportError, match="missing reference prior file"):
        import_torch_prior(tmp_path / "nothing", arch="resnet18")


def test_torch_files_read_like_torch_loads_them(tmp_path):
    torch = _torch()
    # our reader on torch.save output (bf16, int64, views of a shared storage, parameters)
    base = torch.arange(30, dtype=torch.float32)
    obj = {"bf": torch.linspace(-1, 1, 7).bfloat16(), "long": torch.arange(5),
           "view": base[3:23].view(4, 5).t(), "same": base, "param": torch.nn.Parameter(base[:3]),
           "list": [torch.ones(2, 2, dtype=torch.float64), {"inner": torch.zeros(0, 3)}]}
    torch.save(obj, tmp_path / "mixed.pt")
    out = torch_reader.load(tmp_path / "mixed.pt")
    ref = torch.load(tmp_path / "mixed.pt", weights_only=True)
    np.testing.assert_array_equal(out["bf"].astype(np.float32), ref["bf"].float().numpy())
    for key in ("long", "view", "same"):
        np.testing.assert_array_equal(out[key], ref[key].numpy())
        assert out[key].dtype == ref[key].numpy().dtype
    np.testing.assert_array_equal(out["param"], base[:3].numpy())
    np.testing.assert_array_equal(out["list"][0], np.ones((2, 2)))
    assert out["list"][1]["inner"].shape == (0, 3)
    # our hand-made writer is what torch writes: torch reads it back
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    back = torch.load(_write_pt(tmp_path / "hand.pt", arrays), weights_only=True)
    np.testing.assert_array_equal(back["w"].numpy(), arrays["w"])
    # legacy format written by torch itself
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(LegacyTorchFormatError, match="torch.save"):
        torch_reader.load(tmp_path / "legacy.pt")


# ============================================================================ torch: ResNet-50
def test_resnet50_shapes_import(tmp_path):
    torch = _torch()
    with torch.device("meta"):            # names, shapes and order only: no memory
        net = _torch_resnet(torch, "resnet50")
    named = [(n, tuple(p.shape)) for n, p in net.named_parameters()]
    d = sum(math.prod(s) for _, s in named)
    assert d == 23_508_032
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(d, dtype=np.float32)
    sd, o = {}, 0
    for name, buf in net.state_dict().items():     # registration order, with BN stats
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros((), dtype=torch.int64)
        elif name.endswith(("running_mean", "running_var")):
            sd[name] = torch.ones(tuple(buf.shape))
        else:
            n = math.prod(buf.shape)
            sd[name] = torch.from_numpy(mean[o:o + n].reshape(tuple(buf.shape)))
            o += n
    assert o == d
    prefix = tmp_path / "resnet50_sup_prior"
    torch.save(sd, f"{prefix}_model.pt")
    torch.save(torch.from_numpy(mean), f"{prefix}_mean.pt")
    var = np.full(d, 1e-4, np.float32)
    var[:: 1000] = 2e-4
    torch.save(torch.from_numpy(var), f"{prefix}_variance.pt")
    cov = rng.standard_normal((2, d), dtype=np.float32)
    torch.save(torch.from_numpy(cov), f"{prefix}_covmat.pt")
    del sd

    prior = import_torch_prior(prefix, arch="resnet50", method="supervised")
    assert prior.dim == d and prior.rank == 2 and prior.kind == "lowrank"
    assert prior.metadata["reference"]["model_check"]["matches"] is True
    assert prior.metadata["architecture"]["arch"] == "resnet50"
    offsets = {}
    o = 0
    for name, shape in named:
        offsets[name] = (o, shape)
        o += math.prod(shape)
    spec_off = dict(zip(prior.spec.paths, prior.spec.offsets))
    mean_p, dev_p = np.asarray(prior.mean), np.asarray(prior.deviations)
    for key, path in [("conv1.weight", "backbone/conv1/kernel"),
                      ("layer4.2.conv3.weight", "backbone/layer4/2/conv3/kernel"),
                      ("layer3.0.downsample.0.weight", "backbone/layer3/0/downsample/0/kernel"),
                      ("layer3.0.downsample.1.bias", "backbone/layer3/0/downsample/1/bias"),
                      ("layer2.3.bn2.weight", "backbone/layer2/3/bn2/scale")]:
        start, shape = offsets[key]
        n = math.prod(shape)
        transform = "oihw_to_hwio" if len(shape) == 4 else "identity"
        s = spec_off[path]
        np.testing.assert_array_equal(
            mean_p[s:s + n], models.torch_to_flax(mean[start:start + n].reshape(shape),
                                                  transform).ravel(), err_msg=key)
        np.testing.assert_allclose(      # K = 2, λ = 1: deviations = √(K−1)·C = C
            dev_p[1, s:s + n], models.torch_to_flax(cov[1, start:start + n].reshape(shape),
                                                    transform).ravel(), err_msg=key)
