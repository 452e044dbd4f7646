"""Synthetic datasets shaped like the ones a first real run meets, for bench/data_scale.py.

    ultrachat(path, n)   JSON Lines like HuggingFaceH4/ultrachat_200k's train_sft split: one
                         {"prompt", "prompt_id", "messages"} row per conversation, 1-4 user/assistant
                         rounds, short questions and long answers (paragraphs, numbered lists).
    short_json(path, n)  one JSON array of n short alpaca records ({"instruction", "input",
                         "output"}): 418,000 of them make a 200 MB file, like the issue's case.

Deterministic (seeded, numpy's PCG64): every machine writes the same bytes. Text is English words
drawn with Zipf-like weights from a fixed list, so a BPE tokenizer sees a realistic mix of cached
and rare words; the lengths were tuned so the demo model's tokenizer (builtin:tiny-llama) gives
the ultrachat set a median of about 1,500 tokens a conversation (bench/data_scale.py measures and
reports the distribution every time).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

_WORD_LIST = """
the of and to a in is that for it as with was on be by this are or from at an which have not can
more one all their has will about would so other into its some what only time also there these
could new than may first been two any people like then most after made well over such many very
how through where much should because those each just work even good way while year same right
still system data model learning training example answer question language code function value
process information important different however example important between during number
important provide include several following specific general approach method result research
analysis design develop development performance quality support different community health
history culture science technology energy water environment education economic social political
business market customer service product strategy management team project resource plan goal
challenge solution problem benefit impact change growth level factor area form part place case
point group world country city state government company family child student teacher user
person friend life story book music film game art food travel weather nature animal plant
computer software network security privacy internet website application database server cloud
algorithm structure variable parameter memory storage device interface feature option setting
effective efficient significant potential necessary possible available common simple complex
natural human personal public private local global modern traditional popular successful
increase reduce improve create maintain consider ensure require allow help understand explain
describe discuss identify determine suggest recommend compare evaluate analyze implement manage
write read learn teach build test measure observe report share connect communicate collaborate
first second third finally additionally furthermore moreover therefore however meanwhile overall
specifically generally typically usually often sometimes always never rarely frequently
carefully quickly slowly clearly directly easily simply mainly mostly nearly especially
photosynthesis chlorophyll sustainability renewable biodiversity infrastructure transportation
neighborhood entrepreneurship accountability transparency collaboration communication
responsibility relationship opportunity experience perspective environment organization
"""
WORDS = _WORD_LIST.split()

QUESTION_OPENERS = [
    "Can you explain", "What are the main", "How does", "Write a short essay about", "Describe",
    "Why is", "Give me some tips on", "Compare", "Summarize the key points of", "What is the best way to",
]  # fmt: skip


class Writer:
    BLOCK = 1 << 20

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        ranks = np.arange(1, len(WORDS) + 1)
        weights = 1.0 / ranks**0.9
        self.p = weights / weights.sum()
        self.words = np.array(WORDS, dtype=object)
        self._block: list[str] = []
        self._at = 0

    def words_(self, n: int) -> list[str]:
        # Drawn a million at a time: one numpy call per word would dominate the run.
        if self._at + n > len(self._block):
            self._block = list(self.words[self.rng.choice(len(WORDS), size=max(n, self.BLOCK), p=self.p)])
            self._at = 0
        self._at += n
        return self._block[self._at - n : self._at]

    def sentence(self, n: int) -> str:
        w = self.words_(max(3, n))
        if self.rng.random() < 0.15:
            w.insert(int(self.rng.integers(1, len(w))), str(int(self.rng.integers(2, 2030))))
        if self.rng.random() < 0.25:
            w[int(self.rng.integers(0, len(w) - 1))] += ","
        return " ".join(w).capitalize() + ("?" if self.rng.random() < 0.05 else ".")

    def paragraph(self, words: int) -> str:
        out, left = [], words
        while left > 0:
            n = int(np.clip(self.rng.normal(17, 6), 5, 40))
            out.append(self.sentence(min(n, max(left, 3))))
            left -= n
        return " ".join(out)

    def question(self) -> str:
        words = int(np.clip(self.rng.lognormal(np.log(27), 0.6), 6, 300))
        opener = QUESTION_OPENERS[int(self.rng.integers(len(QUESTION_OPENERS)))]
        return f"{opener} {self.paragraph(words)}"

    def answer(self) -> str:
        words = int(np.clip(self.rng.lognormal(np.log(128), 0.55), 15, 1100))
        parts, left = [], words
        while left > 0:
            chunk = int(np.clip(self.rng.normal(70, 25), 20, 160))
            if self.rng.random() < 0.25:
                items = int(self.rng.integers(3, 7))
                per = max(6, chunk // items)
                parts.append("\n".join(f"{i}. {self.sentence(per)}" for i in range(1, items + 1)))
            else:
                parts.append(self.paragraph(chunk))
            left -= chunk
        return "\n\n".join(parts)


def ultrachat(path: Path, n: int, seed: int = 0) -> None:
    """n conversations of 1-4 rounds (weights 0.25/0.3/0.25/0.2), written as JSON Lines."""
    w = Writer(seed)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(n):
            rounds = int(w.rng.choice([1, 2, 3, 4], p=[0.25, 0.3, 0.25, 0.2]))
            messages = []
            for _ in range(rounds):
                messages.append({"content": w.question(), "role": "user"})
                messages.append({"content": w.answer(), "role": "assistant"})
            prompt = messages[0]["content"]
            row = {
                "prompt": prompt,
                "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                "messages": messages,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)


def short_json(path: Path, n: int, seed: int = 1) -> None:
    """n short alpaca records in ONE JSON array (the shape that must not be loaded whole)."""
    w = Writer(seed)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            record = {
                "instruction": w.sentence(int(w.rng.integers(6, 22))),
                "input": w.sentence(int(w.rng.integers(4, 14))) if w.rng.random() < 0.4 else "",
                "output": w.paragraph(int(np.clip(w.rng.lognormal(np.log(56), 0.5), 5, 220))),
            }
            f.write(("  " if i == 0 else ",\n  ") + json.dumps(record, ensure_ascii=False))
        f.write("\n]\n")
    tmp.rename(path)
