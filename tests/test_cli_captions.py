"""`i2v tag --captions`: caption files written beside the images or mirrored under a folder."""

from __future__ import annotations

import json
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
