"""Chat with one model: streamed Markdown answers, a stop key, a multi-line message box, past
questions edited and answered again, history saved in the store."""

from __future__ import annotations

import re
import threading
import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Collapsible, Footer, Markdown, Static

from edgellm.runtime.templates import Message
from edgellm.tui.conversations import Conversations
from edgellm.tui.messages import Answered, AnswerFailed, AnswerSoFar, Loaded, LoadFailed
from edgellm.tui.widgets import PromptArea

UPDATE_EVERY = 0.05  # seconds between redraws of a streaming answer


def _question(text: str) -> Static:
    """A question in the transcript, shown as typed (brackets are text, not markup)."""
    return Static(Text(text), classes="user")


def code_blocks(markdown: str) -> list[str]:
    """The fenced code blocks of a Markdown answer, in order, without their fences."""
    return [m.group(2) for m in re.finditer(r"^([`~]{3,})[^\n]*\n(.*?)^\1[ \t]*$", markdown, re.M | re.S)]


class ChatScreen(Screen):
    BINDINGS = [
        ("escape", "stop", "Stop answer"),
        ("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+y", "copy_last", "Copy answer", priority=True),  # over the message box's redo
        ("f2", "edit", "Edit question"),
        ("ctrl+o", "copy_code", "Copy code"),  # not Ctrl+K: the prompt line deletes to its end with it
        ("ctrl+r", "regenerate", "Regenerate"),
        ("ctrl+b", "back", "Back"),
    ]

    def __init__(self, model_name: str, conversation: int | None = None, read_only: bool = False) -> None:
        """``conversation``: a saved conversation to reopen and go on with; ``read_only``: only to
        read (its model is no longer in the library), nothing is loaded."""
        super().__init__()
        self.model_name = model_name
        self.model = None
        self._answer: Markdown | None = None  # the answer being streamed into
        self._thinking: Collapsible | None = None  # and its thinking, for a reasoning model
        self._thought: Static | None = None  # the text inside it
        self.history: list[Message] = []
        self.stop = threading.Event()
        self.idle = threading.Event()  # no answer being generated: the model may be closed
        self.idle.set()
        self.generating = False
        self.conversation = conversation
        self.read_only = read_only
        self._code_turn = 0  # Ctrl+O: how many of the last answer's code blocks, from the end, were copied
        self._edit_turn = 0  # F2: how many questions back, from the last, the one being edited is
        self._editing: int | None = None  # the history index of the question being edited

    def compose(self) -> ComposeResult:
        yield Static(f"edgellm · chat · {self.model_name}", id="title")
        yield VerticalScroll(id="transcript")
        yield PromptArea(placeholder="loading the model…", id="prompt", disabled=True)
        yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.conversations: Conversations = self.app.conversations
        if self.conversation is not None:
            self.history = self.conversations.load(self.conversation)
            transcript = self.query_one("#transcript", VerticalScroll)
            for m in self.history:
                transcript.mount(_question(m.content) if m.role == "user" else Markdown(m.content, classes="assistant"))
            transcript.scroll_end(animate=False)
        if self.read_only:
            self._status(f"{self.model_name} is no longer in the library: this conversation can be read, not continued")
            self.query_one("#prompt", PromptArea).placeholder = "read only · Ctrl-B goes back"
            return
        self._load()

    @work(thread=True, exclusive=True, group="model")
    def _load(self) -> None:
        from edgellm.models import load_options, resolve
        from edgellm.runtime.loader import load_model

        try:
            settings = self.app.settings_for(self.model_name)
            resolved = resolve(self.model_name, settings)
            model = load_model(resolved.path, load_options(settings), None, resolved.header,
                               self.app.hardware)
        except Exception as exc:
            self.post_message(LoadFailed(exc))
        else:
            self.post_message(Loaded(model))

    @on(LoadFailed)
    def _failed(self, message: LoadFailed) -> None:
        """The chat cannot go on: say why and the way out, instead of a prompt still 'loading'."""
        exc = message.error
        self.app.report(exc)
        self._status(f"could not load {self.model_name}: {getattr(exc, 'message', exc)}")  # the reason; the hint is in the notification
        self.query_one("#prompt", PromptArea).placeholder = (
            f"{self.model_name} could not be loaded: Ctrl-B goes back to the library, where s changes its settings")

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        self.model = model = message.model
        load = model.load_options
        where = "CPU" if not load.n_gpu_layers else f"{load.n_gpu_layers} GPU layers"
        template = model.template
        self._status(f"ready · ctx {load.n_ctx} · kv {load.type_k}/{load.type_v} · {where} · template: {template.origin}")
        if template.is_fallback:  # said once, not discovered from odd answers
            self.app.notify(f"{self.model_name} has no chat template: messages go through a generic one, and a base "
                            "model may just continue the text", severity="warning", timeout=10)
        prompt = self.query_one("#prompt", PromptArea)
        prompt.disabled = False
        prompt.placeholder = "Message (Enter sends, Ctrl+J a new line, Esc stops an answer, F2 edits a question)"
        prompt.focus()

    def _status(self, text: str) -> None:
        self.query_one("#status", Static).update(Text(text))  # may quote a model's or a path's brackets

    def on_prompt_area_submitted(self, event: PromptArea.Submitted) -> None:
        text = event.value.strip()
        if not text or self.model is None or self.generating:
            return
        event.prompt.value = ""
        if self._editing is not None:  # the edited question takes the old one's place; what followed goes
            del self.history[self._editing:]
            self._cut(self._questions()[-self._edit_turn], keep=False)
            self._end_edit()
        self.query_one("#transcript", VerticalScroll).mount(_question(text))
        self.history.append(Message("user", text))
        self._ask()

    def action_regenerate(self) -> None:
        """Answer the last question again: the last answer (and its thinking and figures) goes,
        from the screen and the saved conversation alike."""
        if self.model is None or self.generating or not self.history or self.history[-1].role != "assistant":
            return
        self.history.pop()
        self._end_edit()
        self._cut(self._questions()[-1], keep=True)
        self._ask()

    def action_edit(self) -> None:
        """Edit a past question and go on from there: each press takes the one before, from the
        last. Enter sends it in place of the old one, and what came after it goes, from the screen
        and the saved conversation alike; Esc leaves everything as it was."""
        asked = [i for i, m in enumerate(self.history) if m.role == "user"]
        if self.model is None or self.generating or not asked:
            return
        questions = self._questions()
        if self._editing is not None:
            questions[-self._edit_turn].remove_class("editing")
        self._edit_turn = self._edit_turn % len(asked) + 1
        self._editing = asked[-self._edit_turn]
        shown = questions[-self._edit_turn]
        shown.add_class("editing")
        shown.scroll_visible(animate=False)
        prompt = self.query_one("#prompt", PromptArea)
        prompt.value = self.history[self._editing].content
        prompt.focus()
        number = len(asked) - self._edit_turn + 1
        self._status(f"editing question {number} of {len(asked)}: Enter answers it again and drops what followed it · "
                     "F2 the one before · Esc leaves it")

    def _end_edit(self, clear: bool = False) -> None:
        if self._editing is not None:
            for shown in self._questions():
                shown.remove_class("editing")
            if clear:
                self.query_one("#prompt", PromptArea).value = ""
                self._status("left as it was")
        self._editing, self._edit_turn = None, 0

    def _questions(self) -> list[Widget]:
        """The questions in the transcript, in order: one per user message of the history."""
        return list(self.query_one("#transcript", VerticalScroll).query(".user"))

    def _cut(self, question: Widget, keep: bool) -> None:
        """Remove what follows ``question`` in the transcript, and the question too unless ``keep``."""
        children = list(self.query_one("#transcript", VerticalScroll).children)
        for widget in children[children.index(question) + keep:]:
            widget.remove()

    def _ask(self) -> None:
        """Generate an answer to the history as it stands, into a new answer widget."""
        transcript = self.query_one("#transcript", VerticalScroll)
        answer = Markdown("", classes="assistant")
        transcript.mount(answer)
        transcript.scroll_end(animate=False)
        self.stop.clear()
        self.idle.clear()
        self.generating = True
        self._answer, self._thinking = answer, None
        self._generate()

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self) -> None:
        pieces: list[str] = []
        thoughts: list[str] = []
        last_draw = 0.0
        final = None
        try:
            settings = self.app.settings_for(self.model_name)  # as the preset is now (it may have changed)
            system = [Message("system", settings.system)] if settings.system else []
            for chunk in self.model.chat(system + self.history, settings.sampling, cancel=self.stop.is_set):
                pieces.append(chunk.text)
                thoughts.append(chunk.reasoning)
                final = chunk
                now = time.monotonic()
                if now - last_draw >= UPDATE_EVERY or chunk.finish_reason:
                    last_draw = now
                    self.post_message(AnswerSoFar("".join(pieces), "".join(thoughts)))
        except Exception as exc:
            self.post_message(AnswerFailed(exc))
            return
        finally:
            self.idle.set()
        self.post_message(Answered("".join(pieces), final))

    def on_answer_so_far(self, message: AnswerSoFar) -> None:
        if not self.is_attached or self._answer is None:
            return
        if message.reasoning:  # a reasoning model's thinking: dimmed, folded away once the answer starts
            if self._thinking is None:
                self._thought = Static("", classes="thinking")
                self._thinking = Collapsible(self._thought, title="thinking", collapsed=False)
                self.query_one("#transcript", VerticalScroll).mount(self._thinking, before=self._answer)
            self._thought.update(Text(message.reasoning))
            self._thinking.collapsed = bool(message.text)
        self._answer.update(message.text)
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    @on(AnswerFailed)
    def _answer_failed(self, message: AnswerFailed) -> None:
        exc = message.error
        self.generating = False
        if not self.is_attached:
            return
        self.history.pop()
        self.app.report(exc)

    @on(Answered)
    def _answered(self, message: Answered) -> None:
        text, final = message.text, message.last
        self.generating = False
        if not self.is_attached:
            return
        self.history.append(Message("assistant", text))
        self._code_turn = 0
        if self.conversation is None:
            self.conversation = self.conversations.new(self.model_name)
        self.conversations.save(self.conversation, self.history)
        t = final.timings
        speed = f"{t.tokens_per_second:.1f} tok/s" if t.tokens_per_second else "-"
        load = self.model.load_options
        used = t.prompt_tokens + t.generated_tokens
        note = " · stopped" if final.finish_reason == "cancelled" else ""
        # under the answer, what it alone cost: kept in the transcript, answer by answer
        stats = Static(Text(f"{t.generated_tokens} tokens · {speed} · first token {t.prompt_ms:.0f} ms{note}"),
                       classes="stats")
        self.query_one("#transcript", VerticalScroll).mount(stats, after=self._answer)
        self._status(f"{t.generated_tokens} tokens · {speed} · context {used}/{load.n_ctx} · "
                     f"kv {load.type_k}/{load.type_v} · GPU layers {load.n_gpu_layers}{note}")

    def action_stop(self) -> None:
        if self.generating:
            self.stop.set()
        elif self._editing is not None:
            self._end_edit(clear=True)
        else:
            self.action_back()

    def action_new_chat(self) -> None:
        if self.generating:
            return
        self._end_edit(clear=True)
        self.history.clear()
        self.conversation = None
        self.query_one("#transcript", VerticalScroll).remove_children()
        self._status("new chat")

    def action_copy_last(self) -> None:
        answers = [m.content for m in self.history if m.role == "assistant"]
        if answers:
            self.app.copy_to_clipboard(answers[-1])
            self.app.notify("answer copied")

    def action_copy_code(self) -> None:
        """Copy the last answer's code blocks one at a time: each press the one before, from the
        last (the fences and language tag left out)."""
        answers = [m.content for m in self.history if m.role == "assistant"]
        blocks = code_blocks(answers[-1]) if answers else []
        if not blocks:
            self.app.notify("the last answer has no code block")
            return
        self._code_turn = self._code_turn % len(blocks) + 1
        block = blocks[-self._code_turn]
        self.app.copy_to_clipboard(block)
        self.app.notify(f"code block {len(blocks) - self._code_turn + 1} of {len(blocks)} copied "
                        f"({len(block.splitlines())} lines)")

    def action_back(self) -> None:
        self.stop.set()
        self.app.pop_screen()

    def on_unmount(self) -> None:
        """Leaving mid-answer stops it; the model is freed once its worker has let go of it."""
        self.stop.set()
        model = self.model
        if model is not None:
            threading.Thread(target=lambda: (self.idle.wait(), model.close()), daemon=True).start()
