"""folders.py: the folders a call makes, and takes back while they are empty."""
from normlab import folders


def test_make_returns_the_folders_it_created_innermost_first(tmp_path):
    assert folders.make(tmp_path / "a" / "b" / "c") == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"]
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert folders.make(tmp_path / "a" / "b" / "c") == []  # all there: nothing created


def test_remove_empty_takes_back_only_empty_folders_and_stops_at_the_first_that_is_not(tmp_path):
    made = folders.make(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "keep.txt").write_text("")
    folders.remove_empty(made)
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "keep.txt").is_file()
    folders.remove_empty([tmp_path / "missing", tmp_path / "a"])  # a folder that is gone stops it: a is kept
    assert (tmp_path / "a").is_dir()
