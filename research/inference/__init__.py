"""Decoding: a static-cache engine for every attention type, and MTP's self-speculative decoding."""
