"""TFRecord framing: read and write length-prefixed, CRC32C-checked records.

A TFRecord file is a sequence of
    uint64 length | uint32 masked_crc32c(length) | bytes data[length] | uint32 masked_crc32c(data)
(little endian). Reading it here, rather than through tf.data, keeps TensorFlow out of the data
workers (importing it costs seconds per process) and lets every error name its record index.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c

from smart_r1.storage import open_stream, write_bytes

_MASK_DELTA = 0xA282EAD8


class RecordError(ValueError):
    """A record that cannot be read; names the file and the record index."""

    def __init__(self, path: str | Path, index: int, reason: str):
        super().__init__(f"{path}: record {index}: {reason}")
        self.path, self.index, self.reason = str(path), index, reason


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


_CHUNK = 1 << 24


def _read_up_to(f, n: int) -> bytes:
    """At most n bytes from f (fewer at the end of the file), allocating no more than it finds."""
    if n <= _CHUNK:
        return f.read(n)
    chunks = []
    while n > 0 and (chunk := f.read(min(n, _CHUNK))):
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_records(path: str | Path) -> Iterator[bytes]:
    """Yield the payload of every record; raise RecordError at the first damaged one.

    A damaged frame (bad CRC, truncation) ends the file: the framing after it cannot be trusted.
    Data is read in chunks of at most `_CHUNK` bytes, so a corrupt length field (one that passes
    its CRC by chance, or a crafted one) never makes the reader allocate more than the file holds.
    """
    with open_stream(path) as f:  # a local file or a URI (s3://, gs://)
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise RecordError(path, index, f"truncated header ({len(header)} of 12 bytes)")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if masked_crc(header[:8]) != length_crc:
                raise RecordError(path, index, "bad length CRC (corrupt or not a TFRecord file)")
            data = _read_up_to(f, length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise RecordError(path, index, f"truncated data ({len(data)} of {length} bytes)")
            if masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise RecordError(path, index, "bad data CRC")
            yield data
            index += 1


def write_records(path: str | Path, payloads: Iterable[bytes]) -> int:
    """Write payloads as a TFRecord file, atomically (the file is whole or absent); returns the
    number written."""
    frames = []
    for data in payloads:
        length = struct.pack("<Q", len(data))
        frames += [length, struct.pack("<I", masked_crc(length)), data, struct.pack("<I", masked_crc(data))]
    write_bytes(path, b"".join(frames))
    return len(frames) // 4
