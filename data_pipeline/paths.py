"""Where a dataset lives: a local directory, a ``file://`` URL, or a remote URL (``s3://``, ``gs://``, ...)."""

from __future__ import annotations

import os


def is_remote(uri: str) -> bool:
    """True for a URL streaming downloads from; False for a plain path or a ``file://`` URL."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The local path of a plain path or a ``file://`` URL (a plain path comes back as it is)."""
    return uri.removeprefix("file://")


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """``path`` is ``root`` or lies under it (symbolic links resolved)."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root
