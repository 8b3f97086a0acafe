"""Paged KV-cache bookkeeping: which blocks each sequence owns, and which prompt blocks are cached.
Pure Python, no torch.

Engines own the cache tensors ([num_blocks, block_size, kv_heads, head_dim] per layer); this
class owns the block tables. A sequence's token at position p lives in block
table[p // block_size] at offset p % block_size, i.e. flat slot block * block_size + offset.

Prefix caching (vLLM's automatic prefix caching, at block granularity): a full block of prompt
tokens, once computed, is kept under a key that hashes every token up to its end, images by
their content hash. A later prompt that starts the same way (the same image and system prompt,
an earlier turn of the same chat) takes those blocks instead of computing them. A finished
sequence leaves its answer's full blocks cached too (the engine's release with its ids), so a
chat's next turn, which repeats the earlier exchange, starts past the last answer. Blocks are
shared read-only: a sequence only ever writes past its cached prefix, into blocks of its own. A
cached block no sequence holds stays until its room is needed (least recently used first), so
it counts as free.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class CacheFullError(RuntimeError):
    """Not enough free KV blocks for the tokens asked for."""


def image_key(pixels: np.ndarray) -> str:
    """The content hash an image is known by: in the image-embedding cache and in prefix keys."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).hexdigest()


def prefix_block_keys(token_ids: list[int], image_keys: list[str], image_token: int, image_len: int,
                      block_size: int) -> list[bytes]:
    """The key of each full block of a prompt: a hash chained over the blocks, of each block's ids
    and the content keys of the images whose tokens it holds (the ids fix which rows of them), so
    two prompts share a block's key only if they agree on every token up to its end."""
    ids = np.asarray(token_ids, dtype=np.int64)
    image_rows = np.cumsum(ids == image_token)  # image tokens up to and including each position
    keys, key = [], b""
    for end in range(block_size, len(ids) + 1, block_size):
        first, last = image_rows[end - block_size] - (ids[end - block_size] == image_token), image_rows[end - 1]
        images = image_keys[first // image_len : -(-last // image_len)] if last > first else []
        h = hashlib.blake2b(key, digest_size=16)
        h.update(ids[end - block_size : end].tobytes())
        h.update("/".join(images).encode())
        key = h.digest()
        keys.append(key)
    return keys


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks  # sequences holding each block
        self._cached: dict[bytes, int] = {}  # prefix key -> block holding those tokens
        self._key_of: dict[int, bytes] = {}  # the reverse, for cached blocks
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first
        self._keys: dict[int, list[bytes]] = {}  # seq -> prefix keys of its prompt's full blocks
        self._committed: dict[int, int] = {}  # seq -> how many of those are in the cache
        self.stats = {"prefix_hit_tokens": 0}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def started(self, seq_id: int) -> bool:
        return seq_id in self.tables or seq_id in self._keys

    def length(self, seq_id: int) -> int:
        return self.lengths.get(seq_id, 0)

    def blocks_needed(self, seq_id: int, n_new: int) -> int:
        have = len(self.tables.get(seq_id, ()))
        total = self.length(seq_id) + n_new
        return max(0, -(-total // self.block_size) - have)

    def can_append(self, requests: dict[int, int]) -> bool:
        """requests: seq_id -> number of new tokens."""
        return sum(self.blocks_needed(s, n) for s, n in requests.items()) <= self.num_free_blocks

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # the least recently used cached block no sequence holds
            block, _ = self._idle.popitem(last=False)
            del self._cached[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def _drop(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._key_of:
                self._idle[block] = None  # the most recently used end
            else:
                self._free.append(block)

    def append(self, seq_id: int, n_new: int) -> list[int]:
        """Reserve room for n_new tokens of seq_id; returns their flat cache slots."""
        need = self.blocks_needed(seq_id, n_new)
        if need > self.num_free_blocks:
            raise CacheFullError(
                f"KV cache full: sequence {seq_id} needs {need} more blocks, {self.num_free_blocks} free "
                f"of {self.num_blocks}; raise the KV-cache size or run fewer requests at once"
            )
        table = self.tables.setdefault(seq_id, [])
        table.extend(self._take() for _ in range(need))
        start = self.length(seq_id)
        self.lengths[seq_id] = start + n_new
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + n_new)]

    def cached_prefix(self, keys: list[bytes]) -> int:
        """How many of these leading block keys are cached (without taking them)."""
        n = 0
        while n < len(keys) and keys[n] in self._cached:
            n += 1
        return n

    def uncached(self, keys: list[bytes], n_tokens: int) -> list[bytes]:
        """The keys of the whole blocks of an n_tokens prompt that attach_prefix would not find
        cached (blocks past the last token's are left out: that token is always computed)."""
        cap = min(len(keys), (n_tokens - 1) // self.block_size)
        return keys[min(self.cached_prefix(keys), cap) : cap]

    def attach_prefix(self, seq_id: int, keys: list[bytes], max_tokens: int) -> int:
        """Start a new sequence on the cached blocks of its prompt's leading keys, at most
        max_tokens tokens of them; returns the tokens it now has. Its own blocks are cached as
        they fill (commit). Without prefix caching nothing is shared and this returns 0."""
        if self.started(seq_id):
            raise ValueError(f"sequence {seq_id} has already started")
        if not self.prefix_caching:
            return 0
        n = min(self.cached_prefix(keys), max_tokens // self.block_size)
        table = self.tables[seq_id] = []
        for key in keys[:n]:
            block = self._cached[key]
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            table.append(block)
        self.lengths[seq_id] = n * self.block_size
        self._keys[seq_id], self._committed[seq_id] = keys, n
        self.stats["prefix_hit_tokens"] += n * self.block_size
        return n * self.block_size

    def commit(self, seq_id: int) -> None:
        """Cache the sequence's keyed blocks that are full and computed by now (after a forward)."""
        keys = self._keys.get(seq_id)
        if keys is None:
            return
        table, done = self.tables[seq_id], min(len(keys), self.length(seq_id) // self.block_size)
        for j in range(self._committed[seq_id], done):
            # Two sequences may have computed the same block side by side: the first one is kept.
            if keys[j] not in self._cached and table[j] not in self._key_of:
                self._cached[keys[j]], self._key_of[table[j]] = table[j], keys[j]
        self._committed[seq_id] = max(self._committed[seq_id], done)

    def cache_blocks(self, seq_id: int, keys: list[bytes]) -> None:
        """Cache the sequence's full computed blocks under these keys (its whole ids so far: a
        finished answer's blocks too, for a chat's next turn, which repeats it)."""
        if not self.prefix_caching or seq_id not in self.tables:
            return
        self._keys[seq_id] = keys
        self._committed.setdefault(seq_id, 0)
        self.commit(seq_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no sequence holds (benchmarks: a cold start)."""
        for block in self._idle:
            del self._cached[self._key_of.pop(block)]
            self._free.append(block)
        self._idle.clear()

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget tokens past `length` (a failed step's reservation), freeing whole blocks."""
        if length == 0:
            return self.release(seq_id)
        table = self.tables[seq_id]
        keep = -(-length // self.block_size)
        for block in reversed(table[keep:]):
            self._drop(block)
        del table[keep:]
        self.lengths[seq_id] = length
        if seq_id in self._committed:
            self._committed[seq_id] = min(self._committed[seq_id], length // self.block_size)

    def release(self, seq_id: int) -> None:
        for block in reversed(self.tables.pop(seq_id, [])):
            self._drop(block)
        self.lengths.pop(seq_id, None)
        self._keys.pop(seq_id, None)
        self._committed.pop(seq_id, None)
