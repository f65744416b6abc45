"""Entry point of dair-tui (not yet implemented)."""
import sys


def main() -> int:
    print("dair-tui: not yet implemented", file=sys.stderr)
    return 2
