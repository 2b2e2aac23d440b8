"""modelconsole.console: the command line entry point and the Textual console.

The console is a client of the engine: it never imports torch, and it
imports the engine lazily, only in the modes that embed it.
"""

__version__ = "0.1.0"
