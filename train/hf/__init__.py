"""Hugging Face transformers interop: what ``mnemo export --format hf`` writes.

Two kinds of module live here. ``configuration_mnemo.py`` and
``modeling_mnemo.py`` are copied into every hf export folder, beside
every module of model/ (memory.py, sizes.py, transformer.py, ...), with each
``from mnemo.model.X import`` rewritten to ``from .X import``: transformers
loads them as remote code (``trust_remote_code=True``), so they import only
torch, transformers and each other. ``folder.py`` and ``tokenizer.py`` run
inside mnemo at export time and are not copied. Importing this package
imports nothing heavy.
"""
