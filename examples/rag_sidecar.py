"""Retrieval-augmented generation against a tokenwire sidecar: retrieve passages, build a prompt, stream the answer.

Start a server next to your service (loopback or a unix socket), then run:

    tokenwire serve --host 127.0.0.1 --port 50051          # or: --unix-socket /run/tokenwire.sock
                                                           # --speculative-tokens 4: faster greedy
                                                           # answers that quote their passages
    python examples/rag_sidecar.py "What does the KV cache hold?"
    python examples/rag_sidecar.py --target unix:/run/tokenwire.sock "How are requests batched?"
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from tokenwire.client import ChatMessage, Client, TokenwireError

PASSAGES = [
    "A paged KV cache stores the keys and values of every token a sequence has seen, in fixed-size "
    "blocks drawn from one shared pool, so sequences of any length share memory without fragmentation.",
    "Continuous batching lets requests join and leave the running batch at every engine step, "
    "instead of waiting for the slowest request of a static batch to finish.",
    "Prefix caching reuses the KV blocks of a prompt prefix that an earlier request already "
    "computed, such as a shared system prompt, so only the new tokens are prefilled.",
    "A gRPC bidirectional stream carries many generation requests at once; the client tags each "
    "with a request id and the server streams tokens back as soon as they are sampled.",
    "Cancelling a request, or passing its deadline, frees its KV blocks within one engine step, "
    "so abandoned generations do not hold memory that waiting requests need.",
    "Greedy decoding picks the most likely token at every step; temperature, top-k and top-p "
    "sampling trade that determinism for variety.",
]
_STOPWORDS = frozenset("a an and are as at be by do does for from how in is it of on or so that the to what which with".split())


def words(text: str) -> set[str]:
    """The lower-cased content words of a text."""
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOPWORDS}


def retrieve(question: str, passages: list[str], k: int = 2) -> list[str]:
    """The k passages sharing the most content words with the question (a naive retriever)."""
    query = words(question)
    ranked = sorted(passages, key=lambda p: len(query & words(p)), reverse=True)
    return ranked[:k]


def build_messages(question: str, passages: list[str]) -> list[ChatMessage]:
    """A chat asking the model to answer from the retrieved passages only."""
    context = "\n".join(f"Passage {i}: {p}" for i, p in enumerate(passages, 1))
    return [
        ChatMessage("system", "Answer the question in one or two sentences, using only the passages given."),
        ChatMessage("user", f"{context}\n\nQuestion: {question}"),
    ]


def main() -> int:
    """Retrieve, prompt, and stream the answer; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What does a paged KV cache store?")
    parser.add_argument("--target", default=os.environ.get("TOKENWIRE_TARGET", "127.0.0.1:50051"),
                        help="the sidecar: host:port or unix:PATH [env TOKENWIRE_TARGET]")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    passages = retrieve(args.question, PASSAGES)
    for i, passage in enumerate(passages, 1):
        print(f"[passage {i}] {passage}")
    print("\nAnswer: ", end="", flush=True)
    # NOTE: the token comes from the environment, as a sidecar's secrets usually do.
    with Client(args.target, token=os.environ.get("TOKENWIRE_TOKEN"), timeout=120) as client:
        try:
            for chunk in client.generate(
                messages=build_messages(args.question, passages), max_tokens=args.max_tokens, temperature=0.0
            ):
                print(chunk.text, end="", flush=True)
        except TokenwireError as error:
            print(f"\ngeneration failed: {error}", file=sys.stderr)
            return 1
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
