"""modelconsole.scheduler: the engine — everything that decides.

Import ``Engine`` from ``modelconsole.scheduler.engine``; this package
keeps its import light.
"""
