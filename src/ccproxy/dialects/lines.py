"""Line framing for the backends' streams: bytes split anywhere in, whole lines out.

SSE (https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream) and
Ollama's NDJSON are both lines. One `split` per chunk: slicing the rest of the buffer off after
each line copied it once per line, which on a chunk of many events cost more than parsing them
(bench/README.md, "Where the time goes"). The pieces of an unfinished line are kept in a list and
joined once its newline comes: appending each chunk to a bytes buffer copied the buffer every time,
quadratic in the line's length. `held` is how many bytes wait for a newline, so the reader can
refuse a backend whose line never ends (the parsers' `held`, providers/_http.py `read_stream`).
"""

from __future__ import annotations


class Lines:
    """The lines of a byte stream, chunk by chunk; `rest` is the unfinished last line."""

    __slots__ = ("_held", "held")

    def __init__(self) -> None:
        self._held: list[bytes] = []  # the pieces of the unfinished last line (none holds a newline)
        self.held = 0  # their bytes

    @property
    def rest(self) -> bytes:
        return b"".join(self._held)

    def clear(self) -> None:
        """Forget the unfinished line."""
        self._held.clear()
        self.held = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes, without their "\\n" or "\\r\\n"."""
        held = self._held
        if b"\n" not in chunk:
            if chunk:
                held.append(chunk)
                self.held += len(chunk)
            return []
        if held:
            held.append(chunk)
            buf = b"".join(held)
            held.clear()
        else:
            buf = chunk
        lines = buf.split(b"\n")
        rest = lines.pop()
        if rest:
            held.append(rest)
        self.held = len(rest)
        if b"\r" in buf:
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        return lines
