"""Personal data replaced by placeholders: e-mail addresses, IP addresses (v4 and v6) and phone
numbers, each counted.

Patterns, applied in this order so a match is never rewritten by a later one:

- e-mail: `local@domain.tld` (RFC 5322's common subset: letters, digits, `._%+-` in the local
  part, a dotted domain ending in a 2+ letter TLD) -> `<EMAIL_ADDRESS>`;
- IP: dotted quads with every octet <= 255, and colon-hex runs that Python's `ipaddress`
  accepts as IPv6 (so clock times like 10:30:00 are left alone) -> `<IP_ADDRESS>`;
- phone: an optional `+country` code, an optional bracketed area code and groups of digits
  separated by spaces, dots or dashes, 9 to 15 digits in all (E.164's maximum), not part of a
  longer number or word -> `<PHONE_NUMBER>`. Dates (2024-05-01) and years have too few digits.

A document keeps its place in the pipeline; only its text changes (what is tokenized, hashed
for dedup and checked for contamination is the scrubbed text).
"""

from __future__ import annotations

import ipaddress
import re

PLACEHOLDERS = {
    "email": "<EMAIL_ADDRESS>",
    "ip": "<IP_ADDRESS>",
    "phone": "<PHONE_NUMBER>",
}

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w.]\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?!\w)"
)


def _ipv6(m: re.Match) -> str:
    try:
        ipaddress.IPv6Address(m.group(0))
    except ValueError:
        return m.group(0)
    return PLACEHOLDERS["ip"]


def _phone(m: re.Match) -> str:
    digits = sum(c.isdigit() for c in m.group(0))
    return PLACEHOLDERS["phone"] if 9 <= digits <= 15 else m.group(0)


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """The text with personal data replaced, and how many of each kind were replaced."""
    counts = {}
    text, counts["email"] = _EMAIL.subn(PLACEHOLDERS["email"], text)
    text, n4 = _IPV4.subn(PLACEHOLDERS["ip"], text)
    before = text.count(PLACEHOLDERS["ip"])
    text = _IPV6.sub(_ipv6, text)
    counts["ip"] = n4 + text.count(PLACEHOLDERS["ip"]) - before
    before = text.count(PLACEHOLDERS["phone"])
    text = _PHONE.sub(_phone, text)
    counts["phone"] = text.count(PLACEHOLDERS["phone"]) - before
    return text, counts
