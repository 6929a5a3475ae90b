"""Passwords kept out of what the platform records and prints (light: no imports of ours)."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(://[^/@:\s]+):[^/@\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it masked: what
    the platform records (params, tags, ``config.yaml``) or prints is readable by everyone who
    can read the store."""
    return _URL_PASSWORD.sub(r"\1:***@", text)
