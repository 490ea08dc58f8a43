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
    CaptionRequest,
    already_captioned,
    caption_path,
    caption_request,
    caption_tags,
    caption_text,
    check_caption_tags,
    check_captions_dir,
    check_collisions,
    check_extension,
    common_root,
    exclude_tags,
    exclude_warnings,
    find_collisions,
    parse_caption,
    tag_key,
    unreadable_tags,
    write_caption,
)
from i2v_cli.errors import I2VError
from i2v_cli.tags import load_tag_list


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
        ({"extension": ".txt.png"}, "caption extension .txt.png ends in .png, an image extension; captions would"),
        ({"extension": "tags.WebP"}, "caption extension .tags.WebP ends in .webp, an image extension"),
        ({"extension": ".x.psd"}, "caption extension .x.psd ends in .psd, an image extension"),
        ({"extension": ".txt."}, "caption extension '.txt.' is not a file extension"),
        ({"extension": ".."}, "caption extension '..' is not a file extension"),
        ({"extension": ".t\0xt"}, "caption extension '.t\\x00xt' is not a file extension"),
        ({"extension": ".t\nxt"}, "caption extension '.t\\nxt' is not a file extension"),
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
    assert str(info.value) == f"cannot write {tmp_path}/caps/sub/img.txt: Not a directory"
    (tmp_path / "img.txt").mkdir()
    with pytest.raises(CaptionError) as info:
        write_caption(record(str(tmp_path / "img.png")), opts(existing="overwrite"))
    assert str(info.value) == f"cannot write {tmp_path}/img.txt: it is a folder"


def test_missing_image_folder_is_a_caption_error(tmp_path):
    with pytest.raises(CaptionError) as info:
        write_caption(record(str(tmp_path / "nope" / "img.png")), opts())
    assert str(info.value) == f"cannot write {tmp_path}/nope/img.txt: No such file or directory"


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
    existing = [e.replace(" ", "_") if underscores else e for e in existing]  # a file written in this style
    existing = list({tag_key(t): t for t in existing}.values())  # without duplicates of its own
    rec_tags = {t: s for t, s in general.items() if t.strip() == t}
    with tempfile.TemporaryDirectory() as folder:
        rec = {"path": os.path.join(folder, "img.png"), "general": rec_tags}
        caption = Path(folder) / "img.txt"
        options = opts(existing="append", separator=separator, underscores=underscores)
        original = separator.join(existing) + (separator.rstrip() if trailing_separator else "") + newline
        caption.write_text(original, encoding="utf-8", newline="")

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


def _appearing(monkeypatch, text):
    """Make a file appear at each caption's target just before the caption is put in place."""
    import i2v_cli.captions as captions

    class Racing(captions.AtomicFile):
        def commit(self, **kwargs):
            self.target.write_text(text)
            return super().commit(**kwargs)

    monkeypatch.setattr(captions, "AtomicFile", Racing)


