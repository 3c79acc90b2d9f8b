"""streaming imported without transformers (data_pipeline/lean_imports.py): it writes and reads MDS as
before, transformers stays unimported until someone imports it (then the real one), and a streaming that
needs more of transformers than the stand-ins still imports."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str, **env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("\n")


def test_mds_round_trip_without_transformers(tmp_path):
    """(The real transformers importable after: test_launch_env.py, in the rank's import.)"""
    code = f"""
import sys
import numpy as np
from mnemo.data_pipeline.lean_imports import import_streaming
streaming = import_streaming()
print('transformers' in sys.modules, [m for m in sys.modules if m.startswith('transformers')])
docs = [np.arange(n, dtype=np.int32) for n in (3, 70, 5)]
with streaming.MDSWriter(out={str(tmp_path / "mds")!r}, columns={{'tokens': 'ndarray:int32'}}) as w:
    for d in docs:
        w.write({{'tokens': d}})
ds = streaming.StreamingDataset(local={str(tmp_path / "mds")!r}, shuffle=False, batch_size=1)
print(all(np.array_equal(ds[i]['tokens'], d) for i, d in enumerate(docs)), len(ds))
from streaming.base.dataloader import BatchFeature
try:
    BatchFeature()
except RuntimeError as e:
    print('stand-in:', e)
"""
    lines = _run(code)
    assert lines[0] == "False []"
    assert lines[1] == "True 3"
    assert lines[2].startswith("stand-in: BatchFeature: streaming was imported without transformers")


def test_a_streaming_that_needs_more_of_transformers_is_imported_the_ordinary_way(tmp_path):
    """A stand-in import that fails leaves no half-imported streaming module behind: the retry is real."""
    fake = tmp_path / "site" / "streaming"
    (fake / "base").mkdir(parents=True)
    (fake / "__init__.py").write_text("from streaming.base import dataloader\nKIND = 'fake'\n")
    (fake / "base" / "__init__.py").write_text("")
    (fake / "base" / "dataloader.py").write_text(
        "from transformers.feature_extraction_utils import BatchFeature\n"
        "from transformers.utils import logging  # beyond the stand-ins\n"
    )
    code = """
import sys
from mnemo.data_pipeline.lean_imports import import_streaming
s = import_streaming()
import streaming.base.dataloader as d
print(s.KIND, sys.modules['transformers'].__file__ is not None, d.BatchFeature.__module__)
"""
    lines = _run(code, PYTHONPATH=str(tmp_path / "site"))
    assert lines[0] == "fake True transformers.feature_extraction_utils"


def test_the_tracking_sender_imports_mlflow_without_pandas_and_without_a_needed_package_too():
    """The sender holds pandas off while importing mlflow; pandas imports normally afterwards. Holding off a
    package this mlflow cannot do without (fastapi, in 3.x) falls back to the ordinary import of everything."""
    code = """
import sys
from mnemo.train.tracking import sender
sender.HELD_OFF = tuple(sys.argv[1].split(','))
client = sender.import_mlflow_client()
print(client.__name__, [n for n in sender.HELD_OFF if n in sys.modules])
import pandas
print(pandas.__file__ is not None)
"""
    for held, imported in (("pandas", []), ("pandas,fastapi", ["pandas", "fastapi"])):
        out = subprocess.run(
            [sys.executable, "-c", code, held], env=dict(os.environ), capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split("\n")[:2] == [f"MlflowClient {imported}", "True"], (held, out.stdout)
