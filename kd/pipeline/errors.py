"""Re-export of kd.errors for the pipeline's modules (the exception lives at the package root so
that kd.cache, which imports nothing from kd.pipeline, can raise it too)."""

from kd.errors import KdError, where

__all__ = ["KdError", "where"]
