"""The official `openai` Python package against a running swarm's API."""

import json
import urllib.error
import urllib.request

import openai
import pytest

from conftest import API_KEY

QUESTION = "Name three colors of the rainbow."


def client(swarm, key=API_KEY):
    return openai.OpenAI(base_url=swarm.url + "/v1", api_key=key, max_retries=0, timeout=300)


def model_id(swarm):
    return client(swarm).models.list().data[0].id


def test_models_lists_the_served_model(swarm):
    models = client(swarm).models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert models[0].owned_by == "allmende"


def test_greedy_chat_equals_the_cli(swarm):
    reply = client(swarm).chat.completions.create(
        model=model_id(swarm),
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=24,
    )
    cli = swarm.cli("generate", "--local", "--chat", "--prompt", QUESTION,
                    "--temperature", "0", "--max-tokens", "24", "--json")
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == cli["text"]
    assert choice.finish_reason == {"stop": "stop", "length": "length"}[cli["finish_reason"]]
    assert reply.usage.prompt_tokens == len(cli["prompt_token_ids"])
    assert reply.usage.completion_tokens == len(cli["token_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_chat_sends_the_same_text_in_chunks(swarm):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client(swarm).chat.completions.create(
        model=model_id(swarm), messages=messages, temperature=0, max_tokens=24)
    stream = client(swarm).chat.completions.create(
        model=model_id(swarm), messages=messages, temperature=0, max_tokens=24, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3, "text arrives in several chunks"
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_completions_honour_stop_and_seed(swarm):
    c = client(swarm)
    reply = c.completions.create(model=model_id(swarm), prompt="The capital of France is",
                                 temperature=0, max_tokens=20, stop=["\n"])
    assert reply.choices[0].text == " Paris."
    assert reply.choices[0].finish_reason == "stop"
    sampled = [c.completions.create(model=model_id(swarm), prompt="Open source software is",
                                    temperature=0.9, top_p=0.95, seed=7, max_tokens=12).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1], "the same seed gives the same text"


def raw_post(swarm, path, body, key=API_KEY):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    request = urllib.request.Request(swarm.url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(swarm):
    status, body = raw_post(swarm, "/v1/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"

    with pytest.raises(openai.NotFoundError) as e:
        client(swarm).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as e:
        client(swarm).completions.create(model=model_id(swarm), prompt="hi", max_tokens=100_000)
    assert e.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.AuthenticationError):
        client(swarm, key="wrong").models.list()
    status, body = raw_post(swarm, "/v1/completions", b'{"prompt": "hi"}', key=None)
    assert status == 401
    assert "API key" in body["error"]["message"]

    reply = client(swarm).completions.create(model=model_id(swarm), prompt="Hello",
                                             temperature=0, max_tokens=4)
    assert reply.usage.completion_tokens > 0


def test_metrics_count_what_was_served(swarm):
    client(swarm).completions.create(model=model_id(swarm), prompt="One", temperature=0, max_tokens=3)
    with urllib.request.urlopen(swarm.url + "/metrics") as response:
        text = response.read().decode()
    values = {line.split()[0]: float(line.split()[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["allmende_api_requests_total"] >= 1
    assert values["allmende_tokens_generated_total"] >= 3
    assert values["allmende_steps_total"] >= 3
    assert values["allmende_step_seconds_count"] == values["allmende_steps_total"]
    assert "allmende_busy_refusals_total" in values and "allmende_failovers_total" in values


def test_logprobs_in_openais_shapes_equal_the_clis(swarm):
    cli = swarm.cli("generate", "--local", "--chat", "--prompt", QUESTION, "--temperature", "0",
                    "--max-tokens", "8", "--json", "--logprobs", "3")
    reply = client(swarm).chat.completions.create(
        model=model_id(swarm), messages=[{"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == len(cli["token_ids"])
    for ours, theirs in zip(content, cli["logprobs"]):
        assert ours.logprob == pytest.approx(theirs["logprob"], abs=1e-6)
        assert [t.logprob for t in ours.top_logprobs] == \
            pytest.approx([t["logprob"] for t in theirs["top"]], abs=1e-6)
        assert ours.top_logprobs[0].logprob >= ours.top_logprobs[-1].logprob
    assert "".join(t.token for t in content) == reply.choices[0].message.content

    text = client(swarm).completions.create(
        model=model_id(swarm), prompt="The capital of France is", temperature=0,
        max_tokens=5, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == text.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0

    with pytest.raises(openai.BadRequestError):
        client(swarm).chat.completions.create(
            model=model_id(swarm), messages=[{"role": "user", "content": "x"}],
            logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError):
        client(swarm).chat.completions.create(
            model=model_id(swarm), messages=[{"role": "user", "content": "x"}],
            logprobs=False, top_logprobs=2)
    with pytest.raises(openai.BadRequestError):
        client(swarm).completions.create(model=model_id(swarm), prompt="x", logprobs=6)


def test_streamed_logprobs_equal_the_whole_responses(swarm):
    messages = [{"role": "user", "content": QUESTION}]
    ask = dict(model=model_id(swarm), messages=messages, temperature=0, max_tokens=12,
               logprobs=True, top_logprobs=3)
    whole = client(swarm).chat.completions.create(**ask).choices[0].logprobs.content
    chunks = list(client(swarm).chat.completions.create(**ask, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert len(streamed) == len(whole) == 12
    for ours, theirs in zip(streamed, whole):
        assert (ours.token, ours.logprob) == (theirs.token, theirs.logprob)
        assert [(t.token, t.logprob) for t in ours.top_logprobs] == \
            [(t.token, t.logprob) for t in theirs.top_logprobs]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(t.token for t in streamed) == text

    prompt = dict(model=model_id(swarm), prompt="The capital of France is", temperature=0,
                  max_tokens=6, logprobs=2)
    whole = client(swarm).completions.create(**prompt).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client(swarm).completions.create(**prompt, stream=True)
             if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [x for p in parts for x in p.token_logprobs] == whole.token_logprobs
    assert [x for p in parts for x in p.text_offset] == whole.text_offset


def test_concurrent_streams_beyond_the_gateways_limit_wait_their_turn(swarm):
    """32 streaming chats at once through a gateway that runs 4 at a time: the rest
    wait in its queue, and every one completes (none gets an error event or a 503)."""
    import concurrent.futures
    import time

    messages = [{"role": "user", "content": QUESTION}]
    model = model_id(swarm)

    def one(i):
        started = time.monotonic()
        stream = client(swarm).chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=8, seed=i, stream=True)
        first = None
        text = ""
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic() - started
                text += chunk.choices[0].delta.content
        return first, text

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    firsts = sorted(first for first, _ in results)
    assert all(first is not None and text for first, text in results)
    assert len({text for _, text in results}) == 1, "greedy: the same answer for all"
    print(f"time to first token over 32 streams: median {firsts[16]:.2f} s, "
          f"p99 {firsts[-1]:.2f} s")


def test_an_overlong_stop_sequence_is_refused(swarm):
    with pytest.raises(openai.BadRequestError) as refused:
        client(swarm).completions.create(
            model=model_id(swarm), prompt="Hello", max_tokens=4, stop=["x" * 257])
    assert "stop" in str(refused.value)
