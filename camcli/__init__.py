"""camcli: see where a convolutional image classifier looks, from the command line."""

__version__ = "0.1.0"
