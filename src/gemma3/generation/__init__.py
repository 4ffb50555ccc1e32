"""Text generation: `Generator` (batched prefill + decode, stop rules, streaming), `ChatSession` (a conversation
that keeps its KV cache), `SamplingParams` (how the next token is picked); structured output in
gemma3.generation.structured, the per-row finish rule in gemma3.generation.finish."""

from gemma3.generation.generator import ChatSession, GenerationConfig, GenerationResult, Generator
from gemma3.generation.sampling import SamplingParams

__all__ = ["ChatSession", "GenerationConfig", "GenerationResult", "Generator", "SamplingParams"]
