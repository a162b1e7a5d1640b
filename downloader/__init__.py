"""imgdl: a fast, polite, loss-free batch image downloader."""

__version__ = "0.1.0"
