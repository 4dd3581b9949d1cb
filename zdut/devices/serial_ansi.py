"""Terminal escape sequences in serial output: strip them all, keep only the ones that draw, or keep all.

Handles CSI, two-byte ESC sequences and the DCS/OSC/SOS/PM/APC strings (ended by ST; OSC also by BEL).
A sequence split across reads is carried over to the next one, up to MAX_REMAINDER bytes.
"""

from __future__ import annotations

STRIP_ALL, KEEP_DISPLAY, KEEP_ALL = range(3)
#: Cap on a partial escape sequence carried from one read to the next.
MAX_REMAINDER = 16 * 1024

_ESC, _ST, _BEL = 0x1B, 0x9C, 0x07
_STRING_INTRODUCERS = b"P]X^_"  # DCS, OSC, SOS, PM, APC


def _string_end(data: bytes, start: int) -> int:
    osc = data[start + 1] == ord("]")
    pos = start + 2
    while pos < len(data):
        byte = data[pos]
        if byte == _ST or (osc and byte == _BEL):
            return pos
        if byte == _ESC:
            if pos + 1 >= len(data):
                return -1
            if data[pos + 1] == ord("\\"):
                return pos + 1
        pos += 1
    return -1


def _csi_end(data: bytes, start: int) -> int:
    pos = start + 2
    while pos < len(data) and 0x30 <= data[pos] <= 0x3F:
        pos += 1
    while pos < len(data) and 0x20 <= data[pos] <= 0x2F:
        pos += 1
    if pos >= len(data):
        return -1
    if not 0x40 <= data[pos] <= 0x7E:
        # A CSI cut short (e.g. by a new ESC): drop what we have, rescan the interrupting byte.
        return pos - 1
    return pos


def _seq_end(data: bytes, start: int) -> int:
    """Index of the last byte of the escape sequence at ``start``, -1 if it is incomplete."""
    if start + 1 >= len(data):
        return -1
    second = data[start + 1]
    if second in _STRING_INTRODUCERS:
        return _string_end(data, start)
    if second == ord("["):
        return _csi_end(data, start)
    pos = start + 1
    while pos < len(data) and 0x20 <= data[pos] <= 0x2F:
        pos += 1
    return pos if pos < len(data) else -1


def _is_display(seq: bytes) -> bool:
    """Sequences that only draw the screen (kept in console mode); not titles, clipboard or window ops."""
    if seq[1] in _STRING_INTRODUCERS:
        return False
    if seq[1] == ord("["):
        return len(seq) > 2 and 0x40 <= seq[-1] <= 0x7E and seq[-1] != ord("t")
    return True


class EscapeFilter:
    """Removes terminal escape sequences from a byte stream, reassembling ones split across reads."""

    def __init__(self, policy: int) -> None:
        self.policy = policy
        self.remainder = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.policy == KEEP_ALL:
            return chunk
        data, self.remainder = self.remainder + chunk, b""
        if _ESC not in data:
            return data
        out = bytearray()
        pos = 0
        while pos < len(data):
            esc = data.find(_ESC, pos)
            if esc < 0:
                out += data[pos:]
                break
            out += data[pos:esc]
            end = _seq_end(data, esc)
            if end < 0:
                self.remainder = data[esc:]
                break
            if self.policy == KEEP_DISPLAY and _is_display(data[esc : end + 1]):
                out += data[esc : end + 1]
            pos = end + 1
        if len(self.remainder) > MAX_REMAINDER:
            self.remainder = b""  # junk, not a sequence: keep memory bounded
        return bytes(out)
