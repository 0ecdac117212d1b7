"""Plain-PyTorch, fp32-math reference implementations: the ground truth for every backend."""
