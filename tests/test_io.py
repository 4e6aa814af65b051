"""Reading inputs and writing outputs (``bgekit.io``): pipes read once, undecodable bytes and broken
gzip named, blank lines, byte-order marks, output modes and paths checked before any work."""

from __future__ import annotations

import gzip
import os
import stat
import threading

import pytest

from bgekit import io
from bgekit.errors import DataFormatError, InputError
from bgekit.eval.datasets import read_qrels_tsv


def test_a_pipe_is_read_once_whole(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    lines = "".join(f"line {i}\n" for i in range(1, 5001))

    def feed() -> None:
        with fifo.open("w") as handle:
            handle.write(lines)

    writer = threading.Thread(target=feed)
    writer.start()
    records = io.read_texts(fifo)
    writer.join(timeout=30)
    assert [r.id for r in records] == [str(i) for i in range(1, 5001)]
    assert records[-1].text == "line 5000"


def test_blank_lines_are_skipped_and_ids_stay_line_numbers(tmp_path):
    source = tmp_path / "gap.txt"
    source.write_text("hello\n\n   \nworld\r\n")
    assert [(r.id, r.text) for r in io.read_texts(source)] == [("1", "hello"), ("4", "world")]


def test_a_byte_order_mark_is_dropped(tmp_path):
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b'\xef\xbb\xbf{"_id": "a", "text": "with a BOM"}\n')
    assert [(r.id, r.text) for r in io.read_texts(source)] == [("a", "with a BOM")]


def test_undecodable_bytes_and_broken_gzip_are_named(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl, line 2: not UTF-8 text \(byte 0xe9"):
        io.read_texts(latin1)
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"text": "not gzipped"}\n')
    with pytest.raises(InputError, match="is not a readable gzip file"):
        io.read_texts(fake)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-8])  # no trailer
    with pytest.raises(InputError, match="is not a readable gzip file"):
        list(io.read_jsonl(truncated))


def test_outputs_get_the_umask_mode_or_keep_their_own(tmp_path):
    old = os.umask(0o022)
    try:
        io._umask.cache_clear()
        fresh = tmp_path / "fresh.jsonl"
        io.write_jsonl(fresh, [{"a": 1}])
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.jsonl"
        kept.write_text("old\n")
        kept.chmod(0o640)
        io.write_jsonl(kept, [{"a": 2}])
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == '{"a": 2}\n'
    finally:
        os.umask(old)
        io._umask.cache_clear()


def test_gzipped_jsonl_output_round_trips(tmp_path):
    target = tmp_path / "rows.jsonl.gz"
    io.write_jsonl(target, [{"id": "x", "text": "y"}])
    assert [obj for _, obj in io.read_jsonl(target)] == [{"id": "x", "text": "y"}]


def test_output_paths_are_checked_before_work(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a\n")
    with pytest.raises(InputError, match="is a folder"):
        io.check_outputs(tmp_path)
    with pytest.raises(InputError, match=r"in\.txt is a file, not a folder"):
        io.check_outputs(source / "out.npy")
    with pytest.raises(InputError, match="is also an input"):
        io.check_outputs(None, source, inputs=[source])
    io.check_outputs(tmp_path / "new" / "deeper" / "out.npy", inputs=[source])  # folders are made on write


def test_qrels_header_is_recognised_but_a_bad_first_grade_is_an_error(tmp_path):
    headed = tmp_path / "headed.tsv"
    headed.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert read_qrels_tsv(headed) == {"q1": {"d1": 1}}
    bad = tmp_path / "bad.tsv"
    bad.write_text("q1\td1\tx\nq1\td2\t1\n")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 1"):
        read_qrels_tsv(bad)


def test_examples_files_as_a_json_array_or_jsonl_also_gzipped(tmp_path):
    array = tmp_path / "ex.json.gz"
    array.write_bytes(gzip.compress(b'[{"query": "q", "response": "r"}]\n'))
    lines = tmp_path / "ex.jsonl"
    lines.write_text('{"query": "q", "response": "r"}\n\n')
    assert io.read_examples(array) == io.read_examples(lines) == [{"query": "q", "response": "r"}]


def test_ray_shards_name_bad_lines_as_read_texts_does(tmp_path):
    pytest.importorskip("pyarrow")
    from bgekit.distributed.plan import plan, read_shard

    source = tmp_path / "corpus.jsonl"
    source.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n{"text": broken}\n')
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl, line 3: not UTF-8 text"):
        plan(str(source), 1)  # planning reads every line as the plain reader does: before any model loads
    source.write_bytes(b'{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken}\n')
    shards = plan(str(source), 1)
    assert read_shard(str(source), shards.format, shards.shards[0]) == (["1"], ["ok"])
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl, line 4: not valid JSON"):
        read_shard(str(source), shards.format, shards.shards[2])


def test_a_text_field_for_plain_text_is_an_error(tmp_path):
    """``--text-field`` on a plain-text file was silently unused (every line embedded whole); it is an
    error naming the file, while JSONL still reads the field and leaving it out still reads 'text'."""
    plain = tmp_path / "lines.txt"
    plain.write_text("first line\nsecond line\n")
    with pytest.raises(InputError, match=r"text field 'body' \(--text-field\) .*lines\.txt is plain text"):
        io.read_texts(plain, field="body")
    assert [r.text for r in io.read_texts(plain)] == ["first line", "second line"]
    records = tmp_path / "records.jsonl"
    records.write_text('{"_id": "a", "body": "from body", "text": "from text"}\n')
    assert [r.text for r in io.read_texts(records, field="body")] == ["from body"]
    assert [r.text for r in io.read_texts(records)] == ["from text"]


def test_encode_dataset_refuses_a_text_field_for_plain_text(tmp_path):
    """The same for ``bgekit embed --ray`` (and ``encode_dataset``), before any model loads."""
    pytest.importorskip("pyarrow")
    from bgekit.distributed import encode_dataset

    plain = tmp_path / "lines.txt"
    plain.write_text("first line\nsecond line\n")
    with pytest.raises(InputError, match=r"text field 'body' \(--text-field\)"):
        encode_dataset("no/such-model", plain, tmp_path / "out", use_ray=False, text_field="body")
