"""What a data source is read as: only the documented file types of a folder, no file that is not
text, and a row or column that cannot be read named by file (and line)."""

from __future__ import annotations

import json

import pytest

from llm.config import PrepareConfig
from llm.data.prepare import load_meta, prepare
from llm.errors import ConfigError


def test_jsonl_rows_without_text_are_counted_and_a_broken_line_is_one_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"text": f"def f{i}(x): return x * {i}\n"} if i % 3 else {"other": "x"}) + "\n"
            for i in range(300)
        )
    )
    said = []
    prepare(PrepareConfig(text=str(rows), vocab_size=300, cache_dir=str(tmp_path / "c")), log=said.append)
    assert "warning: data.text=" + str(
        rows
    ) + ": 100 of 300 documents have no text in data.text_field=text" in "\n".join(said)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(rows.read_text() + "{not json\n")
    with pytest.raises(
        ConfigError,
        match=rf"^data.text: {broken}:301 is not JSON \(Expecting property name .* at column 2\); fix or remove that",
    ):
        prepare(PrepareConfig(text=str(broken), vocab_size=300, cache_dir=str(tmp_path / "c")))
    listed = tmp_path / "listed.jsonl"
    listed.write_text(rows.read_text() + "[1, 2]\n")
    with pytest.raises(ConfigError, match=rf"data.text: {listed}:301 is not a JSON object \(a list\)"):
        prepare(PrepareConfig(text=str(listed), vocab_size=300, cache_dir=str(tmp_path / "c")))
    other = tmp_path / "other.jsonl"
    other.write_text('{"name": "a", "body": "some text"}\n')
    with pytest.raises(
        ConfigError, match=rf"data.text: {other} has no column data.text_field=text \(columns: name, body\)"
    ):
        prepare(PrepareConfig(text=str(other), vocab_size=300, cache_dir=str(tmp_path / "c")))


def test_a_folders_other_files_are_not_read_as_data(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    (tmp_path / "corpus" / "metadata.json").write_text('{"name": "corpus", "version": 1, "license": "mit"}')
    (tmp_path / "corpus" / "notes.pdf").write_bytes(b"%PDF-1.4\n\0\0")
    said = []
    folder = prepare(
        PrepareConfig(text=str(tmp_path / "corpus"), vocab_size=300, cache_dir=str(tmp_path / "c")), log=said.append
    )
    assert load_meta(folder)["source"]["files"] == 1
    assert said[0] == (
        f"warning: data.text={tmp_path / 'corpus'}: 2 files that are not .txt, .jsonl or .parquet are left out "
        "(1 .json, 1 .pdf: metadata.json, notes.pdf)"
    )


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x7fELF\x02\x01\x01\0\0\0" + bytes(range(256)) * 4, "NUL bytes in its first 1,034 bytes: a binary file"),
        (b"%PDF-1.4\n" + bytes(range(128, 256)) * 40, "\\d+% of its first 5,129 bytes are not UTF-8"),
    ],
    ids=["a program", "a pdf without NUL bytes"],
)
def test_a_file_that_is_not_text_is_refused_naming_it(tmp_path, content, reason):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(b"plain words, and a stray byte: \xff\n" * 50)  # text all the same
    (tmp_path / "corpus" / "b.txt").write_bytes(content)
    with pytest.raises(
        ConfigError,
        match=rf"^data.text={tmp_path}/corpus: {tmp_path}/corpus/b.txt is not text \({reason}\); give text files",
    ):
        prepare(PrepareConfig(text=str(tmp_path / "corpus"), vocab_size=300, cache_dir=str(tmp_path / "c")))


def test_a_fifo_or_a_link_that_leads_nowhere_is_named_for_what_it_is(tmp_path):
    import os

    from llm.data.sources import resolve_source

    fifo, loop, dangling = tmp_path / "pipe", tmp_path / "loop", tmp_path / "dangling"
    os.mkfifo(fifo)
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    dangling.symlink_to(tmp_path / "gone.txt")
    with pytest.raises(ConfigError, match=rf"^data.text={fifo}: not a regular file \(a FIFO, a socket or a device\)"):
        resolve_source(str(fifo), None)
    for link in (loop, dangling):
        with pytest.raises(ConfigError, match=rf"^data.text={link}: a symbolic link that leads to no file"):
            resolve_source(str(link), None)
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve_source(str(tmp_path / "absent.txt"), None)
