"""Chat templates: the real SmolLM2 template, the fallback, and hostile templates."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgellm.errors import TemplateError
from edgellm.gguf.header import read_header
from edgellm.runtime.templates import FALLBACK_STOPS, ChatTemplate, Message


def test_smollm2_template_renders_chatml(smollm2: Path) -> None:
    template = ChatTemplate(read_header(smollm2).chat_template)
    text = template.render([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
                            Message("user", "Bye")])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    # without a system message the template supplies its default one
    assert template.render([Message("user", "Hi")]).startswith("<|im_start|>system\nYou are a helpful")


def test_fallback_template_for_models_without_one() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback and template.stops == FALLBACK_STOPS
    text = template.render([Message("system", "Be kind."), Message("user", "Hi"), Message("assistant", "Hey"),
                            Message("user", "How are you?")])
    assert text == "Be kind.\n\nUser: Hi\nAssistant: Hey\nUser: How are you?\nAssistant:"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for c in messages.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ raise_exception.__globals__['os'].system('id') }}",
        "{% set x = cycler.__init__.__globals__ %}{{ x }}",
    ],
)
def test_template_reaching_for_python_internals_is_refused(source: str) -> None:
    with pytest.raises(TemplateError, match="reaches for Python internals"):
        ChatTemplate(source)


def test_attribute_lookups_see_plain_data_only() -> None:
    # even without the dunder check, names that are not in the data lead nowhere
    text = ChatTemplate("{{ messages[0].role }}|{{ messages[0].mro }}|{{ bos_token.format }}").render(
        [Message("user", "x")]
    )
    assert text == "user||"


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    ],
)
def test_template_that_never_ends_is_stopped(source: str) -> None:
    template = ChatTemplate(source)
    start = time.perf_counter()
    with pytest.raises(TemplateError, match="ran too long and was stopped"):
        template.render([Message("user", "hi")])
    assert time.perf_counter() - start < 2


def test_recursion_is_stopped() -> None:
    template = ChatTemplate("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    with pytest.raises(TemplateError, match="recursion"):
        template.render([Message("user", "hi")])


def test_output_is_capped() -> None:
    template = ChatTemplate("{% for i in range(9000) %}{{ messages[0].content }}{% endfor %}")
    with pytest.raises(TemplateError, match="over the limit"):
        template.render([Message("user", "x" * 1000)])


def test_syntax_error_is_reported_at_load() -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")


def test_raise_exception_from_template_is_a_clear_error() -> None:
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok")
    assert template.render([Message("user", "hi")]) == "ok"
    with pytest.raises(TemplateError, match="first message must be user"):
        template.render([Message("assistant", "hi")])


def test_unknown_role_is_refused() -> None:
    with pytest.raises(TemplateError, match="unknown message role 'wizard'"):
        ChatTemplate(None).render([{"role": "wizard", "content": "hi"}])


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("source", [
    "{% set a = 'x' * 1000000 %}{{ ([a] * 3000)|join|length }}",
    "{% set a = 'x' * 1000000 %}{{ ([a] * 40000)|join|length }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{{ (range(10000)|list) * 100000 }}",
])
def test_a_template_that_asks_for_gigabytes_is_stopped_and_the_process_lives(source: str) -> None:
    before = _rss()
    start = time.monotonic()
    with pytest.raises(TemplateError) as err:
        ChatTemplate(source).render([Message("user", "hi")])
    assert time.monotonic() - start < 15
    assert err.value.message.startswith("the GGUF chat template")
    assert _rss() - before < 64 << 20  # the memory went in the sandbox, not here
    assert ChatTemplate(None).render([Message("user", "hi")]) == "User: hi\nAssistant:"  # a fresh sandbox renders


def test_a_template_files_final_newline_is_not_in_the_prompt(smollm2: Path, tmp_path: Path) -> None:
    """Editors end files with a newline; Hugging Face and llama.cpp drop a template's last one (Jinja's
    default). Kept, it made the generation prompt end in a blank line, and at temperature 0 SmolLM2
    rambled to the output limit where it answers in one line."""
    from edgellm.gguf.header import read_header
    from edgellm.runtime.templates import ChatTemplate, Message

    source = read_header(smollm2).chat_template
    turns = [Message("user", "Hi")]
    assert ChatTemplate(source + "\n", origin="--template").render(turns) == ChatTemplate(source).render(turns)
    assert ChatTemplate(source).render(turns).endswith("<|im_start|>assistant\n")
