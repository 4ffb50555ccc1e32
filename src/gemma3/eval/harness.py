"""`gemma3` as a model of EleutherAI's lm-evaluation-harness: the evaluator litgpt, gpt-fast and MLX-LM plug
into, so a change to the model can be measured on the benchmarks people report.

    gemma3 lm-eval --model gemma3 --model_args pretrained=SOURCE,dtype=float32 --tasks hellaswag
    # or in Python:  import gemma3.eval.harness; lm_eval.simple_evaluate(model="gemma3", model_args=..., tasks=[...])

lm-eval (0.4.x) has no plugin entry point: a model exists for it once a module registering it is imported.
`gemma3 lm-eval ARGS` is lm-eval's own command line (every flag of `lm_eval run`) with this module imported.

The three request kinds, over our model and generator:

* `loglikelihood(context, continuation)` -> (sum of log p(continuation tokens), whether greedy decoding would
  have produced them). Scored in batches of right-padded rows; only the continuation's positions go through
  the 262k-wide output head, a few hundred at a time, so a long continuation never holds (T, V) logits.
* `loglikelihood_rolling(text)` -> log p(text), over lm-eval's own disjoint rolling windows of `max_length`.
* `generate_until(context, {until, max_gen_toks, do_sample, temperature, ...})` -> the text before the first
  stop string, through `gemma3.generation.generator.Generator` (batched, KV cache; greedy unless do_sample).

Tokenization follows lm-eval's `hf` backend exactly, so the two give the same numbers on the same weights
(tests/test_harness.py: within 1e-4 on a converted checkpoint): a context is encoded with <bos> (unless it
already starts with it), a continuation is what encoding context + continuation adds after the context (a
context's trailing spaces move to the continuation), an empty context is <bos> alone, and the rolling text is
encoded with <bos> and conditioned on a <bos> prefix (so its first scored token is that <bos>, as in `hf`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from gemma3.errors import Gemma3Error

HEAD_CHUNK = 256  # positions per pass through the output head: 256 x 262 144 fp32 logits = 256 MiB
AUTO_BATCH = 8  # what batch_size=auto means here (no search: a CPU has no out-of-memory error to probe for)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLING_KWARGS = {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"}


def _batch_size(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        return AUTO_BATCH
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise Gemma3Error(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise Gemma3Error(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return size


@register_model("gemma3")
class Gemma3LM(TemplateLM):
    """lm-eval model `gemma3`. model_args (all optional):

    pretrained   a model source as everywhere in gemma3 (.gguf, checkpoint or run directory, Hub id);
                 default the embedded Gemma 3 270M
    dtype        float32 | bfloat16 (default float32 on CPU, bfloat16 on CUDA; never float16)
    quantize     int8 | int4 (quantized at load), none (float weights), default: a quantized GGUF runs in its
                 own blocks, as `gemma3 generate` does
    lora         a LoRA adapter folded into the weights
    max_length   the tokens a request may use (default the model's max_position_embeddings, as `hf`)
    max_gen_toks default generation budget when a task gives none (256, as `hf`)
    threads      CPU threads (default torch's)
    """

    backend = "causal"

    def __init__(self, pretrained: str | None = None, dtype: str | None = None, quantize: str | None = "auto",
                 lora: str | None = None, device: str | None = None, batch_size: Any = 1,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 threads: int | None = None, add_bos_token: bool = True, progress: bool = True, **unknown: Any):
        super().__init__()
        if unknown:
            raise Gemma3Error(f"unknown gemma3 model_args: {', '.join(sorted(unknown))} (see gemma3.eval.harness.Gemma3LM)")
        from gemma3.generation.generator import Generator
        from gemma3.loading import check_quantize, load, resolve_device

        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise; its `hf` backend then runs on the CPU
            print(f"gemma3: --device {device}: CUDA is not available here, running on the CPU", file=sys.stderr)
            device = "cpu"
        device_ = resolve_device(device or "cpu")
        dtype = dtype or ("bfloat16" if device_.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise Gemma3Error(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        # lm-eval reads `quantize=none` as None: None means float weights, "auto" (the default) the file's own.
        quantize = {"auto": None, None: "none"}.get(quantize, quantize)
        if quantize not in (None, "none", "int8", "int4"):
            raise Gemma3Error(f"quantize must be none, int8 or int4, got {quantize!r}")
        check_quantize(quantize, device_)
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise Gemma3Error(f"threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        self._batch = _batch_size(batch_size)
        self.model, self.tokenizer, self.config = load(pretrained, dtype=DTYPES[dtype], device=device_,
                                                       progress=progress, lora=lora, quantize=quantize)
        if self.tokenizer is None:
            raise Gemma3Error(f"{pretrained}: has no tokenizer files")
        self.model.eval()
        self._device = device_
        self._max_length = int(max_length) if max_length else self.config.max_position_embeddings
        if not 2 <= self._max_length <= self.config.max_position_embeddings:
            raise Gemma3Error(f"max_length must be in [2, {self.config.max_position_embeddings}], got {max_length}")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise Gemma3Error(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = bool(add_bos_token)
        self.progress = progress
        # The generator reads the model as loaded (no packed copy swapped in), so scoring and generation use the
        # same modules, the exact ones for float weights.
        self.generator = Generator(self.model, self.tokenizer, pack_weights=False)

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.config.eos_token_id[0]  # <eos>: "end of text", what `hf` uses (the tokenizer's eos)

    @property
    def prefix_token_id(self) -> int:
        return self.config.bos_token_id  # the condition of an empty context (Gemma's attention sink)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and string.startswith("<bos>"):
            add_bos = False  # the text carries its own (a chat template's output)
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat (--apply_chat_template)
    @property
    def tokenizer_name(self) -> str:
        return f"gemma3-{self.config.vocab_size}"  # part of lm-eval's request-cache key

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "gemma3.text.chat.render_chat (Gemma 3 turns)" if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat_for_lm_eval(chat_history, add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _score_batch(self, rows: list[tuple[tuple[int, ...], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """rows: (input ids, continuations) -- score each continuation (n tokens) as the predictions of the last
        n input positions. Requests that differ only in their last token (a multiple-choice question with
        one-token answers) share one row: the forward pass is the same, only the target read off it differs."""
        T = max(len(x) for x, _ in rows)
        B = len(rows)
        ids = torch.full((B, T), self.config.pad_token_id, dtype=torch.long)
        real = torch.zeros(B, T, dtype=torch.bool)
        for r, (x, _) in enumerate(rows):  # right padding: a causal row never sees the pads after it
            ids[r, :len(x)] = torch.tensor(x)
            real[r, :len(x)] = True
        hidden = self._final_hidden(ids.to(self._device), None if bool(real.all()) else real.to(self._device))
        out = []
        for r, (x, continuations) in enumerate(rows):
            n, end = len(continuations[0]), len(x)
            targets = torch.tensor(continuations, device=self._device)  # (choices, n)
            logprob = torch.zeros(len(continuations), dtype=torch.float64)
            greedy = torch.ones(len(continuations), dtype=torch.bool)
            for s in range(end - n, end, HEAD_CHUNK):  # the continuation's positions only, a chunk at a time
                e = min(end, s + HEAD_CHUNK)
                logp = torch.log_softmax(self.model._head(hidden[r, s:e]).float(), dim=-1)
                t = targets[:, s - (end - n):e - (end - n)]
                logprob += logp.gather(-1, t.T).sum(0).double().cpu()
                greedy &= (logp.argmax(-1)[:, None] == t.T).all(0).cpu()
            out.append([(float(lp), bool(g)) for lp, g in zip(logprob, greedy)])
        return out

    def _final_hidden(self, ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """The final-norm hidden states (B, T, d): taken from the model's last norm by a hook, so the forward
        runs the output head on one position instead of all of them."""
        captured: list[torch.Tensor] = []
        handle = self.model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            self.model(ids, padding_mask=real, logits_to_keep=1)
        finally:
            handle.remove()
        return captured[0]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, override_bs: int | None = None
                              ) -> list[tuple[float, bool]]:
        shared: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (input ids, n) -> the requests reading it
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise Gemma3Error("a loglikelihood request has an empty continuation (nothing to score)")
            if len(continuation) > self.max_length:
                raise Gemma3Error(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                  f"{self.max_length}")
            full = (context + continuation)[-(self.max_length + 1):]  # left-truncated as `hf` does
            shared.setdefault((tuple(full[:-1]), len(continuation)), []).append(i)
        # Longest first (as `hf`: a batch's padding stays small and the slowest batch comes first).
        keys = sorted(shared, key=lambda k: (-len(k[0]), k))
        batch = override_bs or self.batch_size
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="gemma3 loglikelihood", disable=disable_tqdm or not self.progress,
                   file=sys.stderr)
        for start in range(0, len(keys), batch):
            chunk = keys[start:start + batch]
            rows = [(x, [requests[i][2][-n:] for i in shared[(x, n)]]) for x, n in chunk]
            for key, answers in zip(chunk, self._score_batch(rows)):
                for i, answer in zip(shared[key], answers):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(answers))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, target in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _generation_config(self, gen_kwargs: dict):
        from gemma3.generation.generator import GenerationConfig
        from gemma3.generation.sampling import SamplingParams

        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        unknown = set(kwargs) - SAMPLING_KWARGS
        if unknown:
            raise Gemma3Error(f"generation kwargs gemma3 does not take: {', '.join(sorted(unknown))}")
        seed = kwargs.pop("seed", None)
        if do_sample and temperature > 0:
            # HF's generate defaults where a task leaves a filter out: no top-k / top-p / min-p unless asked.
            sampling = SamplingParams(temperature=temperature, top_k=int(kwargs.get("top_k", 0)),
                                      top_p=float(kwargs.get("top_p", 1.0)), min_p=float(kwargs.get("min_p", 0.0)),
                                      repetition_penalty=float(kwargs.get("repetition_penalty", 1.0)))
        else:
            sampling = SamplingParams(temperature=0.0)
        config = GenerationConfig(max_new_tokens=max_gen_toks, sampling=sampling,
                                  stop_strings=tuple(s for s in until if s), seed=seed)
        return config, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            if not isinstance(gen_kwargs, dict):
                raise Gemma3Error(f"generation kwargs must be a mapping, got {type(gen_kwargs).__name__}")
            groups.setdefault(repr(sorted(gen_kwargs.items(), key=lambda kv: kv[0])), []).append(i)
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc="gemma3 generate_until", disable=disable_tqdm or not self.progress,
                   file=sys.stderr)
        for indices in groups.values():
            config, until = self._generation_config(args[indices[0]][1])
            budget = self.max_length - config.max_new_tokens
            if budget < 1:
                raise Gemma3Error(f"max_gen_toks {config.max_new_tokens} leaves no room for a context in "
                                  f"max_length {self.max_length}")
            prompts = {i: self.tok_encode(args[i][0], left_truncate_len=budget) for i in indices}
            order = sorted(indices, key=lambda i: (-len(prompts[i]), args[i][0]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                outs = self.generator.generate_batch([prompts[i] for i in chunk], config)
                for i, out in zip(chunk, outs):
                    text = postprocess_generated_text(out.text, until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


def render_chat_for_lm_eval(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A conversation as lm-eval's `hf` backend renders it with transformers' `apply_chat_template`: the Gemma 3
    turns; without a generation prompt the last message is left open, to be continued (`hf` passes
    `continue_final_message=True` then)."""
    from gemma3.text.chat import render_chat

    text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    end = "<end_of_turn>\n"
    return text if add_generation_prompt or not text.endswith(end) else text[:-len(end)]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the `gemma3` model registered (what `gemma3 lm-eval` runs)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
