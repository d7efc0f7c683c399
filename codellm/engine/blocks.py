"""The KV block pool: which cache blocks each sequence holds, and which full blocks are kept for reuse.

Keys and values live in fixed-size blocks of one pool, so memory follows each sequence's real length
rather than a whole context per sequence. A full block is keyed by (its parent block's key, its token
ids, the adapter): a prompt that starts like an earlier one (the same system prompt and tools, the same
file prefix, the conversation so far with its answers) finds those blocks and prefills only the rest.
Blocks that nobody holds stay cached and are handed out again least recently freed first.

No tensors here: the scheduler decides with this, and the cache's tensors follow the block ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class Chain:
    """One sequence's blocks, in position order, and how many of the leading ones are keyed."""

    salt: str | None  # the adapter: the same tokens under another adapter have other keys and values
    blocks: list[int] = field(default_factory=list)
    keyed: int = 0
    parent: int | None = None  # the key of block ``keyed - 1``


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the pool needs at least one block of at least one token")
        self.num_blocks, self.size, self.caching = num_blocks, block_size, caching
        self.refs = [0] * num_blocks
        self.keys: list[tuple | None] = [None] * num_blocks  # a cached block's (parent, tokens, salt)
        self.by_key: dict[tuple, int] = {}
        # blocks whose keys a mirroring cache (a draft model's, on the same block ids) holds too: a shared block
        # written while its sequence did not draft is computed by the draft before it drafts over it
        self.mirrored = [False] * num_blocks
        # blocks no sequence holds, the next to hand out first: unkeyed ones at the front, then cached ones from
        # the least recently freed
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    # -- reading ---------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.size)

    def _key(self, parent: int | None, tokens, salt) -> tuple:
        return (parent, tuple(tokens), salt)

    def mirrored_prefix(self, chain: Chain) -> int:
        """Positions from the start of ``chain`` whose blocks the mirroring cache holds."""
        n = 0
        while n < len(chain.blocks) and self.mirrored[chain.blocks[n]]:
            n += 1
        return n * self.size

    def match(self, tokens: list[int], salt: str | None) -> list[int]:
        """The cached blocks that hold the longest full-block prefix of ``tokens``, leaving at least the last
        token to compute (its logits are what the prompt is for)."""
        if not self.caching:
            return []
        found, parent = [], None
        for start in range(0, len(tokens) - 1 - self.size + 1, self.size):
            block = self.by_key.get(self._key(parent, tokens[start:start + self.size], salt))
            if block is None:
                break
            found.append(block)
            parent = hash(self.keys[block])
        return found

    # -- changing --------------------------------------------------------------------------
    def acquire(self, tokens: list[int], salt: str | None, reuse: bool = True) -> tuple[Chain, int] | None:
        """Blocks for all of ``tokens``: the cached prefix shared (unless not ``reuse``), the rest new. (chain,
        tokens already cached), or None (and nothing taken) when the pool cannot hold them now."""
        shared = self.match(tokens, salt) if reuse else []
        new = self.blocks_for(len(tokens)) - len(shared)
        reclaimable = len(self.free) - sum(1 for b in shared if self.refs[b] == 0)
        if new > reclaimable:
            return None
        chain = Chain(salt)
        for b in shared:
            self._hold(b)
        chain.blocks = shared + [self._take() for _ in range(new)]
        chain.keyed = len(shared)
        chain.parent = hash(self.keys[shared[-1]]) if shared else None
        return chain, len(shared) * self.size

    def extend(self, chain: Chain, tokens: int) -> bool:
        """Make ``chain`` cover ``tokens`` positions; False (nothing taken) when the pool is out of blocks."""
        if tokens <= len(chain.blocks) * self.size:  # (most decode steps: the last block has room)
            return True
        need = self.blocks_for(tokens) - len(chain.blocks)
        if need > len(self.free):
            return False
        chain.blocks += [self._take() for _ in range(need)]
        return True

    def commit(self, chain: Chain, tokens: list[int], written: int) -> None:
        """Key the chain's full blocks whose keys and values are written (the first ``written`` positions of
        ``tokens``), so that later prompts can share them. A block whose key another block already has stays
        private (two sequences computed the same prefix at once)."""
        if not self.caching:
            return
        while (chain.keyed + 1) * self.size <= written and chain.keyed < len(chain.blocks):
            start = chain.keyed * self.size
            key = self._key(chain.parent, tokens[start:start + self.size], chain.salt)
            block = chain.blocks[chain.keyed]
            if key not in self.by_key and self.keys[block] is None:
                self.keys[block] = key
                self.by_key[key] = block
            chain.parent = hash(key)
            chain.keyed += 1

    def mirror(self, chain: Chain, written: int) -> None:
        """The mirroring cache holds the first ``written`` positions of ``chain``: its full blocks among them are
        marked."""
        for block in chain.blocks[:written // self.size]:
            self.mirrored[block] = True

    def release(self, chain: Chain) -> None:
        """Let go of every block of ``chain``: a keyed block stays cached until the pool needs it."""
        for block in reversed(chain.blocks):  # a chain's tail goes first when blocks are needed
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.keys[block] is None:
                    self.free.move_to_end(block, last=False)
        chain.blocks, chain.keyed, chain.parent = [], 0, None

    def reset(self) -> None:
        """Forget every cached block (none may be held)."""
        assert not any(self.refs), "blocks are still held"
        self.keys = [None] * self.num_blocks
        self.by_key.clear()
        self.mirrored = [False] * self.num_blocks

    def _hold(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        key = self.keys[block]
        self.mirrored[block] = False
        if key is not None:  # evicted: its contents are about to be overwritten
            self.keys[block] = None
            if self.by_key.get(key) == block:
                del self.by_key[key]
        self.refs[block] = 1
        return block
