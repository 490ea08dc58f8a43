"""``i2v dupes``: re-encoded and resized copies of large images group together, distinct images do not; the keep
rule; pairs equal an exact all-pairs search."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from i2v_cli.cli import cli
from i2v_cli.dupes import groups_of, similar_pairs


@pytest.fixture(scope="module")
def dupes_db(tmp_path_factory, golden, tag_weights, feature_weights):
    """Large golden images (640x480 and up: the synthetic models react to fine texture, so small images change
    too much when shrunk) with re-encoded and resized copies, and distinct images."""
    folder = tmp_path_factory.mktemp("dupes") / "imgs"
    folder.mkdir()
    mixed = golden / "images" / "mixed"
    shutil.copy(mixed / "img001.png", folder / "a.png")  # 640x480, lossless
    with Image.open(mixed / "img001.png") as im:
        im.save(folder / "a_q90.jpg", quality=90)  # same size, lossy: not kept
        im.resize((576, 432), Image.LANCZOS).save(folder / "a_small.png")  # 90%: smaller, not kept
    shutil.copy(mixed / "img006.jpg", folder / "b.jpg")  # 2048x1536
    with Image.open(mixed / "img006.jpg") as im:
        im.resize((1843, 1382), Image.LANCZOS).save(folder / "b_small.jpg", quality=92)
    for name, src in (("c.png", "img003.png"), ("d.png", "img008.png"), ("e.png", "img002.png")):
        shutil.copy(mixed / src, folder / name)
    os.utime(folder / "a_q90.jpg", ns=(10**18, 10**18))
    db = folder.parent / "c.db"
    result = CliRunner().invoke(cli, ["index", str(folder), "--db", str(db), "--tag-weights", str(tag_weights),
                                      "--feature-weights", str(feature_weights), "-j", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder, db


def test_copies_group_and_distinct_images_do_not(dupes_db):
    folder, db = dupes_db
    result = CliRunner().invoke(cli, ["dupes", "--db", str(db), "-f", "jsonl"])
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    names = [[os.path.basename(p) for p in g["paths"]] for g in groups]
    assert names == [["a.png", "a_q90.jpg", "a_small.png"], ["b.jpg", "b_small.jpg"]]
    assert [os.path.basename(g["keep"]) for g in groups] == ["a.png", "b.jpg"]
    assert all(0.95 <= g["min_similarity"] <= 1.0 for g in groups)
    text = CliRunner().invoke(cli, ["dupes", "--db", str(db)])
    assert text.stdout.splitlines()[:2] == [f"keep\t{folder / 'a.png'}", f"  dupe\t{folder / 'a_q90.jpg'}"]
    # Nothing was touched.
    assert sorted(os.listdir(folder)) == sorted(["a.png", "a_q90.jpg", "a_small.png", "b.jpg", "b_small.jpg",
                                                 "c.png", "d.png", "e.png"])  # fmt: skip


@pytest.mark.parametrize("exact_rows", [10**9, 0])  # all pairs compared; the sketch path
def test_an_image_with_a_copy_and_a_near_duplicate_is_in_one_group(golden, tag_weights, feature_weights, tmp_path,
                                                                     monkeypatch, exact_rows):  # fmt: skip
    """b.jpg, a near-duplicate of a.png with a byte-identical copy c.jpg, was listed twice: kept in a group of its
    own with c.jpg, and a dupe in a.png's group (copies formed a group unless their first was a component's root)."""
    from i2v_cli import dupes

    folder = tmp_path / "imgs"
    folder.mkdir()
    with Image.open(golden / "images" / "mixed" / "img001.png") as im:  # 640x480
        im.convert("RGB").save(folder / "a.png")
        im.convert("RGB").save(folder / "b.jpg", quality=90)
    shutil.copy(folder / "b.jpg", folder / "c.jpg")
    db = tmp_path / "c.db"
    result = CliRunner().invoke(cli, ["index", str(folder), "--db", str(db), "--tag-weights", str(tag_weights),
                                      "--feature-weights", str(feature_weights), "-j", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(dupes, "EXACT_ROWS", exact_rows)
    result = CliRunner().invoke(cli, ["dupes", "--db", str(db), "-f", "jsonl"])
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert [[os.path.basename(p) for p in g["paths"]] for g in groups] == [["a.png", "b.jpg", "c.jpg"]]
    assert os.path.basename(groups[0]["keep"]) == "a.png"


def test_keep_rule_prefers_lossless_then_oldest(dupes_db, tmp_path):
    from i2v_cli.dupes import Image as Img

    big = Img(1, "x.jpg", 100, 100, "JPEG", 5)
    png = Img(2, "y.png", 90, 90, "PNG", 1)
    same_jpeg_old = Img(3, "z.jpg", 100, 100, "JPEG", 1)
    same_png = Img(4, "w.png", 100, 100, "PNG", 9)
    assert min([big, png], key=Img.keep_key) is big  # resolution first
    assert min([big, same_png], key=Img.keep_key) is same_png  # then lossless
    assert min([big, same_jpeg_old], key=Img.keep_key) is same_jpeg_old  # then oldest


def test_pairs_equal_exact_all_pairs():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 32)).astype(np.float32)
    noisy = base[:60] + 0.05 * rng.standard_normal((60, 32)).astype(np.float32)
    vecs = np.concatenate([base, noisy])
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    got = {(i, j) for i, j, _ in similar_pairs(unit, 0.9, block=37)}
    sims = unit @ unit.T
    want = {(i, j) for i in range(len(unit)) for j in range(i + 1, len(unit)) if sims[i, j] >= 0.9}
    assert got == want and len(want) >= 60
    groups = groups_of(iter([(0, 1, 0.99), (2, 3, 0.97), (1, 4, 0.96)]), 6)
    assert sorted(m for m, _ in groups.values()) == [[0, 1, 4], [2, 3]]
    assert sorted(low for _, low in groups.values()) == [0.96, 0.97]
