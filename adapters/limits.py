"""Caps on what is read from a tenant's files, checked before anything is parsed.

The same caps apply wherever those files are read: uploads, the store's fetch, folders registered
from a path, conversion, composition and validation. Each is far above what a real adapter
needs, and far below what would hurt the server: CPython's tarfile reads a whole extended header
into memory when it meets one.
"""

from __future__ import annotations

MAX_ARCHIVE_MEMBERS = 64  # tar headers of every kind: files, folders and extended headers
MAX_EXTENDED_HEADER_BYTES = 64 * 1024  # one PAX or GNU long-name header
ARCHIVE_OVERHEAD_BYTES = 1024 * 1024  # what a tar adds to its files' bytes: headers, padding, end blocks
