"""Weight files: caffemodels (V1, V2), earlier ports' .pth, safetensors; errors; where weights are found."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from safetensors import safe_open
from safetensors.torch import save_file

from i2v_cli import weights
from i2v_cli.atomic import is_temp_name
from i2v_cli.config import CONV_NAMES, FEATURE, TAG
from i2v_cli.errors import ModelKindError, OutputError, WeightsError, WeightsNotFoundError
from i2v_cli.model import Architecture, Illust2VecNet, layer_key
from i2v_cli.store import default_weights_dir, resolve_weights
from i2v_cli.weights import (
    caffe_message,
    convert,
    load_model,
    load_weights,
    read_caffemodel,
    read_state_dict_pth,
    save_safetensors,
)

GOLDEN = Path(__file__).parent / "data" / "golden"
MODELS = GOLDEN / "models"
WIDTHS = (2, 4, 8, 8, 16, 16, 16, 16, 32, 32, 32)
# Positions of the convolutions in the earlier port's nn.Sequential (TagI2V.net, FeatureI2V.features):
# conv, relu (, pool) for each layer, as in its illust2vec_pytorch.py.
SEQUENTIAL_INDICES = (0, 3, 6, 8, 11, 13, 16, 18, 21, 23, 25, 27)


# ------------------------------------------------------------------------------------------------------------
# Helpers: parse, edit and write caffemodels with the package's own schema


def parse(path: Path) -> Message:
    return caffe_message("NetParameter").FromString(path.read_bytes())


def write(net: Message, path: Path) -> Path:
    path.write_bytes(net.SerializeToString())
    return path


def layers_of(net: Message):
    return net.layer if len(net.layer) else net.layers


def reformat(net: Message, version: int) -> Message:
    """The same parameters in Caffe's V1 (``layers``, 4-D num/channels/height/width) or V2 format."""
    out = caffe_message("NetParameter")(name=net.name)
    for layer in layers_of(net):
        new = out.layer.add(name=layer.name) if version == 2 else out.layers.add(name=layer.name)
        ndims = (4 if layer.name.startswith("conv") else 2, 1)
        for blob, ndim in zip(layer.blobs, ndims, strict=False):
            shape = weights._blob_shape(blob, "")
            while len(shape) > ndim and shape[0] == 1:
                shape = shape[1:]
            b = new.blobs.add()
            b.data.extend(np.asarray(blob.data, dtype=np.float32))
            if version == 2:
                b.shape.dim.extend(shape)
            else:
                b.num, b.channels, b.height, b.width = (1,) * (4 - len(shape)) + shape
    return out


def find_layer(net: Message, name: str):
    return next(layer for layer in layers_of(net) if layer.name == name)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key], b[key]), key


def one_line_error(exc: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.fixture(scope="module")
def golden_sd() -> dict[str, dict[str, torch.Tensor]]:
    return {name: read_caffemodel(MODELS / f"{name}.caffemodel") for name in ("tag_v1", "tag_v2", "feature_v1")}


# ------------------------------------------------------------------------------------------------------------
# Caffemodels


@pytest.mark.parametrize("name", ["tag_v1", "tag_v2", "feature_v1"])
def test_golden_caffemodels_compute_the_original_outputs(name: str) -> None:
    """The weights land where the network reads them: the original pipeline's outputs on its own inputs."""
    model, info = load_model(MODELS / f"{name}.caffemodel")
    inputs = torch.from_numpy(np.load(GOLDEN / "expected" / "inputs.npz")["inputs"])
    with torch.inference_mode():
        out = model(inputs).numpy()
    expected = np.load(GOLDEN / "expected" / f"{name}.npy")
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)
    assert info.widths == WIDTHS
    assert info.kind == (FEATURE if name.startswith("feature") else TAG)


def test_caffemodel_shapes(golden_sd: dict[str, dict[str, torch.Tensor]]) -> None:
    tag, feature = golden_sd["tag_v1"], golden_sd["feature_v1"]
    assert sorted(tag) == sorted([layer_key(n, p) for n in (*CONV_NAMES, "conv6_4") for p in ("weight", "bias")])
    assert tuple(tag["features.conv1_1.weight"].shape) == (2, 3, 3, 3)
    assert tuple(tag["features.conv6_3.bias"].shape) == (32,)
    assert tuple(tag["conv6_4.weight"].shape) == (1539, 32, 3, 3)
    assert tuple(feature["encode1.weight"].shape) == (128, 32 * 7 * 7)  # V1: stored as 1x1x128x1568
    assert tuple(feature["encode1.bias"].shape) == (128,)
    assert tuple(feature["encode2.weight"].shape) == (1539, 128)
    assert "conv6_4.weight" not in feature


@pytest.mark.parametrize(("name", "version"), [("tag_v1", 2), ("tag_v2", 1), ("feature_v1", 2)])
def test_v1_and_v2_give_identical_tensors(tmp_path: Path, golden_sd: dict, name: str, version: int) -> None:
    other = write(
        reformat(parse(MODELS / f"{name}.caffemodel"), version), tmp_path / f"{name}_as_v{version}.caffemodel"
    )
    assert len(parse(other).layer if version == 2 else parse(other).layers) > 0
    assert_same(read_caffemodel(other), golden_sd[name])
    assert load_weights(other)[1].source_format == f"caffemodel-v{version}"


