"""The SQL a PostgreSQL store runs: SQLite's placeholders and types translated, literals left alone."""

from dispatcher.postgres import dialect, redacted, translate


def test_placeholders_are_numbered_outside_string_literals():
    assert translate("SELECT a FROM t WHERE b = ? AND c IN (?, ?)") == "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
    assert translate("UPDATE t SET e = 'why? because' WHERE id = ?") == "UPDATE t SET e = 'why? because' WHERE id = $1"
    assert translate("DELETE FROM t") == "DELETE FROM t"


def test_the_sqlite_schema_is_given_postgres_types():
    assert dialect("seq INTEGER PRIMARY KEY AUTOINCREMENT,\n at REAL NOT NULL,\n out BLOB") == \
        "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n at DOUBLE PRECISION NOT NULL,\n out BYTEA"


def test_a_password_never_shows_in_messages():
    assert redacted("postgresql://es:hunter2@db:5432/state") == "postgresql://es:***@db:5432/state"
    assert redacted("postgresql://es@db/state") == "postgresql://es@db/state"
