"""The prompts the layer-steering peers' tests use."""

TEXTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
"""Token ids of three prompts of different lengths (left-padded into one batch)."""
