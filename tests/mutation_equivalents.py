"""The mutants that survive tests/mutation_score.py because no test could tell them from the code: each with why.

Keyed by (module, function, the line as written, the line as mutated) — what `mutmut show` prints — so the
list survives renumbering when code moves. A mutant that a test *could* catch does not belong here: write the test.
"""

EQUIVALENT: dict[tuple[str, str, str, str], str] = {
}
