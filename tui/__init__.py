"""dair-tui: the Textual dashboard and interactive prompt (entry point: dair.tui.main:main)."""
