"""One rule for the files an input path names (bnfold predict, with or without --ray): folders at
any depth, names starting with . or _ skipped, other suffixes ignored, one kind per run."""

from __future__ import annotations

import pytest

from bnfold import UsageError
from bnfold.inputs import ARRAYS, IMAGES, TABLES, file_kind, folder_files, local_inputs, one_kind


def touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_a_folder_is_its_files_at_any_depth_sorted_without_hidden_names(tmp_path):
    touch(tmp_path, "b.png", "a.JPG", "sub/c.png", "sub/deeper/d.webp", "notes.txt", "README")
    touch(tmp_path, ".e.png", "_f.png", "sub/.g.png", "sub/_h.png", ".cache/i.png", "_tmp/j.png", "sub/_k/l.png")
    expected = ["a.JPG", "b.png", "sub/c.png", "sub/deeper/d.webp"]
    assert folder_files(tmp_path) == [tmp_path / name for name in expected]


def test_a_folder_mixing_kinds_is_refused_naming_both(tmp_path):
    touch(tmp_path, "a.png", "deep/b.npy")
    with pytest.raises(UsageError, match=r"mixes arrays \(.*deep/b.npy\) and images \(.*a.png\): predict one kind"):
        folder_files(tmp_path)


def test_a_folder_without_inputs_is_refused(tmp_path):
    touch(tmp_path, "notes.txt", ".x.png", "_y/z.npy")
    with pytest.raises(UsageError, match="no input files in this folder"):
        folder_files(tmp_path)


def test_files_are_themselves_and_a_missing_path_is_refused(tmp_path):
    touch(tmp_path, "_x.npy", "d/a.npy")
    assert local_inputs([tmp_path / "_x.npy", tmp_path / "d"]) == [tmp_path / "_x.npy", tmp_path / "d" / "a.npy"]
    with pytest.raises(UsageError, match=r"nope\.npy does not exist"):
        local_inputs([tmp_path / "nope.npy"])


@pytest.mark.parametrize(
    ("name", "kind"),
    [("a.PNG", IMAGES), ("a.npz", ARRAYS), ("a.parquet", TABLES), ("s3://b/p.parquet/", TABLES), ("a.txt", None)],
)
def test_the_kind_is_the_suffix(name, kind):
    assert file_kind(name) == kind


def test_one_kind_counts_unknown_suffixes_as_images():
    assert one_kind(["s3://bucket/photos/", "a.png"], "`data`") == IMAGES
    with pytest.raises(UsageError, match=r"^`data` mixes arrays \(x.npy\) and images \(s3://b/\)"):
        one_kind(["x.npy", "s3://b/"], "`data`")
