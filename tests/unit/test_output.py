import pytest
from transformers import AutoTokenizer

from gpu_worker.text.output import OutputProcessor, ReasoningSplitter


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def run(tok, text, stop=(), reasoning=False):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    p = OutputProcessor(tok.backend_tokenizer, stop, True, [], reasoning=reasoning)
    content, thoughts, stopped = [], [], False
    for i in ids:
        c, r, stopped = p.push(i)
        content.append(c)
        thoughts.append(r)
        if stopped:
            break
    if not stopped:
        c, r = p.flush()
        content.append(c)
        thoughts.append(r)
    return content, thoughts, stopped


def test_multibyte_characters_stream_whole(tok):
    text = "café naïve 日本語 ✓ — done"
    content, _, _ = run(tok, text)
    assert "".join(content) == text
    assert all("\ufffd" not in piece for piece in content)  # never half a character


def test_stop_string_spanning_tokens_is_cut_and_not_emitted(tok):
    content, _, stopped = run(tok, "The capital of France is Paris. The quick", stop=("Paris.",))
    assert stopped
    assert "".join(content) == "The capital of France is "


def test_held_back_text_is_released_when_no_stop_matches(tok):
    content, _, stopped = run(tok, "Hello world!", stop=("world?",))
    assert not stopped and "".join(content) == "Hello world!"


def test_reasoning_split_across_chunks():
    r = ReasoningSplitter()
    out = [r.feed(c) for c in ["<th", "ink>I think", " hard</th", "ink>\n\nAnswer: 4"]] + [r.feed("", final=True)]
    assert "".join(c for c, _ in out) == "Answer: 4"
    assert "".join(t for _, t in out) == "I think hard"


def test_no_think_block_is_all_content():
    r = ReasoningSplitter()
    out = [r.feed("<"), r.feed("b>bold</b>"), r.feed("", final=True)]
    assert "".join(c for c, _ in out) == "<b>bold</b>"


def test_blank_lines_after_think_are_dropped_even_in_later_chunks():
    r = ReasoningSplitter()
    out = [r.feed(c) for c in ["<think>x</think>", "\n", "\n", "Answer\n\nmore"]]
    assert "".join(c for c, _ in out) == "Answer\n\nmore"
