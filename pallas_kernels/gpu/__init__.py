"""Multi-LoRA kernels for Hopper GPUs in Pallas Mosaic GPU (see docs/architecture/06-lora-kernels.md)."""

from pallas_kernels.gpu import kernel_lowering_cache, kernel_names


def install_kernel_caches() -> None:
    """Process-wide, idempotent: a Mosaic GPU kernel in several step programs is lowered once
    (kernel_lowering_cache.py) and compiled once (kernel_names.py)."""
    kernel_names.install()
    kernel_lowering_cache.install()


install_kernel_caches()  # the LoRA kernels; the expert GEMM and the push kernel call it too
