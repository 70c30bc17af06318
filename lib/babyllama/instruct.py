"""Asking a model for stories: answer one request, and measure how often answers honour them.

    from babyllama.instruct import answer, evaluate_requests
    text = answer(engine, tok, "Tell me a story about a shy fox named Max who finds a red kite.")
    score = evaluate_requests(engine, tok, n=50)     # score.fraction: name, animal and object

    babyllama eval-requests out/finetune.bin -z out/tok512.bin --n 50

The requests evaluated are held out by construction (stories.is_held_out): their (name, animal,
object) combinations never occur in fine-tuning data. With held_out=False it asks the first
fine-tuning requests instead (seed 0 is data.REQUEST_SEEDS["train"]): requests the model was
trained on, to tell recall from following. Works with any engine that has the shared
`generate` interface (NumPy, C, or babyllama.chat.TorchEngine over a PyTorch model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from babyllama.chat import encode_turn
from babyllama.stories import Request, generate_requests, honours

EVAL_SEED = 0


def answer(engine, tok, request: str, temperature: float = 0.0, topp: float = 0.9,
           seed: int = 42, steps: int | None = None) -> str:
    """The model's reply to one chat turn: the turn's ids as chat mode feeds them, then
    generation until EOS (or the end of the context)."""
    prompt = encode_turn(tok, request)
    ids = list(engine.generate(prompt, steps or engine.args.max_seq_len, temperature, topp, seed))
    return tok.decode(ids).strip()


@dataclass
class RequestScore:
    n: int
    honoured: int                     # answers naming the character, the animal and the object
    parts: dict[str, int]             # how many name each of them
    samples: list[tuple[Request, str]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.honoured / self.n

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / self.n:.0%}" for k, v in self.parts.items())
        return f"{self.honoured}/{self.n} = {self.fraction:.0%} honoured ({parts})"


def evaluate_requests(engine, tok, n: int = 50, seed: int = EVAL_SEED, temperature: float = 0.0,
                      topp: float = 0.9, held_out: bool = True) -> RequestScore:
    """Answer `n` held-out requests (or, held_out=False, fine-tuning requests) and count those
    whose answer names all three details."""
    score = RequestScore(n, 0, {"name": 0, "animal": 0, "object": 0})
    for i, (req, _) in enumerate(generate_requests(n, seed, held_out=held_out)):
        text = answer(engine, tok, req.text, temperature, topp, seed=seed + i + 1)
        got = honours(req, text)
        score.honoured += all(got.values())
        for k, v in got.items():
            score.parts[k] += v
        score.samples.append((req, text))
    return score