def test_a_file_that_appears_meanwhile_is_kept(tmp_path, monkeypatch):
    _appearing(monkeypatch, "theirs")
    assert write_caption(record(str(tmp_path / "img.png")), opts()) == "skipped"
    assert (tmp_path / "img.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["img.txt"]


def test_without_hard_links(tmp_path, monkeypatch):
    def no_link(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    assert write_caption(record(str(tmp_path / "img.png")), opts()) == "written"
    assert (tmp_path / "img.txt").read_text().startswith("1girl")
    _appearing(monkeypatch, "theirs")
    assert write_caption(record(str(tmp_path / "new.png")), opts()) == "skipped"
    assert (tmp_path / "new.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.txt", "new.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_append_keeps_the_mode(tmp_path):
    (tmp_path / "img.txt").write_text("extra")
    (tmp_path / "img.txt").chmod(0o600)
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "appended"
    assert stat.S_IMODE((tmp_path / "img.txt").stat().st_mode) == 0o600
    assert (tmp_path / "img.txt").read_text() == "extra, 1girl, hatsune miku, long hair, vocaloid, solo\n"


# --- extensions (issue 14 point 3) ---------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".txt", "caption", ".tags.txt", ".png.txt", ".TXT", ".json"])
def test_plain_extensions_are_accepted(extension):
    assert check_extension(extension) == (extension if extension.startswith(".") else "." + extension)


def test_a_multi_dot_image_extension_never_replaces_an_image(tmp_path):
    (tmp_path / "img.txt.png").write_bytes(b"\x89PNG a real image")
    with pytest.raises(CaptionError, match=re.escape("ends in .png, an image extension")):
        write_caption(record(str(tmp_path / "img.png")), opts(extension=".txt.png", existing="overwrite"))
    assert (tmp_path / "img.txt.png").read_bytes() == b"\x89PNG a real image"


# --- separators that tags hold (issue 14 points 13 and 14) ---------------------------------------------------

RELEASE_TAGS = load_tag_list()


def test_release_tags_are_readable_with_the_default_separators():
    for options in (opts(), opts(separator=","), opts(separator="\n"), opts(separator=" ", underscores=True)):
        check_caption_tags(RELEASE_TAGS, options)


def test_underscore_separator_with_underscores_is_refused():
    with pytest.raises(CaptionError) as info:
        check_caption_tags(RELEASE_TAGS, opts(separator="_", underscores=True))
    assert str(info.value) == (
        "the caption separator '_' cannot be told apart from 1067 tag(s) as written: 'long_hair', 'short_hair', "
        "'multiple_girls' and 1064 more. Choose another separator, or --exclude those tags"
    )
    assert sum(" " in t for t in RELEASE_TAGS) == 1067


def test_a_separator_inside_a_release_tag_is_refused_unless_excluded():
    with pytest.raises(CaptionError) as info:
        check_caption_tags(RELEASE_TAGS, opts(separator=";"))
    assert str(info.value) == (
        "the caption separator ';' cannot be told apart from 1 tag(s) as written: 'steins;gate'. "
        "Choose another separator, or --exclude those tags"
    )
    check_caption_tags(RELEASE_TAGS, opts(separator=";", exclude={"Steins;Gate"}))


@pytest.mark.parametrize(
    ("tag", "options"),
    [
        ("a, b", opts()),
        ("a|b", opts(separator=" | ")),
        ("long hair", opts(separator="_", underscores=True)),
        ("a\u3000b", opts(separator=" ", underscores=True)),
    ],
)
def test_write_caption_refuses_a_tag_holding_the_separator(tmp_path, tag, options):
    rec = {"path": str(tmp_path / "img.png"), "general": {tag: 0.9, "solo": 0.5}}
    with pytest.raises(CaptionError, match="occurs in the tag"):
        write_caption(rec, options)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_tags_are_exactly_those_parse_caption_splits():
    options = opts(separator=", ")
    assert unreadable_tags(["a", "a,b", " a", "a b", "x\ny"], options) == ["a,b", " a", "x\ny"]


# --- appending to a file that uses another separator (issue 14 point 14) ------------------------------------


@pytest.mark.parametrize(
    ("existing", "kwargs", "seems"),
    [
        ("1girl;solo", {}, ";"),
        ("1girl|solo\n", {}, "|"),
        ("1girl long_hair", {"underscores": True}, " "),
        ("1girl, solo", {"separator": "\n"}, ","),
        ("1girl,solo", {"separator": " ", "underscores": True}, ","),
    ],
)
def test_append_refuses_a_file_with_another_separator(tmp_path, existing, kwargs, seems):
    (tmp_path / "img.txt").write_text(existing)
    rec = record(str(tmp_path / "img.png"), general={"1girl": 0.9, "solo": 0.8, "long hair": 0.7})
    options = opts(existing="append", **kwargs)
    with pytest.raises(CaptionError) as info:
        write_caption(rec, options)
    assert str(info.value) == (
        f"{tmp_path}/img.txt: the caption file there seems to use {seems!r} between tags, not "
        f"{options.separator!r}; appending would repeat its tags (give --caption-sep {seems!r}, or --overwrite)"
    )
    assert (tmp_path / "img.txt").read_text() == existing


@pytest.mark.parametrize(
    ("existing", "kwargs"),
    [
        ("blue sky", {"separator": "\n"}),  # one tag with a space, one a line
        ("blue sky", {}),
        ("1girl", {"separator": "|"}),
        ("a;b, c", {}),  # uses ", ": a tag may hold ';'
        ("solo\nlong hair\n", {"separator": "\n"}),
    ],
)
def test_append_to_a_file_with_the_same_separator_is_not_refused(tmp_path, existing, kwargs):
    (tmp_path / "img.txt").write_text(existing)
    rec = record(str(tmp_path / "img.png"), general={"1girl": 0.9, "solo": 0.8, "sky": 0.7, "b": 0.6})
    assert write_caption(rec, opts(existing="append", **kwargs)) in ("appended", "unchanged")


# --- symlinks and special files (issue 14 point 14) ---------------------------------------------------------


@pytest.mark.parametrize("existing", ["overwrite", "append"])
def test_a_caption_symlink_is_written_through(tmp_path, existing):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "kept.txt").write_text("extra\n")
    (tmp_path / "img.txt").symlink_to(tmp_path / "real" / "kept.txt")
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing=existing)) in ("overwritten", "appended")
    assert os.readlink(tmp_path / "img.txt") == str(tmp_path / "real" / "kept.txt")
    assert (tmp_path / "real" / "kept.txt").read_text().endswith("1girl, hatsune miku, long hair, vocaloid, solo\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.txt", "real"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["kept.txt"]


def test_a_dangling_caption_symlink_is_written_through(tmp_path):
    (tmp_path / "img.txt").symlink_to("elsewhere.txt")
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="overwrite")) == "written"
    assert os.readlink(tmp_path / "img.txt") == "elsewhere.txt"
    assert (tmp_path / "elsewhere.txt").read_text().startswith("1girl")


