"""Entry point of dair-bus (not yet implemented)."""
import sys


def main() -> int:
    print("dair-bus: not yet implemented", file=sys.stderr)
    return 2
