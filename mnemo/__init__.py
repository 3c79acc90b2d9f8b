"""mnemo: distributed pretraining of transformer language models with memory.

The top-level folders ``train/``, ``model/``, ``launch/``, ``evaluation/`` and
``data_pipeline/`` install as ``mnemo.train``, ``mnemo.model``, ``mnemo.launch``,
``mnemo.evaluation`` and ``mnemo.data_pipeline`` (pyproject.toml maps them), so
nothing of mnemo is importable under a bare name that a user's own files could shadow.
"""

from pathlib import Path as _Path

# Run from a source checkout without installing (benchmarks, `python -m mnemo`
# in the repository): the subpackages are the checkout's top-level folders.
_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "train").is_dir() and (_root / "train" / "trainer.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (the package's own __path__)
