"""A seeded corpus of strings that stress the Gemma 3 tokenizer where rebuilt tokenizers go wrong.

Each family targets one known failure: whitespace runs (user-defined pieces 107-167 and tab runs; runs of 32+
spaces split differently under a wrong merge order), code indentation (`"    return"` under merges ranked by
raw GGUF score), byte fallback (rare code points, control characters), emoji ZWJ sequences (multi-code-point
graphemes, 4-byte UTF-8), special-token text (matched whole in raw text), CJK and mixed scripts, and long
random strings mixing all of them. `corpus()` is deterministic for a given seed.
"""

from __future__ import annotations

import random

SPECIAL_TEXT = ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<unused0>", "<unused99>",
                "<unused6241>", "<0x41>", "<start_of_turn", "start_of_turn>", "< bos>", "<BOS>", "<<bos>>"]
WORDS = ["the", "The", "tokenizer", "Gemma", "model", "return", "def", "class", "import", "self", "x", "i",
         "hello", "world", "naïve", "café", "über", "ÆØÅ", "don't", "it's", "1234567", "3.14159", "0x1F",
         "e.g.", "https://example.com/a?b=c&d=e", "user@example.org", "#include", "std::vector<int>",
         "λx.x", "∑", "→", "—", "…", "«quote»", "¿qué?", "Straße", "İstanbul", "ǅ", "ﬁ", "Ⅻ"]
CODE_LINES = ["def f(x):", "return x + 1", "if (a && b) {", "}", "for i in range(10):", "print(i)",
              "const y = await fetch(url);", "# comment", "// comment", "elif x is None:", "pass",
              "SELECT * FROM t WHERE id = 1;", "  - item: value", "\"key\": [1, 2, 3],", "else:"]
CJK = ("天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏の人は日本語でひらがなカタカナ"
       "한국어문장입니다가나다라마바사。、「」！？　")
