"""Caption files: what goes in them, where they go, collisions, and each policy for files already there."""

from __future__ import annotations

import os
import re
import stat
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from i2v_cli.captions import (
    CaptionError,
    CaptionOptions,
    caption_path,
    caption_tags,
    caption_text,
    check_collisions,
    common_root,
    find_collisions,
    parse_caption,
    tag_key,
    write_caption,
)
from i2v_cli.errors import I2VError


def record(path: str = "img.png", **overrides: dict[str, float]) -> dict[str, object]:
    rec: dict[str, object] = {
        "path": path,
        "general": {"1girl": 0.99, "long hair": 0.9, "solo": 0.8},
        "character": {"hatsune miku": 0.95},
        "copyright": {"vocaloid": 0.85},
        "rating": {"safe": 0.9, "questionable": 0.08, "explicit": 0.01},
    }
    rec.update(overrides)
    return rec


def opts(**kwargs: object) -> CaptionOptions:
    return CaptionOptions(**kwargs)  # type: ignore[arg-type]


# --- what goes in a caption ---------------------------------------------------------------------------------


def test_default_caption_merges_categories_by_score():
    assert caption_text(record(), opts()) == "1girl, hatsune miku, long hair, vocaloid, solo"


def test_character_first():
    text = caption_text(record(), opts(character_first=True))
    assert text == "hatsune miku, vocaloid, 1girl, long hair, solo"


def test_character_first_sorts_each_category_by_score():
    rec = record(character={"b": 0.6, "a": 0.7}, copyright={}, general={"y": 0.1, "x": 0.2})
    assert caption_tags(rec, opts(character_first=True)) == ["a", "b", "x", "y"]


def test_rating_adds_the_best_rating_last():
    assert caption_text(record(), opts(rating=True)) == "1girl, hatsune miku, long hair, vocaloid, solo, safe"
    rec = record(rating={"safe": 0.1, "questionable": 0.3, "explicit": 0.2})
    assert caption_tags(rec, opts(rating=True, character_first=True))[-1] == "questionable"
    assert caption_tags(record(rating={}), opts(rating=True))[-1] == "solo"
    assert "safe" not in caption_tags(record(), opts())


def test_underscores():
    text = caption_text(record(general={"long hair": 0.9, "looking at viewer": 0.5}), opts(underscores=True))
    assert text == "hatsune_miku, long_hair, vocaloid, looking_at_viewer"
    rec = record(character={"admiral (kantai collection)": 1.0}, general={}, copyright={})
    assert caption_text(rec, opts(underscores=True)) == "admiral_(kantai_collection)"


@pytest.mark.parametrize("underscores", [False, True])
def test_exclude_matches_either_spelling_and_any_case(underscores):
    options = opts(exclude={"Long_Hair", "SOLO", "hatsune  miku", "safe"}, underscores=underscores, rating=True)
    assert caption_tags(record(), options) == ["1girl", "vocaloid"]


def test_tag_key():
    assert tag_key("Long_Hair") == tag_key("long hair") == tag_key(" long  hair ") == "long hair"
    assert tag_key("STRASSE") == tag_key("straße")


@pytest.mark.parametrize(
    ("separator", "text"),
    [
        (",", "1girl,hatsune miku,long hair,vocaloid,solo"),
        (" | ", "1girl | hatsune miku | long hair | vocaloid | solo"),
        ("\n", "1girl\nhatsune miku\nlong hair\nvocaloid\nsolo"),
    ],
)
def test_separator(separator, text):
    assert caption_text(record(), opts(separator=separator)) == text


def test_space_separator_with_underscores():
    assert caption_text(record(), opts(separator=" ", underscores=True)) == "1girl hatsune_miku long_hair vocaloid solo"


def test_equal_scores_keep_category_then_record_order():
    rec = record(general={"g1": 0.5, "g2": 0.5}, character={"c": 0.5}, copyright={"p": 0.5})
    assert caption_tags(rec, opts()) == ["g1", "g2", "c", "p"]


def test_duplicates_are_dropped():
    rec = record(general={"a b": 0.9}, character={"a_b": 0.8}, copyright={"A B": 0.7})
    assert caption_tags(rec, opts()) == ["a b"]
    assert caption_tags(rec, opts(underscores=True)) == ["a_b"]


def test_missing_categories_and_non_ascii_tags():
    rec = {"path": "x.png", "general": {"初音ミク": 0.9, "ねこ耳 あり": 0.8}}
    assert caption_text(rec, opts(underscores=True)) == "初音ミク, ねこ耳_あり"


