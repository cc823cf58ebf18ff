import pytest

from vembed.data.records import (
    ImageRecord,
    PairRecord,
    label_codes,
    read_records,
    record_to_json,
    records_from_folder,
)
from vembed.errors import VembedError


@pytest.fixture
def images(tmp_path):
    for name in ("a.png", "b.png", "sub/c.png"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not decoded here")
    return tmp_path


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_image_records_resolve_relative_to_the_file(images):
    f = write(
        images / "r.jsonl",
        ['{"image": "a.png", "label": 1, "category": "x"}', "", '{"image": "sub/c.png", "label": "y"}'],
    )
    rs = read_records(f)
    assert [r.image for r in rs.records] == [images / "a.png", images / "sub/c.png"]
    assert rs.records[0] == ImageRecord(images / "a.png", 1, "x", f"{f}:1")
    assert rs.records[1].source == f"{f}:3"  # blank lines keep the numbering honest


def test_image_root_overrides_the_folder(images, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    f = write(other / "r.jsonl", ['{"image": "a.png"}'])
    assert read_records(f, image_root=images).records[0].image == images / "a.png"


def test_pair_records_and_their_images(images):
    f = write(
        images / "p.jsonl",
        [
            '{"query_image": "a.png", "positive": "b.png", "label": 7}',
            '{"query_image": "b.png", "positive": "sub/c.png"}',
        ],
    )
    rs = read_records(f)
    assert rs.is_pairs and isinstance(rs.records[0], PairRecord)
    imgs = rs.images()
    assert [r.label for r in imgs] == [7, 7, "pair-1", "pair-1"]


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"image": "a.png", "label": 1', "malformed JSON"),
        ('["a.png"]', "expected a JSON object"),
        ('{"label": 1}', "missing field 'image'"),
        ('{"query_image": "a.png", "label": 1}', "missing field 'positive'"),
        ('{"image": "missing.png"}', "image not found: .*missing.png"),
        ('{"image": "a.png", "label": [1]}', "'label' must be an integer or a string"),
    ],
)
def test_bad_lines_name_file_and_line(images, line, message):
    f = write(images / "bad.jsonl", ['{"image": "a.png", "label": 0}', line])
    with pytest.raises(VembedError, match=rf"bad\.jsonl:2: {message}"):
        read_records(f)


def test_skip_bad_counts_problems(images):
    f = write(
        images / "mixed.jsonl", ['{"image": "a.png"}', "{oops", '{"image": "gone.png"}', '{"image": "b.png"}']
    )
    rs = read_records(f, skip_bad=True)
    assert len(rs) == 2 and len(rs.problems) == 2
    assert "mixed.jsonl:2" in rs.problems[0] and "mixed.jsonl:3" in rs.problems[1]


def test_mixing_pairs_and_images_is_an_error(images):
    f = write(images / "m.jsonl", ['{"image": "a.png"}', '{"query_image": "a.png", "positive": "b.png"}'])
    with pytest.raises(VembedError, match="m.jsonl:2: mixes pair and image records"):
        read_records(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(VembedError, match="records file not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(VembedError, match="no records"):
        read_records(tmp_path / "empty.jsonl")


def test_require_label(images):
    f = write(images / "nolabel.jsonl", ['{"image": "a.png"}'])
    with pytest.raises(VembedError, match="nolabel.jsonl:1: missing field 'label'"):
        read_records(f, require_label=True)


def test_folder_labels_codes_and_json(images):
    rs = records_from_folder(images)
    assert [r.label for r in rs.records] == [None, None, "sub"]
    codes, names = label_codes(["b", "a", "b", 3])
    assert codes == [0, 1, 0, 2] and names == ["b", "a", 3]
    rec = ImageRecord(images / "sub/c.png", "sub", "cat")
    assert record_to_json(rec, relative_to=images) == {
        "image": "sub/c.png",
        "label": "sub",
        "category": "cat",
    }
    pair = PairRecord(images / "a.png", images / "b.png", 1)
    assert record_to_json(pair, relative_to=images) == {
        "query_image": "a.png",
        "positive": "b.png",
        "label": 1,
    }
    outside = ImageRecord(images.parent / "elsewhere.png")  # not under the base: absolute, not relative
    assert record_to_json(outside, relative_to=images) == {
        "image": str((images.parent / "elsewhere.png").resolve())
    }
