"""One line saying whether the bus is reachable and the pipeline ready, and why not."""
from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class StatusLine(Widget):
    link: reactive[str] = reactive("connecting")
    addr: reactive[str] = reactive("")
    attempt: reactive[int] = reactive(0)
    model: reactive[str] = reactive("")
    ready: reactive[bool] = reactive(False)
    problems: reactive[tuple[str, ...]] = reactive(())
    note: reactive[str] = reactive("")

    def render(self) -> Text:
        t = Text()
        if self.link == "connected":
            t.append("● connected ", style="bold green")
            t.append(self.addr, style="dim")
            if self.model:
                t.append(f" · {self.model}")
            if self.ready:
                t.append(" · pipeline ready", style="green")
            else:
                t.append(" · not ready: ", style="bold red")
                t.append("; ".join(self.problems) or "waiting for stats", style="red")
        elif self.link == "reconnecting":
            t.append("◌ reconnecting ", style="bold yellow")
            t.append(f"to {self.addr} (attempt {self.attempt})", style="yellow")
            t.append("  the bus is not answering; what is shown is stale", style="dim")
        else:
            t.append("◌ connecting ", style="bold yellow")
            t.append(f"to {self.addr}" + (f" (attempt {self.attempt})" if self.attempt > 1 else ""), style="yellow")
            if self.attempt > 2:
                t.append("  is the cluster up? `dair up` starts one", style="dim")
        if self.note:
            t.append(f"  {self.note}", style="italic")
        return t
