"""`gemma3 serve`: the OpenAI-compatible server (gemma3.serve), an optional extra: pip install 'gemma3[serve]'."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading

from gemma3.cli.common import add_model_args, load_from_args, prepare_run, status
from gemma3.errors import Gemma3Error


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat, completions, streaming, JSON schema, tools) and a "
                      "playground page in the browser",
        description="Serve the model over HTTP with OpenAI's API: POST /v1/chat/completions and /v1/completions "
                    "(streaming, n, stop, seed, logprobs, response_format json_object / json_schema), "
                    "GET /v1/models and /health, POST /tokenize and /detokenize. Concurrent requests share "
                    "one running batch (continuous batching): on a CPU a decode step costs about the same for "
                    "1 row as for 8. The playground at http://HOST:PORT/ chats in the browser (JSON schema, tools, "
                    "conversations kept and exported) and, on a click on any token of a reply, shows the model's "
                    "inside at that step: the candidates, the logit lens, where a sliding and a global layer looked.",
        epilog="example: gemma3 serve --port 8000, then: curl http://127.0.0.1:8000/v1/completions "
               "-H 'Content-Type: application/json' -d '{\"prompt\": \"The capital of France is\", "
               "\"max_tokens\": 16}'")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port, 0 = any free one (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("GEMMA3_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $GEMMA3_API_KEY, else no key)")
    g.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together, one KV-cache row each (default: 8)")
    g.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a row before the server answers 429 (default: 64)")
    g.add_argument("--context", type=int, default=4096, metavar="N",
                   help="tokens per request, prompt and completion together (default: 4096; the KV cache "
                        "holds max-batch × context tokens)")
    g.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="prompt tokens read per scheduler turn, so running requests keep streaming (default: 256)")
    g.add_argument("--no-ui", action="store_true", help="no playground page at / (the API only)")
    g.add_argument("--inside-tokens", type=int, default=1024, metavar="N",
                   help="the most tokens the playground's look inside the model reads (default: 1024; 0 = off): "
                        "it holds the model for one plain forward over them")
    g.add_argument("--inside-seconds", type=float, default=5.0, metavar="S",
                   help="and the longest it may hold the model, checked before each layer (default: 5)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id in /v1/models and responses (default: gemma-3-270m for the embedded model, "
                        "else the source's name)")
    add_model_args(p)
    p.set_defaults(func=run_serve)


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise Gemma3Error(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Gemma3Error(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise Gemma3Error(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(256)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from gemma3.serve.app import ServerConfig, create_app
        from gemma3.serve.scheduler import Scheduler
    except ModuleNotFoundError as e:
        raise Gemma3Error(f"gemma3 serve needs the server extra ({e.name} is missing): "
                          "pip install 'gemma3[serve]'") from None
    from gemma3.generation.generator import Generator

    for name in ("max_batch", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise Gemma3Error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise Gemma3Error(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.context < 16:
        raise Gemma3Error(f"--context must be at least 16 tokens, got {args.context}")
    if args.inside_tokens < 0:
        raise Gemma3Error(f"--inside-tokens must be >= 0, got {args.inside_tokens}")
    if not 0.1 <= args.inside_seconds <= 600:  # also refuses nan and inf
        raise Gemma3Error(f"--inside-seconds must be in [0.1, 600], got {args.inside_seconds}")
    if args.api_key is not None and not args.api_key.strip():
        raise Gemma3Error("--api-key is empty")
    device, dtype = prepare_run(args)
    sock = _listen(args.host, args.port)  # before the load: a port in use is said at once

    def build():
        loaded = load_from_args(args, device, dtype)
        gen = Generator(loaded.model, loaded.tokenizer)  # swaps in the fast CPU modules
        return loaded, Scheduler(gen.model, loaded.tokenizer, max_batch=args.max_batch, context=args.context,
                                 max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, dtype=gen.dtype,
                                 fuse_steps=gen.fuse_steps)

    loaded, scheduler = _on_a_passing_thread(build)
    scheduler.start()
    name = args.served_model_name or ("gemma-3-270m" if args.model is None else
                                      os.path.basename(os.path.normpath(str(args.model))))
    app = create_app(scheduler, ServerConfig(model_name=name, api_key=args.api_key,
                                             chat_template=loaded.chat_template, ui=not args.no_ui,
                                             inside_tokens=args.inside_tokens, inside_seconds=args.inside_seconds))
    _warm_grammar_engine(loaded.tokenizer, scheduler.stop_ids)
    host, port = sock.getsockname()[:2]
    status(args, f"loaded {loaded.description} in {loaded.load_s:.1f} s; {args.max_batch} slots × "
                 f"{args.context} tokens (KV cache {scheduler.cache.nbytes() / 2**20:.0f} MiB)")
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"warning: listening on {args.host} with no --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    print(f"serving {name} on http://{host}:{port}/v1" + ("" if args.no_ui else f" (playground: http://{host}:{port}/)"),
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", access_log=not args.quiet,
                            timeout_graceful_shutdown=5, h11_max_incomplete_event_size=64 << 10)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        scheduler.close()
    return 0


def _on_a_passing_thread(fn):
    """fn() run on a thread that then exits; its result, or its exception raised here.

    The scheduler runs the model on its own thread. OpenMP (libgomp) keeps a pool of worker threads for each
    thread that has run a parallel region, until that thread exits, and the load runs many. With the main
    thread's pool alive beside the scheduler's, the kernels' calls on the scheduler's thread were ~60 µs slower
    each on the 2-core test machine (a 16-row step 82 -> 101 ms, the fused one-row step 9.9 -> 12 ms;
    docs/performance.md, "Batched decode steps"); with the loading thread gone, as fast as on the main thread."""
    result: list = []

    def run():
        try:
            result.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            result.append((False, e))

    thread = threading.Thread(target=run, name="gemma3-load", daemon=True)  # Ctrl-C during a load exits
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _warm_grammar_engine(tokenizer, stop_ids) -> None:
    """Build the grammar engine's view of the vocabulary (seconds: docs/generation.md, "Structured output") in the
    background, so the first request with a response_format does not wait for it."""
    import importlib.util

    if importlib.util.find_spec("llguidance") is None:
        return
    from gemma3.generation.structured import engine_tokenizer

    threading.Thread(target=engine_tokenizer, args=(tokenizer, stop_ids), daemon=True).start()
