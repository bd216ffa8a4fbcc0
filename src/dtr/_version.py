"""The version of denoising-task-routing (read by pyproject.toml and written into saved routing records)."""

__version__ = "0.4.0"
