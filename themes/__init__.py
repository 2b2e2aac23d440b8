"""modelconsole.themes: Textual stylesheets, shipped as package data (found with importlib.resources)."""
