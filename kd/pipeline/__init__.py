"""Shared machinery: data, engines, losses, models, training."""
