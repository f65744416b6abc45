"""Dev step: an SVG screenshot of the dashboard during a generation, for the README.

    python -m dair.tui.screenshot --bus tcp://127.0.0.1:5555 --out docs/tui.svg
    rsvg-convert -o docs/tui.png docs/tui.svg      # Debian: librsvg2-bin

Runs the app headless against a live cluster, finishes one chat turn (so the sparkline and the
transcript have something in them), then saves the screen part-way through a second answer.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from dair.tui.app import DairApp
from dair.tui.widgets.settings import Settings

TURNS = ("In one sentence: what is pipeline parallelism?",
         "Write a short story about three old laptops that run a language model together.")


async def shoot(bus: str, out: Path, size: tuple[int, int], after_tokens: int) -> None:
    app = DairApp(bus, settings=Settings(temperature=0.3, top_p=0.9, max_tokens=400))
    async with app.run_test(size=size) as pilot:

        async def until(cond, timeout: float) -> None:  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + timeout
            while not cond():
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting on the cluster at {bus}")
                await pilot.pause(0.05)

        await until(lambda: app.cluster.ready, 60)
        await pilot.press(*TURNS[0], "enter")
        await until(lambda: not app.generating, 120)
        await pilot.press(*TURNS[1], "enter")
        # Wait for enough text and for a stats tick that saw this generation's tokens, so the
        # sparkline and the rate show it.
        await until(lambda: (app._reply_tokens >= after_tokens and app.cluster.current_tok_s > 0)
                    or not app.generating, 120)
        await pilot.pause(0.1)
        app.save_screenshot(out.name, str(out.parent))
        print(f"wrote {out} ({'during' if app.generating else 'after'} the generation)")
        app.action_stop()
        await until(lambda: not app.generating, 30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dair.tui.screenshot")
    p.add_argument("--bus", default="tcp://127.0.0.1:5555")
    p.add_argument("--out", type=Path, default=Path("docs/tui.svg"))
    p.add_argument("--size", default="120x36", help="terminal columns x rows")
    p.add_argument("--after-tokens", type=int, default=45, help="shoot once this many tokens streamed")
    args = p.parse_args(argv)
    cols, rows = (int(v) for v in args.size.split("x"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot(args.bus, args.out, (cols, rows), args.after_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
