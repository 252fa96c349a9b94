"""Architecture adapters; importing the package registers every family's adapter (``adapters.register_adapter``)."""

from . import flux, pixart, sd3, unet, unet2d  # noqa: F401  (register their adapters)
