"""Suite-wide settings."""

import os

# The machine (and CI) has 2 cores shared by in-process tests and the
# multi-process jobs some tests start: one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
