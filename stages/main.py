"""Entry point of dair-stage (not yet implemented)."""
import sys


def main() -> int:
    print("dair-stage: not yet implemented", file=sys.stderr)
    return 2