SCRIPTS = ["Привет, мир", "Γειά σου κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
           "Xin chào thế giới", "Merhaba dünya", "Բարեւ աշխարհ", "ሰላም ልዑል", "გამარჯობა", "ᚠᚢᚦᚨᚱᚲ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
EMOJI = ["😀", "👍🏽", "🇯🇵", "🇺🇳", "❤️", "👨‍👩‍👧‍👦", "🧑🏿‍💻", "🏳️‍🌈", "👩‍❤️‍💋‍👨", "🫠", "🦀", "#️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
         "☺", "✅", "🤷‍♀️"]
WHITESPACE = [" ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u3000", "\u2009", "\u200b", "\v", "\f"]


def _rare_char(rng: random.Random) -> str:
    """A code point unlikely to have its own piece, so it goes through `<0xNN>` byte fallback."""
    while True:
        cp = rng.choice([rng.randrange(0x20), 0x7F, rng.randrange(0x80, 0xA0), rng.randrange(0x0370, 0x2FFF),
                         rng.randrange(0xA000, 0xD7FF), rng.randrange(0xE000, 0xF8FF),
                         rng.randrange(0x10000, 0x3FFFF), rng.randrange(0xE0000, 0xE01EF),
                         rng.randrange(0xF0000, 0x10FFFF)])
        if not 0xD800 <= cp <= 0xDFFF:  # surrogates cannot be encoded
            return chr(cp)


def _run(rng: random.Random) -> str:
    """A whitespace run, sometimes far past the longest piece (31 newlines/spaces/tabs)."""
    length = rng.choice([1, 2, 3, 4, 7, 8, 15, 16, 17, 30, 31, 32, 33, 47, 62, 63, 64, 65, 96, rng.randrange(1, 200)])
    return rng.choice([" ", "\t", "\n", "\r\n", " \t", "\n "]) * length if rng.random() < 0.2 else \
        rng.choice(" \t\n") * length


def _whitespace(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randrange(1, 6)):
        parts.append(_run(rng))
        if rng.random() < 0.7:
            parts.append(rng.choice(WORDS))
    return "".join(parts)


def _code(rng: random.Random) -> str:
    unit = rng.choice(["    ", "  ", "\t", "        ", " "])
    lines = []
    for _ in range(rng.randrange(1, 12)):
        depth = rng.randrange(0, 9)
        lines.append(unit * depth + rng.choice(CODE_LINES) + rng.choice(["", "", " ", "  ", "\t"]))
    return rng.choice(["\n", "\n\n", "\r\n"]).join(lines)


def _cjk(rng: random.Random) -> str:
    return "".join(rng.choice(CJK) if rng.random() < 0.85 else rng.choice(WORDS + [" ", "\n", "1", "。"])
                   for _ in range(rng.randrange(1, 60)))


def _emoji(rng: random.Random) -> str:
    return "".join(rng.choice(EMOJI) if rng.random() < 0.7 else rng.choice(WORDS + [" ", "\u200d", "\ufe0f"])
                   for _ in range(rng.randrange(1, 15)))


def _bytes(rng: random.Random) -> str:
    return "".join(_rare_char(rng) if rng.random() < 0.6 else rng.choice(WORDS + [" "])
                   for _ in range(rng.randrange(1, 20)))


def _special(rng: random.Random) -> str:
    if rng.random() < 0.3:
        turns = [f"<start_of_turn>{rng.choice(['user', 'model'])}\n{rng.choice(WORDS)} {rng.choice(WORDS)}"
                 f"<end_of_turn>\n" for _ in range(rng.randrange(1, 4))]
        return rng.choice(["", "<bos>"]) + "".join(turns) + rng.choice(["", "<start_of_turn>model\n"])
    return "".join(rng.choice(SPECIAL_TEXT) if rng.random() < 0.5 else rng.choice(WORDS + [" ", "\n", "  "])
                   for _ in range(rng.randrange(1, 10)))


def _mixed(rng: random.Random) -> str:
    pools = [SCRIPTS, WORDS, EMOJI, [CJK[rng.randrange(len(CJK)):][:5]], WHITESPACE, ["123", "4567", "٣٤٥", "①"]]
    return "".join(rng.choice(rng.choice(pools)) + rng.choice(["", " ", ""]) for _ in range(rng.randrange(1, 20)))


def _long(rng: random.Random) -> str:
    makers = [_whitespace, _code, _cjk, _emoji, _bytes, _special, _mixed]
    return "".join(rng.choice(makers)(rng) for _ in range(rng.randrange(10, 40)))


def _random_chars(rng: random.Random) -> str:
    """Uniform junk over printable ASCII, Latin-1 and a few blocks: digits, punctuation and case runs."""
    alphabet = "".join(chr(c) for c in range(0x20, 0x7F)) + "éèàüößøåñçÉÀÜ€£¥©®°±µ¶·¿×÷" + "\t\n"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))


FAMILIES = {"whitespace": _whitespace, "code": _code, "cjk": _cjk, "emoji": _emoji, "byte_fallback": _bytes,
            "special_text": _special, "mixed_scripts": _mixed, "random_chars": _random_chars, "long": _long}

# Hand-picked cases each family might miss: empty text, lone pieces, exact run boundaries around 31/32.
EDGE_CASES = ["", " ", "  ", "\n", "\t", "a", "<bos>", "<bos><bos>", " <bos>", "<eos>", "\u2581", "\u2581\u2581x",
              " " * 31, " " * 32, " " * 33, " " * 64, "\n" * 31, "\n" * 32, "\t" * 31, "\t" * 32, "\t" * 100,
              "    return x", "\treturn x", " \n \n", "\x00", "\x00\x01\x7f", "\ufeff", "\U0010ffff", "\ud7ff",
              "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "12345678901234567890", "a" * 1000]


def corpus(seed: int = 0, per_family: int = 250) -> list[str]:
    """EDGE_CASES then `per_family` strings from each family (9 families: 2 250 + edge cases at the default)."""
    rng = random.Random(seed)
    return EDGE_CASES + [make(rng) for make in FAMILIES.values() for _ in range(per_family)]
