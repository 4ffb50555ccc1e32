"""GGUF, llama.cpp's checkpoint format, for Gemma 3: `reader` (the bounded parser, the ggml type table, tensors
from a memory map), `dequantize` (ggml's block layouts in numpy), `translate` (metadata -> config, tensors ->
our state dict), `writer` (config and state dict -> a file) and `q4_k` (the Q4_K quantizer the writer uses)."""
