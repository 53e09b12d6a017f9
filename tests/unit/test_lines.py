"""dialects.lines.Lines: the same lines however the bytes are split, LF or CRLF, the unfinished
last line kept for the next chunk."""

from __future__ import annotations

import pytest

from ccproxy.dialects.lines import Lines

STREAMS = [
    (b"data: a\n\ndata: b\n\n", [b"data: a", b"", b"data: b", b""], b""),
    (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"data: a", b"", b"data: b", b""], b""),
    (b'{"x":1}\n{"x":2}\n{"x":3}', [b'{"x":1}', b'{"x":2}'], b'{"x":3}'),
    (b"no newline at all", [], b"no newline at all"),
    (b"\n\n\n", [b"", b"", b""], b""),
    ("data: é\r\n".encode(), ["data: é".encode()], b""),
]


@pytest.mark.parametrize("data,lines,rest", STREAMS)
def test_lines_whole_and_split_at_every_byte(data: bytes, lines: list[bytes], rest: bytes) -> None:
    whole = Lines()
    assert whole.feed(data) == lines and whole.rest == rest
    for cut in range(len(data) + 1):  # two chunks, cut anywhere (inside a CRLF too)
        two = Lines()
        assert two.feed(data[:cut]) + two.feed(data[cut:]) == lines and two.rest == rest, cut
    bytewise = Lines()
    assert [line for i in range(len(data)) for line in bytewise.feed(data[i:i + 1])] == lines
    assert bytewise.rest == rest
