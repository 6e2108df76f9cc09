import os

import torch

# Without a GPU the Triton kernels run under the interpreter; the flag is read when kernels are defined,
# so it must be set before anything imports triton (fastgrpo itself imports no triton at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
