"""The streaming detokenizer: the same text as one decode of the whole, without re-decoding it."""

from __future__ import annotations

import random

from node.client.textgen import Detokenizer, TextModel
from node.engine.testing import smollm2_tokenizer_dir
from node.models import Tokenizer

TEXTS = ["Héllo wörld — 日本語のテキスト 🙂🙂 done.", "def f(x):\n    return x  # ok\n\n\tend",
         " leading  spaces  and\u00a0nbsp"]


def test_streamed_text_equals_the_whole_decode_and_never_decodes_the_whole():
    tok = Tokenizer.from_dir(smollm2_tokenizer_dir())
    model = TextModel("m", "m", tok, (0, 2), 6, 49152)
    rng = random.Random(1)
    cases = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    cases.append([rng.randrange(3, 49152) for _ in range(3000)])  # byte pieces that split characters
    for ids in cases:
        expected = model.decode(ids)
        pieces: list[str] = []
        detok = Detokenizer(model, pieces.append)
        model.decode = None  # type: ignore[assignment, method-assign]  - any whole decode fails now
        for t in [*ids[:len(ids) // 2], 2, *ids[len(ids) // 2:]]:  # an end token in the middle is skipped
            detok.push(t)
        del model.decode
        assert "".join(pieces) == detok.emitted == expected
