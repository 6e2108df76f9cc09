"""The reward side of the objective (MATH §3): rewards → advantages. Its one op is ``advantages``; the estimators
without a kernel are PyTorch in ``estimators``."""
