"""modelconsole.themes: Textual stylesheets, shipped as package data (found with importlib.resources),
and the console's registered colour themes (one dark, one light).

``console.tcss`` holds the layout and component styles; it uses only theme
variables (``$primary``, ``$surface``, ...), so each theme recolours it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from textual.theme import Theme

DARK = Theme(
    name="modelconsole-dark",
    primary="#4FA3FF",
    secondary="#7E8CE0",
    accent="#FFB454",
    warning="#F5C542",
    error="#FF5F5F",
    success="#5FD787",
    foreground="#D8DEE9",
    background="#0F1419",
    surface="#151B23",
    panel="#1C2430",
    dark=True,
    variables={"footer-key-foreground": "#FFB454", "block-cursor-text-style": "bold"},
)

LIGHT = Theme(
    name="modelconsole-light",
    primary="#0B5CAD",
    secondary="#5A4FCF",
    accent="#B35900",
    warning="#9A6700",
    error="#C62828",
    success="#1B7F3B",
    foreground="#1F2328",
    background="#FAFAF7",
    surface="#F0F0EA",
    panel="#E4E6E1",
    dark=False,
    variables={"footer-key-foreground": "#B35900", "block-cursor-text-style": "bold"},
)

THEMES: tuple[Theme, ...] = (DARK, LIGHT)
DEFAULT_THEME = DARK.name


def stylesheet(name: str = "console.tcss") -> Path:
    """The path of one of the package's .tcss files."""
    return Path(str(files(__name__).joinpath(name)))
