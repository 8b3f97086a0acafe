"""Paged KV-cache bookkeeping: which blocks each sequence owns. Pure Python, no torch.

Engines own the cache tensors ([num_blocks, block_size, kv_heads, head_dim] per layer); this
class owns the block tables. A sequence's token at position p lives in block
table[p // block_size] at offset p % block_size, i.e. flat slot block * block_size + offset.
"""

from __future__ import annotations


class CacheFullError(RuntimeError):
    """Not enough free KV blocks for the tokens asked for."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def length(self, seq_id: int) -> int:
        return self.lengths.get(seq_id, 0)

    def blocks_needed(self, seq_id: int, n_new: int) -> int:
        have = len(self.tables.get(seq_id, ()))
        total = self.length(seq_id) + n_new
        return max(0, -(-total // self.block_size) - have)

    def can_append(self, requests: dict[int, int]) -> bool:
        """requests: seq_id -> number of new tokens."""
        return sum(self.blocks_needed(s, n) for s, n in requests.items()) <= len(self._free)

    def append(self, seq_id: int, n_new: int) -> list[int]:
        """Reserve room for n_new tokens of seq_id; returns their flat cache slots."""
        need = self.blocks_needed(seq_id, n_new)
        if need > len(self._free):
            raise CacheFullError(
                f"KV cache full: sequence {seq_id} needs {need} more blocks, {len(self._free)} free "
                f"of {self.num_blocks}; raise the KV-cache size or run fewer requests at once"
            )
        table = self.tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(need))
        start = self.length(seq_id)
        self.lengths[seq_id] = start + n_new
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + n_new)]

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget tokens past `length` (a failed step's reservation), freeing whole blocks."""
        if length == 0:
            return self.release(seq_id)
        table = self.tables[seq_id]
        keep = -(-length // self.block_size)
        self._free.extend(reversed(table[keep:]))
        del table[keep:]
        self.lengths[seq_id] = length

    def release(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)
