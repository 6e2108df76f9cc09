"""The benchmark suite behind ``python -m fastgrpo bench``: one module per op (token_logprobs, grpo_loss,
linear_grpo_loss, advantages), each giving the cases to time and the work they must do (bytes or FLOPs);
:mod:`.harness` times them against a roofline measured in the same run and writes the results."""
