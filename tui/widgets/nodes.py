"""The nodes table: one row per stage, red when the stage is dead."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from dair.bus import states
from dair.tui import fmt
from dair.tui.cluster import NodeView

COLUMNS = (("node", "Node"), ("host", "Host:pid"), ("layers", "Layers"), ("state", "State"),
           ("rss", "RSS/budget"), ("cpu", "CPU"), ("hop", "Hop p50/p95 ms"), ("bytes", "In/Out"),
           ("rate", "Rate in/out"), ("hb", "HB age"))

STATE_STYLE = {states.READY: "green", states.BUSY: "bold yellow", states.STREAMING: "cyan",
               states.LOADING: "dim yellow", states.DEAD: "bold red"}


def row_cells(n: NodeView, stale: bool = False) -> list[Text]:
    """The row of one node; all of it red when it is dead, dim when the bus is out of reach."""
    rss = fmt.human_bytes(n.rss) + (f"/{fmt.human_bytes(n.max_ram)}" if n.max_ram else "")
    cpu = "-" if n.cpu is None else f"{n.cpu:.0f}%"
    hop = f"{fmt.ms(n.hop_ms_p50)}/{fmt.ms(n.hop_ms_p95)}"
    values = [n.name, f"{n.host}:{n.pid}", fmt.span(n.first, n.last), n.state, rss, cpu, hop,
              f"{fmt.human_bytes(n.bytes_in)}/{fmt.human_bytes(n.bytes_out)}",
              f"{fmt.rate(n.rate_in)} {fmt.rate(n.rate_out)}", fmt.age(n.heartbeat_age_s)]
    if n.dead:
        return [Text(v, style="bold red") for v in values]
    cells = [Text(v, style="dim" if stale else "") for v in values]
    cells[0] = Text("■ ", style=n.colour) + Text(n.name, style="dim" if stale else "bold")
    cells[3] = Text(n.state, style="dim" if stale else STATE_STYLE.get(n.state, ""))
    if n.max_ram and n.rss > n.max_ram:
        cells[4].stylize("bold yellow")
    return cells


class NodesTable(DataTable):
    """Rows keyed by the bus's node id, updated in place so the cursor does not jump."""

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.show_cursor = False  # a highlighted row would read as "selected" when nobody is browsing
        self.zebra_stripes = True
        for key, label in COLUMNS:
            self.add_column(label, key=key)

    def on_focus(self) -> None:
        self.show_cursor = True

    def on_blur(self) -> None:
        self.show_cursor = False

    def show(self, nodes: list[NodeView], stale: bool = False) -> None:
        keys = [n.node for n in nodes]
        present = {str(k.value) for k in self.rows}
        if [str(k.value) for k in self.rows] != keys:
            # Membership or order changed (a stage joined, left or moved): rebuild, keeping the cursor.
            cursor = self.cursor_row
            self.clear()
            for n in nodes:
                self.add_row(*row_cells(n, stale), key=n.node)
            if nodes:
                self.move_cursor(row=min(cursor, len(nodes) - 1))
            return
        for n in nodes:
            if n.node in present:
                for (col, _), cell in zip(COLUMNS, row_cells(n, stale), strict=True):
                    self.update_cell(n.node, col, cell, update_width=True)
