"""Fine-tuning data in the format TRL and OpenAI fine-tuning take: `{"messages", "tools"}` records with assistant
tool calls and tool results, and `{"prompt", "completion"}` pairs. What must hold: the training tokens are the
server's prompt token for token; the loss mask is exactly what the model writes; a packed conversation has the
loss it has alone; the head computed only at loss positions is the full head's loss and gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gemma3.text.tokenizer import Tokenizer
from gemma3.train.data import IGNORE_INDEX, DataError, PackedDataset, TokenFile, collate, tokenize_chat
from test_train_support import tiny_config, tiny_tokenizer_file

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "description": "Set an alarm.",
    "parameters": {"type": "object", "properties": {"hour": {"type": "integer"}, "minute": {"type": "integer"}},
                   "required": ["hour", "minute"]}}}
TOOLS = [WEATHER, ALARM]
SYSTEM = {"role": "developer", "content": "You are a model that can do function calling with the following functions"}


def _call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


# A call, its result and the answer; then a second user turn answered with two parallel calls and their results.
LOOP = [SYSTEM, {"role": "user", "content": "Weather in Paris, in celsius?"},
        {"role": "assistant", "tool_calls": [_call("c1", "get_weather", {"city": "Paris", "unit": "celsius"})]},
        {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temperature": 21, "sky": "clear"})},
        {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
        {"role": "user", "content": "Now London, and wake me at 6:30."},
        {"role": "assistant", "tool_calls": [_call("c2", "get_weather", {"city": "London"}),
                                             _call("c3", "set_alarm", {"hour": 6, "minute": 30})]},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "tool", "tool_call_id": "c3", "content": "done"},
        {"role": "assistant", "content": "Rain in London; alarm set for 6:30."}]
# tools declared, but the right answer is text
NO_CALL = [SYSTEM, {"role": "user", "content": "Tell me a joke."},
           {"role": "assistant", "content": "Why did the tomato blush? It saw the salad dressing."}]
# a call that ends the conversation: the model's part ends where the server stops it
LAST_CALL = [SYSTEM, {"role": "user", "content": "Alarm at 7"},
             {"role": "assistant", "tool_calls": [_call("c9", "set_alarm", {"hour": 7, "minute": 0})]}]


@pytest.fixture(scope="module")
def official(official_tokenizer):
    return Tokenizer.from_file(official_tokenizer / "tokenizer.json")


def _targets(tok, ids, mask) -> list[str]:
    ids, mask = np.array(ids), np.array(mask, dtype=int)
    cuts = np.flatnonzero(np.diff(mask)) + 1
    return [tok.decode(s.tolist()) for s, m in zip(np.split(ids, cuts), np.split(mask, cuts)) if m[0]]


def test_the_loss_mask_is_exactly_what_the_model_writes(official):
    ids, mask = tokenize_chat(LOOP, official, tools=TOOLS)
    assert _targets(official, ids, mask) == [
        "<start_function_call>call:get_weather{city:<escape>Paris<escape>,unit:<escape>celsius<escape>}"
        "<end_function_call><start_function_response>",
        "It is 21 °C and clear in Paris.<end_of_turn>",
        "<start_function_call>call:get_weather{city:<escape>London<escape>}<end_function_call>"
        "<start_function_call>call:set_alarm{hour:6,minute:30}<end_function_call><start_function_response>",
        "Rain in London; alarm set for 6:30.<end_of_turn>"]
    text = official.decode(ids)
    # declarations, the user's turns and the tool results are in the sequence and never targets
    untargeted = official.decode([i for i, m in zip(ids, mask) if not m])
    for piece in ("<start_function_declaration>declaration:get_weather", "Weather in Paris",
                  "response:get_weather{sky:<escape>clear<escape>,temperature:21}", "response:set_alarm{value:"):
        assert piece in text and piece in untargeted
    ids, mask = tokenize_chat(NO_CALL, official, tools=TOOLS)
    assert _targets(official, ids, mask) == ["Why did the tomato blush? It saw the salad dressing.<end_of_turn>"]
    ids, mask = tokenize_chat(LAST_CALL, official, tools=TOOLS)
    assert _targets(official, ids, mask) == ["<start_function_call>call:set_alarm{hour:7,minute:0}<end_function_call>"
                                             "<start_function_response>"]
    assert mask[-1] == 1  # nothing after the call: the conversation ends where the server stops the model


@pytest.fixture(scope="module")
def server_client(tiny_hf_dir):
    pytest.importorskip("starlette")
    pytest.importorskip("llguidance")
    from starlette.testclient import TestClient

    from gemma3.loading import load
    from gemma3.serve.app import ServerConfig, create_app
    from gemma3.serve.scheduler import Scheduler

    model, tokenizer, _ = load(tiny_hf_dir, progress=False)
    scheduler = Scheduler(model, tokenizer, max_batch=1, context=64).start()
    with TestClient(create_app(scheduler, ServerConfig(model_name="tiny"))) as client:
        yield client, tokenizer
    scheduler.close()


@pytest.mark.parametrize("messages", [LOOP, NO_CALL, LAST_CALL], ids=["loop", "no-call", "last-call"])
def test_every_training_prompt_is_the_servers_prompt_token_for_token(server_client, messages):
    client, tok = server_client
    ids, mask = tokenize_chat(messages, tok, tools=TOOLS)
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == len(turns)
    for start, turn in zip(starts, turns):
        r = client.post("/apply-template", json={"model": "tiny", "messages": messages[:turn], "tools": TOOLS})
        assert r.status_code == 200, r.text
        server = client.post("/tokenize", json={"content": r.json()["prompt"], "add_special": False})
        assert server.status_code == 200, server.text
        assert server.json()["tokens"] == ids[:start], f"before assistant message {turn}"


def test_tool_records_and_prompt_completion_pairs_from_jsonl(tmp_path, official):
    data = tmp_path / "tools.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"messages": LOOP, "tools": TOOLS}, {"messages": NO_CALL, "tools": TOOLS},
        {"prompt": LAST_CALL[:2], "completion": LAST_CALL[2:], "tools": TOOLS}]) + "\n", encoding="utf-8")
    tf = TokenFile.build([str(data)], official, tmp_path / "cache", progress=False)
    assert tf.kind == "chat" and tf.num_docs == 3
    for d, (messages, tools) in enumerate([(LOOP, TOOLS), (NO_CALL, TOOLS), (LAST_CALL, TOOLS)]):
        s, e = tf.offsets[d], tf.offsets[d + 1]
        ids, mask = tokenize_chat(messages, official, tools=tools)
        assert tf.tokens[s:e].tolist() == ids and tf.mask[s:e].tolist() == mask

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Translate to French: cat ->", "completion": " chat"}) + "\n",
                     encoding="utf-8")
    tf = TokenFile.build([str(pairs)], official, tmp_path / "cache", progress=False)
    assert tf.kind == "chat"  # masked, packed whole
    ids, mask = tf.tokens[:].tolist(), tf.mask[:].tolist()
    assert ids == official.encode("Translate to French: cat ->") + official.encode(" chat", add_bos=False) + [official.eos_id]
    assert _targets(official, ids, mask) == [" chat<eos>"]


@pytest.mark.parametrize("record, message", [
    ({"messages": NO_CALL, "tools": {"a": 1}}, "'tools' must be a list"),
    ({"text": "hi", "tools": TOOLS}, "'tools' must be a list of tool declarations beside"),
    ({"messages": NO_CALL, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"messages": [SYSTEM, {"role": "user", "content": "hi"}], "tools": TOOLS}, "no assistant message"),
    ({"messages": [SYSTEM, {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        _call("c1", "get_weather", {"city": "x"})]}, {"role": "tool", "tool_call_id": "zz", "content": "1"}],
      "tools": TOOLS}, "zz"),
    ({"messages": [SYSTEM, {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}],
      "tools": TOOLS}, "JSON"),
    ({"prompt": "a"}, "'prompt' and 'completion' must both be"),
    ({"prompt": "a", "completion": ""}, "'completion' is empty"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]},
     "role assistant or tool"),
])
def test_a_bad_record_is_an_error_naming_file_and_line(tmp_path, official, record, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": NO_CALL, "tools": TOOLS}) + "\n" + json.dumps(record) + "\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: ") as e:
        TokenFile.build([str(data)], official, tmp_path / "cache", progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- packing and the head

def _tiny_model():
    from gemma3.model import Gemma3Model

    torch.manual_seed(0)
    model = Gemma3Model(tiny_config())
    model.init_weights(torch.Generator().manual_seed(0))
    return model.float()


@pytest.mark.parametrize("packed_attention", [False, True], ids=["mask", "document-by-document"])
def test_a_packed_conversation_has_the_loss_it_has_alone(tmp_path, packed_attention):
    """Positions restart at 0 for each packed conversation and the model reads the restart as a document
    boundary: each conversation's summed loss equals its loss alone (fp32, 1e-5), and padding changes nothing."""
    tok = Tokenizer.from_file(tiny_tokenizer_file(tmp_path))
    data = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"Q{i}{'?' * i}"},
              {"role": "assistant", "content": f"A{i}{'!' * (i % 3)}"}] for i in range(5)]
    data.write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n", encoding="utf-8")
    tf = TokenFile.build([str(data)], tok, tmp_path / "cache", progress=False)
    ds = PackedDataset(tf, np.arange(5), seq_len=256)
    assert len(ds) == 1 and len(ds.bins[0]) == 5  # all five in one sequence, then padding
    model = _tiny_model()
    if packed_attention:
        from gemma3.train.attention import use_training_attention

        use_training_attention(model)
    batch = collate(ds, [0])
    assert batch.positions[0, 0] == 0 and (batch.positions[0] == 0).sum() == 5 and batch.positions[0, -1] == -1
    with torch.no_grad():
        out = model(batch.input_ids, positions=batch.positions, labels=batch.labels)
    n_packed = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    alone_sum, n_alone = 0.0, 0
    for d in range(5):
        s, e = tf.offsets[d], tf.offsets[d + 1]
        ids = torch.from_numpy(tf.tokens[s:e].astype(np.int64))[None]
        labels = torch.where(torch.from_numpy(tf.mask[s:e].astype(bool))[None], ids, IGNORE_INDEX)
        with torch.no_grad():
            loss = model(ids, labels=labels).loss
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        alone_sum, n_alone = alone_sum + float(loss) * n, n_alone + n
    assert n_packed == n_alone
    assert float(out.loss) == pytest.approx(alone_sum / n_alone, rel=1e-5, abs=1e-6)
    # without the restarts (one long document) the conversations see each other and the loss moves
    with torch.no_grad():
        crossed = model(batch.input_ids, labels=batch.labels).loss
    assert abs(float(crossed) - float(out.loss)) > 1e-3


