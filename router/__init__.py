"""router: a daemon for digital response management."""

__version__ = "0.1.0"