@pytest.mark.parametrize("existing", ["overwrite", "append"])
def test_a_caption_that_is_a_device_is_refused(tmp_path, existing):
    (tmp_path / "img.txt").symlink_to("/dev/null")
    with pytest.raises(CaptionError) as info:
        write_caption(record(str(tmp_path / "img.png")), opts(existing=existing))
    assert str(info.value) == f"cannot write {tmp_path}/img.txt: not a regular file (a device, pipe or socket)"
    assert os.readlink(tmp_path / "img.txt") == "/dev/null"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# --- the captions folder, checked first (issue 14 point 14) -------------------------------------------------


def test_check_captions_dir_creates_it_and_leaves_nothing(tmp_path):
    check_captions_dir(None)
    check_captions_dir(opts())
    check_captions_dir(opts(captions_dir=tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []


@pytest.mark.parametrize(
    ("where", "reason"),
    [("file", "it is a file, not a folder"), ("file/sub", "Not a directory")],
)
def test_check_captions_dir_refuses_an_unusable_folder(tmp_path, where, reason):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaptionError) as info:
        check_captions_dir(opts(captions_dir=tmp_path / where))
    assert str(info.value) == f"cannot use {tmp_path / where} as the captions folder: {reason}"


def test_check_captions_dir_finds_a_folder_without_write_permission(tmp_path, monkeypatch):
    """As root, permissions do not stop writes: the refusal of the file system is simulated."""
    real_open = os.open

    def refuse(path, flags, mode=0o777, *, dir_fd=None):
        if os.path.dirname(os.fspath(path)) == str(tmp_path / "caps") and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CaptionError, match=r"as the captions folder \(cannot write .*: Permission denied"):
        check_captions_dir(opts(captions_dir=tmp_path / "caps"))


# --- --skip-existing without running the network (issue 14 point 14) ---------------------------------------


