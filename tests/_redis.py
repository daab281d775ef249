"""Placeholder: replaced by the Redis fixture module."""