def test_error_record_has_no_caption(tmp_path):
    rec = {"path": str(tmp_path / "bad.png"), "error": "truncated"}
    assert caption_tags(rec, opts()) == []
    assert write_caption(rec, opts()) == "failed"
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=100, deadline=None)
@given(
    general=st.dictionaries(st.text(string.ascii_letters + " _", min_size=1), st.floats(0, 1), max_size=8),
    character=st.dictionaries(st.text(string.ascii_letters + " _", min_size=1), st.floats(0, 1), max_size=4),
    exclude=st.frozensets(st.text(string.ascii_letters + " _", min_size=1), max_size=4),
    underscores=st.booleans(),
)
def test_caption_tags_are_unique_not_excluded_and_by_score(general, character, exclude, underscores):
    rec = {"path": "x.png", "general": general, "character": character, "copyright": {}}
    tags = caption_tags(rec, opts(exclude=exclude, underscores=underscores))
    keys = [tag_key(t) for t in tags]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {tag_key(t) for t in exclude}
    score: dict[str, float] = {}  # a tag in two spellings or categories is placed by its best score
    for t, s in [*general.items(), *character.items()]:
        score[tag_key(t)] = max(s, score.get(tag_key(t), s))
    scores = [score[k] for k in keys]
    assert scores == sorted(scores, reverse=True)
    if underscores:
        assert not any(" " in t for t in tags)


# --- options ------------------------------------------------------------------------------------------------


def test_options_are_normalised():
    options = opts(extension="caption", exclude=["a", "b"], captions_dir="out", root="in")
    assert options.extension == ".caption"
    assert options.exclude == frozenset({"a", "b"})
    assert options.captions_dir == Path("out") and options.root == Path("in")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extension": ".png"}, "caption extension .png is an image extension"),
        ({"extension": "JPG"}, "caption extension .JPG is an image extension"),
        ({"extension": ""}, "caption extension '' is not a file extension"),
        ({"extension": "."}, "caption extension '.' is not a file extension"),
        ({"extension": "a/b"}, "caption extension 'a/b' is not a file extension"),
        ({"separator": ""}, "the caption separator is empty"),
        ({"separator": " "}, "separator ' ' cannot be told from the spaces inside tags; add underscores"),
        ({"separator": "\t"}, "separator '\\t' cannot be told"),
        ({"existing": "merge"}, "existing-file policy 'merge': expected one of skip, overwrite, append"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(CaptionError, match=re.escape(message)):
        opts(**kwargs)


def test_caption_error_is_an_i2v_error():
    assert issubclass(CaptionError, I2VError)


# --- where captions go --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "kwargs", "expected"),
    [
        ("a/b.png", {}, "a/b.txt"),
        ("b.PNG", {}, "b.txt"),
        ("a/b.c.jpg", {}, "a/b.c.txt"),
        ("a/noext", {}, "a/noext.txt"),
        ("/data/set/b.png", {"extension": "caption"}, "/data/set/b.caption"),
        ("/data/set/x/b.png", {"captions_dir": "/caps", "root": "/data/set"}, "/caps/x/b.txt"),
        ("/data/set/x/y/b.png", {"captions_dir": "caps", "root": "/data/set"}, "caps/x/y/b.txt"),
        ("/data/set/x/b.png", {"captions_dir": "/caps"}, "/caps/b.txt"),
        ("/data/set/x/../b.png", {"captions_dir": "/caps", "root": "/data/set"}, "/caps/b.txt"),
        ("画像/初音ミク.webp", {}, "画像/初音ミク.txt"),
    ],
)
def test_caption_path(image, kwargs, expected):
    assert caption_path(image, opts(**kwargs)) == Path(expected)


def test_caption_path_of_relative_image_under_absolute_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = opts(captions_dir=tmp_path / "caps", root=tmp_path / "set")
    assert caption_path("set/sub/a.png", options) == tmp_path / "caps" / "sub" / "a.txt"


def test_image_outside_root_is_an_error():
    with pytest.raises(CaptionError) as info:
        caption_path("/other/b.png", opts(captions_dir="/caps", root="/data/set"))
    assert str(info.value) == "/other/b.png is outside /data/set, the folder that the captions folder mirrors"
    with pytest.raises(CaptionError, match="outside"):
        caption_path("/data/settings/b.png", opts(captions_dir="/caps", root="/data/set"))


def test_caption_that_would_be_the_image_itself():
    with pytest.raises(CaptionError) as info:
        caption_path("a/notes.txt", opts())
    assert str(info.value) == "the caption of a/notes.txt would be the image itself"
    with pytest.raises(CaptionError, match="is not the path of an image file"):
        caption_path("a/..", opts())


