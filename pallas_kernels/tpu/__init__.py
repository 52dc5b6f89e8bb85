"""Mosaic TPU LoRA kernels: shrink and expand over work lists built from a row grouping (schedule.py)."""
