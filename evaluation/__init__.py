"""Evaluation of a trained model: scoring, reports, held-out documents and generation.

Layer: it may import ``data_pipeline`` and ``model`` only; ``train`` (the
in-run evaluation), ``launch`` and the CLI import it. Its user errors are
``errors.EvalError``, printed by the CLI as one line.
"""
