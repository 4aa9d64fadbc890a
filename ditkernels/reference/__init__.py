"""Plain-PyTorch references: readable, float64-capable, the ground truth of the tests."""
