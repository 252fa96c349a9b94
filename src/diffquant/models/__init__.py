"""Architecture adapters; importing the package registers every family's adapter (``adapters.register_adapter``)."""

from . import flux, pixart  # noqa: F401  (register their adapters)
