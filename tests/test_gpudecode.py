"""``--decode cuda`` (i2v_cli.gpudecode): which files go to the GPU, the resize there, and batches equal to the CPU
reader's. Without a GPU it runs on the CPU with a Pillow decoder in nvJPEG's place, so everything but nvJPEG
itself is checked here; the GPU test at the end checks nvJPEG against the CPU path."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import i2v_cli.gpudecode as gpudecode
from i2v_cli.cli import cli
from i2v_cli.data import iter_batches
from i2v_cli.decode import RGBPixels, open_image
from i2v_cli.transform import network_input_array, resize_array

CPU = torch.device("cpu")


def pillow_decoder(datas):
    """nvJPEG's stand-in: the same pixels as i2v's CPU decoding, so batches must equal the CPU reader's."""
    out = []
    for data in datas:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous())
    return out


def picture(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-20, 21, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
    return img.convert(mode)


@pytest.fixture
def mixed(tmp_path):
    """Files of every route: JPEGs of several sizes (one 224x224, one grey), and for the CPU a PNG, a CMYK JPEG,
    an EXIF-rotated JPEG, a truncated JPEG and a file that is no image."""
    files = {}
    for name, (w, h), mode in [
        ("a.jpg", (300, 200), "RGB"),
        ("b.jpg", (224, 224), "RGB"),
        ("c.jpg", (300, 200), "RGB"),
        ("grey.jpg", (180, 260), "L"),
        ("d.jpg", (97, 411), "RGB"),
    ]:
        path = tmp_path / name
        picture(w, h, seed=len(files), mode=mode).save(path, quality=92)
        files[name] = path
    picture(250, 250, seed=9).save(tmp_path / "e.png")
    picture(120, 90, seed=10).convert("CMYK").save(tmp_path / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(160, 100, seed=11).save(tmp_path / "rotated.jpg", exif=exif)
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.jpg").write_text("not a picture")
    order = ["a.jpg", "e.png", "cut.jpg", "b.jpg", "cmyk.jpg", "grey.jpg", "rotated.jpg", "text.jpg", "c.jpg", "d.jpg"]
    return [str(tmp_path / n) for n in order]


def test_only_whole_upright_rgb_or_grey_jpegs_go_to_the_gpu(mixed, tmp_path, monkeypatch):
    routed = {p.rsplit("/", 1)[1]: gpudecode.jpeg_for_gpu(p) for p in mixed}
    assert {n for n, r in routed.items() if r is not None} == {"a.jpg", "b.jpg", "c.jpg", "grey.jpg", "d.jpg"}
    data, shape = routed["d.jpg"]
    assert shape == (411, 97) and data == (tmp_path / "d.jpg").read_bytes()
    assert gpudecode.jpeg_for_gpu(str(tmp_path / "missing.jpg")) is None
    monkeypatch.setattr(gpudecode, "MAX_GPU_PIXELS", 300 * 200 - 1)
    assert gpudecode.jpeg_for_gpu(mixed[0]) is None  # too large for the GPU: the CPU's bounded resize


@pytest.mark.parametrize("size", [(300, 200), (224, 224), (97, 411), (1000, 7), (50, 50)])
def test_the_gpu_resize_is_the_spec_resize(size):
    img = picture(*size, seed=size[0])
    want = network_input_array(resize_array(RGBPixels(img)))
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    got = gpudecode.GpuResize(CPU)([chw])[0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_a_flat_image_resizes_to_its_colour():
    chw = torch.full((3, 40, 60), 77, dtype=torch.uint8)
    got = gpudecode.GpuResize(CPU)([chw])[0]
    want = network_input_array(resize_array(RGBPixels(Image.new("RGB", (60, 40), (77, 77, 77)))))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_gpu_batches_equal_the_cpu_readers(mixed, workers):
    """In input order, with the same errors: the CPU files decoded by the CPU path (in a worker process with
    workers > 0), the JPEGs by the decoder, all resized to the same inputs."""
    want = list(iter_batches(mixed, batch_size=4, workers=0))
    got = list(gpudecode.gpu_batches(mixed, batch_size=4, device=CPU, workers=workers, decoder=pillow_decoder))
    assert [b.ok for b in got] == [b.ok for b in want] == [[0, 1, 3], [4, 5, 6], [8, 9]]
    assert [b.errors for b in got] == [b.errors for b in want]
    assert "cut.jpg" in got[0].errors[2] and "text.jpg" in got[1].errors[7]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.inputs.numpy(), w.inputs.numpy(), atol=2e-4, rtol=0)


def test_what_the_decoder_refuses_or_misreads_goes_to_the_cpu(mixed):
    def picky(datas):
        out = pillow_decoder(datas)
        out[0] = None  # refused
        if len(out) > 1:
            out[1] = out[1][:, :5]  # a wrong shape: never trusted
        return out

    (want,) = iter_batches(mixed, batch_size=10, workers=0)
    (got,) = gpudecode.gpu_batches(mixed, batch_size=10, device=CPU, decoder=picky)
    assert got.ok == want.ok and got.errors == want.errors
    np.testing.assert_allclose(got.inputs.numpy(), want.inputs.numpy(), atol=2e-4, rtol=0)


def test_a_decoder_out_of_memory_sends_its_files_to_the_cpu(mixed):
    def full(datas):
        raise torch.OutOfMemoryError("CUDA out of memory")

    (want,) = iter_batches(mixed, batch_size=10, workers=0)
    (got,) = gpudecode.gpu_batches(mixed, batch_size=10, device=CPU, decoder=full)
    assert got.ok == want.ok
    np.testing.assert_allclose(got.inputs.numpy(), want.inputs.numpy(), atol=1e-6, rtol=0)


def test_decode_cuda_needs_a_cuda_device(golden_order, tag_weights):
    result = CliRunner().invoke(
        cli, ["tag", str(golden_order[0]), "-w", str(tag_weights), "--device", "cpu", "--decode", "cuda"]
    )
    assert result.exit_code == 2
    assert (
        result.output.strip() == "Error: --decode cuda decodes JPEG files on the GPU that runs the "
        "network: add --device cuda"
    )


def test_decode_cuda_is_for_the_local_engine():
    result = CliRunner().invoke(cli, ["tag", "x.jpg", "--engine", "ray", "--decode", "cuda"])
    assert result.exit_code == 2 and "--decode cuda: for the local engine only" in result.output


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(gpudecode.gpu_decoding_available() is not None, reason="needs a CUDA device and torchvision")
def test_nvjpeg_batches_match_the_cpu_reader(mixed, tag_weights, tmp_path):
    """nvJPEG on the GPU: the CPU files exactly as the CPU reader makes them, the JPEGs within a few levels, order
    and errors the same; and `i2v tag --decode cuda` agrees with --decode cpu. Measured on an H100 (torch 2.11,
    torchvision 0.26): the grey JPEG equal (4e-6), the colour ones 2.9 to 5.2 levels apart on average (30 to 39 at
    most): nvJPEG upsamples chroma unlike libjpeg, and these pictures have noisy chroma; 99.14% of the golden tag
    model's decisions the same."""
    cuda = torch.device("cuda")
    want = list(iter_batches(mixed, batch_size=4, workers=0))
    got = list(gpudecode.gpu_batches(mixed, batch_size=4, device=cuda, workers=1))
    assert [b.ok for b in got] == [b.ok for b in want] and [b.errors for b in got] == [b.errors for b in want]
    for g, w in zip(got, want, strict=True):
        assert g.inputs.device.type == "cuda"
        for i, (a, b) in enumerate(zip(g.inputs.cpu().numpy(), w.inputs.numpy(), strict=True)):
            if mixed[g.ok[i]].endswith(".png") or "cmyk" in mixed[g.ok[i]] or "rotated" in mixed[g.ok[i]]:
                np.testing.assert_allclose(a, b, atol=2e-4, rtol=0)
            else:
                assert float(np.abs(a - b).mean()) < 8.0, mixed[g.ok[i]]

    def scores(decode):
        args = ["tag", *mixed, "-w", str(tag_weights), "--device", "cuda", "--decode", decode, "-t", "0"]
        result = CliRunner().invoke(cli, [*args, "-f", "jsonl"])
        assert result.exit_code == 1  # the two bad files
        return [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]

    on_cpu, on_gpu = scores("cpu"), scores("cuda")
    assert [r["path"] for r in on_cpu] == [r["path"] for r in on_gpu]
    same = total = 0
    for a, b in zip(on_cpu, on_gpu, strict=True):
        if "error" in a:
            assert a == b
            continue
        for key in ("general", "character", "copyright"):
            same += sum((a[key][t] >= 0.5) == (b[key][t] >= 0.5) for t in a[key])
            total += len(a[key])
    assert same / total >= 0.97


def test_open_image_and_the_probe_agree_on_size(mixed):
    """The probe's (height, width) is the decoded image's: the check that a decoder's output is trusted."""
    for path in mixed:
        probe = gpudecode.jpeg_for_gpu(path)
        if probe is not None:
            img = open_image(path)
            assert probe[1] == (img.height, img.width)


def test_index_refuses_decode_cuda_without_a_gpu(golden_order, tag_weights, feature_weights, tmp_path):
    args = ["index", str(golden_order[0]), "--db", str(tmp_path / "c.db"), "--tag-weights", str(tag_weights)]
    args += ["--feature-weights", str(feature_weights), "--device", "cpu", "--decode", "cuda"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "add --device cuda" in result.output
    assert not (tmp_path / "c.db").exists()


def test_run_model_refuses_gpu_decoding_for_a_cpu_session(golden_order):
    from i2v_cli.errors import I2VError
    from i2v_cli.runner import run_model

    class Session:  # a predictor of NumPy arrays, as ortcache.SessionNet: CPU only
        arrays = True

        def __call__(self, x):
            return np.zeros((len(x), 1539), np.float32)

    with pytest.raises(I2VError, match="needs the network on a CUDA device"):
        list(run_model(None, [str(golden_order[0])], net=Session(), decode="cuda"))
    assert len(next(iter(run_model(None, [str(golden_order[0])], net=Session())))) == 1


# ------------------------------------------------------------------------------------------------------------
# Found by attacking the options (stop 12)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")


@no_cuda
def test_a_refused_decode_makes_no_captions_folder(golden_order, tag_weights, tmp_path):
    folder = tmp_path / "caps" / "deep"
    args = ["tag", str(golden_order[0]), "-w", str(tag_weights), "--decode", "cuda", "--captions-dir", str(folder)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and not (tmp_path / "caps").exists()


@no_cuda
def test_similar_checks_decode_even_when_no_query_needs_the_network(golden_order, feature_weights, tmp_path):
    vecs = tmp_path / "v.npy"
    made = CliRunner().invoke(cli, ["features", str(golden_order[0]), "-w", str(feature_weights), "-o", str(vecs)])
    assert made.exit_code == 0, made.output
    args = ["similar", str(golden_order[0]), "--index", str(vecs), "-w", str(feature_weights), "--decode", "cuda"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--decode cuda" in result.output


def test_index_import_takes_no_decode(tmp_path):
    args = ["index", "--import", str(tmp_path), "--import", str(tmp_path), "--db", str(tmp_path / "i.db")]
    result = CliRunner().invoke(cli, [*args, "--decode", "cuda"])
    assert result.exit_code == 2 and "--import reads records" in result.output
    assert not (tmp_path / "i.db").exists()


def test_run_model_refuses_an_unknown_decode(golden_order, tag_weights):
    from i2v_cli.errors import I2VError
    from i2v_cli.runner import run_model
    from i2v_cli.weights import load_model

    model, _ = load_model(tag_weights)
    for value in ("gpu", "CUDA", None):
        with pytest.raises(I2VError, match="unknown decode"):
            list(run_model(model, [str(golden_order[0])], decode=value))


def test_a_resume_refusal_names_the_default_decode():
    from i2v_cli.resume import _differences, make_job

    old = make_job("tag", "jsonl", {"precision": "fp32", "decode": "cuda"}, {"sha256": "a"})
    new = make_job("tag", "jsonl", {"precision": "fp32"}, {"sha256": "a"})
    assert _differences(old, new) == ["decode cuda (now cpu)"]
    assert _differences(new, make_job("tag", "jsonl", {"precision": "fp32", "decode": "cpu"}, {"sha256": "a"})) == []
