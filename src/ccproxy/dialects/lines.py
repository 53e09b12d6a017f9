"""Line framing for the backends' streams: bytes split anywhere in, whole lines out.

SSE (https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream) and
Ollama's NDJSON are both lines. One `split` per chunk: slicing the rest of the buffer off after
each line copied it once per line, which on a chunk of many events cost more than parsing them
(bench/README.md, "Where the time goes").
"""

from __future__ import annotations


class Lines:
    """The lines of a byte stream, chunk by chunk; `rest` is the unfinished last line."""

    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes, without their "\\n" or "\\r\\n"."""
        buf = self.rest + chunk if self.rest else chunk
        if b"\n" not in chunk:  # (`rest` never holds one)
            self.rest = buf
            return []
        lines = buf.split(b"\n")
        self.rest = lines.pop()
        if b"\r" in buf:
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        return lines
