"""Text generation: `Generator` (batched prefill + decode, stop rules, streaming), `ChatSession` (a conversation
that keeps its KV cache, and can call tools), `SamplingParams` (how the next token is picked); structured output
in gemma3.generation.structured, tool calls kept to their schemas in gemma3.generation.tool_grammar, the per-row
finish rule in gemma3.generation.finish."""

from gemma3.generation.generator import ChatReply, ChatSession, GenerationConfig, GenerationResult, Generator
from gemma3.generation.sampling import SamplingParams

__all__ = ["ChatReply", "ChatSession", "GenerationConfig", "GenerationResult", "Generator", "SamplingParams"]
