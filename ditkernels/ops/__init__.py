"""Registered ops (``torch.library`` custom ops with fake implementations and autograd)."""
