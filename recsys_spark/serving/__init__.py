"""Serving: batch top-K scoring, nearline streaming updates, and the lookup read path."""
