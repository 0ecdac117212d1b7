"""The DeepSeek-V3 model on dsv3_kernels (built in a later issue)."""
