"""The reward side of the objective (MATH §3): rewards → advantages. Its one op is ``advantages``."""
