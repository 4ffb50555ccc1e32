"""`gemma3 generate`, `gemma3 chat` and `gemma3 perplexity`."""

from __future__ import annotations

import argparse
import json
import sys

from gemma3.cli.common import (KV_CACHE_DTYPES, add_cache_args, add_model_args, check_seed, load_from_args,
                               prepare_run, read_text_arg, status)
from gemma3.errors import Gemma3Error
from gemma3.files import TEXT_BYTES, LineReader, LineTooLong, check_text

EMBEDDED_IS_BASE = ("the embedded Gemma 3 270M is the pretrained base model, not instruction-tuned: for a chat model "
                    "run -m google/gemma-3-270m-it (or a local directory of it)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="complete a prompt (streams to the terminal)",
        description="Complete PROMPT with the model, streaming the text as it is generated. Stops at <eos> or "
                    "<end_of_turn>, a --stop string, -n tokens, or the end of the context.",
        epilog='example: gemma3 generate "The capital of France is" -n 32 --temperature 0')
    p.add_argument("prompt", nargs="?", help="the prompt (default: -f FILE, or stdin)")
    p.add_argument("-f", "--file", help="read the prompt from FILE")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token ids, prompt tokens, finish reason, timings) "
                        "instead of streaming")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the output to JSON matching the JSON schema in FILE ('{}' = any JSON); needs "
                        "llguidance (pip install 'gemma3[serve]'). The output is complete JSON when the finish "
                        "reason is stop; -n too small cuts it")
    add_model_args(p)
    add_cache_args(p)
    p.set_defaults(func=run_generate)

    c = sub.add_parser(
        "chat", help="interactive chat (also reads piped stdin, one message per line)",
        description="Chat with the model using its chat template (the built-in Gemma 3 format if the checkpoint "
                    "has none). Commands: /reset starts over, /exit quits. The KV cache is kept across turns, "
                    "so each turn only processes its new tokens; when the context fills up the oldest turns "
                    "are dropped. With piped input, the exit status is 2 if any turn failed.",
        epilog=f"note: {EMBEDDED_IS_BASE}.")
    c.add_argument("--system", help="a system prompt (Gemma 3 folds it into the first user turn)")
    c.add_argument("--context", type=int, default=8192, metavar="N",
                   help="context length in tokens for the conversation (default: 8192)")
    t = c.add_argument_group("tool calling (FunctionGemma's format; calls are kept to their schemas)")
    t.add_argument("--tools", metavar="FILE", default=None,
                   help="a JSON file with OpenAI's `tools` list ([{\"type\": \"function\", \"function\": {name, "
                        "description, parameters}}, ...]); each call the model makes is shown, and its result is "
                        "read from the next input line (JSON or text) or from --tool-results")
    t.add_argument("--tool-choice", default=None, metavar="auto|none|required|NAME",
                   help="auto (default): text or calls; none: text only; required: at least one call; NAME: a "
                        "call to that tool")
    t.add_argument("--tool-results", metavar="FILE", default=None,
                   help="a JSON object {tool name: result} answering every call to that tool (a mock)")
    t.add_argument("--no-parallel-tool-calls", action="store_true", help="at most one call a turn")
    add_sampling_args(c)
    add_model_args(c)
    add_cache_args(c)
    c.set_defaults(func=run_chat)

    q = sub.add_parser(
        "perplexity", help="perplexity of a text file",
        description="Perplexity of FILE under the model, with strided windows as in Hugging Face's perplexity "
                    "guide. The text starts with <bos>; later windows get a <bos> in front as unscored "
                    "context. Use it to check a model, a conversion or a quantisation.")
    q.add_argument("file", help="a UTF-8 text file")
    q.add_argument("--context", type=int, default=1024, metavar="N", help="window length in tokens (default: 1024)")
    q.add_argument("--stride", type=int, default=None, metavar="S",
                   help="tokens between window starts (default: context / 2)")
    q.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_model_args(q)
    q.set_defaults(func=run_perplexity)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: Gemma 3's own generation config)")
    g.add_argument("-n", "--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    g.add_argument("--top-k", type=int, default=64, help="keep the k most likely tokens, 0 = off (default: 64)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1] (default: 0.95)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p × top probability (default: 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="HF/CTRL penalty, 1 = off (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (not included in the output); repeatable")


