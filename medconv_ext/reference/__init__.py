"""Pure-PyTorch references, written for clarity, never for speed."""
