"""Host-side bookkeeping of the paged KV cache: which pages are free. The pages themselves live on the device
(models/step.py `allocate_kv_cache`); page 0 is never handed out, so padding entries of block tables can point
at it harmlessly (attention masks whatever it holds)."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16  # tokens per page
    num_pages: int = 1024  # pages per layer slot, including the reserved page 0

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)


class PageAllocator:
    def __init__(self, config: CacheConfig):
        if config.num_pages < 2 or config.page_size < 1:
            raise ValueError(f"cache needs page_size >= 1 and num_pages >= 2, got {config}")
        self.config = config
        self._free = collections.deque(range(1, config.num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.config.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"{n} KV pages requested, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