@pytest.mark.parametrize("array_protocol", [True, False])
def test_both_blob_readers_agree(monkeypatch: pytest.MonkeyPatch, golden_sd: dict, array_protocol: bool) -> None:
    """upb's ``__array__`` path and the raw-bytes view of the schema (any protobuf backend) read the same."""
    monkeypatch.setattr(weights, "_USE_ARRAY_PROTOCOL", array_protocol)
    for name in ("tag_v1", "tag_v2", "feature_v1"):
        assert_same(read_caffemodel(MODELS / f"{name}.caffemodel"), golden_sd[name])


def _unpacked_classes() -> dict[str, type[Message]]:
    """The schema with ``data``/``double_data`` not packed: a legal encoding that Caffe never writes."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(
        (Path(weights.__file__).parent / "proto" / "caffe.desc").read_bytes()
    )
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:
        for msg in fdp.message_type:
            for field in msg.field:
                if msg.name == "BlobProto" and field.name in ("data", "double_data"):
                    field.ClearField("options")
        pool.Add(fdp)
    return {"NetParameter": message_factory.GetMessageClass(pool.FindMessageTypeByName("i2v_caffe.NetParameter"))}


@pytest.mark.parametrize("array_protocol", [True, False])
def test_unpacked_and_double_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, golden_sd: dict, array_protocol: bool
) -> None:
    monkeypatch.setattr(weights, "_USE_ARRAY_PROTOCOL", array_protocol)
    net = parse(MODELS / "tag_v2.caffemodel")
    blob = find_layer(net, "conv2_1").blobs[0]
    values = np.asarray(blob.data, dtype=np.float64)
    blob.ClearField("data")
    blob.double_data.extend(values)
    unpacked = _unpacked_classes()["NetParameter"].FromString(net.SerializeToString())
    path = tmp_path / "unpacked.caffemodel"
    path.write_bytes(unpacked.SerializeToString())
    assert path.stat().st_size > (MODELS / "tag_v2.caffemodel").stat().st_size  # a tag per value now
    assert_same(read_caffemodel(path), golden_sd["tag_v2"])


# ------------------------------------------------------------------------------------------------------------
# safetensors


@pytest.mark.parametrize(
    ("name", "fmt"), [("tag_v1", "caffemodel-v1"), ("tag_v2", "caffemodel-v2"), ("feature_v1", "caffemodel-v1")]
)
def test_convert_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], golden_sd: dict, name: str, fmt: str
) -> None:
    src = MODELS / f"{name}.caffemodel"
    dst = tmp_path / "sub" / "out.safetensors"
    info = convert(src, dst)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    kind, dim = (FEATURE, 128) if name.startswith("feature") else (TAG, 0)
    digest = weights.tensors_digest(golden_sd[name])
    assert info == weights.WeightsInfo(kind, WIDTHS, dim, 1539, src.name, sha, fmt, digest)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.safetensors"]  # no temporary file left
    sd, again = load_weights(dst)
    assert again == info  # the conversion is the same network: the same tensors' digest
    assert_same(sd, golden_sd[name])
    with safe_open(dst, framework="pt") as f:
        meta = f.metadata()
    assert meta == {
        "format": "pt",
        "i2v.kind": kind,
        "i2v.widths": "2,4,8,8,16,16,16,16,32,32,32",
        "i2v.feature_dim": str(dim),
        "i2v.num_tags": "1539",
        "i2v.source": f"{name}.caffemodel",
        "i2v.source_sha256": sha,
        "i2v.source_format": fmt,
    }
    assert info.as_dict()["widths"] == list(WIDTHS)
    assert capsys.readouterr() == ("", "")  # the library never prints


def test_converted_file_has_default_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    convert(MODELS / "tag_v2.caffemodel", tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_mode == plain.stat().st_mode


def test_safetensors_writer_matches_the_library(tmp_path: Path, golden_sd: dict) -> None:
    """The streaming writer makes what safetensors itself makes: same tensors and metadata, same data bytes."""
    from safetensors.torch import load, save

    meta = {"i2v.kind": "tag", "i2v.source": "caf\u00e9.caffemodel"}
    save_safetensors(golden_sd["tag_v2"], tmp_path / "w.safetensors", meta)
    mine, ref = (tmp_path / "w.safetensors").read_bytes(), save(golden_sd["tag_v2"], {"format": "pt", **meta})
    assert len(mine) == len(ref)
    assert mine[-1_000_000:] == ref[-1_000_000:]  # the tensors, in the library's order
    assert_same(load(mine), golden_sd["tag_v2"])
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", **meta}


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.mark.parametrize("how", ["same name", "symlink to it", "hard link", "relative name"])
def test_convert_refuses_to_overwrite_its_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Issue 14.1: ``-o`` naming the input is refused before anything is read, through links too."""
    src = _copy(MODELS / "tag_v2.caffemodel", tmp_path / "in.caffemodel")
    before = src.read_bytes()
    out = tmp_path / "out.safetensors"
    if how == "same name":
        out = src
    elif how == "symlink to it":
        out.symlink_to(src)
    elif how == "hard link":
        os.link(src, out)
    else:
        monkeypatch.chdir(tmp_path)
        out = Path("./sub/../in.caffemodel")
        (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError) as exc:
        convert(src, out)
    assert str(exc.value) == f"{out} is the input file {src}: write the safetensors file under another name"
    assert src.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]


