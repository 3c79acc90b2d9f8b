"""Where a dataset lives: a local directory, a ``file://`` URL, or a remote URL (``s3://``, ``gs://``, ...)."""

from __future__ import annotations


def is_remote(uri: str) -> bool:
    """True for a URL streaming downloads from; False for a plain path or a ``file://`` URL."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The local path of a plain path or a ``file://`` URL (a plain path comes back as it is)."""
    return uri.removeprefix("file://")
