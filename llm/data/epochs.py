"""Which block of the corpus a training sample reads: every block once per epoch, in an order of
its own each epoch, worked out from (seed, sample number) alone.

An epoch is the corpus cut into `n` non-overlapping blocks, shifted by an offset drawn for that
epoch, so that block edges move from one epoch to the next. Sample i is block permute(i mod n) of
epoch i div n, where `permute` is a Feistel network keyed by (seed, epoch) over the smallest
power-of-four range that holds n, walked along its cycle until it lands below n (a bijection of
0..n-1, as the network is one of its range). Nothing is stored: a corpus of 10^10 blocks costs what
one of 10 does, and a resumed run, or one on another number of processes, reads exactly the blocks
the uninterrupted run would have."""

from __future__ import annotations

MASK64 = (1 << 64) - 1
ROUNDS = 4  # a Feistel network of 4 rounds with pseudo-random round functions is a pseudo-random permutation


def splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash of x (Steele et al., SplitMix64)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def permute(k: int, n: int, key: int) -> int:
    """Position k of a permutation of 0..n-1 chosen by `key`."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # the two halves of a range of 4^half >= n values
    mask = (1 << half) - 1
    x = k
    while True:  # cycle-walking: the cycle through k returns to k < n, so this ends (after < 4 steps on average)
        left, right = x >> half, x & mask
        for r in range(ROUNDS):
            left, right = right, left ^ (splitmix64(key ^ (r << 60) ^ right) & mask)
        x = (left << half) | right
        if x < n:
            return x


class Epochs:
    """The blocks of `n_tokens` tokens that training samples read, block_size + 1 tokens each
    (inputs and their next-token targets, so a block's last token is the next one's first)."""

    def __init__(self, n_tokens: int, block_size: int, seed: int):
        if n_tokens < block_size + 1:
            raise ValueError(f"{n_tokens} tokens are fewer than block_size + 1 = {block_size + 1}")
        self.n_tokens, self.block_size, self.seed = n_tokens, block_size, seed
        self.blocks = max(1, (n_tokens - block_size) // block_size)  # per epoch, whatever its offset
        self.offsets = min(block_size, n_tokens - self.blocks * block_size)  # starts 0 .. offsets-1 all fit

    def offset(self, epoch: int) -> int:
        return splitmix64(splitmix64(self.seed) ^ epoch) % self.offsets

    def start(self, i: int) -> int:
        """Where sample number i of the run starts."""
        epoch, k = divmod(i, self.blocks)
        key = splitmix64((self.seed << 32) ^ epoch)
        return self.offset(epoch) + permute(k, self.blocks, key) * self.block_size