def test_already_captioned(tmp_path):
    images = [str(tmp_path / f"{n}.png") for n in ("a", "b", "c", "d")]
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "d.txt").symlink_to("nowhere")
    assert already_captioned(images, opts()) == [images[1], images[3]]
    assert already_captioned(images, opts(existing="overwrite")) == []
    assert already_captioned(images, opts(existing="append")) == []


# --- captions and the output file (issue 14 point 5) --------------------------------------------------------


@pytest.mark.parametrize("exists", [False, True])
def test_a_caption_that_is_the_output_file_is_refused(tmp_path, exists):
    out = tmp_path / "img.txt"
    if exists:
        out.write_text("records")
    with pytest.raises(CaptionError) as info:
        check_collisions([str(tmp_path / "a.png"), str(tmp_path / "img.png")], opts(), outputs=[str(out)])
    assert str(info.value) == (
        f"the caption of {tmp_path}/img.png would be {tmp_path}/img.txt, which is the output file {out}: "
        "choose another caption extension or folder, or another output file"
    )
    check_collisions([str(tmp_path / "img.png")], opts(), outputs=[None, "-", str(tmp_path / "out.jsonl")])


def test_a_caption_that_is_the_output_through_links_is_refused(tmp_path, monkeypatch):
    (tmp_path / "records.jsonl").write_text("{}\n")
    os.link(tmp_path / "records.jsonl", tmp_path / "hard.txt")
    (tmp_path / "soft.txt").symlink_to("records.jsonl")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for image in ("hard.png", "soft.png"):
        with pytest.raises(CaptionError, match=re.escape("which is the output file ../records.jsonl")):
            check_collisions([str(tmp_path / image)], opts(), outputs=["../records.jsonl"])
    (tmp_path / "dangling.txt").symlink_to("new.jsonl")
    with pytest.raises(CaptionError, match="which is the output file"):
        check_collisions(["../dangling.png"], opts(), outputs=[tmp_path / "new.jsonl"])


# --- --exclude on records, and its warnings (issue 13 point 7) -----------------------------------------------


def test_exclude_tags_from_records():
    rec = record()
    out = exclude_tags(rec, {"Long_Hair", "hatsune miku", "safe"})
    assert out == {**rec, "general": {"1girl": 0.99, "solo": 0.8}, "character": {}}
    assert rec["general"] == {"1girl": 0.99, "long hair": 0.9, "solo": 0.8}  # the record itself is unchanged
    assert exclude_tags({"path": "x", "error": "bad"}, {"solo"}) == {"path": "x", "error": "bad"}
    assert exclude_tags(rec, set()) == rec


def test_exclude_warnings_name_the_closest_tags():
    warnings = exclude_warnings({"Long_Hair", "long hiar", "zzzzqqq", "solo"}, RELEASE_TAGS)
    assert warnings == [
        "--exclude 'long hiar' is not in the tag list; did you mean 'long hair', 'long image', 'orange hair'?",
        "--exclude 'zzzzqqq' is not in the tag list (nothing close)",
    ]


# --- the command line's caption options in one call (issue 13 point 7) ---------------------------------------

DEFAULTS = {
    "captions": False,
    "captions_dir": None,
    "caption_ext": ".txt",
    "caption_sep": ", ",
    "underscores": False,
    "exclude": (),
    "character_first": False,
    "rating_tag": False,
    "skip_existing": False,
    "overwrite": False,
    "append": False,
}


def request(inputs=("a.png",), folders=(), **params):
    return caption_request({**DEFAULTS, **params}, list(inputs), list(folders), tags=RELEASE_TAGS)


def test_no_captions_asked():
    assert request() == CaptionRequest(None, frozenset(), [])


def test_captions_asked():
    got = request(captions=True, caption_ext="cap", underscores=True, overwrite=True, exclude=("solo, long hair",))
    assert got.options == opts(extension=".cap", underscores=True, existing="overwrite", exclude={"solo", "long hair"})
    assert got.exclude == {"solo", "long hair"} and got.warnings == []
    assert request(captions=True, append=True).options.existing == "append"
    assert request(captions=True, skip_existing=True).options.existing == "skip"
    assert request(captions=True, existing="append").options.existing == "append"  # one shared Click value


