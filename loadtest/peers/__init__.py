"""Peer servers for the benchmark: the same model, preprocessing and API shape as convserve,
each written and tuned the way its own documentation shows."""
