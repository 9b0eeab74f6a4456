"""Saved conversations: a small SQLite file in the store's home, shared by the chat screens."""

from __future__ import annotations

import sqlite3
import time

from edgellm.runtime.templates import Message


class Conversations:
    """Conversations kept in ``$EDGELLM_HOME/conversations.db`` (SQLite)."""

    def __init__(self, path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS conversations (id INTEGER PRIMARY KEY, model TEXT, created REAL);"
            "CREATE TABLE IF NOT EXISTS messages (conversation INTEGER, position INTEGER, role TEXT, content TEXT,"
            " PRIMARY KEY (conversation, position));"
        )

    def new(self, model: str) -> int:
        with self.db:
            return self.db.execute("INSERT INTO conversations (model, created) VALUES (?, ?)", (model, time.time())).lastrowid

    def save(self, conversation: int, messages: list[Message]) -> None:
        with self.db:
            self.db.execute("DELETE FROM messages WHERE conversation = ?", (conversation,))
            self.db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?)",
                                [(conversation, i, m.role, m.content) for i, m in enumerate(messages)])

    def recent(self, limit: int = 100) -> list[tuple[int, str, float, str, int]]:
        """(id, model, created, first question, messages) of the newest conversations first."""
        rows = self.db.execute(
            "SELECT c.id, c.model, c.created, COALESCE((SELECT content FROM messages m WHERE m.conversation = c.id"
            " AND m.role = 'user' ORDER BY position LIMIT 1), ''), (SELECT COUNT(*) FROM messages m"
            " WHERE m.conversation = c.id) FROM conversations c ORDER BY c.created DESC, c.id DESC LIMIT ?", (limit,))
        return list(rows)

    def load(self, conversation: int) -> list[Message]:
        rows = self.db.execute("SELECT role, content FROM messages WHERE conversation = ? ORDER BY position", (conversation,))
        return [Message(role, content) for role, content in rows]