def test_captions_dir_mirrors_the_one_folder_named(tmp_path):
    got = request([str(tmp_path / "d" / "x" / "a.png")], [str(tmp_path / "d")], captions_dir=str(tmp_path / "c"))
    assert got.options.captions_dir == tmp_path / "c" and got.options.root == tmp_path / "d"
    got = request([str(tmp_path / "d" / "x" / "a.png"), str(tmp_path / "d" / "y" / "b.png")], captions_dir="c")
    assert got.options.root == tmp_path / "d"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"overwrite": True, "append": True}, "--overwrite and --append contradict each other"),
        ({"skip_existing": True, "overwrite": True}, "--skip-existing and --overwrite contradict each other"),
        ({"skip_existing": True, "overwrite": True, "append": True}, "--skip-existing and --overwrite and --append"),
    ],
)
def test_contradicting_policies_are_refused(params, message):
    with pytest.raises(CaptionError, match=message):
        request(captions=True, **params)


@pytest.mark.parametrize(
    ("params", "shown"),
    [
        ({"underscores": True}, "--underscores only shape caption files: add --captions (or --captions-dir DIR), "
         "or leave it out"),
        ({"caption_ext": ".cap", "rating_tag": True}, "--caption-ext, --rating-tag only shape caption files"),
        ({"overwrite": True}, "--overwrite only shape"),
        ({"skip_existing": True}, "--skip-existing only shape"),
        ({"existing": "append"}, "--overwrite/--append only shape"),
        ({"character_first": True, "caption_sep": "|"}, "--caption-sep, --character-first only shape"),
    ],
)  # fmt: skip
def test_caption_only_options_without_captions_are_refused(params, shown):
    with pytest.raises(CaptionError, match=re.escape(shown)):
        request(**params)


def test_options_given_explicitly_count_even_with_default_values():
    params = {**DEFAULTS, "caption_ext": ".txt"}
    caption_request(params, ["a.png"], given={"exclude"})
    with pytest.raises(CaptionError, match="--caption-ext only shape caption files"):
        caption_request(params, ["a.png"], given={"caption_ext"})


def test_exclude_alone_filters_records_and_warns():
    got = request(exclude=("solo,long hiar", "Long_Hair"))
    assert got.options is None and got.exclude == {"solo", "long hiar", "Long_Hair"}
    assert got.warnings == [
        "--exclude 'long hiar' is not in the tag list; did you mean 'long hair', 'long image', 'orange hair'?"
    ]


def test_request_checks_the_separator_against_the_tag_list():
    with pytest.raises(CaptionError, match="the caption separator '_' cannot be told apart"):
        request(captions=True, caption_sep="_", underscores=True)
    with pytest.raises(CaptionError, match="'steins;gate'"):
        request(captions=True, caption_sep=";")
    assert request(captions=True, caption_sep=";", exclude=("steins;gate",)).options.separator == ";"


def test_request_checks_collisions_and_outputs(tmp_path):
    with pytest.raises(CaptionError, match="would serve more than one image"):
        request(["a.png", "a.jpg"], captions=True)
    with pytest.raises(CaptionError, match="which is the output file"):
        caption_request({**DEFAULTS, "captions": True}, ["a.png"], outputs=["a.txt"])
    with pytest.raises(CaptionError, match=r"caption extension \.txt\.png ends in \.png"):
        request(captions=True, caption_ext=".txt.png")


# --- links to images, foreign files (hostile review: captions point 1) --------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


def _images(tmp_path: Path, *names: str) -> list[str]:
    for name in names:
        (tmp_path / name).write_bytes(PNG)
    return [str(tmp_path / n) for n in names]


