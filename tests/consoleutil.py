"""Helpers the console's Pilot tests share: wait for a condition, read and select table rows."""

from __future__ import annotations

import time


async def until(pilot, cond, timeout=15.0, what="condition"):
    """Poll ``cond()`` while the app keeps running; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def cell(app, key, col):
    return app.table.get_cell(key, col).plain


def select(app, key):
    app.table.move_cursor(row=app.table.get_row_index(key), animate=False)