def test_common_root(tmp_path, monkeypatch):
    assert common_root(["/d/a/x.png", "/d/a/b/y.png", "/d/a/b/c/z.png"]) == Path("/d/a")
    assert common_root(["/d/a/x.png"]) == Path("/d/a")
    assert common_root(["/d/a/x.png", "/e/y.png"]) == Path("/")
    monkeypatch.chdir(tmp_path)
    assert common_root(["s/a/x.png", "s/b/y.png"]) == tmp_path / "s"
    with pytest.raises(ValueError, match="at least one path"):
        common_root([])


def test_common_root_mirrors_sub_folders():
    images = ["/d/set/a/1.png", "/d/set/b/1.png"]
    options = opts(captions_dir="/caps", root=common_root(images))
    assert [caption_path(p, options) for p in images] == [Path("/caps/a/1.txt"), Path("/caps/b/1.txt")]
    assert find_collisions(images, options) == {}


# --- collisions ---------------------------------------------------------------------------------------------


def test_same_stem_collides():
    images = ["a/img.png", "a/other.png", "a/img.jpg", "b/img.gif"]
    assert find_collisions(images, opts()) == {Path("a/img.txt"): ["a/img.png", "a/img.jpg"]}


def test_flat_captions_dir_collides_across_folders():
    images = ["/d/a/1.png", "/d/b/1.png", "/d/b/2.png"]
    assert find_collisions(images, opts(captions_dir="/caps")) == {Path("/caps/1.txt"): ["/d/a/1.png", "/d/b/1.png"]}


def test_same_image_twice_is_not_a_collision():
    assert find_collisions(["a/x.png", "a/./x.png", "a/b/../x.png"], opts()) == {}


def test_caption_that_is_another_input():
    assert find_collisions(["x.png", "y.png", "x.cap"], opts(extension=".cap")) == {Path("x.cap"): ["x.png", "x.cap"]}
    assert find_collisions(["x.cap"], opts(extension=".cap")) == {Path("x.cap"): ["x.cap"]}


def test_check_collisions_message():
    check_collisions(["a.png", "b.png"], opts())
    images = [f"{i}.{ext}" for i in range(5) for ext in ("png", "jpg")]
    with pytest.raises(CaptionError) as info:
        check_collisions(images, opts())
    assert str(info.value) == (
        "5 caption file(s) would serve more than one image or replace an image: 0.txt <- 0.png, 0.jpg; "
        "1.txt <- 1.png, 1.jpg; 2.txt <- 2.png, 2.jpg and 2 more. "
        "Rename the images, or choose another caption extension or folder"
    )


# --- writing ------------------------------------------------------------------------------------------------


def test_write_new_caption(tmp_path):
    rec = record(str(tmp_path / "img.png"))
    assert write_caption(rec, opts()) == "written"
    assert (tmp_path / "img.txt").read_bytes() == b"1girl, hatsune miku, long hair, vocaloid, solo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.txt"]  # no temporary file left


def test_write_with_every_option(tmp_path):
    rec = record(str(tmp_path / "img.png"))
    options = opts(
        extension="caption", separator=",", underscores=True, exclude={"solo"}, character_first=True, rating=True
    )
    assert write_caption(rec, options) == "written"
    assert (tmp_path / "img.caption").read_text() == "hatsune_miku,vocaloid,1girl,long_hair,safe\n"


def test_no_tags_gives_an_empty_file(tmp_path):
    rec = {"path": str(tmp_path / "img.png"), "general": {}, "character": {}, "copyright": {}, "rating": {}}
    assert write_caption(rec, opts()) == "written"
    assert (tmp_path / "img.txt").read_bytes() == b""


def test_skip_never_touches_an_existing_file(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"my own caption")
    assert write_caption(record(str(tmp_path / "img.png")), opts()) == "skipped"
    assert (tmp_path / "img.txt").read_bytes() == b"my own caption"


def test_skip_leaves_a_dangling_link(tmp_path):
    (tmp_path / "img.txt").symlink_to(tmp_path / "nowhere")
    assert write_caption(record(str(tmp_path / "img.png")), opts()) == "skipped"
    assert os.readlink(tmp_path / "img.txt") == str(tmp_path / "nowhere")


def test_overwrite(tmp_path):
    (tmp_path / "img.txt").write_text("old, tags\n")
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="overwrite")) == "overwritten"
    assert (tmp_path / "img.txt").read_text() == "1girl, hatsune miku, long hair, vocaloid, solo\n"
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="overwrite")) == "unchanged"