def test_convert_writes_through_a_symlink(tmp_path: Path, golden_sd: dict) -> None:
    """Issue 14.1: the link stays a link; the file it points to gets the weights."""
    real = tmp_path / "store" / "tag.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "tag.safetensors"
    link.symlink_to(real)
    convert(MODELS / "tag_v2.caffemodel", link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert_same(load_weights(real)[0], golden_sd["tag_v2"])
    assert sorted(p.name for p in real.parent.iterdir()) == ["tag.safetensors"]


def test_convert_into_a_fifo_writes_in_place(tmp_path: Path, golden_sd: dict) -> None:
    """Issue 14.1: a special file (here a FIFO; /dev/null alike) is written to, never replaced by a regular file."""
    import threading

    from safetensors.torch import load

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    info = convert(MODELS / "tag_v2.caffemodel", fifo)
    reader.join(10)
    assert fifo.is_fifo()
    assert_same(load(received[0]), golden_sd["tag_v2"])
    assert info.kind == TAG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_convert_refuses_a_terminal(tmp_path: Path) -> None:
    """A binary safetensors file is not written to a terminal (gzip's rule); the terminal stays as it was."""
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        with pytest.raises(OutputError) as exc:
            convert(MODELS / "tag_v2.caffemodel", name)
        assert str(exc.value) == (f"{name} is a terminal: safetensors is binary; name a file (or redirect the output)")
        assert os.path.exists(name) and not os.path.isfile(name)
    finally:
        os.close(master)
        os.close(slave)


def test_cli_convert_onto_its_input_is_a_usage_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from i2v_cli.cli import cli

    src = _copy(MODELS / "tag_v2.caffemodel", tmp_path / "m.caffemodel")
    result = CliRunner().invoke(cli, ["weights", "convert", str(src), "-o", str(src)])
    assert result.exit_code == 2
    want = f"Error: -o {src} is one of the inputs ({src}): it would be destroyed; choose another output\n"
    assert result.output == want
    assert src.read_bytes() == (MODELS / "tag_v2.caffemodel").read_bytes()


def test_convert_of_a_safetensors_keeps_provenance(tmp_path: Path) -> None:
    first = convert(MODELS / "feature_v1.caffemodel", tmp_path / "a.safetensors")
    assert convert(tmp_path / "a.safetensors", tmp_path / "b.safetensors") == first


def test_foreign_safetensors_without_metadata(tmp_path: Path, golden_sd: dict) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(golden_sd["tag_v2"], path)
    sd, info = load_weights(path)
    assert_same(sd, golden_sd["tag_v2"])
    assert (info.source, info.source_format) == ("plain.safetensors", "safetensors")
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("src", "name"), [("tag_v2.caffemodel", "model.bin"), ("tag_v1.caffemodel", "model.pth")])
def test_format_is_told_by_content_not_extension(tmp_path: Path, golden_sd: dict, src: str, name: str) -> None:
    path = tmp_path / name
    path.write_bytes((MODELS / src).read_bytes())
    assert_same(load_weights(path)[0], golden_sd[src.split(".")[0]])
    st = convert(path, tmp_path / "x.safetensors")
    disguised = tmp_path / "x.caffemodel"
    os.replace(tmp_path / "x.safetensors", disguised)
    assert load_weights(disguised)[1] == st


# ------------------------------------------------------------------------------------------------------------
# PyTorch state dicts, including the earlier ports' layouts


