"""Private implementation of metacf. Not part of the public API."""
