"""Part files and their commit, on a real file system: a small body lives in a file
without a name (O_TMPFILE) until its commit links it into place, and the rules of
the named part files hold for it (no clobbering, nothing partial at a final name)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from downloader import storage
from downloader.errors import UnsafeNameError
from downloader.storage import NameTakenError, PartFile, Store, UnnamedPart

TEMPLATE = "{url_hash:.3}/{url_hash}"
BODY = b"\xff\xd8\xff" + bytes(range(256)) * 80


def _store(root: Path, probe: bool = False) -> Store:
    root.mkdir(exist_ok=True)
    return Store(root, TEMPLATE, probe=probe, parts=root / ".imgdl" / "parts")


def _parts(store: Store) -> list[str]:
    return os.listdir(store._parts)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".imgdl" not in p.parts
    }


@pytest.fixture(params=["linkat", "proc"])
def unnamed(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test of unnamed parts runs with both ways of naming them: libc's linkat
    with AT_EMPTY_PATH, and the link through /proc/self/fd where that is not allowed."""
    if not storage.unnamed_parts_work(tmp_path):
        pytest.skip("this file system makes no O_TMPFILE files")  # not Linux tmpfs/ext4/xfs
    if request.param == "proc":
        monkeypatch.setattr(storage, "_linkat", False)
    elif not storage._linkat:
        pytest.skip("linkat(AT_EMPTY_PATH) is not allowed here (Linux < 6.10, not root)")


def test_unnamed_parts_are_linked_through_proc_where_linkat_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing_linkat(*args: object) -> int:
        return -1  # as libc's linkat does without CAP_DAC_READ_SEARCH on older kernels

    class Libc:
        linkat = staticmethod(refusing_linkat)

    monkeypatch.setattr(storage.ctypes, "CDLL", lambda *args, **kwargs: Libc())
    monkeypatch.setattr(storage, "_linkat", None)
    monkeypatch.setattr(storage, "_unnamed_ok", {})
    assert storage.unnamed_parts_work(tmp_path) is True
    assert storage._linkat is False  # decided: through /proc from now on
    store = _store(tmp_path / "out")
    part = store.write_part("abc/one", BODY)
    assert isinstance(part, UnnamedPart)
    assert asyncio.run(part.commit(".jpg")) == "abc/one.jpg"
    assert _files(tmp_path / "out") == {"abc/one.jpg": BODY} and _parts(store) == []


@pytest.mark.usefixtures("unnamed")
async def test_a_small_body_has_no_name_until_its_commit(tmp_path: Path) -> None:
    store = _store(tmp_path / "out")
    part = store.write_part("abc/one", BODY)
    assert isinstance(part, UnnamedPart)
    assert _parts(store) == [] and _files(tmp_path / "out") == {}
    assert part.path.read_bytes() == BODY  # what validate.decode reads
    await part.close()  # nothing buffered: the body stays until the commit
    assert await part.commit(".jpg") == "abc/one.jpg"
    assert _files(tmp_path / "out") == {"abc/one.jpg": BODY}
    assert _parts(store) == []


@pytest.mark.usefixtures("unnamed")
async def test_an_unnamed_part_never_replaces_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = _store(out, probe=True)
    (out / "abc").mkdir()
    (out / "abc/taken.jpg").write_bytes(b"first")
    (out / "abc/sibling.png").write_bytes(b"other type")
    for stem in ("abc/taken", "abc/sibling"):
        part = store.write_part(stem, BODY)
        with pytest.raises(NameTakenError, match=stem):
            await part.commit(".jpg")
    assert _files(out) == {"abc/taken.jpg": b"first", "abc/sibling.png": b"other type"}
    assert _parts(store) == []


@pytest.mark.usefixtures("unnamed")
async def test_an_unnamed_part_replaces_only_when_revalidating(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = _store(out)
    (out / "abc").mkdir()
    (out / "abc/old.jpg").write_bytes(b"old version")
    part = store.write_part("abc/old", BODY)
    assert await part.commit(".jpg", replace=True) == "abc/old.jpg"
    assert _files(out) == {"abc/old.jpg": BODY}
    assert _parts(store) == []


@pytest.mark.usefixtures("unnamed")
async def test_an_aborted_unnamed_part_leaves_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path / "out")
    before = len(os.listdir("/proc/self/fd"))
    for n in range(20):
        part = store.write_part(f"abc/{n}", BODY)
        await part.abort()
    assert len(os.listdir("/proc/self/fd")) == before  # no descriptor kept open
    assert _files(tmp_path / "out") == {} and _parts(store) == []


async def test_named_part_files_where_unnamed_ones_cannot_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(parts: Path) -> int:
        raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")

    monkeypatch.setattr(storage, "_open_unnamed", refuse)
    monkeypatch.setattr(storage, "_unnamed_ok", {})
    store = _store(tmp_path / "out")
    part = store.write_part("abc/one", BODY)
    assert isinstance(part, PartFile)
    assert [name.endswith(".part") for name in _parts(store)] == [True]
    assert await part.commit(".jpg") == "abc/one.jpg"
    assert _files(tmp_path / "out") == {"abc/one.jpg": BODY} and _parts(store) == []


async def test_the_folder_of_a_name_is_made_or_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checked: set[str] = set()
    store = Store(out, TEMPLATE, parts=out / "p", checked_dirs=checked)
    await store.write_part("new/deeper/one", BODY).abort()  # a missing parent is made too
    assert (out / "new/deeper").is_dir()
    (out / "file").write_bytes(b"x")
    with pytest.raises(FileExistsError):  # a file where the folder would be: write_error
        store.write_part("file/one", BODY)
    (out / "planted").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeNameError, match="outside the output folder"):
        store.write_part("planted/one", BODY)
    # the next shard's store of this process trusts the folders already checked
    later = Store(out, TEMPLATE, parts=out / "p", checked_dirs=checked)
    assert str(out / "new/deeper") in checked and str(out / "planted") not in checked
    with pytest.raises(UnsafeNameError):
        later.write_part("planted/two", BODY)
    assert list(elsewhere.iterdir()) == []
