"""Multi-LoRA kernels for Hopper GPUs in Pallas Mosaic GPU (see docs/architecture/06-lora-kernels.md)."""

from pallas_kernels.gpu import kernel_names

kernel_names.install()  # identical kernels in different step programs share one compile (kernel_names.py)