@pytest.mark.parametrize("link_to", ["a.png", "b.png"])
def test_a_caption_symlink_to_an_input_is_a_collision(tmp_path, link_to):
    images = _images(tmp_path, "a.png", "b.png")
    (tmp_path / "a.txt").symlink_to(link_to)
    collisions = find_collisions(images, opts())
    assert collisions == {tmp_path / "a.txt": sorted({images[0], str(tmp_path / link_to)})}
    with pytest.raises(CaptionError, match="would serve more than one image or replace an image"):
        check_collisions(images, opts(existing="overwrite"))


def test_a_caption_hard_link_to_an_input_is_a_collision(tmp_path):
    images = _images(tmp_path, "a.png", "b.png")
    os.link(tmp_path / "b.png", tmp_path / "a.txt")
    assert find_collisions(images, opts()) == {tmp_path / "a.txt": images}


def test_a_captions_dir_link_to_an_input_is_a_collision(tmp_path):
    (tmp_path / "rp").mkdir()
    images = _images(tmp_path / "rp", "a.png")
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "a.txt").symlink_to(tmp_path / "rp" / "a.png")
    options = opts(captions_dir=tmp_path / "caps", root=tmp_path / "rp", existing="overwrite")
    with pytest.raises(CaptionError, match="replace an image"):
        check_collisions(images, options)


def test_captions_in_a_linked_folder_collide_by_their_real_path(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").symlink_to("x")
    images = _images(tmp_path / "x", "a.png")
    (tmp_path / "x" / "a.jpg").write_bytes(PNG)
    # y/a.jpg and x/a.png: different images (one a jpg), captions y/a.txt and x/a.txt: one file.
    assert find_collisions([images[0], str(tmp_path / "y" / "a.jpg")], opts()) == {
        tmp_path / "x" / "a.txt": [images[0], str(tmp_path / "y" / "a.jpg")]
    }


def test_the_same_image_by_two_names_is_not_a_collision(tmp_path):
    images = _images(tmp_path, "a.png")
    (tmp_path / "l").symlink_to(".")
    assert find_collisions([images[0], str(tmp_path / "l" / "a.png")], opts()) == {}


def test_an_image_by_a_second_name_still_has_its_caption_checked(tmp_path):
    images = _images(tmp_path, "a.png", "b.jpg")
    (tmp_path / "b.png").symlink_to("a.png")
    paths = [images[0], str(tmp_path / "b.png"), images[1]]
    assert find_collisions(paths, opts()) == {tmp_path / "b.txt": paths[1:]}


@pytest.mark.parametrize("existing", ["overwrite", "append"])
def test_write_caption_never_replaces_the_image_through_a_link(tmp_path, existing):
    images = _images(tmp_path, "a.png")
    (tmp_path / "a.txt").symlink_to("a.png")
    with pytest.raises(CaptionError, match="would be the image itself"):
        write_caption(record(images[0]), opts(existing=existing))
    assert (tmp_path / "a.png").read_bytes() == PNG


@pytest.mark.parametrize("existing", ["overwrite", "append"])
@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (PNG, "PNG"),
        (b"SQLite format 3\x00" + bytes(100), "SQLite"),
        (b"\xff\xd8\xff\xe0" + bytes(60), "JPEG"),
        (b"\x00\x00\x01\x00\x01\x00\x10\x10" + bytes(40), "binary data"),
    ],  # an ICO: no name in the sniffer
    ids=["png", "sqlite", "jpeg", "ico"],
)
def test_a_caption_file_holding_an_image_or_database_is_never_replaced(tmp_path, existing, content, kind):
    (tmp_path / "other.bin").write_bytes(content)
    (tmp_path / "a.txt").symlink_to("other.bin")
    with pytest.raises(
        CaptionError, match=rf"a\.txt holds something else \({kind}.*\), not a caption: it is left as it is"
    ):
        write_caption(record(str(tmp_path / "a.png")), opts(existing=existing))
    assert (tmp_path / "other.bin").read_bytes() == content
    assert (tmp_path / "a.txt").is_symlink()


# --- two writers appending at once (hostile review: captions point 3) ---------------------------------------


