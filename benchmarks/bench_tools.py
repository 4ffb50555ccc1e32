"""What the tool-call grammar costs a decode, on the embedded 270M:

    python benchmarks/bench_tools.py [--threads 2] [--tokens 96] [--rounds 3]

Generations of up to `--tokens` new tokens (seeds 0-2) from a prompt with three tools declared, with and
without the grammar of each tool_choice, interleaved, best of `--rounds`: decode tokens per second (all decoded
tokens over all decode time: runs that stop early count for what they decoded) and the ratio to the
unconstrained runs. Also the grammar's compile time and the mask time per token alone (median).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                                                                             "enum": ["celsius", "fahrenheit"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "book_table", "description": "Book a table.", "parameters": {
        "type": "object", "properties": {"place": {"type": "object", "properties": {"name": {"type": "string"},
                                                                                   "stars": {"type": "number"}}},
                                         "guests": {"type": "integer"}, "diets": {"type": "array", "items": {
                                             "type": "string"}}, "outdoor": {"type": "boolean"}},
        "required": ["place", "guests"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time."}},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import gemma3
    from gemma3.generation import GenerationConfig, Generator, SamplingParams
    from gemma3.generation.tool_grammar import ToolCallGrammar, with_tools
    from gemma3.text.chat import render_chat
    from gemma3.text.tools import TRIGGER, ToolChoice, parse_tools

    model, tokenizer, _ = gemma3.load()
    gen = Generator(model, tokenizer)
    tools = parse_tools(TOOLS)
    messages = [{"role": "system", "content": TRIGGER},
                {"role": "user", "content": "Book a table for two in Rome and tell me the weather there."}]
    prompt = tokenizer.encode(render_chat(messages, tools=tools), add_bos=False)
    base = GenerationConfig(max_new_tokens=args.tokens, sampling=SamplingParams(temperature=1.0))
    modes = {"unconstrained": base}
    for mode in ("none", "auto", "required"):
        t = time.perf_counter()
        ToolCallGrammar.build(tools, ToolChoice(mode))
        compile_ms = (time.perf_counter() - t) * 1e3
        modes[mode] = with_tools(base, tools, ToolChoice(mode))
        print(f"grammar '{mode}': compiled in {compile_ms:.1f} ms")
    gen.generate(prompt, GenerationConfig(max_new_tokens=4))  # warm up

    best: dict[str, float] = {}
    decoded: dict[str, int] = {}
    names = list(modes)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # a different order each round
            config = modes[name]
            steps, seconds = 0, 0.0
            for seed in range(3):
                r = gen.generate(prompt, dataclasses.replace(config, seed=seed))
                steps, seconds = steps + r.timings.decode_steps, seconds + r.timings.decode_s
            best[name] = max(best.get(name, 0.0), steps / seconds)
            decoded[name] = steps
    print(f"\nembedded 270M, {args.threads} threads, {args.tokens} new tokens, best of {args.rounds} rounds "
          f"(decode tok/s, ratio to unconstrained):")
    for name, rate in best.items():
        print(f"  {name:14} {rate:7.1f} tok/s   {rate / best['unconstrained']:6.3f}   ({decoded[name]} tokens a round)")

    # the mask alone, per token, along a "required" generation
    r = gen.generate(prompt, dataclasses.replace(modes["required"], seed=0))
    matcher = modes["required"].grammar.matcher(tokenizer, tuple(gen.stop_ids(base)))
    times = []
    for token in r.token_ids:
        t = time.perf_counter()
        matcher.allowed(len(tokenizer))
        times.append(time.perf_counter() - t)
        if matcher.finished:
            break
        matcher.advance(token)
    print(f"\nmask per token under 'required': median {statistics.median(times) * 1e6:.0f} µs, "
          f"max {max(times) * 1e6:.0f} µs over {len(times)} tokens")


if __name__ == "__main__":
    main()
