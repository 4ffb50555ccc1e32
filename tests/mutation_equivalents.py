"""The mutants that survive tests/mutation_score.py because no test could tell them from the code: each with why.

Keyed by (module, function, the line as written, the line as mutated) — what `mutmut show` prints — so the
list survives renumbering when code moves. A mutant that a test *could* catch does not belong here: write the test.
"""

EQUIVALENT: dict[tuple[str, str, str, str], str] = {
    # model
    ("model", "GroupedQueryAttention.attention_probs",
     "scores = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # (B, K, G·T, S), fp32",
     "scores = (q.float() @ k.float().transpose(+2, -1)) * self.scale  # (B, K, G·T, S), fp32"):
        "k is always 4-D (B, K, S, hd), so dimension 2 is dimension -2.",
    ("model", "GroupedQueryAttention.attention_probs",
     "if T > 1:  # (B, 1, T, S) → (B, 1, G·T, S); one query's (B, 1, 1, S) row broadcasts as it is",
     "if T >= 1:  # (B, 1, T, S) → (B, 1, G·T, S); one query's (B, 1, 1, S) row broadcasts as it is"):
        "for one query, expanding and reshaping the (B, 1, 1, S) mask to (B, 1, G, S) gives exactly what broadcasting "
        "it gives.",
    ("model", "GroupedQueryAttention.__init__",
     "self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)",
     "self.q_proj = nn.Linear(d, self.num_heads * hd, bias=None)"):
        "nn.Linear only asks `if bias:`, and None is as false as False: no bias either way.",
    ("model", "GroupedQueryAttention.__init__",
     "self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)",
     "self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=None)"):
        "nn.Linear only asks `if bias:`, and None is as false as False: no bias either way.",
    ("model", "GroupedQueryAttention.__init__",
     "self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)",
     "self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=None)"):
        "nn.Linear only asks `if bias:`, and None is as false as False: no bias either way.",
    ("model", "GroupedQueryAttention.__init__",
     "self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)",
     "self.o_proj = nn.Linear(self.num_heads * hd, d, bias=None)"):
        "nn.Linear only asks `if bias:`, and None is as false as False: no bias either way.",
    ("model", "FeedForward.__init__",
     "self.gate_proj = nn.Linear(d, f, bias=False)",
     "self.gate_proj = nn.Linear(d, f, bias=None)"):
        "nn.Linear only asks `if bias:`, and None is as false as False: no bias either way.",
    ("model", "FeedForward.__init__",
     "self.up_proj = nn.Linear(d, f, bias=False)",
     "self.up_proj = nn.Linear(d, f, bias=None)"):
        "nn.Linear only asks `if bias:`, and None is as false as False: no bias either way.",
    ("model", "FeedForward.__init__",
     "self.down_proj = nn.Linear(f, d, bias=False)",
     "self.down_proj = nn.Linear(f, d, bias=None)"):
        "nn.Linear only asks `if bias:`, and None is as false as False: no bias either way.",
    ("model", "Gemma3Model.forward",
     "x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(x.dtype)",
     "x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=None).to(x.dtype)"):
        "under torch's default fp32 the same tensor; under a float64 default, sqrt(d) rounded through fp32 to the "
        "activation dtype and rounded to it directly are equal for every width d ≤ 20 000 in fp32, bf16 and fp16 "
        "(checked), Gemma 3's 640 to 5 376 among them.",
    ("model", "Gemma3Model.forward",
     "x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(x.dtype)",
     "x = x * torch.tensor(math.sqrt(self.config.hidden_size), ).to(x.dtype)"):
        "under torch's default fp32 the same tensor; under a float64 default, sqrt(d) rounded through fp32 to the "
        "activation dtype and rounded to it directly are equal for every width d ≤ 20 000 in fp32, bf16 and fp16 "
        "(checked), Gemma 3's 640 to 5 376 among them.",
    ("model", "Gemma3Model.forward",
     "and bool((positions == torch.arange(T, device=positions.device)).all())):",
     "and bool((positions == torch.arange(T, device=None)).all())):"):
        "the tests run on one device, where a tensor made on the default device is on positions' device; on CUDA the "
        "mutant compares a CUDA tensor with a CPU one and raises, which tests/test_cuda.py runs into (skipped without "
        "a GPU).",
    ("model", "Gemma3Model.forward",
     "and bool((positions == torch.arange(T, device=positions.device)).all())):",
     "and bool((positions == torch.arange(T, )).all())):"):
        "the tests run on one device, where a tensor made on the default device is on positions' device; on CUDA the "
        "mutant compares a CUDA tensor with a CPU one and raises, which tests/test_cuda.py runs into (skipped without "
        "a GPU).",
    # sampling
    ("sampling", "apply_repetition_penalty",
     "vocab = logits.shape[-1]",
     "vocab = logits.shape[+1]"):
        "logits are (B, V) as documented, so shape[+1] is shape[-1].",
    ("sampling", "apply_repetition_penalty",
     "ids = torch.where((prev_ids >= 0) & (prev_ids < vocab), prev_ids, vocab)  # (B, T)",
     "ids = torch.where((prev_ids >= 0) & (prev_ids <= vocab), prev_ids, vocab)  # (B, T)"):
        "an id equal to V is sent to column V either way (where() picks prev_ids == vocab or the fallback vocab).",
    ("sampling", "apply_repetition_penalty",
     "padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)",
     "padded = torch.nn.functional.pad(logits, (0, 2))  # (B, V + 1)"):
        "the extra padding columns are cut off again by [:, :vocab], so a second one changes nothing.",
    ("sampling", "apply_repetition_penalty",
     "seen = torch.where(seen < 0, seen * penalty, seen / penalty)",
     "seen = torch.where(seen <= 0, seen * penalty, seen / penalty)"):
        "a zero logit is 0 whether multiplied or divided by the penalty (and -0.0 stays -0.0).",
    ("sampling", "apply_top_k",
     "if k == 0 or k >= logits.shape[-1]:",
     "if k == 0 or k >= logits.shape[+1]:"):
        "logits are (B, V) as documented, so shape[+1] is shape[-1].",
    ("sampling", "apply_top_k",
     "kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)",
     "kth = torch.topk(logits, k, ).values[:, -1:]  # (B, 1)"):
        "torch.topk's default dim is -1.",
    ("sampling", "apply_top_k",
     "kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)",
     "kth = torch.topk(logits, k, dim=+1).values[:, -1:]  # (B, 1)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "apply_top_p",
     "sorted_logits, order = torch.sort(logits, dim=-1, descending=False)",
     "sorted_logits, order = torch.sort(logits, descending=False)"):
        "torch.sort's default dim is -1.",
    ("sampling", "apply_top_p",
     "sorted_logits, order = torch.sort(logits, dim=-1, descending=False)",
     "sorted_logits, order = torch.sort(logits, dim=-1, )"):
        "torch.sort's default is descending=False.",
    ("sampling", "apply_top_p",
     "sorted_logits, order = torch.sort(logits, dim=-1, descending=False)",
     "sorted_logits, order = torch.sort(logits, dim=+1, descending=False)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "apply_top_p",
     "cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)",
     "cumulative = sorted_logits.softmax(dim=+1).cumsum(dim=-1)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "apply_top_p",
     "cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)",
     "cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=+1)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "apply_min_p",
     "probs = logits.softmax(dim=-1)",
     "probs = logits.softmax(dim=+1)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "apply_min_p",
     "threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)",
     "threshold = min_p * probs.amax(dim=+1, keepdim=True)  # (B, 1)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "apply_min_p",
     "drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)",
     "drop.scatter_(1, probs.argmax(dim=+1, keepdim=True), False)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "greedy",
     "def greedy(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:",
     "def greedy(logits: torch.Tensor, block: int = 1025) -> torch.Tensor:"):
        "the blocked argmax gives argmax's index for any block that divides V (and falls back to argmax otherwise): "
        "the block size changes only the speed.",
    ("sampling", "greedy",
     "if V % block or V < 16 * block:",
     "if V / block or V < 16 * block:"):
        "V / block is always truthy, so every call takes the plain argmax: the same index, only slower.",
    ("sampling", "greedy",
     "if V % block or V < 16 * block:",
     "if V % block or V <= 16 * block:"):
        "it only moves the V at which the blocked argmax takes over; both paths give argmax's index.",
    ("sampling", "greedy",
     "if V % block or V < 16 * block:",
     "if V % block or V < 16 / block:"):
        "it only moves the V at which the blocked argmax takes over; both paths give argmax's index.",
    ("sampling", "greedy",
     "if V % block or V < 16 * block:",
     "if V % block or V < 17 * block:"):
        "it only moves the V at which the blocked argmax takes over; both paths give argmax's index.",
    ("sampling", "greedy",
     "return logits.argmax(dim=-1)",
     "return logits.argmax(dim=+1)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "greedy",
     "first = blocks.amax(dim=-1).argmax(dim=-1)  # (B,) the first block holding the max; amax keeps NaN",
     "first = blocks.amax(dim=-1).argmax(dim=+1)  # (B,) the first block holding the max; amax keeps NaN"):
        "blocks.amax(dim=-1) is (B, V // block), 2-D, so argmax(dim=+1) is argmax(dim=-1).",
    ("sampling", "greedy",
     "inside = blocks[torch.arange(B, device=logits.device), first].argmax(dim=-1)",
     "inside = blocks[torch.arange(B, device=None), first].argmax(dim=-1)"):
        "on the CPU the mutation run uses, device=None is the logits' device; only a CUDA run could tell "
        "(test_tokens_stay_on_the_logits_device, skipped without a GPU).",
    ("sampling", "greedy",
     "inside = blocks[torch.arange(B, device=logits.device), first].argmax(dim=-1)",
     "inside = blocks[torch.arange(B, ), first].argmax(dim=-1)"):
        "on the CPU the mutation run uses, the default device is the logits' device; only a CUDA run could tell "
        "(test_tokens_stay_on_the_logits_device, skipped without a GPU).",
    ("sampling", "greedy",
     "inside = blocks[torch.arange(B, device=logits.device), first].argmax(dim=-1)",
     "inside = blocks[torch.arange(B, device=logits.device), first].argmax(dim=+1)"):
        "blocks[rows, first] is (B, block), 2-D, so argmax(dim=+1) is argmax(dim=-1).",
    ("sampling", "sample",
     "probs = logits.softmax(dim=-1)",
     "probs = logits.softmax(dim=+1)"):
        "logits are (B, V) as documented (2-D), so softmax(dim=+1) is softmax(dim=-1).",
    ("sampling", "mask_padding",
     "if vocab is not None and logits.shape[-1] > vocab:",
     "if vocab is not None and logits.shape[-1] >= vocab:"):
        "when V == vocab the slice [..., vocab:] is empty, so filling it changes nothing.",
    ("sampling", "next_token",
     "if params.greedy or not 0 < params.top_k <= TOP_K_CANDIDATES or params.top_k >= logits.shape[-1]:",
     "if params.greedy or not 0 < params.top_k <= TOP_K_CANDIDATES or params.top_k > logits.shape[-1]:"):
        "with top_k == V the candidate path keeps all V ids (every logit >= the smallest) and draws over the same V "
        "logits in id order as the full path.",
    ("sampling", "next_token",
     "if params.greedy or not 0 < params.top_k <= TOP_K_CANDIDATES or params.top_k >= logits.shape[-1]:",
     "if params.greedy or not 0 < params.top_k <= TOP_K_CANDIDATES or params.top_k >= logits.shape[+1]:"):
        "logits are (B, V) as documented, so shape[+1] is shape[-1].",
    ("sampling", "next_token",
     "kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)",
     "kth = torch.topk(logits, params.top_k, ).values[:, -1:]  # (B, 1)"):
        "torch.topk's default dim is -1.",
    ("sampling", "next_token",
     "kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)",
     "kth = torch.topk(logits, params.top_k, dim=+1).values[:, -1:]  # (B, 1)"):
        "logits here are (B, V) as documented (2-D), so dim=+1 is dim=-1.",
    ("sampling", "next_token",
     "tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)",
     "tokens = torch.empty(logits.shape[0], dtype=torch.long, device=None)"):
        "on the CPU the mutation run uses, device=None is the logits' device; only a CUDA run could tell "
        "(test_tokens_stay_on_the_logits_device, skipped without a GPU).",
    ("sampling", "next_token",
     "tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)",
     "tokens = torch.empty(logits.shape[0], dtype=torch.long, )"):
        "on the CPU the mutation run uses, the default device is the logits' device; only a CUDA run could tell "
        "(test_tokens_stay_on_the_logits_device, skipped without a GPU).",
    ("sampling", "next_token",
     "keep &= logits[row] > -math.inf",
     "keep = logits[row] > -math.inf"):
        "the line runs only when the k-th value is -inf, where keep (logits >= -inf) is all True, so assigning equals "
        "and-ing.",
    # streaming
    ("streaming", "TextStreamer.__init__",
     "self._prefix = 0",
     "self._prefix = None"):
        "None as a slice start is 0, and push() replaces _prefix with an int the first time it releases text.",
    # kv_cache
    ("kv_cache", "KVCache.__init__",
     "self.global_pos = torch.full((batch_size, max_seq_len), -1, dtype=torch.long, device=device)",
     "self.global_pos = torch.full((batch_size, max_seq_len), -1, dtype=None, device=device)"):
        "torch.full infers int64 from the integer fill -1, so the dtype is torch.long either way.",
    ("kv_cache", "KVCache.__init__",
     "self.global_pos = torch.full((batch_size, max_seq_len), -1, dtype=torch.long, device=device)",
     "self.global_pos = torch.full((batch_size, max_seq_len), -1, device=device)"):
        "torch.full infers int64 from the integer fill -1, so the dtype is torch.long either way.",
    ("kv_cache", "KVCache.__init__",
     "self.ring_pos = torch.full((batch_size, self.ring_size), -1, dtype=torch.long, device=device)",
     "self.ring_pos = torch.full((batch_size, self.ring_size), -1, dtype=None, device=device)"):
        "torch.full infers int64 from the integer fill -1, so the dtype is torch.long either way.",
    ("kv_cache", "KVCache.__init__",
     "self.ring_pos = torch.full((batch_size, self.ring_size), -1, dtype=torch.long, device=device)",
     "self.ring_pos = torch.full((batch_size, self.ring_size), -1, device=device)"):
        "torch.full infers int64 from the integer fill -1, so the dtype is torch.long either way.",
    ("kv_cache", "KVCache.__init__",
     "self.last_pos = torch.full((batch_size,), -1, dtype=torch.long, device=device)",
     "self.last_pos = torch.full((batch_size,), -1, dtype=None, device=device)"):
        "torch.full infers int64 from the integer fill -1, so the dtype is torch.long either way.",
    ("kv_cache", "KVCache.__init__",
     "self.last_pos = torch.full((batch_size,), -1, dtype=torch.long, device=device)",
     "self.last_pos = torch.full((batch_size,), -1, device=device)"):
        "torch.full infers int64 from the integer fill -1, so the dtype is torch.long either way.",
    ("kv_cache", "KVCache.begin",
     "positions = positions.to(self.global_pos.device)",
     "positions = positions.to(None)"):
        "on the CPU the mutation run uses, positions already live on the cache's device "
        "(test_a_cache_on_the_gpu_takes_positions_built_on_the_cpu tells them apart on CUDA).",
    ("kv_cache", "KVCache._ring_slots",
     "return torch.arange(first, start + T, device=self.ring_pos.device) % self.ring_size",
     "return torch.arange(first, start + T, device=None) % self.ring_size"):
        "the slots only index the ring buffers, and CPU index tensors index tensors on any device, so only where the "
        "arange lives changes.",
    ("kv_cache", "KVCache._ring_slots",
     "return torch.arange(first, start + T, device=self.ring_pos.device) % self.ring_size",
     "return torch.arange(first, start + T, ) % self.ring_size"):
        "the slots only index the ring buffers, and CPU index tensors index tensors on any device, so only where the "
        "arange lives changes.",
    ("kv_cache", "_widened",
     "return t if t.dtype == dtype else t.to(dtype)",
     "return t if (t.dtype == dtype) and False else t.to(dtype)"):
        "Tensor.to with the tensor's own dtype returns the tensor itself, so both branches return the same object.",
    ("kv_cache", "SlotKVCache.begin",
     "positions = positions.to(c.global_pos.device)",
     "positions = positions.to(None)"):
        "on the CPU the mutation run uses, positions already live on the cache's device "
        "(test_a_cache_on_the_gpu_takes_positions_built_on_the_cpu tells them apart on CUDA).",
    ("kv_cache", "SlotKVCache.begin",
     "rows_t = torch.tensor(rows, device=c.global_pos.device)",
     "rows_t = torch.tensor(rows, device=None)"):
        "rows_t is only used as an index, and CPU index tensors index tensors on any device.",
    ("kv_cache", "SlotKVCache.begin",
     "rows_t = torch.tensor(rows, device=c.global_pos.device)",
     "rows_t = torch.tensor(rows, )"):
        "rows_t is only used as an index, and CPU index tensors index tensors on any device.",
    ("kv_cache", "SlotKVCache.begin",
     "slot_t = torch.tensor([self.lengths[r] for r in rows], device=c.global_pos.device)",
     "slot_t = torch.tensor([self.lengths[r] for r in rows], device=None)"):
        "slot_t is only used as an index (also as slot_t % W), and CPU index tensors index tensors on any device.",
    ("kv_cache", "SlotKVCache.begin",
     "slot_t = torch.tensor([self.lengths[r] for r in rows], device=c.global_pos.device)",
     "slot_t = torch.tensor([self.lengths[r] for r in rows], )"):
        "slot_t is only used as an index (also as slot_t % W), and CPU index tensors index tensors on any device.",
    ("kv_cache", "DecodeStep.__init__",
     "self.start = 0  # read by the model only for chunks (T > 1)",
     "self.start = None  # read by the model only for chunks (T > 1)"):
        "SlotKVCache.begin only makes one-token steps, and the model reads step.start only when T > 1, so nothing "
        "ever reads it.",
    ("kv_cache", "DecodeStep.__init__",
     "self.start = 0  # read by the model only for chunks (T > 1)",
     "self.start = 1  # read by the model only for chunks (T > 1)"):
        "SlotKVCache.begin only makes one-token steps, and the model reads step.start only when T > 1, so nothing "
        "ever reads it.",
    # chat
    ("chat", "_render_function_gemma",
     'previous = None  # what the last message ended with: "content", "tool_call" or "tool_response"',
     'previous = ""  # what the last message ended with: "content", "tool_call" or "tool_response"'):
        '`previous` is only ever compared with "tool_call" and "tool_response", which "" matches no more than None '
        "does.",
    ("chat", "_render_function_gemma",
     "previous = None",
     'previous = ""'):
        '`previous` is only ever compared with "tool_call" and "tool_response", which "" matches no more than None '
        "does.",
    ("chat", "_render_function_gemma",
     'previous = "content"',
     "previous = None"):
        '`previous` is only ever compared with "tool_call" and "tool_response": after a message\'s text any other '
        "value, None included, gives the same output.",
    ("chat", "_render_function_gemma",
     'previous = "content"',
     'previous = "XXcontentXX"'):
        '`previous` is only ever compared with "tool_call" and "tool_response": after a message\'s text any other '
        "value gives the same output.",
    ("chat", "_render_function_gemma",
     'previous = "content"',
     'previous = "CONTENT"'):
        '`previous` is only ever compared with "tool_call" and "tool_response": after a message\'s text any other '
        "value gives the same output.",
    ("chat", "_TemplateProcess._start",
     "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)",
     "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, )"):
        "close_fds=True is Popen's default on POSIX, so leaving it out changes nothing.",
    ("chat", "_TemplateProcess._ask",
     'data = json.dumps(request, ensure_ascii=False).encode("utf-8")',
     'data = json.dumps(request, ensure_ascii=None).encode("utf-8")'):
        "json.dumps only tests ensure_ascii for truth, and None is false like False.",
    ("chat", "_TemplateProcess._ask",
     'data = json.dumps(request, ensure_ascii=False).encode("utf-8")',
     'data = json.dumps(request, ensure_ascii=False).encode("UTF-8")'):
        '"UTF-8" and "utf-8" name the same codec.',
    ("chat", "_TemplateProcess._receive",
     'return json.loads(self._read_exactly(n, deadline).decode("utf-8"))',
     'return json.loads(self._read_exactly(n, deadline).decode("UTF-8"))'):
        '"UTF-8" and "utf-8" name the same codec.',
    ("chat", "_TemplateProcess._read_exactly",
     "if left <= 0 or not select.select([fd], [], [], left)[0]:",
     "if left < 0 or not select.select([fd], [], [], left)[0]:"):
        "the two differ only when the time left is exactly 0.0, a float difference of two monotonic readings that no "
        "test can arrange.",
    ("chat", "_TemplateProcess._read_exactly",
     "chunk = os.read(fd, min(n - len(out), 1 << 20))",
     "chunk = os.read(fd, min(n - len(out), 2 << 20))"):
        "only the largest single read changes; it still never reads past the reply's length, so the bytes read are "
        "the same.",
    ("chat", "_TemplateProcess._read_exactly",
     "chunk = os.read(fd, min(n - len(out), 1 << 20))",
     "chunk = os.read(fd, min(n - len(out), 1 << 21))"):
        "only the largest single read changes; it still never reads past the reply's length, so the bytes read are "
        "the same.",
    # files
    ("files", "decode_utf8",
     'return data.decode("utf-8")',
     'return data.decode("UTF-8")'):
        "Python's codec names are case-insensitive: both name the same codec.",
    ("files", "decode_utf8",
     'line = data.count(b"\\n", 0, e.start) + 1',
     'line = data.count(b"\\n", None, e.start) + 1'):
        "bytes.count takes a start of None as 0, the start of the data.",
    ("files", "check_text",
     'text.encode("utf-8")',
     'text.encode("UTF-8")'):
        "Python's codec names are case-insensitive: both name the same codec.",
}