def test_the_head_only_at_loss_positions_is_the_full_heads_loss_and_gradients():
    """The trainer's loss head (train/loss.py) computes logits only where a target is; the full head computes
    them everywhere and lets cross_entropy ignore -100. Same loss and gradients, fp32, 1e-6 relative."""
    from gemma3.train.loss import ChunkedLinearCrossEntropy

    g = torch.Generator().manual_seed(3)
    V, d, N = 300, 24, 50
    h = torch.randn(N, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.7] = IGNORE_INDEX  # most positions carry no loss, as in chat SFT
    cap = 30.0
    logits = torch.tanh((h @ w.t()) / cap) * cap
    full = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    gh_full, gw_full = torch.autograd.grad(full, (h, w))
    keep = targets != IGNORE_INDEX
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ours = ChunkedLinearCrossEntropy.apply(h2[keep], w2, targets[keep], 7, cap)
    gh, gw = torch.autograd.grad(ours, (h2, w2))
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh, gh_full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, gw_full, rtol=1e-6, atol=1e-7)
    assert bool((gh[~keep] == 0).all())  # positions without a target get no gradient


def test_the_fused_heads_weight_gradient_follows_the_incoming_gradient_and_is_given_once():
    """The head's weight gradient is computed in forward and scaled in place in backward (no second (V, d) table
    at the step's peak): a scaled loss scales it, a target-free batch gives zeros, and a second backward through
    the same loss is refused rather than scaled twice."""
    from gemma3.train.loss import ChunkedLinearCrossEntropy

    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(9, 6, generator=g), torch.randn(40, 6, generator=g)
    targets = torch.randint(0, 40, (9,), generator=g)
    grads = []
    for scale in (1.0, 0.25):
        wi = w.clone().requires_grad_()
        (ChunkedLinearCrossEntropy.apply(h, wi, targets, 4, None) * scale).backward()
        grads.append(wi.grad)
    torch.testing.assert_close(grads[1], grads[0] * 0.25, rtol=1e-6, atol=0)
    wi = w.clone().requires_grad_()
    ChunkedLinearCrossEntropy.apply(h[:0], wi, targets[:0], 4, None).backward()
    assert wi.grad.shape == w.shape and not wi.grad.any()
    wi = w.clone().requires_grad_()
    loss = ChunkedLinearCrossEntropy.apply(h, wi, targets, 4, None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("window", [None, 6])
def test_packed_attention_is_the_masked_attention(window):
    """Document by document (train/attention.py) = the fused kernel over the whole mask: outputs and gradients,
    fp32, 1e-5 — with padding at the end, a document longer than the sliding window, and rows packed
    differently; positions it cannot read as documents fall back to the mask."""
    from gemma3.config import GLOBAL
    from gemma3.model import GroupedQueryAttention, PackedMask, attention_mask, packed_documents
    from gemma3.train.attention import TrainingAttention, document_spans

    cfg = tiny_config()
    torch.manual_seed(0)
    plain = GroupedQueryAttention(cfg)
    packed = GroupedQueryAttention(cfg)
    packed.load_state_dict(plain.state_dict())
    packed.__class__ = TrainingAttention
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 0, 1, -1, -1],
                              [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    assert document_spans(positions) == [[(0, 9), (9, 12), (12, 16)], [(0, 3), (3, 16)]]
    mask = attention_mask(positions, positions, window, packed_documents(positions))
    B, T, H, K, hd = 2, 16, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, hd, generator=g, requires_grad=True)
    k = torch.randn(B, K, T, hd, generator=g, requires_grad=True)
    v = torch.randn(B, K, T, hd, generator=g, requires_grad=True)
    want = plain.sdpa(q, k, v, mask)
    got = packed.sdpa(q, k, v, PackedMask(mask, positions, window))
    real = (positions >= 0)[:, None, :, None]
    torch.testing.assert_close(got * real, want * real, rtol=1e-5, atol=1e-6)
    grads_want = torch.autograd.grad((want * real).square().sum(), (q, k, v))
    grads_got = torch.autograd.grad((got * real).square().sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert document_spans(torch.tensor([[0, 1, 3, 0, 1]])) is False  # a gap inside a document
    assert document_spans(torch.tensor([[0, 1, -1, 2, 0]])) is False  # padding inside a document
    odd = torch.tensor([[0, 1, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    odd_mask = attention_mask(odd, odd, window, packed_documents(odd))
    torch.testing.assert_close(packed.sdpa(q, k, v, PackedMask(odd_mask, odd, window)), plain.sdpa(q, k, v, odd_mask))