def _changing(monkeypatch, times: int, text: str = "theirs") -> list[int]:
    """Make another writer replace each caption file (a new inode, as a rename does) just before the first
    ``times`` commits of this one; returns the count of commits tried."""
    import i2v_cli.captions as captions

    tried = [0]

    class Racing(captions.AtomicFile):
        def commit(self, **kwargs):
            tried[0] += 1
            if tried[0] <= times:
                other = self.target.with_name("other-writer")
                other.write_text(f"{text}{tried[0]}\n")
                os.replace(other, self.target)
            return super().commit(**kwargs)

    monkeypatch.setattr(captions, "AtomicFile", Racing)
    return tried


def test_append_merges_again_when_another_writer_got_there_first(tmp_path, monkeypatch):
    (tmp_path / "img.txt").write_text("mine\n")
    tried = _changing(monkeypatch, 2)
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "appended"
    assert tried[0] == 3
    assert (tmp_path / "img.txt").read_text() == "theirs2, 1girl, hatsune miku, long hair, vocaloid, solo\n"


def test_append_where_a_file_appears_meanwhile_merges_with_it(tmp_path, monkeypatch):
    _changing(monkeypatch, 1)
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "appended"
    assert (tmp_path / "img.txt").read_text() == "theirs1, 1girl, hatsune miku, long hair, vocaloid, solo\n"


def test_append_gives_up_on_a_file_that_keeps_changing(tmp_path, monkeypatch):
    import i2v_cli.captions as captions

    (tmp_path / "img.txt").write_text("mine\n")
    _changing(monkeypatch, 100)
    with pytest.raises(CaptionError, match=rf"kept changing .* \({captions.MERGE_TRIES} tries\); left as it is"):
        write_caption(record(str(tmp_path / "img.png")), opts(existing="append"))
    assert (tmp_path / "img.txt").read_text() == f"theirs{captions.MERGE_TRIES}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.txt"]


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_append_holds_the_lock_of_the_file_until_the_merge_is_in_place(tmp_path, monkeypatch):
    """Another i2v appending waits for the lock: a check of the file's identity just before the rename cannot
    close the window between the check and the rename on its own (one caption in 600 lost tags)."""
    import fcntl

    import i2v_cli.captions as captions

    (tmp_path / "img.txt").write_text("mine\n")
    held = []

    class Checking(captions.AtomicFile):
        def commit(self, **kwargs):
            with open(self.target, "rb") as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.append(True)
                else:
                    held.append(False)
            return super().commit(**kwargs)

    monkeypatch.setattr(captions, "AtomicFile", Checking)
    assert write_caption(record(str(tmp_path / "img.png")), opts(existing="append")) == "appended"
    assert held == [True]
    with open(tmp_path / "img.txt", "rb") as after:  # released once done
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- a full disk (hostile review: captions point 4) ----------------------------------------------------------


def test_a_full_disk_is_a_write_error_not_a_caption_error(tmp_path, monkeypatch):
    import errno

    from i2v_cli.errors import WriteError

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=r"img\.txt: No space left on device"):
        write_caption(record(str(tmp_path / "img.png")), opts())
    assert list(tmp_path.iterdir()) == []


def test_the_caption_sink_stops_at_a_write_error(tmp_path, monkeypatch):
    import errno

    from i2v_cli.errors import WriteError
    from i2v_cli.pipeline import CaptionSink

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    sink = CaptionSink(opts())
    with pytest.raises(WriteError):
        sink.write([record(str(tmp_path / "a.png")), record(str(tmp_path / "b.png"))])
    assert sink.errors == [] and list(tmp_path.iterdir()) == []


# --- separators (hostile review: captions point 5) -----------------------------------------------------------


@pytest.mark.parametrize("separator", ["\udcff", ", \udc80"])
def test_a_separator_that_is_not_utf8_is_refused(separator):
    with pytest.raises(CaptionError, match=r"the caption separator .* is not UTF-8 text"):
        opts(separator=separator)
