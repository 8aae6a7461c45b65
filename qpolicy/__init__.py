"""qpolicy: adaptive precision policies for diffusion models."""
__version__ = "0.1.0"
