"""The model families' real tokenizers and chat templates (llama.cpp's copies: see ``realvocab``), through our
detokenizer, template sandbox, tool-call parser, forced calls and FIM, and a served model on each."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

import realvocab
from realvocab import FAMILIES, VOCABS

from codellm.engine import templates, tools as calls
from codellm.engine.detok import IncrementalDetokenizer, pieces_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search_code", "description": "Search the repository",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 12}},
                   "required": ["query"], "additionalProperties": False}}}
TEMPLATED = [f for f in FAMILIES.values() if f.template]


@pytest.mark.parametrize("vocab", VOCABS)
def test_streamed_text_is_the_decoded_text(vocab):
    """Tokens decoded one at a time, as a stream sends them, join to exactly the text the whole ids decode to, on
    llama.cpp's tokenizer test inputs (multi-byte characters split across tokens, runs of whitespace, emoji)."""
    tok = realvocab.base_tokenizer(vocab)
    for text in realvocab.vectors(vocab):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), text
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


@pytest.mark.parametrize("vocab", VOCABS)
def test_token_text_table_streams_what_decoding_does(vocab):
    """Where a token's text is looked up instead of decoded (byte-level vocabularies, ``pieces_of``), the stream is
    the same piece for piece as decoding every window: on the test inputs, and on random ids (special tokens, bytes
    cut mid-character), skipping special tokens or not."""
    tok = realvocab.base_tokenizer(vocab)
    table = pieces_of(tok)
    byte_level = type(tok.backend_tokenizer.decoder).__name__ == "ByteLevel"
    assert (table is not None) == byte_level
    if table is not None:
        assert sum(p is not None for p in table) > len(table) // 2
    rng = random.Random(0)
    runs = [tok(text, add_special_tokens=False)["input_ids"] for text in realvocab.vectors(vocab)]
    runs += [[rng.randrange(len(tok)) for _ in range(64)] for _ in range(20)]
    for ids in runs:
        for skip in (True, False):
            looked_up, decoded = IncrementalDetokenizer(tok, ids[:3], skip), IncrementalDetokenizer(tok, ids[:3], skip)
            decoded.pieces = None
            assert [looked_up.add(i) for i in ids] + [looked_up.flush()] == \
                [decoded.add(i) for i in ids] + [decoded.flush()]


def _conversation(call_args: dict) -> tuple[list[dict], list[dict]]:
    asked = [{"role": "system", "content": "You are a coding assistant."},
             {"role": "user", "content": "What's the weather in Paris?"}]
    answered = asked + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_abc123def", "type": "function", "function": {"name": "get_weather", "arguments": call_args}}]}]
    return asked, answered


@pytest.mark.parametrize("family", [f.name for f in TEMPLATED])
def test_templates_render_tools_and_calls_parse_back(family):
    """The family's own template, in our sandbox, renders the tools and a past tool call and its result; the call as
    the template writes it parses back into the same call with the format we pick for that template."""
    fam = FAMILIES[family]
    tok = realvocab.tokenizer(fam)
    fmt = calls.tool_format(tok.chat_template, None)
    if fam.tool_format is None:  # a template without tools: they go into the system message (Hermes style)
        assert not calls.template_renders_tools(tok.chat_template)
        return
    assert fmt == fam.tool_format
    args = {"city": "Paris", "days": 3}
    asked, answered = _conversation(args)
    head = templates.render_chat(tok, asked, tools=[WEATHER, SEARCH])
    assert "get_weather" in head and "search_code" in head and "Current weather in a city" in head
    full = templates.render_chat(tok, answered, tools=[WEATHER, SEARCH], add_generation_prompt=False)
    turn = full[len(head):] if full.startswith(head) else full[full.rfind("Paris?") + len("Paris?"):]
    turn = turn.split(fam.eos)[0]
    for marker in ("<|start_header_id|>assistant<|end_header_id|>\n\n", "[/INST]"):
        turn = turn.split(marker)[-1]
    text, found = calls.parse_all(turn, fmt, [WEATHER, SEARCH])
    assert [(c.name, c.arguments) for c in found] == [("get_weather", args)], turn
    with_result = answered + [{"role": "tool", "tool_call_id": "call_abc123def", "name": "get_weather",
                               "content": "sunny, 21 C"}, {"role": "assistant", "content": "Sunny and 21 C."},
                                {"role": "user", "content": "And tomorrow?"}]
    assert "sunny, 21 C" in templates.render_chat(tok, with_result, tools=[WEATHER, SEARCH])


