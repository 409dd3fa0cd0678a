"""Ids given by a unique prefix, as docker takes them: the store's lookup, on a real SQLite file."""

from __future__ import annotations

from dispatcher.store import Database


def test_a_whole_id_a_unique_prefix_an_ambiguous_one_and_none(tmp_path):
    store = Database(str(tmp_path / "state.db"))
    with store.conn:
        for letter_id in ("abc123", "abd456", "ab", "f%_x"):
            store.conn.execute("INSERT INTO dead_letters (id, trigger, event_id, event, attempts, created_at) "
                               "VALUES (?, 't', ?, '{}', '[]', 0)", (letter_id, letter_id))
    assert store.resolve("dead_letters", "abc") == ["abc123"]
    assert store.resolve("dead_letters", "ab") == ["ab"]  # a whole id wins over the ids it begins
    assert store.resolve("dead_letters", "a") == ["ab", "abc123"]  # ambiguous: two are enough to say so
    assert store.resolve("dead_letters", "abd456") == ["abd456"]
    assert store.resolve("dead_letters", "f%") == ["f%_x"]
    assert store.resolve("dead_letters", "%") == []  # no wildcard: a LIKE would have matched everything
    assert store.resolve("dead_letters", "") == []
    assert store.resolve("invocations", "ab") == []
    store.close()
