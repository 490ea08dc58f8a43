"""`i2v tag --captions`: caption files written beside the images or mirrored under a folder."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli


@pytest.fixture
def dataset(tmp_path, golden):
    root = tmp_path / "dataset"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    shutil.copy(golden / "images" / "sq" / "img000.png", root / "a" / "one.png")
    shutil.copy(golden / "images" / "sq" / "img001.png", root / "b" / "two.png")
    return root


def tag(*args, weights):
    return CliRunner().invoke(cli, ["tag", *map(str, args), "--weights", str(weights), "--workers", "0"])


def expected_caption(record, sep=", "):
    merged = {**record["general"], **record["character"], **record["copyright"]}
    return sep.join(t for t, _ in sorted(merged.items(), key=lambda kv: -kv[1]))


def test_captions_beside_images_match_the_records(dataset, tag_weights):
    result = tag(dataset, "-r", "--captions", "-t", "0.3", weights=tag_weights)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # captions are the output unless --format/-o ask for records
    assert "2 written" in result.stderr
    records = [json.loads(line) for line in tag(dataset, "-r", "-t", "0.3", weights=tag_weights).stdout.splitlines()]
    for record, caption in zip(records, [dataset / "a" / "one.txt", dataset / "b" / "two.txt"], strict=True):
        assert caption.read_text() == expected_caption(record) + "\n"


def test_captions_dir_mirrors_folders_and_options_apply(dataset, tag_weights, tmp_path):
    out = tmp_path / "captions"
    result = tag(dataset, "-r", "--captions-dir", out, "--top-k", "3", "--underscores", "--rating-tag",
                 "--caption-ext", "caption", "--format", "jsonl", weights=tag_weights)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    text = (out / "a" / "one.caption").read_text().strip()
    assert (out / "b" / "two.caption").exists() and not list(dataset.rglob("*.caption"))
    rating = max(records[0]["rating"], key=records[0]["rating"].get)
    assert text == expected_caption(records[0]).replace(" ", "_").replace(",_", ", ") + ", " + rating


def test_existing_captions_are_kept_unless_asked(dataset, tag_weights):
    caption = dataset / "a" / "one.txt"
    caption.write_text("my own tag\n")
    result = tag(dataset / "a", "--captions", weights=tag_weights)
    assert result.exit_code == 0
    assert caption.read_text() == "my own tag\n"
    assert "1 skipped" in result.stderr and "--overwrite or --append" in result.stderr
    tag(dataset / "a", "--captions", "--append", "-t", "0.3", weights=tag_weights)
    appended = caption.read_text()
    assert appended.startswith("my own tag, ") and appended.count("my own tag") == 1
    tag(dataset / "a", "--captions", "--append", "-t", "0.3", weights=tag_weights)
    assert caption.read_text() == appended  # appending again adds nothing
    tag(dataset / "a", "--captions", "--overwrite", "-t", "0.3", "--exclude", "my own tag", weights=tag_weights)
    assert "my own tag" not in caption.read_text()


def test_colliding_captions_are_refused_up_front(dataset, tag_weights):
    shutil.copy(dataset / "a" / "one.png", dataset / "a" / "one.jpg")
    result = tag(dataset / "a", "--captions", weights=tag_weights)
    assert result.exit_code == 2
    assert "one.txt" in result.stderr and not (dataset / "a" / "one.txt").exists()


def test_a_multi_dot_image_extension_is_refused(dataset, tag_weights):
    (dataset / "a" / "one.txt.png").write_bytes(b"a real image")
    result = tag(dataset / "a", "--captions", "--caption-ext", ".txt.png", "--overwrite", weights=tag_weights)
    assert result.exit_code == 2
    assert "caption extension .txt.png ends in .png, an image extension" in result.stderr
    assert (dataset / "a" / "one.txt.png").read_bytes() == b"a real image"


def test_a_tag_list_with_duplicates_is_refused(dataset, tag_weights, tmp_path):
    names = [f"t{i}" for i in range(1539)]
    names[9] = "t2"
    (tmp_path / "tags.json").write_text(json.dumps(names))
    result = tag(dataset / "a", "--tags", tmp_path / "tags.json", weights=tag_weights)
    assert result.exit_code == 2
    assert "1 unusable tag name(s): #9 't2' (a duplicate of #2)" in result.stderr
    assert result.stdout == ""


def test_append_to_a_caption_with_another_separator_fails_that_image(dataset, tag_weights):
    caption = dataset / "a" / "one.txt"
    records = [json.loads(line) for line in tag(dataset / "a", "-t", "0.3", weights=tag_weights).stdout.splitlines()]
    first = next(iter(records[0]["general"]))
    caption.write_text(f"{first};my own tag\n")
    result = tag(dataset / "a", "--captions", "--append", "-t", "0.3", weights=tag_weights)
    assert result.exit_code == 1
    assert "seems to use ';' between tags, not ', '" in result.stderr
    assert caption.read_text() == f"{first};my own tag\n"


def test_a_caption_symlink_is_written_through(dataset, tag_weights, tmp_path):
    (tmp_path / "elsewhere.txt").write_text("old\n")
    (dataset / "a" / "one.txt").symlink_to(tmp_path / "elsewhere.txt")
    result = tag(dataset / "a", "--captions", "--overwrite", weights=tag_weights)
    assert result.exit_code == 0, result.stderr
    assert (dataset / "a" / "one.txt").is_symlink()
    assert (tmp_path / "elsewhere.txt").read_text() != "old\n"


def test_an_underscore_separator_with_underscores_is_refused_up_front(dataset, tag_weights):
    result = tag(dataset, "-r", "--captions", "--caption-sep", "_", "--underscores", weights=tag_weights)
    assert result.exit_code == 2
    assert "the caption separator '_' cannot be told apart from" in result.stderr
    assert not list(dataset.rglob("*.txt"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--overwrite", "--append"], "--overwrite and --append contradict each other"),
        (["--skip-existing", "--overwrite"], "--skip-existing and --overwrite contradict each other"),
    ],
)
def test_contradicting_policies_are_refused(dataset, tag_weights, flags, message):
    result = tag(dataset, "-r", "--captions", *flags, weights=tag_weights)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not list(dataset.rglob("*.txt"))


@pytest.mark.parametrize("option", [["--underscores"], ["--caption-ext", ".cap"], ["--rating-tag"], ["--append"]])
def test_caption_options_without_captions_are_refused(dataset, tag_weights, option):
    result = tag(dataset, "-r", *option, weights=tag_weights)
    assert result.exit_code == 2
    assert f"{option[0]} only shape caption files: add --captions" in result.stderr
    assert result.stdout == ""


def test_exclude_without_captions_filters_the_records_and_warns(dataset, tag_weights):
    full = [json.loads(line) for line in tag(dataset, "-r", "-t", "0.3", weights=tag_weights).stdout.splitlines()]
    drop = next(iter(full[0]["general"]))
    result = tag(dataset, "-r", "-t", "0.3", "--exclude", f"{drop.replace(' ', '_').upper()},long hiar",
                 weights=tag_weights)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert drop not in records[0]["general"]
    assert records[0]["general"] == {t: s for t, s in full[0]["general"].items() if t != drop}
    assert "--exclude 'long hiar' is not in the tag list; did you mean 'long hair'" in result.stderr


def test_a_caption_that_is_the_output_file_is_refused(dataset, tag_weights):
    out = dataset / "a" / "one.txt"
    out.write_text("earlier records\n")
    result = tag(dataset / "a", "--captions", "--overwrite", "-o", out, "-f", "jsonl", weights=tag_weights)
    assert result.exit_code == 2
    assert "which is the output file" in result.stderr
    assert out.read_text() == "earlier records\n"


def test_an_unusable_captions_dir_is_refused_before_the_network_runs(dataset, tag_weights, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "records.jsonl"
    result = tag(dataset, "-r", "--captions-dir", tmp_path / "file" / "caps", "-o", out, weights=tag_weights)
    assert result.exit_code == 2
    assert f"cannot use {tmp_path}/file/caps as the captions folder: Not a directory" in result.stderr
    assert not out.exists()


def test_skip_existing_does_not_run_images_whose_captions_exist(dataset, tag_weights):
    """A broken image whose caption exists is not even decoded: it is skipped before the network runs."""
    (dataset / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (dataset / "a" / "broken.txt").write_text("kept\n")
    (dataset / "a" / "one.txt").write_text("kept too\n")
    result = tag(dataset, "-r", "--captions", weights=tag_weights)
    assert result.exit_code == 0, result.stderr
    assert "broken.png" not in result.stderr
    assert "1 written" in result.stderr and "2 skipped" in result.stderr
    assert (dataset / "a" / "broken.txt").read_text() == "kept\n"


# --- hostile review of captions ------------------------------------------------------------------------------


@pytest.mark.parametrize("link_to", ["one.png", "other.png"])
def test_a_caption_that_links_to_an_input_is_refused_before_the_network_runs(dataset, tag_weights, link_to):
    shutil.copy(dataset / "a" / "one.png", dataset / "a" / "other.png")
    (dataset / "a" / "one.txt").symlink_to(link_to)
    before = (dataset / "a" / link_to).read_bytes()
    result = tag(dataset / "a", "--captions", "--overwrite", "-o", dataset / "out.jsonl", weights=tag_weights)
    assert result.exit_code == 2, result.stderr
    assert "caption file(s) would serve more than one image or replace an image" in result.stderr
    assert (dataset / "a" / link_to).read_bytes() == before
    assert not (dataset / "out.jsonl").exists()


def test_a_captions_dir_entry_that_links_to_an_input_is_refused(dataset, tag_weights, tmp_path):
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "one.txt").symlink_to(dataset / "a" / "one.png")
    before = (dataset / "a" / "one.png").read_bytes()
    result = tag(dataset / "a", "--captions-dir", tmp_path / "caps", "--overwrite", weights=tag_weights)
    assert result.exit_code == 2, result.stderr
    assert "replace an image" in result.stderr
    assert (dataset / "a" / "one.png").read_bytes() == before


def test_a_caption_that_links_to_another_image_fails_that_image_only(dataset, tag_weights, tmp_path):
    shutil.copy(dataset / "a" / "one.png", tmp_path / "not-an-input.png")
    (dataset / "a" / "one.txt").symlink_to(tmp_path / "not-an-input.png")
    before = (tmp_path / "not-an-input.png").read_bytes()
    result = tag(dataset, "-r", "--captions", "--append", weights=tag_weights)
    assert result.exit_code == 1, result.stderr
    assert "one.txt holds something else (PNG), not a caption: it is left as it is" in result.stderr
    assert (tmp_path / "not-an-input.png").read_bytes() == before
    assert (dataset / "b" / "two.txt").exists()
    assert "1 written" in result.stderr


def _fail_at_the_third_caption(dataset, golden, monkeypatch, error):
    """Two more images in dataset/a (four), and the third caption written raises ``error(record)``."""
    import i2v_cli.pipeline as pipeline

    for i in range(2, 4):
        shutil.copy(golden / "images" / "sq" / f"img00{i - 2}.png", dataset / "a" / f"img{i}.png")
    real, calls = pipeline.write_caption, [0]

    def failing_at_the_third(record, options):
        calls[0] += 1
        if calls[0] == 3:
            raise error(record)
        return real(record, options)

    monkeypatch.setattr(pipeline, "write_caption", failing_at_the_third)


def test_records_reach_the_output_only_after_their_captions(dataset, tag_weights, golden, monkeypatch):
    """A run stopped while writing a batch's captions (SIGTERM) records none of that batch, so --resume
    captions every image."""
    import signal

    import i2v_cli.pipeline as pipeline
    from i2v_cli.errors import Interrupted

    real = pipeline.write_caption
    _fail_at_the_third_caption(dataset, golden, monkeypatch, lambda record: Interrupted(signal.SIGTERM))
    out = dataset / "out.jsonl"
    result = tag(dataset / "a", "--captions", "-b", "2", "-o", out, weights=tag_weights)
    assert result.exit_code == 128 + signal.SIGTERM, result.stderr
    recorded = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert len(recorded) == 2 and all(os.path.exists(os.path.splitext(p)[0] + ".txt") for p in recorded)
    monkeypatch.setattr(pipeline, "write_caption", real)
    result = tag(dataset / "a", "--captions", "-b", "2", "-o", out, "--resume", weights=tag_weights)
    assert result.exit_code == 0, result.stderr
    assert len(list((dataset / "a").glob("*.txt"))) == 3


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_the_captions_of_a_batch_are_written_before_its_records_fail(dataset, tag_weights):
    result = tag(dataset, "-r", "--captions", "-b", "1", "-o", "/dev/full", "-f", "jsonl", weights=tag_weights)
    assert result.exit_code == 3, result.stderr
    assert (dataset / "a" / "one.txt").exists() and not (dataset / "b" / "two.txt").exists()


def test_a_full_disk_stops_at_the_first_caption(dataset, tag_weights, monkeypatch):
    import errno

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    result = tag(dataset, "-r", "--captions", "-b", "1", weights=tag_weights)
    assert result.exit_code == 3, result.stderr
    assert result.stderr.count("No space left on device") == 1
    assert "one.txt: No space left on device (free some space, or write elsewhere)" in result.stderr
    assert "Traceback" not in result.stderr and not list(dataset.rglob("*.txt"))


def test_no_inode_left_for_a_caption_stops_the_run_once(dataset, tag_weights, monkeypatch):
    """Creating the temporary file fails with ENOSPC (inodes exhausted, blocks free): each image failed on its own,
    one message each, instead of one stop with exit 3."""
    import errno

    from i2v_cli.atomic import AtomicFile

    def no_inode(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicFile, "_create_tmp", no_inode)
    result = tag(dataset, "-r", "--captions", "-b", "1", weights=tag_weights)
    assert result.exit_code == 3, result.stderr
    assert result.stderr.count("No space left on device") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_a_full_disk_under_the_captions_keeps_the_records_written_so_far(
    dataset, tag_weights, golden, tmp_path, monkeypatch, fmt
):
    """The images' disk fills at the third caption; -o on another disk keeps the two records whose captions were
    written (a JSON file was thrown away before), and exit 3 names the caption."""
    import errno

    from i2v_cli.atomic import describe_oserror
    from i2v_cli.errors import WriteError

    def full(record):
        return WriteError(describe_oserror(record["path"], OSError(errno.ENOSPC, "No space left on device")))

    _fail_at_the_third_caption(dataset, golden, monkeypatch, full)
    out = tmp_path / f"out.{fmt}"
    result = tag(dataset / "a", "--captions", "-b", "1", "-o", out, weights=tag_weights)
    assert result.exit_code == 3, result.stderr
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    text = out.read_text()
    records = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    assert len(records) == 2
    assert all(os.path.exists(os.path.splitext(r["path"])[0] + ".txt") for r in records)


def test_a_separator_that_is_not_utf8_is_refused_up_front(dataset, tag_weights):
    result = tag(dataset, "-r", "--captions", "--caption-sep", "\udcff", weights=tag_weights)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().endswith("is not UTF-8 text; caption files are UTF-8")
    assert "Traceback" not in result.stderr and not list(dataset.rglob("*.txt"))
