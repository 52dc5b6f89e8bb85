"""Multi-LoRA kernels for Hopper GPUs in Pallas Mosaic GPU (see docs/architecture/06-lora-kernels.md)."""