def generation_config(args: argparse.Namespace):
    from gemma3.generation.generator import GenerationConfig
    from gemma3.generation.sampling import SamplingParams

    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                min_p=args.min_p, repetition_penalty=args.repetition_penalty),
        stop_strings=tuple(args.stop), seed=args.seed)
    config.validate()
    check_seed(args.seed)
    if any(not s for s in config.stop_strings):
        raise Gemma3Error("--stop must not be empty")
    return config


def run_generate(args: argparse.Namespace) -> int:
    from gemma3.generation.generator import Generator

    config = generation_config(args)  # validate flags before the (slow) load
    if args.json_schema is not None:
        from gemma3.generation.structured import MAX_SCHEMA_BYTES, JsonGrammar

        schema = read_text_arg(None, args.json_schema, "JSON schema", cap=MAX_SCHEMA_BYTES)
        try:
            config.grammar = JsonGrammar.from_schema(schema)
        except Gemma3Error as e:
            raise Gemma3Error(f"{args.json_schema}: {e}") from None
    device, dtype = prepare_run(args)
    prompt = read_text_arg(args.prompt, args.file, "prompt")
    if not prompt.strip():
        raise Gemma3Error("the prompt is empty" if not prompt else "the prompt is only whitespace")
    loaded = load_from_args(args, device, dtype)
    gen = Generator(loaded.model, loaded.tokenizer, kv_cache_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype])
    if args.json:
        result = gen.generate(prompt, config)
        t = result.timings
        print(json.dumps({
            "text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
            "timings": {"load_s": round(loaded.load_s, 3), "prefill_s": round(t.prefill_s, 4),
                        "prefill_tok_s": round(t.prefill_tok_s, 2), "decode_s": round(t.decode_s, 4),
                        "decode_tok_s": round(t.decode_tok_s, 2)},
        }, ensure_ascii=False))
        return 0
    status(args, f"loaded {loaded.description} in {loaded.load_s:.1f} s")
    for delta in gen.stream(prompt, config):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = gen.last_result
    status(args, f"[{r.prompt_tokens} prompt tokens, {len(r.token_ids)} generated, finish: {r.finish_reason}; "
                 f"prefill {r.timings.prefill_tok_s:.1f} tok/s, decode {r.timings.decode_tok_s:.1f} tok/s]")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from gemma3.generation.generator import ChatSession, Generator
    from gemma3.text.tools import TRIGGER

    config = generation_config(args)
    device, dtype = prepare_run(args)
    if args.context < 16:
        raise Gemma3Error(f"--context must be at least 16 tokens, got {args.context}")
    if args.max_new_tokens >= args.context:  # every turn keeps -n tokens of the context free for its reply
        raise Gemma3Error(f"-n {args.max_new_tokens} leaves no room for a message in --context {args.context}; "
                          "lower -n or raise --context")
    if args.system is not None:
        check_text(args.system, "--system")
    tools, tool_choice, mock = chat_tools(args)
    system = args.system if args.system is not None or not tools else TRIGGER
    loaded = load_from_args(args, device, dtype)
    if args.max_new_tokens >= loaded.model.config.max_position_embeddings:
        raise Gemma3Error(f"-n {args.max_new_tokens} leaves no room for a message in the model's "
                          f"{loaded.model.config.max_position_embeddings}-token context; lower -n")
    gen = Generator(loaded.model, loaded.tokenizer, kv_cache_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype])
    session = ChatSession(gen, system=system, template=loaded.chat_template, context_length=args.context,
                          config=config, tools=tools, tool_choice=tool_choice,
                          parallel_tool_calls=not args.no_parallel_tool_calls)
    interactive = sys.stdin.isatty()
    if interactive:
        status(args, f"loaded {loaded.description} in {loaded.load_s:.1f} s — /reset to start over, /exit to quit")
        if args.model is None and args.lora is None:
            status(args, f"note: {EMBEDDED_IS_BASE}")
    lines = None if interactive else LineReader(sys.stdin.buffer) if hasattr(sys.stdin, "buffer") else None
    failed = 0
    while True:
        try:
            if lines is not None:
                line = lines.readline()
                if line is None:
                    break
            else:
                line = input("> " if interactive else "")
        except EOFError:
            break
        except Gemma3Error as e:  # a line that is too long or not UTF-8: say so, keep the session
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            if isinstance(e, LineTooLong) and e.fatal:
                break
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            status(args, "(conversation reset)")
            continue
        dropped = session.dropped_turns
        try:
            turn = session.send(text)
            for _ in range(MAX_TOOL_ROUNDS):
                for delta in turn:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                calls = session.pending_calls
                if not calls:
                    break
                turn = session.send_tool_results(tool_results(calls, mock, interactive, lines))
        except Gemma3Error as e:  # e.g. one message longer than the context: say so, keep the session
            sys.stdout.flush()
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        sys.stdout.write("\n")
        if session.dropped_turns > dropped:
            status(args, f"(context full: dropped the oldest {session.dropped_turns - dropped} turn(s))")
    return 2 if failed and not interactive else 0


