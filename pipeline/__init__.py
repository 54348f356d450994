"""cxrgen: an offline feature-store pipeline that learns to write chest X-ray reports."""

__version__ = "0.1.0"
