"""Pruning: weight (unstructured and N:M) masks and updates; structured pruning lands here next (issue 5)."""