def test_qwen3_coder_is_forced_to_call_in_its_own_xml():
    """Qwen3-Coder is made to call a tool in the syntax its template teaches: ``<function=..>`` with a
    ``<parameter=..>`` block a value, strings raw and held to their length and values, other values JSON held to
    their schema. Random tokens under the mask always make one such call, which parses back; a schema raw text
    cannot be held to (a string pattern) is forced as JSON instead, which parses as well."""
    import torch

    from codellm.engine import grammar as grammars

    fam = FAMILIES["qwen3-coder"]
    tok = realvocab.tokenizer(fam)
    eos = (tok.convert_tokens_to_ids(fam.eos),)
    tools = [WEATHER, {"type": "function", "function": {"name": "set_mode", "parameters": {
        "type": "object", "properties": {"mode": {"type": "string", "enum": ["fast", "exact"]},
                                         "limit": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["mode", "limit"]}}}]
    for name in ("get_weather", "set_mode", None):
        head, start, tail = calls.forced_call("qwen3_coder", name, tools)
        assert head == "<tool_call>\n" and start.startswith("<function=") and tail == "\n</tool_call>"
        grammar = grammars.tool_call(tools, name, "qwen3_coder")
        for seed in range(4):
            gen = torch.Generator().manual_seed(seed)
            constraint, out = grammars.Constraint(tok, grammar, start, eos), []
            while not constraint.done and len(out) < 200:
                logits = torch.randn(1, len(tok), generator=gen)
                grammars.mask([constraint], logits)
                out.append(int(logits.argmax()))
                assert constraint.accept(out[-1])
            text = tok.decode([t for t in out if t not in eos], skip_special_tokens=False)
            assert "<parameter=" in text and not text.lstrip().startswith("{"), text
            content, found = calls.parse_all(head + start + text + tail, "qwen3_coder", tools)
            assert len(found) == 1 and not content.strip(), text
            call = found[0]
            assert call.name == name or (name is None and call.name in ("get_weather", "set_mode"))
            if call.name == "get_weather":
                assert isinstance(call.arguments["city"], str) and len(call.arguments["city"]) <= 12
                assert 1 <= call.arguments.get("days", 1) <= 7
            else:
                assert call.arguments["mode"] in ("fast", "exact") and 1 <= call.arguments["limit"] <= 9
    patterned = [{"type": "function", "function": {"name": "open_file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string", "pattern": "^[a-z/]+$"}}, "required": ["path"]}}}]
    head, start, tail = calls.forced_call("qwen3_coder", "open_file", patterned)
    assert start.startswith("{")  # JSON, its pattern checked on the JSON string
    content, found = calls.parse_all(head + start + '"path": "src/a"}}' + tail, "qwen3_coder", patterned)
    assert found[0].arguments == {"path": "src/a"}


@pytest.mark.parametrize("family", [f.name for f in FAMILIES.values() if f.fim])
def test_fim_tokens_are_single_tokens(family):
    """Each FIM marker of the family's spelling is one special token of its real vocabulary, so a FIM prompt is
    what the model was trained on, not the markers spelled out in pieces."""
    fam = FAMILIES[family]
    tok = realvocab.tokenizer(fam)
    for marker in fam.fim:
        ids = tok(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == marker, (marker, ids)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server holding a tiny model per family, each pulled from a local hub mirror under its repo's name."""
    from conftest import Server
    from hubmirror import HubMirror

    realvocab.require_assets()
    root = tmp_path_factory.mktemp("realvocab")
    (root / "home").mkdir()
    with HubMirror() as hub:
        for fam in FAMILIES.values():
            hub.add(fam.repo, realvocab.build(fam, root / fam.name))
        srv = Server(root / "home", "--num-ctx", "4096", "--max-loaded", "2", "--engine-thread",
                     env={"HF_ENDPOINT": hub.url})
        try:
            for fam in FAMILIES.values():
                r = httpx.post(srv.url + "/api/pull", json={"model": _name(fam), "stream": False}, timeout=600)
                assert r.status_code == 200, r.text
            yield srv
        finally:
            srv.stop()


def _name(fam) -> str:
    """The name a family's model is pulled under: its catalog name where it has one, else its repo id."""
    from codellm.registry.catalog import CATALOG

    for short, entry in CATALOG.items():
        if entry.repo == fam.repo:
            return short
    return fam.repo


@pytest.mark.parametrize("family", [f.name for f in TEMPLATED if f.tool_format])
def test_forced_tool_calls_on_real_tokenizers(served, family):
    """A forced call on each family's template and vocabulary: the opening in its own syntax, the arguments held
    to the tool's schema, answered as a call whole and streamed (even from a random model)."""
    fam = FAMILIES[family]
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    name = _name(fam)
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "weather in Paris?"}],
                                           tools=[WEATHER, SEARCH], tool_choice=choice, max_tokens=60, seed=1,
                                           temperature=1.0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, repr(c.message.content)
        call = c.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        if choice != "required":
            assert call.function.name == "get_weather" and isinstance(args.get("city"), str), call
        else:
            assert call.function.name in ("get_weather", "search_code"), call
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "weather?"}],
                                            tools=[WEATHER], tool_choice="required", max_tokens=60, stream=True)
    chunks = list(stream)
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"
    assert isinstance(json.loads("".join(d.function.arguments or "" for d in deltas))["city"], str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("family", [f.name for f in FAMILIES.values() if f.fim])
def test_fim_completions_on_real_tokenizers(served, family):
    """A FIM request on each FIM family: the prompt is the family's spelling with one token per marker."""
    fam = FAMILIES[family]
    tok = realvocab.tokenizer(fam)
    r = httpx.post(served.url + "/v1/completions", json={"model": _name(fam), "prompt": "def add(a, b):\n    return ",
                                                          "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = "def add(a, b):\n    return " + "\n\nprint(add(1, 2))\n"
    bare = len(tok(body, add_special_tokens=False)["input_ids"])
    assert bare + 3 <= r.json()["usage"]["prompt_tokens"] <= bare + 5  # three markers (and BOS / boundary merges)
