"""Placeholder replaced by the scale helper."""


def main() -> None:
    raise SystemExit("megalite-scale: not built yet")
