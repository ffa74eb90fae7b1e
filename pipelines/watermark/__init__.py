"""Watermarks: owner keys, the bit extractor, attacks, and honest verification."""