def _sequential_layout(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """TagI2V (``net.N``) or FeatureI2V (``features.N``, ``encode1.0``, ``encode2.0``) keys."""
    names = (*CONV_NAMES, "conv6_4") if kind == TAG else CONV_NAMES
    prefix = "net" if kind == TAG else "features"
    out = {
        f"{prefix}.{i}.{p}": sd[layer_key(n, p)]
        for n, i in zip(names, SEQUENTIAL_INDICES, strict=False)
        for p in ("weight", "bias")
    }
    if kind == FEATURE:
        out.update({f"{k.split('.')[0]}.0.{k.split('.')[1]}": v for k, v in sd.items() if k.startswith("encode")})
    return out


def _caffe_names_layout(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``conv1_1.weight`` ... (the layout of the widely shared illust2vec_tag_ver200.pth), optionally prefixed."""
    return {prefix + k.removeprefix("features."): v for k, v in sd.items()}


def _i2v4pytorch_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``block.conv1_1``, ``tag_classifier.conv6_4``, ``encode1`` (I2VNet of an i2v4pytorch port)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("features."):
            out["block." + k.removeprefix("features.")] = v
        elif k.startswith("conv6_4"):
            out["tag_classifier." + k] = v
        else:
            out[k] = v
    return out


LAYOUTS: dict[str, Callable[[dict[str, torch.Tensor], str], dict]] = {
    "own": lambda sd, kind: dict(sd),
    "sequential": _sequential_layout,
    "caffe_names": lambda sd, kind: _caffe_names_layout(sd),
    "i2v4pytorch": lambda sd, kind: _i2v4pytorch_layout(sd),
    "data_parallel": lambda sd, kind: {"module." + k: v for k, v in _sequential_layout(sd, kind).items()},
    "checkpoint": lambda sd, kind: {"epoch": 3, "state_dict": _caffe_names_layout(sd)},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["tag_v2", "feature_v1"])
def test_pth_layouts_load(tmp_path: Path, golden_sd: dict, layout: str, name: str) -> None:
    sd = golden_sd[name]
    kind = FEATURE if name.startswith("feature") else TAG
    path = tmp_path / "illust2vec.pth"
    torch.save(LAYOUTS[layout](sd, kind), path)
    assert_same(read_state_dict_pth(path), sd)
    loaded, info = load_weights(path)
    assert_same(loaded, sd)
    assert (info.kind, info.source, info.source_format) == (kind, "illust2vec.pth", "pth")
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("data_parallel_copy", "holds net.0.weight twice (key 'module.net.0.weight')"),
        ("zero_padded_index", "holds net.0.weight twice (key 'net.00.weight')"),
        ("mixed_sequentials", "mixes net.N and features.N layers"),
    ],
)
def test_pth_numbered_layers_twice_are_refused(tmp_path: Path, golden_sd: dict, edit: str, message: str) -> None:
    """A numbered layer given twice was merged silently, the last one winning (a conv1_1 a hundred times over)."""
    sd = _sequential_layout(golden_sd["tag_v2"], TAG)
    other = sd["net.0.weight"] * 100
    if edit == "data_parallel_copy":
        sd["module.net.0.weight"] = other
    elif edit == "zero_padded_index":
        sd["net.00.weight"] = other
    else:
        sd = {("features." + k[len("net.") :] if k.startswith("net.0.") else k): v for k, v in sd.items()}
    path = tmp_path / "numbered.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_pth_in_half_precision_is_read_as_float32(tmp_path: Path, golden_sd: dict) -> None:
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in golden_sd["tag_v2"].items()}, path)
    sd = read_state_dict_pth(path)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert torch.equal(sd["conv6_4.bias"], golden_sd["tag_v2"]["conv6_4.bias"].half().float())


def test_meta_tensors_are_refused_cleanly(tmp_path: Path, golden_sd: dict) -> None:
    """A state dict of meta tensors (shapes, no data) was NotImplementedError 'Cannot copy out of meta tensor'."""
    path = tmp_path / "meta.pth"
    torch.save({k: v.to("meta") for k, v in golden_sd["tag_v2"].items()}, path)
    with pytest.raises(WeightsError, match="is a meta tensor"):
        load_weights(path)


def test_pickled_module_is_refused_cleanly(tmp_path: Path) -> None:
    """A whole pickled model (as some ports saved it) needs arbitrary unpickling: weights_only refuses it."""
    path = tmp_path / "model.pth"
    torch.save(Illust2VecNet(Architecture(TAG, WIDTHS)), path)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    assert one_line_error(exc, path) == (
        f"{path} holds pickled Python objects (i2v_cli.model.Illust2VecNet), not only tensors (a whole saved "
        "model?); i2v loads plain state dicts only (torch.load weights_only): re-save it with "
        "torch.save(model.state_dict(), ...)"
    )


# ------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file, never a protobuf/pickle/KeyError


def _edit(src: str, edit: Callable[[Message], object]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        net = parse(MODELS / src)
        edit(net)
        return write(net, path)

    return make


def _remove_layer(name: str) -> Callable[[Message], None]:
    def edit(net: Message) -> None:
        layers = layers_of(net)
        del layers[[layer.name for layer in layers].index(name)]

    return edit


def _set_v1_dims(layer: str, dims: tuple[int, int, int, int]) -> Callable[[Message], None]:
    def edit(net: Message) -> None:
        b = find_layer(net, layer).blobs[0]
        b.num, b.channels, b.height, b.width = dims

    return edit


def _set_v2_dims(layer: str, dims: tuple[int, ...]) -> Callable[[Message], None]:
    def edit(net: Message) -> None:
        shape = find_layer(net, layer).blobs[0].shape
        del shape.dim[:]
        shape.dim.extend(dims)

    return edit


def _duplicate(name: str) -> Callable[[Message], None]:
    def edit(net: Message) -> None:
        layers_of(net).add().CopyFrom(find_layer(net, name))

    return edit


def _set(name: str, param: str, **settings: object) -> Callable[[Message], None]:
    """Write settings into a layer's ``param`` message (repeated fields take lists)."""

    def edit(net: Message) -> None:
        message = getattr(find_layer(net, name), param)
        for field, value in settings.items():
            if isinstance(value, list):
                del getattr(message, field)[:]
                getattr(message, field).extend(value)
            else:
                setattr(message, field, value)

    return edit


def _both_formats(net: Message) -> None:
    net.layers.add(name="conv1_1")


def _torch_save(obj: object) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        torch.save(obj, path)
        return path

    return make


def _bytes(data: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return make


def _truncated(src: Path, fraction: float, convert_first: bool = False) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        data = src.read_bytes()
        if convert_first:
            convert(src, path.with_suffix(".full"))
            data = path.with_suffix(".full").read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return path

    return make


def _pth_then_truncate(path: Path) -> Path:
    torch.save(read_caffemodel(MODELS / "tag_v2.caffemodel"), path)
    path.write_bytes(path.read_bytes()[:100_000])
    return path


def _safetensors_with_meta(meta: dict[str, str]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        save_safetensors(read_caffemodel(MODELS / "tag_v2.caffemodel"), path, meta)
        return path

    return make


def _golden_sd(name: str) -> dict[str, torch.Tensor]:
    return read_caffemodel(MODELS / f"{name}.caffemodel")


def _pth(edit: Callable[[dict[str, torch.Tensor]], object], name: str = "tag_v2") -> Callable[[Path], Path]:
    """A .pth of a golden model's state dict after ``edit`` (which changes the dict in place)."""

    def make(path: Path) -> Path:
        sd = _golden_sd(name)
        edit(sd)
        torch.save(sd, path)
        return path

    return make


def _slice(sd: dict[str, torch.Tensor], layer: str, n: int, dim: int = 0) -> None:
    for param in ("weight", "bias"):
        if param == "bias" and dim:
            continue
        key = layer_key(layer, param)
        sd[key] = sd[key].narrow(dim, 0, n).contiguous()


def _set_type(name: str, layer_type: str | int) -> Callable[[Message], None]:
    def edit(net: Message) -> None:
        find_layer(net, name).type = layer_type

    return edit


def _insert_layer(after: str, name: str, layer_type: str, blobs: int = 0) -> Callable[[Message], None]:
    """A V2 layer of ``layer_type`` placed after ``after``, with ``blobs`` small parameter blobs."""

    def edit(net: Message) -> None:
        names = [layer.name for layer in net.layer]
        layers = list(net.layer)
        new = caffe_message("LayerParameter")(name=name, type=layer_type, bottom=[after], top=[after])
        for _ in range(blobs):
            new.blobs.add(data=[1.0, 2.0]).shape.dim.extend([2])
        layers.insert(names.index(after) + 1, new)
        del net.layer[:]
        net.layer.extend(layers)

    return edit


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(7).bytes(4096))
    return path


ERRORS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty": (_bytes(b""), "{p} is not a weight file: it looks like an empty file"),
    "text": (
        _bytes(b'name: "illust2vec"\nlayer {\n  name: "conv1_1"\n  type: "Convolution"\n}\n'),
        "{p} is not a weight file: it looks like a text file (a .prototxt, or an error page saved instead of "
        "the download?)",
    ),
    "html": (
        _bytes(b"<!DOCTYPE html><html><body>Not Found</body></html>"),
        "{p} is not a weight file: it looks like a text file",
    ),
    "jpeg": (
        _bytes((GOLDEN / "images" / "mixed" / "img000.jpg").read_bytes()),
        "{p} is not a weight file: it looks like a JPEG image",
    ),
    "gzip": (
        _bytes(b"\x1f\x8b\x08\x00" + bytes(100)),
        "{p} is not a weight file: it looks like a gzip file (decompress it first)",
    ),
    "truncated_caffemodel": (
        _truncated(MODELS / "tag_v2.caffemodel", 0.6),
        "{p} is not a valid caffemodel (truncated or corrupt: ",
    ),
    "missing_layer": (_edit("tag_v1.caffemodel", _remove_layer("conv3_2")), "{p}: layer conv3_2 is missing"),
    "missing_head": (
        _edit("feature_v1.caffemodel", _remove_layer("encode1")),
        "{p}: layer conv6_4 (tag model) or encode1 (feature model) is missing",
    ),
    "size_mismatch_v1": (
        _edit("tag_v1.caffemodel", _set_v1_dims("conv3_1", (8, 4, 3, 4))),
        "{p}: conv3_1 weight holds 288 values but its shape (8, 4, 3, 4) needs 384",
    ),
    "size_mismatch_v2": (
        _edit("tag_v2.caffemodel", _set_v2_dims("conv6_4", (1539, 32, 3))),
        "{p}: conv6_4 weight holds 443232 values but its shape (1539, 32, 3) needs 147744",
    ),
    "wrong_shape": (
        _edit("tag_v2.caffemodel", _set_v2_dims("conv4_1", (16, 8, 9, 1))),
        "{p}: features.conv4_1.weight has shape (16, 8, 9, 1), expected (16, 8, 3, 3)",
    ),
    "wrong_rank": (
        _edit("feature_v1.caffemodel", _set_v1_dims("encode1", (2, 1, 64, 1568))),
        "{p}: encode1 weight has shape (2, 1, 64, 1568), expected 2 dimensions",
    ),
    "layer_twice": (_edit("tag_v2.caffemodel", _duplicate("conv2_1")), "{p} holds layer conv2_1 twice"),
    # Settings that make Caffe compute something else than i2v does, each refused with the value it differs by.
    "conv_stride": (
        _edit("tag_v2.caffemodel", _set("conv1_1", "convolution_param", stride=[2])),
        "{p}: layer conv1_1 has stride 2x2, where Illustration2Vec has 1x1 (i2v would compute something else",
    ),
    "conv_pad_v1": (
        _edit("tag_v1.caffemodel", _set("conv3_2", "convolution_param", pad_h=0, pad_w=1)),
        "{p}: layer conv3_2 has pad 0x1, where Illustration2Vec has 1x1",
    ),
    "conv_kernel": (
        _edit("feature_v1.caffemodel", _set("conv2_1", "convolution_param", kernel_size=[1])),
        "{p}: layer conv2_1 has kernel 1x1, where Illustration2Vec has 3x3",
    ),
    "conv_group": (
        _edit("tag_v2.caffemodel", _set("conv4_1", "convolution_param", group=2)),
        "{p}: layer conv4_1 has group 2, where Illustration2Vec has 1",
    ),
    "conv_dilation": (
        _edit("tag_v2.caffemodel", _set("conv5_2", "convolution_param", dilation=[2])),
        "{p}: layer conv5_2 has dilation 2, where Illustration2Vec has 1",
    ),
    "pool_average": (
        _edit("tag_v2.caffemodel", _set("pool2", "pooling_param", pool=1)),
        "{p}: layer pool2 has pool AVE, where Illustration2Vec has MAX",
    ),
    "pool6_max_v1": (
        _edit("tag_v1.caffemodel", _set("pool6", "pooling_param", pool=0)),
        "{p}: layer pool6 has pool MAX, where Illustration2Vec has AVE",
    ),
    "pool_stride": (
        _edit("feature_v1.caffemodel", _set("pool5", "pooling_param", stride=1)),
        "{p}: layer pool5 has stride 1x1, where Illustration2Vec has 2x2",
    ),
    "leaky_relu": (
        _edit("tag_v2.caffemodel", _set("relu1_1", "relu_param", negative_slope=1.0)),
        "{p}: layer relu1_1 has negative_slope 1.0, where Illustration2Vec has 0.0",
    ),
    "missing_relu": (
        _edit("tag_v2.caffemodel", _remove_layer("relu3_1")),
        "{p}: layer relu3_1 is missing: Caffe would compute another network than Illustration2Vec without it",
    ),
    "missing_pools_v1": (
        _edit("feature_v1.caffemodel", lambda net: [_remove_layer(n)(net) for n in ("pool2", "pool4")]),
        "{p}: layer pool2 is missing (and 1 more): Caffe would compute",
    ),
    "missing_pool6": (_edit("tag_v1.caffemodel", _remove_layer("pool6")), "{p}: layer pool6 is missing"),
    "transposed_inner_product": (
        _edit("feature_v1.caffemodel", _set("encode1", "inner_product_param", transpose=True)),
        "{p}: layer encode1 has transpose true, where Illustration2Vec has false",
    ),
    "both_formats": (
        _edit("tag_v2.caffemodel", _both_formats),
        "{p} holds both V1 'layers' and V2 'layer' definitions: not a valid caffemodel",
    ),
    "no_layers": (
        lambda p: write(caffe_message("NetParameter")(name="empty"), p),
        "{p} is not a caffemodel: it holds no layers",
    ),
    "foreign_layers": (
        _edit("tag_v2.caffemodel", lambda net: [setattr(layer, "name", layer.name.upper()) for layer in net.layer]),
        "{p} holds none of Illustration2Vec's layers (conv1_1 ... conv6_4, encode1)",
    ),
    "truncated_safetensors": (
        _truncated(MODELS / "tag_v2.caffemodel", 0.5, convert_first=True),
        "{p} is not a valid safetensors file (truncated or corrupt:",
    ),
    "safetensors_wrong_metadata": (
        _safetensors_with_meta({"i2v.kind": "feature"}),
        "{p}: its metadata says feature model but its tensors make a tag model",
    ),
    "truncated_pth": (_pth_then_truncate, "{p} is not a readable PyTorch file (truncated or corrupt:"),
    "pth_without_tensors": (
        _torch_save({"epoch": 3, "lr": 0.1}),
        "{p} holds no state dict (expected a dict of tensors)",
    ),
    "pth_unknown_keys": (
        _torch_save({"fc.weight": torch.zeros(2, 2)}),
        "{p}: unexpected key 'fc.weight' for an Illustration2Vec state dict",
    ),
    "pth_too_few_convs": (
        _torch_save({f"net.{i}.weight": torch.zeros(2, 3, 3, 3) for i in SEQUENTIAL_INDICES[:5]}),
        "{p} holds 5 convolution layers, expected 12",
    ),
    "pth_integer_tensor": (
        _torch_save({"conv1_1.weight": torch.zeros(2, 3, 3, 3, dtype=torch.int64)}),
        "{p}: conv1_1.weight is not a floating-point tensor",
    ),
    "pth_scalar_tensor": (
        _torch_save({"conv1_1.weight": torch.tensor(0.5)}),
        "{p}: conv1_1.weight is a single number (a 0-d tensor), not a layer's weights",
    ),
    "plain_pickle": (
        _bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x03."),
        "{p} is not a readable PyTorch file",
    ),
    # Issue 14.12: models that would compute something else, refused when read.
    "tag_head_1000_outputs": (
        _pth(lambda sd: _slice(sd, "conv6_4", 1000)),
        "{p}: layer conv6_4 has 1000 outputs; Illustration2Vec predicts 1539 tags (one per entry of tag_list.json), "
        "so the scores could not be named",
    ),
    "feature_encode2_10_outputs": (
        _pth(lambda sd: _slice(sd, "encode2", 10), "feature_v1"),
        "{p}: layer encode2 has 10 outputs; Illustration2Vec predicts 1539 tags",
    ),
    "zero_width": (
        _pth(lambda sd: (_slice(sd, "conv3_1", 0), _slice(sd, "conv3_2", 0, dim=1))),
        "{p}: layer conv3_1 has no output channels (a zero-width model computes nothing)",
    ),
    "zero_feature": (
        _pth(lambda sd: (_slice(sd, "encode1", 0), _slice(sd, "encode2", 0, dim=1)), "feature_v1"),
        "{p}: layer encode1 has no outputs (a zero-length feature)",
    ),
    "pth_sparse_tensor": (
        _pth(lambda sd: sd.update({"conv6_4.bias": sd["conv6_4.bias"].to_sparse()})),
        "{p}: conv6_4.bias is a sparse tensor (torch.sparse_coo); i2v reads dense tensors only",
    ),
    "pth_nan": (
        _pth(lambda sd: sd["features.conv2_1.weight"].view(-1).__setitem__(5, float("nan"))),
        "{p}: features.conv2_1.weight holds NaN or infinite values: the network would compute nonsense",
    ),
    "batchnorm": (
        _edit("tag_v2.caffemodel", _insert_layer("conv3_1", "bn3_1", "BatchNorm", blobs=3)),
        "{p}: layer 'bn3_1' is a BatchNorm layer, which Illustration2Vec does not have (i2v would compute something "
        "else than this file describes)",
    ),
    "softmax_instead_of_sigmoid": (
        _edit("tag_v2.caffemodel", _set_type("prob", "Softmax")),
        "{p}: layer prob is a Softmax layer, not a Sigmoid as in Illustration2Vec (i2v would compute something "
        "else than this file describes)",
    ),
    "softmax_instead_of_sigmoid_v1": (
        _edit("tag_v1.caffemodel", _set_type("prob", 20)),  # V1 SOFTMAX
        "{p}: layer prob is a SOFTMAX layer, not a Sigmoid as in Illustration2Vec",
    ),
    "deconvolution_under_a_conv_name": (
        _edit("tag_v2.caffemodel", _set_type("conv3_1", "Deconvolution")),
        "{p}: layer conv3_1 is a Deconvolution layer, not a Convolution as in Illustration2Vec",
    ),
    "lrn_without_parameters": (
        _edit("feature_v1.caffemodel", lambda net: net.layers.add(name="norm1", type=15)),  # V1 LRN
        "{p}: layer 'norm1' is a LRN layer, which Illustration2Vec does not have",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_one_line_and_name_the_file(tmp_path: Path, case: str) -> None:
    make, expected = ERRORS[case]
    path = make(tmp_path / f"{case}.weights")
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    assert type(exc.value) is WeightsError
    assert one_line_error(exc, path).startswith(expected.format(p=path))
    with pytest.raises(WeightsError) as exc:
        convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]  # no temporary file left


@pytest.mark.parametrize(
    ("layer", "param", "axis"),
    [
        ("conv1_1", "convolution_param", -3),
        ("encode1", "inner_product_param", -3),
        ("encode2", "inner_product_param", -1),
    ],
)
def test_an_axis_counted_from_the_end_is_the_same_layer(tmp_path: Path, golden_sd: dict, layer, param, axis) -> None:
    """Caffe counts a negative axis from the end: -3 of a (N, C, H, W) input, -1 of encode2's (N, 4096), are axis 1."""
    path = _edit("feature_v1.caffemodel", _set(layer, param, axis=axis))(tmp_path / "axis.caffemodel")
    assert_same(load_weights(path)[0], golden_sd["feature_v1"])


def test_layers_that_do_not_compute_are_accepted(tmp_path: Path, golden_sd: dict) -> None:
    """Data, dropout and loss layers (as a training snapshot holds them) change nothing at inference."""
    net = parse(MODELS / "tag_v2.caffemodel")
    for after, name, layer_type in [("conv1_1", "drop1", "Dropout"), ("prob", "loss", "SigmoidCrossEntropyLoss")]:
        _insert_layer(after, name, layer_type)(net)
    net.layer.insert(0, caffe_message("LayerParameter")(name="data", type="Input", top=["data"]))
    assert_same(read_caffemodel(write(net, tmp_path / "v2.caffemodel")), golden_sd["tag_v2"])
    # a training snapshot's head: the loss on pool6, no prob (the scores are taken before it)
    _remove_layer("prob")(net)
    assert_same(read_caffemodel(write(net, tmp_path / "train.caffemodel")), golden_sd["tag_v2"])
    v1 = parse(MODELS / "feature_v1.caffemodel")
    v1.layers.add(name="data", type=5)  # DATA
    v1.layers.add(name="loss", type=27)  # SIGMOID_CROSS_ENTROPY_LOSS
    assert_same(read_caffemodel(write(v1, tmp_path / "v1.caffemodel")), golden_sd["feature_v1"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("model.safetensors", "{p} is not a safetensors file (it lacks the safetensors header) nor any other weight "
         "format i2v reads: unrecognised binary data (truncated at the start, or not weights at all)"),
        ("model.pth", "{p} is not a PyTorch file (neither a zip archive nor a pickle) nor any other weight format "
         "i2v reads: unrecognised binary data (truncated at the start, or not weights at all)"),
        ("model.PT", "{p} is not a PyTorch file (neither a zip archive nor a pickle)"),
        ("model.caffemodel", "{p} is not a valid caffemodel (truncated or corrupt: "),
    ],
)  # fmt: skip
def test_random_bytes_are_named_for_what_they_claim_to_be(tmp_path: Path, name: str, message: str) -> None:
    """Issue 13.5: random bytes named .safetensors/.pth are not called a broken caffemodel."""
    path = _random_bytes(tmp_path / name)
    with pytest.raises(WeightsError) as exc:
        load_weights(path)
    assert one_line_error(exc, path).startswith(message.format(p=path))


def test_a_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO as the weight file is refused before it is opened (opening blocks; the file is read twice)."""
    import threading

    fifo = tmp_path / "weights.caffemodel"
    os.mkfifo(fifo)

    def feed() -> None:  # so that the old code, which opened the pipe, does not hang the test
        with contextlib.suppress(OSError), open(fifo, "wb") as f:
            f.write((MODELS / "tag_v2.caffemodel").read_bytes())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(WeightsError) as exc:
            load_weights(fifo)
        assert str(exc.value) == f"{fifo} is not a regular file (a pipe or a device): save the weights to a file first"
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # releases the writer
        writer.join(5)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as exc:
        load_weights(tmp_path / "nope.safetensors")
    assert str(exc.value) == f"{tmp_path}/nope.safetensors: no such file"
    with pytest.raises(WeightsError) as exc:
        load_weights(tmp_path)
    assert str(exc.value) == f"{tmp_path} is a folder, not a weight file"


@pytest.mark.parametrize(
    ("src", "kind", "message"),
    [
        (
            "feature_v1.caffemodel",
            TAG,
            "{p} is a feature model (encode1); `i2v tag` needs the tag model "
            "(illust2vec_tag_ver200.caffemodel or illust2vec_tag_ver200.safetensors)",
        ),
        (
            "tag_v1.caffemodel",
            FEATURE,
            "{p} is a tag model (conv6_4); feature extraction needs the feature model "
            "(illust2vec_ver200.caffemodel or illust2vec_ver200.safetensors)",
        ),
    ],
)
def test_model_kind_mix_up(src: str, kind: str, message: str) -> None:
    with pytest.raises(ModelKindError) as exc:
        load_model(MODELS / src, kind=kind)
    assert str(exc.value) == message.format(p=MODELS / src)


def test_load_model_builds_the_right_network(tmp_path: Path, feature_weights: Path) -> None:
    model, info = load_model(feature_weights, kind=FEATURE)
    assert not model.training
    assert model.arch == Architecture(FEATURE, WIDTHS, 128)
    assert info.source == "feature_v1.caffemodel"
    assert next(model.parameters()).device == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------
# Where weights are found


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No i2v variables, and a home folder of our own."""
    for var in ("I2V_WEIGHTS", "I2V_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_default_weights_dir(monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path) -> None:
    assert default_weights_dir() == clean_env / ".cache" / "i2v"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_weights_dir() == clean_env / ".cache" / "i2v"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_weights_dir() == tmp_path / "xdg" / "i2v"
    monkeypatch.setenv("I2V_HOME", str(tmp_path / "i2v_home"))
    assert default_weights_dir() == tmp_path / "i2v_home"


def test_resolve_order(monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("I2V_HOME", str(cache))
    cached = cache / "illust2vec_tag_ver200.safetensors"
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    env_file = tmp_path / "env.safetensors"
    env_file.write_bytes(b"x")
    explicit = tmp_path / "explicit.caffemodel"
    explicit.write_bytes(b"x")

    assert resolve_weights(None, TAG) == cached
    monkeypatch.setenv("I2V_WEIGHTS", str(env_file))
    assert resolve_weights(None, TAG) == env_file
    assert resolve_weights(str(explicit), TAG) == explicit
    assert resolve_weights("", TAG) == env_file  # an empty --weights is no --weights


def test_resolve_folders(monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "illust2vec_ver200.caffemodel").write_bytes(b"x")
    (folder / "illust2vec_tag_ver200.safetensors").write_bytes(b"x")
    monkeypatch.setenv("I2V_WEIGHTS", str(folder))
    assert resolve_weights(None, TAG) == folder / "illust2vec_tag_ver200.safetensors"
    assert resolve_weights(None, FEATURE) == folder / "illust2vec_ver200.caffemodel"  # converted on the fly
    (folder / "illust2vec_ver200.safetensors").write_bytes(b"x")
    assert resolve_weights(str(folder), FEATURE) == folder / "illust2vec_ver200.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError) as exc:
        resolve_weights(str(empty), TAG)
    assert str(exc.value) == (
        f"--weights folder {empty} holds no illust2vec_tag_ver200.safetensors (nor illust2vec_tag_ver200.caffemodel)"
    )


def test_resolve_missing(monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as exc:
        resolve_weights(str(tmp_path / "gone.safetensors"), TAG)
    assert str(exc.value) == f"--weights: {tmp_path}/gone.safetensors does not exist"
    monkeypatch.setenv("I2V_WEIGHTS", str(tmp_path / "gone"))
    with pytest.raises(WeightsNotFoundError) as exc:
        resolve_weights(None, FEATURE)
    assert str(exc.value) == f"$I2V_WEIGHTS: {tmp_path}/gone does not exist"
    monkeypatch.delenv("I2V_WEIGHTS")
    target = clean_env / ".cache" / "i2v" / "illust2vec_ver200.safetensors"
    with pytest.raises(WeightsNotFoundError) as exc:
        resolve_weights(None, FEATURE)
    assert str(exc.value) == (
        f"no feature model weights found (no --weights, no $I2V_WEIGHTS, no {target}): run `i2v weights download`, "
        f"or `i2v weights convert FILE.caffemodel -o {target}`"
    )


def test_weights_under_names_that_are_not_utf8(golden, tmp_path):
    """Linux allows any bytes in a name. The provenance (safetensors metadata, job files, JSON) is UTF-8 text, so a
    source name's odd bytes are written as \\xNN; the safetensors library refuses such a path, so it is opened here."""
    import os

    from i2v_cli.weights import convert, load_weights

    src = os.path.join(os.fsencode(tmp_path), b"tag\xff.caffemodel")
    dst = os.path.join(os.fsencode(tmp_path), b"tag\xfe.safetensors")
    with open(golden / "models" / "tag_v2.caffemodel", "rb") as fin, open(src, "wb") as fout:
        fout.write(fin.read())
    info = convert(os.fsdecode(src), os.fsdecode(dst))
    assert info.source == "tag\\xff.caffemodel"
    state_dict, again = load_weights(os.fsdecode(dst))
    assert again.source == "tag\\xff.caffemodel" and again.sha256 == info.sha256 and state_dict
