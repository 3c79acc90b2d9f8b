"""outputs.check_out_apart resolves each directory once: links must still be seen through."""

from __future__ import annotations

import os

import pytest

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.inputs import plan_inputs
from mnemo.data_pipeline.outputs import check_out_apart, resolve_out


def test_out_apart_sees_through_file_links_and_linked_directories(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    (corpus / "sub").mkdir(parents=True)
    out.mkdir()
    (corpus / "sub" / "a.txt").write_text("plain file\n")
    check_out_apart(resolve_out(str(out)), plan_inputs([str(corpus)]))  # apart: no error

    # A file in the input dir that is a link to a file inside --out.
    (out / "inside.txt").write_text("lives in out\n")
    os.symlink(out / "inside.txt", corpus / "sub" / "link.txt")
    with pytest.raises(DataError, match=r"contains the input .*link\.txt"):
        check_out_apart(resolve_out(str(out)), plan_inputs([str(corpus)]))
    os.remove(corpus / "sub" / "link.txt")

    # An input named through a linked directory that is --out itself.
    os.symlink(out, corpus / "via")
    with pytest.raises(DataError, match=r"contains the input .*via.inside\.txt"):
        check_out_apart(resolve_out(str(out)), plan_inputs([str(corpus / "via" / "inside.txt")]))
    # ... and --out named through a link, the input by its real path.
    with pytest.raises(DataError, match="contains the input"):
        check_out_apart(resolve_out(str(corpus / "via")), plan_inputs([str(out / "inside.txt")]))
