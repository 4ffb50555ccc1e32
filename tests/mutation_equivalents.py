"""The mutants that survive tests/mutation_score.py because no test could tell them from the code: each with why.

Keyed by (module, function, the line as written, the line as mutated) — what `mutmut show` prints — so the
list survives renumbering when code moves. A mutant that a test *could* catch does not belong here: write the test.
"""

EQUIVALENT: dict[tuple[str, str, str, str], str] = {
    ("files", "decode_utf8", 'return data.decode("utf-8")', 'return data.decode("UTF-8")'):
        "Python's codec names are case-insensitive: both name the same codec.",
    ("files", "decode_utf8", 'line = data.count(b"\\n", 0, e.start) + 1',
     'line = data.count(b"\\n", None, e.start) + 1'):
        "bytes.count takes a start of None as 0, the start of the data.",
    ("files", "check_text", 'text.encode("utf-8")', 'text.encode("UTF-8")'):
        "Python's codec names are case-insensitive: both name the same codec.",
}
