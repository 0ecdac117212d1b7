"""Helpers every layer of the kernel package shares (and the model built on it), defined once."""

# The FP8 scale block of DeepSeek-V3's recipe and fp8_gemm's format: activations per 1 x 128,
# weights per 128 x 128. Ops that take a block_size argument default to it.
GEMM_BLOCK = 128


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints, b > 0: the blocks of b that hold a (scale blocks, tiles, cache blocks)."""
    return -(-a // b)
