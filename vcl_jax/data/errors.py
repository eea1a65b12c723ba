"""Errors raised by the data layer."""


class DataError(ValueError):
    """A dataset could not be found or is malformed; the message says what and how to fix it."""
