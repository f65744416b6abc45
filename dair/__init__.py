"""dair: distributed AirLLM. Text -> tokens -> embedding -> layer ranges -> token."""

__version__ = "0.1.0"
