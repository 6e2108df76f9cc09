"""The trajectory side of the objective (MATH §1–§2, §4): log-probs, importance ratios, clipping, KL, aggregation.
Its ops are ``token_logprobs``, ``grpo_loss`` (with ``policy_loss`` on given log-probs) and ``linear_grpo_loss``;
``objective`` is their shared O(N) layer."""
