"""clinic-edge: turn a clinic's GPU box into a private radiograph-reading appliance."""

__version__ = "0.1.0"

__all__ = ["__version__"]