def test_overwrite_replaces_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"\xff\xfe")
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="overwrite")) == "overwritten"
    assert (tmp_path / "img.txt").read_text().startswith("1girl")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    assert write_caption(record(str(tmp_path / "a.png")), opts()) == "written"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "b.txt").chmod(0o640)
    assert write_caption(record(str(tmp_path / "b.png")), opts(existing="overwrite")) == "overwritten"
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ("1girl, solo", "1girl, solo, hatsune miku, long hair, vocaloid\n"),
        ("1girl,solo\n", "1girl,solo, hatsune miku, long hair, vocaloid\n"),
        ("1girl , Solo ,  \n\n", "1girl , Solo, hatsune miku, long hair, vocaloid\n"),
        ("masterpiece, long_hair\nHatsune_Miku", "masterpiece, long_hair\nHatsune_Miku, 1girl, vocaloid, solo\n"),
        ("\ufeffsolo", "\ufeffsolo, 1girl, hatsune miku, long hair, vocaloid\n"),
        ("", "1girl, hatsune miku, long hair, vocaloid, solo\n"),
        (" \n", "1girl, hatsune miku, long hair, vocaloid, solo\n"),
    ],
)
def test_append_adds_missing_tags_keeping_the_file(tmp_path, existing, expected):
    (tmp_path / "img.txt").write_bytes(existing.encode())
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "appended"
    assert (tmp_path / "img.txt").read_bytes().decode() == expected


def test_append_with_nothing_new_is_unchanged(tmp_path):
    text = "solo, vocaloid, extra, long hair, hatsune miku, 1girl"
    (tmp_path / "img.txt").write_text(text)
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "unchanged"
    assert (tmp_path / "img.txt").read_text() == text


def test_append_with_other_separators(tmp_path):
    path = tmp_path / "img.png"
    (tmp_path / "img.txt").write_text("solo\n1girl\n")
    assert write_caption(record(str(path)), opts(existing="append", separator="\n")) == "appended"
    assert (tmp_path / "img.txt").read_text() == "solo\n1girl\nhatsune miku\nlong hair\nvocaloid\n"
    (tmp_path / "img.txt").write_text("solo long_hair")
    assert write_caption(record(str(path)), opts(existing="append", separator=" ", underscores=True)) == "appended"
    assert (tmp_path / "img.txt").read_text() == "solo long_hair 1girl hatsune_miku vocaloid\n"


def test_append_refuses_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"caf\xe9")
    with pytest.raises(CaptionError) as info:
        write_caption(record(str(tmp_path / "img.png")), opts(existing="append"))
    assert str(info.value) == f"{tmp_path}/img.txt: the caption file there is not UTF-8 text; not appending"
    assert (tmp_path / "img.txt").read_bytes() == b"caf\xe9"


def test_append_to_a_new_file_writes_it(tmp_path):
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "written"


def test_parse_caption():
    assert parse_caption("a, b,c ,, d\n e_f , \n") == ["a", "b", "c", "d", "e_f"]
    assert parse_caption("a b\nc d", "\n") == ["a b", "c d"]
    assert parse_caption("a  b\tc\n d", " ") == ["a", "b", "c", "d"]
    assert parse_caption("\ufeffa|b", " | ") == ["a", "b"]


def test_captions_dir_mirrors_folders_and_creates_them(tmp_path):
    images = [tmp_path / "set" / "a" / "1.png", tmp_path / "set" / "b" / "c" / "1.png"]
    options = opts(captions_dir=tmp_path / "caps", root=common_root(images))
    for image in images:
        assert write_caption(record(str(image)), options) == "written"
    assert (tmp_path / "caps" / "a" / "1.txt").read_text().startswith("1girl")
    assert (tmp_path / "caps" / "b" / "c" / "1.txt").read_text().startswith("1girl")
    assert not (tmp_path / "set").exists()  # nothing is written beside the images


def test_non_ascii_paths_and_tags(tmp_path):
    rec = record(str(tmp_path / "画像" / "初音ミク.png"), general={"猫耳": 0.9}, character={}, copyright={})
    (tmp_path / "画像").mkdir()
    assert write_caption(rec, opts()) == "written"
    assert (tmp_path / "画像" / "初音ミク.txt").read_bytes() == "猫耳\n".encode()


