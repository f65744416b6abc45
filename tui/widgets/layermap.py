"""The layer map: one bar over layers 0..L-1, coloured by owning stage; gaps and dead ranges red."""
from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from dair.tui import fmt
from dair.tui.cluster import LayerCell


class LayerMap(Widget):
    cells: reactive[list[LayerCell]] = reactive(list, always_update=True)

    def show(self, cells: list[LayerCell]) -> None:
        self.cells = cells

    def render(self) -> Text:
        cells = self.cells
        n = len(cells)
        if not n:
            return Text("layer map: waiting for the bus's stats", style="dim")
        edges = layer_edges(n, self.size.width)
        bar = Text()
        for i, c in enumerate(cells):
            w = edges[i + 1] - edges[i]
            if c.kind == "live" and c.node is not None:
                bar.append("█" * w, style=c.node.colour)
            elif c.kind == "loading" and c.node is not None:
                bar.append("▒" * w, style=c.node.colour)
            elif c.kind == "dead":
                bar.append("╳" * w, style="bold red on #3a0000")
            else:
                bar.append("░" * w, style="bold red")
        ticks = Text(_ticks(cells, edges), style="dim")
        legend = Text()
        runs: list[tuple[int, int, LayerCell]] = []
        for i, c in enumerate(cells):
            if runs and runs[-1][2].kind == c.kind and runs[-1][2].node is c.node:
                runs[-1] = (runs[-1][0], i, c)
            else:
                runs.append((i, i, c))
        for a, b, c in runs:
            if legend:
                legend.append("  ")
            if c.kind == "gap":
                legend.append(f"░ {fmt.span(a, b)} uncovered", style="bold red")
            elif c.kind == "dead" and c.node is not None:
                legend.append(f"╳ {c.node.name} {fmt.span(a, b)} dead", style="bold red")
            elif c.node is not None:
                mark = "█" if c.kind == "live" else "▒"
                legend.append(f"{mark} ", style=c.node.colour)
                legend.append(f"{c.node.name} {fmt.span(a, b)}" + ("" if c.kind == "live" else f" {c.node.state}"))
        return Text("\n").join([bar, ticks, legend])


def layer_edges(n: int, width: int) -> list[int]:
    """Column where each layer starts (and the end): the bar fills the width, each layer gets at
    least one column."""
    w = max(n, width)
    return [i * w // n for i in range(n + 1)]


def _ticks(cells: list[LayerCell], edges: list[int]) -> str:
    """Layer numbers under the bar where each owner's range starts, and the last layer."""
    n = len(cells)
    line = [" "] * edges[-1]
    free = 0  # first column not yet written, so labels never overlap
    for i, c in enumerate(cells):
        if i and cells[i - 1].node is c.node and cells[i - 1].kind == c.kind:
            continue
        label, at = str(i), edges[i]
        if at >= free and at + len(label) <= len(line):
            line[at:at + len(label)] = label
            free = at + len(label) + 1
    last = str(n - 1)
    at = len(line) - len(last)
    if at >= free:
        line[at:] = last
    return "".join(line)
