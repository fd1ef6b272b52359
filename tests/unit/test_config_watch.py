"""The config file watcher reads an edit only once it is whole."""

import os

from meshproxy.config_watch import FileWatcher


def watcher(path, applied):
    def load(p):
        with open(p, encoding="utf-8") as f:
            return f.read()
    return FileWatcher(str(path), load, applied.append, (ValueError,), interval=1.0)


def edit_in_place(path, text: str, mtime_ns: int) -> None:
    with open(path, "w", encoding="utf-8") as f:  # truncate, then write: same inode
        f.write(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))  # a new stamp even within one clock tick


def test_an_edit_in_place_is_read_once_it_has_settled_and_an_empty_file_never(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    applied: list[str] = []
    w = watcher(path, applied)
    edit_in_place(path, "", 10**18)  # the moment between a truncate and a write
    assert not w.check()  # seen once: it may still be being written
    edit_in_place(path, "a: 1\nb: ", 10**18 + 1)  # half written
    assert not w.check() and applied == []
    edit_in_place(path, "a: 1\nb: 2\n", 10**18 + 2)
    assert not w.check()
    assert w.check() and applied == ["a: 1\nb: 2\n"]  # unchanged over a poll: whole
    edit_in_place(path, "", 10**18 + 3)
    assert not w.check() and not w.check()  # an empty file settled is refused
    assert applied == ["a: 1\nb: 2\n"] and w.last_error == "the file is empty"


def test_a_file_renamed_over_the_old_one_is_read_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    applied: list[str] = []
    w = watcher(path, applied)
    new = tmp_path / "c.yaml.new"
    new.write_text("a: 2\n")
    os.replace(new, path)  # mv, or a ConfigMap's symlink swap: complete when it appears
    assert w.check() and applied == ["a: 2\n"] and w.last_error == ""
