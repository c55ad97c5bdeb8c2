"""Replica checksums, computed identically by server and clients.

A row's checksum covers its identity and version (not its bytes, which differ by role), so a
replica that holds exactly the right rows at the right versions sums to the server's figure.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

MOD = 2**32


def row_checksum(entity: str, row_id: str, version: int) -> int:
    """CRC-32 of ``"{entity}:{row_id}:{version}"`` (UTF-8), as an unsigned 32-bit integer."""
    return zlib.crc32(f"{entity}:{row_id}:{version}".encode()) & 0xFFFFFFFF


def sum_checksums(values: Iterable[int]) -> int:
    total = 0
    for value in values:
        total = (total + value) % MOD
    return total
