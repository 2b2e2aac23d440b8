"""The console's parts without an app: the picture (the table's data model) and the keys table.

The Pilot tests drive them through the screen; these pin what each part answers on its own,
from plain dicts, so a change to one is checked without starting Textual.
"""

from __future__ import annotations

from modelconsole.console import format as fmt
from modelconsole.console import keys
from modelconsole.console.actions import evict_refusal
from modelconsole.console.picture import FAILURE_MEMORY_S, Picture


def version(name: str, v: str, state: str = "READY", fails: int = 0, **kw) -> dict:
    return {"name": name, "version": v, "state": state, "stats": {"fail": fails}, **kw}


def test_observe_answers_the_filtered_rows_in_snapshot_order_and_forgets_deleted_versions():
    p = Picture()
    models = [version("tiny", "1"), version("tiny", "2", "UNLOADED"), version("big", "1")]
    assert [k for k, _ in p.observe(models, now=0.0)] == ["tiny:1", "tiny:2", "big:1"]
    assert p.set_filter("unloaded") is None
    assert [k for k, _ in p.observe(models, now=1.0)] == ["tiny:2"]
    p.marked.update({"tiny:1", "big:1"})
    found, hidden = p.marked_models(shown={"tiny:2"})
    assert [fmt.row_key(m) for m in found] == ["big:1", "tiny:1"] and hidden == 2
    p.set_filter("")
    rows = dict(p.observe(models[:2], now=2.0))  # big:1 deleted
    assert rows["tiny:1"]["name"][0] == "✓tiny" and p.marked == {"tiny:1"}
    assert "big:1" not in p.models and len(p.histories("tiny:1")[0]) == 3


def test_failures_show_as_health_errors_only_while_recent_and_only_when_they_rose_under_our_eyes():
    p = Picture()
    health = lambda rows: dict(rows)["m:1"]["health"][0]  # noqa: E731
    assert health(p.observe([version("m", "1", fails=5)], now=100.0)) != "errors"  # old failures are not news
    assert health(p.observe([version("m", "1", fails=6)], now=101.0)) == "errors"
    assert health(p.observe([version("m", "1", fails=6)], now=101.0 + FAILURE_MEMORY_S + 1)) != "errors"


def test_a_filter_that_is_not_a_regex_matches_as_text_and_says_why_once():
    p = Picture()
    error = p.set_filter("tiny(")
    assert error and p.filter_error == error
    assert p.set_filter("tiny(") is None  # said already
    assert [k for k, _ in p.observe([version("tiny(", "1"), version("tiny", "1")], 0.0)] == ["tiny(:1"]


def test_sort_to_starts_numbers_largest_first_and_keeps_the_order_of_the_same_column():
    p = Picture()
    p.sort_to("rate")
    assert p.sort_col == "rate" and p.sort_reverse == ("rate" in fmt.DESCENDING_FIRST)
    p.sort_to("rate", False)
    p.sort_to("rate")
    assert p.sort_reverse is False
    assert p.sort_step(-1) == fmt.COLUMN_KEYS[fmt.COLUMN_KEYS.index("rate") - 1]


def test_events_are_kept_once_per_seq_and_a_restarted_server_numbers_from_one_again():
    p = Picture()
    assert p.add_event({"seq": 5, "kind": "loaded", "model": "m", "version": "1", "ts": 2.0})
    assert not p.add_event({"seq": 5, "kind": "loaded", "model": "m", "version": "1"})
    assert p.add_event({"seq": 6, "kind": "load_failed", "model": "m", "level": "error", "ts": 1.0})
    assert p.error_logged_since("m", 5) and not p.error_logged_since("m", 6)
    assert [e["seq"] for e in p.recent_events("m:1", "m")] == [6, 5]  # oldest first, by time
    assert p.add_event({"seq": 1, "kind": "connection", "data": {"restarted": True}})
    assert len(p.events_of("m")) == 2


def test_versions_and_the_active_one_come_from_routing_first():
    p = Picture()
    p.observe([version("m", "10"), version("m", "2", active=True), version("m", "1")], 0.0)
    assert [m["version"] for m in p.versions("m")] == ["1", "2", "10"]
    assert p.active_version("m") == "2" and p.versions_by_name() == {"m": ["1", "2", "10"]}
    p.routing = {"m": {"active": "10"}}
    assert p.active_version("m") == "10"


def test_evict_refusal_names_why():
    assert "unpin" in (evict_refusal(version("m", "1", pinned=True)) or "")
    assert "nothing to evict" in (evict_refusal(version("m", "1", "UNLOADED")) or "")
    assert evict_refusal(version("m", "1")) is None


def test_help_rows_follow_the_keymap_and_hide_what_read_only_refuses():
    def shown(b):
        return b.key

    rows = keys.help_rows({"load": "L"}, read_only=False, allowed=lambda a: a != "demo_faster", key_display=shown)
    by_id = {r[2]: r for r in rows if r[2]}
    assert by_id["load"][0] == "L" and by_id["load"][1] == "Load the selected model"
    assert by_id["demo_faster"][3] is False and by_id["help"][0] == "question_mark, f1"
    read_only = {r[2] for r in keys.help_rows({}, True, lambda a: True, shown)}
    assert "load" not in read_only and "help" in read_only
    assert keys.binding_for_key("J", {"load": "J"}).action == "load"
    assert keys.binding_for_key("l", {"load": "J"}) is None
    assert {b.action for b in keys.BINDINGS} >= keys.MUTATING


def test_describe_shows_a_text_models_tokenizer_buckets_and_padding_waste():
    from modelconsole.console import describe

    m = version("sentiment", "1", text={"tokenizer": "/m/tokenizer.json", "head": "classify", "pairs": True,
                                        "max_length": 64, "truncation": False, "buckets": [16, 32, 64],
                                        "padding_waste": 0.25})
    text = dict(describe.sections(m, None, [], []))["text"]
    assert "tokenizer /m/tokenizer.json · head classify · takes text_pair" in text
    assert "buckets 16, 32, 64" in text and "padding waste 0.25 padded tokens per real token" in text
    m["text"]["padding_waste"] = None
    assert "padding waste — (no batch yet)" in dict(describe.sections(m, None, [], []))["text"]
    assert "text" not in dict(describe.sections(version("m", "1"), None, [], []))


def test_the_header_keeps_counts_sort_and_filter_first_and_adds_where_it_runs_when_wide_or_in_trouble():
    from modelconsole.console.status import View, status_text

    p = Picture()
    snap = {"models": [version("tiny", "1"), version("big", "1", "UNLOADED")]}
    p.observe(snap["models"], 0.0)
    p.set_filter("tiny")
    narrow = status_text(snap, p, View("attached to http://h:1", 80, shown_rows=1))
    assert narrow.startswith(" 2 models (1 ready) · 0 req/s · sort model↑ · filter /tiny/ 1 of 2")
    assert "attached" not in narrow
    assert status_text(snap, p, View("attached to http://h:1", 80, trouble=True)).startswith(" attached to")
    wide = status_text(snap, p, View("in-process", 150, swapping={"tiny": "2"}, demo_rate=4.0, read_only=True))
    assert wide.startswith(" modelconsole ") and "swap tiny →2: starting" in wide
    assert wide.endswith("demo 4.00 req/s · READ-ONLY")
