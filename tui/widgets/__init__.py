"""The dashboard's widgets, one small module each; they only render what the app hands them."""
from dair.tui.widgets.chat import ChatPanel, Transcript
from dair.tui.widgets.layermap import LayerMap
from dair.tui.widgets.nodes import NodesTable
from dair.tui.widgets.settings import Settings, SettingsScreen
from dair.tui.widgets.status import StatusLine
from dair.tui.widgets.throughput import Throughput

__all__ = ["ChatPanel", "LayerMap", "NodesTable", "Settings", "SettingsScreen", "StatusLine", "Throughput",
           "Transcript"]