MAX_TOOL_ROUNDS = 8  # call → result → call ... within one user turn


def chat_tools(args: argparse.Namespace):
    """--tools, --tool-choice and --tool-results, read and checked (a one-line error naming the file)."""
    from gemma3.text.tools import parse_tool_choice, parse_tools

    if args.tools is None:
        if args.tool_choice is not None or args.tool_results is not None:
            raise Gemma3Error("--tool-choice and --tool-results need --tools FILE")
        return [], None, None
    tools = parse_tools(read_json_file(args.tools, "--tools"), where=args.tools)
    choice = args.tool_choice
    if choice is not None and choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    choice = parse_tool_choice(choice, tools, where="--tool-choice")
    mock = None
    if args.tool_results is not None:
        mock = read_json_file(args.tool_results, "--tool-results")
        if not isinstance(mock, dict):
            raise Gemma3Error(f"--tool-results {args.tool_results}: expected a JSON object {{tool name: result}}")
    return tools, choice, mock


def read_json_file(path: str, flag: str, limit: int = 1 << 20):
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise Gemma3Error(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise Gemma3Error(f"{flag} {path}: over {limit >> 20} MiB")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Gemma3Error(f"{flag} {path}: not valid JSON ({e})") from None


def tool_results(calls, mock, interactive: bool, lines) -> dict:
    """Each pending call shown on stderr as `call NAME(ARGUMENTS)`, answered from the mock file or the next
    input line (JSON if it parses, else text)."""
    results = {}
    for call in calls:
        print(f"\n[call {call.name}({call.arguments})]", file=sys.stderr, flush=True)
        if mock is not None:
            if call.name not in mock:
                raise Gemma3Error(f"--tool-results has no result for the tool {call.name!r}")
            results[call.id] = mock[call.name]
            print(f"[result {json.dumps(mock[call.name], ensure_ascii=False)}]", file=sys.stderr, flush=True)
            continue
        line = (input(f"result of {call.name}> ") if interactive or lines is None else lines.readline())
        if line is None:
            raise Gemma3Error(f"the input ended before the result of {call.name} was given")
        line = line.strip()
        try:
            results[call.id] = json.loads(line)
        except ValueError:
            results[call.id] = line
    return results


def run_perplexity(args: argparse.Namespace) -> int:
    from gemma3.accel import accelerate
    from gemma3.eval.perplexity import perplexity

    if args.context < 2 or (args.stride is not None and not 1 <= args.stride < args.context):
        raise Gemma3Error(f"need --context >= 2 and 1 <= --stride < --context, got {args.context} and {args.stride}")
    device, dtype = prepare_run(args)
    text = read_text_arg(None, args.file, "text", cap=TEXT_BYTES)
    if not text.strip():
        raise Gemma3Error(f"{args.file}: the file is empty")
    loaded = load_from_args(args, device, dtype)
    accelerate(loaded.model, native=False)  # the attention paths only: every product stays the model's own
    ids = loaded.tokenizer.encode(text, add_bos=True)
    result = perplexity(loaded.model, ids, context=args.context, stride=args.stride, progress=not args.quiet)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
                          "windows": result.windows, "context": args.context,
                          "stride": args.stride or args.context // 2}))
    else:
        print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.4f} nats over {result.tokens} tokens, "
              f"{result.windows} windows)")
    return 0
