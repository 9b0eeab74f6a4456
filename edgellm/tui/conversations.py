"""Saved conversations: a small SQLite file in the store's home, shared by the chat screens."""

from __future__ import annotations

import json
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
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(conversations)")}
        if "title" not in columns:  # a file from before conversations could be renamed
            with self.db:
                self.db.execute("ALTER TABLE conversations ADD COLUMN title TEXT")

    def close(self) -> None:
        self.db.close()

    def new(self, model: str) -> int:
        with self.db:
            return self.db.execute("INSERT INTO conversations (model, created) VALUES (?, ?)", (model, time.time())).lastrowid

    def save(self, conversation: int, messages: list[Message]) -> None:
        with self.db:
            self.db.execute("DELETE FROM messages WHERE conversation = ?", (conversation,))
            self.db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?)",
                                [(conversation, i, m.role, m.content) for i, m in enumerate(messages)])

    def recent(self, limit: int = 100, containing: str = "") -> list[tuple[int, str, float, str, int]]:
        """(id, model, created, title, messages) of the newest conversations first; the title is the
        one given, else the first question. ``containing``: only those with that text in a message
        or the title (case-insensitive)."""
        pattern = "%" + containing.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute(
            "SELECT c.id, c.model, c.created, COALESCE(c.title, (SELECT content FROM messages m WHERE m.conversation = c.id"
            " AND m.role = 'user' ORDER BY position LIMIT 1), ''), (SELECT COUNT(*) FROM messages m"
            " WHERE m.conversation = c.id) FROM conversations c WHERE ? = '' OR c.title LIKE ? ESCAPE '\\'"
            " OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation = c.id AND m.content LIKE ? ESCAPE '\\')"
            " ORDER BY c.created DESC, c.id DESC LIMIT ?", (containing, pattern, pattern, limit))
        return list(rows)

    def rename(self, conversation: int, title: str) -> None:
        with self.db:
            self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation))

    def delete(self, conversation: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM messages WHERE conversation = ?", (conversation,))
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))

    def export(self, conversation: int, fmt: str) -> str:
        """The conversation as Markdown (a heading per turn) or JSON (the OpenAI messages shape)."""
        model, created, title = self.db.execute(
            "SELECT model, created, title FROM conversations WHERE id = ?", (conversation,)).fetchone()
        messages = self.load(conversation)
        if fmt == "json":
            return json.dumps({"model": model, "created": created, "title": title,
                               "messages": [{"role": m.role, "content": m.content} for m in messages]}, indent=2)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
        first = (messages[0].content.splitlines() or [""])[0] if messages else ""
        parts = [f"# {title or first or 'Conversation'}", f"*{model} · {when}*"]
        parts += [f"## {m.role.capitalize()}\n\n{m.content}" for m in messages]
        return "\n\n".join(parts) + "\n"

    def load(self, conversation: int) -> list[Message]:
        rows = self.db.execute("SELECT role, content FROM messages WHERE conversation = ? ORDER BY position", (conversation,))
        return [Message(role, content) for role, content in rows]
