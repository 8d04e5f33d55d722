"""pagent: run YAML pipelines of parallel agents over JSON, JSON Lines and CSV data."""

__version__ = "0.1.0"

__all__ = ["__version__"]
