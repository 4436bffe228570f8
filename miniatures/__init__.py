"""miniatures package."""
