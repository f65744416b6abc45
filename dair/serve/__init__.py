"""`dair serve`: an OpenAI- and Ollama-compatible HTTP API (and a web chat page) over a bus."""