def test_path_that_is_not_utf8(tmp_path):
    image = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    try:
        Path(os.fsdecode(image)).write_bytes(b"")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    assert write_caption(record(os.fsdecode(image)), opts()) == "written"
    assert os.path.exists(os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt"))


def test_unwritable_caption_is_a_caption_error(tmp_path):
    (tmp_path / "caps").write_text("a file, not a folder")
    options = opts(captions_dir=tmp_path / "caps", root=tmp_path)
    with pytest.raises(CaptionError) as info:
        write_caption(record(str(tmp_path / "sub" / "img.png")), options)
    assert str(info.value) == f"cannot write caption {tmp_path}/caps/sub/img.txt: Not a directory"
    (tmp_path / "img.txt").mkdir()
    with pytest.raises(CaptionError) as info:
        write_caption(record(str(tmp_path / "img.png")), opts(existing="overwrite"))
    assert str(info.value) == f"cannot write caption {tmp_path}/img.txt: Is a directory"


def test_missing_image_folder_is_a_caption_error(tmp_path):
    with pytest.raises(CaptionError) as info:
        write_caption(record(str(tmp_path / "nope" / "img.png")), opts())
    assert str(info.value) == f"cannot write caption {tmp_path}/nope/img.txt: No such file or directory"


# --- append, generally --------------------------------------------------------------------------------------

TAG = st.text(string.ascii_letters + "é _-", min_size=1, max_size=12).filter(lambda t: tag_key(t) != "")


@settings(max_examples=150, deadline=None)
@given(
    existing=st.lists(TAG, max_size=8),
    trailing_separator=st.booleans(),
    newline=st.sampled_from(["", "\n", "\r\n", " \n\n"]),
    separator=st.sampled_from([", ", ",", " , ", "\n"]),
    general=st.dictionaries(TAG, st.floats(0, 1), max_size=8),
    underscores=st.booleans(),
)
def test_append_never_duplicates_and_is_idempotent(
    existing, trailing_separator, newline, separator, general, underscores
):
    existing = list({tag_key(t): t for t in existing}.values())  # a file without duplicates of its own
    rec_tags = {t: s for t, s in general.items() if t.strip() == t}
    with tempfile.TemporaryDirectory() as folder:
        rec = {"path": os.path.join(folder, "img.png"), "general": rec_tags}
        caption = Path(folder) / "img.txt"
        original = separator.join(existing) + (separator.rstrip() if trailing_separator else "") + newline
        caption.write_text(original, encoding="utf-8", newline="")
        options = opts(existing="append", separator=separator, underscores=underscores)

        first = write_caption(rec, options)
        after = caption.read_bytes().decode("utf-8")
        parsed = parse_caption(after, separator)
        keys = [tag_key(t) for t in parsed]
        assert len(keys) == len(set(keys))
        new = [t for t in caption_tags(rec, options) if tag_key(t) not in {tag_key(e) for e in existing}]
        assert parsed == [e.strip() for e in existing] + new
        if new:
            assert first == "appended" and after.startswith(original.rstrip().rstrip(",").rstrip())
        else:
            assert first == "unchanged" and after == original

        assert write_caption(rec, options) == "unchanged"
        assert caption.read_bytes().decode("utf-8") == after


# --- writing atomically -------------------------------------------------------------------------------------


def test_a_file_that_appears_meanwhile_is_kept(tmp_path):
    from i2v_cli.captions import _write_atomic

    (tmp_path / "img.txt").write_text("theirs")
    assert _write_atomic(tmp_path / "img.txt", b"ours", replace=False, mode=None) is False
    assert (tmp_path / "img.txt").read_text() == "theirs"
    assert _write_atomic(tmp_path / "img.txt", b"ours", replace=True, mode=None) is True
    assert (tmp_path / "img.txt").read_text() == "ours"
    assert [p.name for p in tmp_path.iterdir()] == ["img.txt"]


def test_without_hard_links(tmp_path, monkeypatch):
    from i2v_cli.captions import _write_atomic

    def no_link(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    assert write_caption(record(str(tmp_path / "img.png")), opts()) == "written"
    assert (tmp_path / "img.txt").read_text().startswith("1girl")
    assert _write_atomic(tmp_path / "img.txt", b"ours", replace=False, mode=None) is False
    assert (tmp_path / "img.txt").read_text().startswith("1girl")
    assert [p.name for p in tmp_path.iterdir()] == ["img.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_append_keeps_the_mode(tmp_path):
    (tmp_path / "img.txt").write_text("extra")
    (tmp_path / "img.txt").chmod(0o600)
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "appended"
    assert stat.S_IMODE((tmp_path / "img.txt").stat().st_mode) == 0o600
    assert (tmp_path / "img.txt").read_text() == "extra, 1girl, hatsune miku, long hair, vocaloid, solo\n"
