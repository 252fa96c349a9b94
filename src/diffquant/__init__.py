"""diffquant: quantize text-to-image diffusion models to low bit widths, faithfully, and run them fast."""

__version__ = "0.1.0"
