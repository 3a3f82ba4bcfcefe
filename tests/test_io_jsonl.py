"""The one JSON Lines reader for user files: objects with their line numbers, one-line errors."""

import pytest

from moescope.errors import MoescopeError
from moescope.io.jsonl import iter_jsonl_objects


def test_objects_come_with_their_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert list(iter_jsonl_objects(path)) == [(1, {"text": "a"}), (3, {"text": "b"})]


@pytest.mark.parametrize("content, message", [
    (b'{"text": "a"}\n{"text": \n', r"t.jsonl:2: invalid JSON"),
    (b'{"text": "a"}\n[1, 2]\n', r"t.jsonl:2: expected a JSON object, got list"),
    (b'{"text": "\xff"}\n', r"t.jsonl:1: not UTF-8 text"),
])
def test_bad_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_bytes(content)
    with pytest.raises(MoescopeError, match=message):
        list(iter_jsonl_objects(path))
