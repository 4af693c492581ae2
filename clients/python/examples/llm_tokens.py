"""An LLM-style token stream, published through the batcher and watched from
a browser. The "model" is a local generator (no network, no weights): it
yields words at a steady rate, like a completion API streaming tokens.

    jobcast serve &                                   # http://127.0.0.1:7700
    python examples/llm_tokens.py                     # prints the page to open
    python examples/llm_tokens.py --watch             # ... and watches it from Python too

Open the printed URL (the dashboard that `jobcast serve` embeds) while the
tokens arrive; reload the page at any moment: it resumes with Last-Event-ID,
each token once. `curl -N -H 'Accept: text/event-stream' URL/v1/streams/ID/events`
shows the raw SSE. A cancel request (`POST /v1/streams/ID/cancel`, once the
server has it) stops the generation: the producer sees `cancel_event`.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from typing import Iterator, Optional

import jobcast

WORDS = (
    "Streams keep the log of long work so that every watcher sees each event once in order and then a "
    "clear end even across reconnects restarts and proxies that break server sent events"
).split()


def fake_model(prompt: str, tokens: int, rate: float, seed: int = 7) -> Iterator[str]:
    """Yields `tokens` tokens at about `rate` per second (words and spaces)."""
    rng = random.Random(seed + len(prompt))
    start = time.monotonic()
    for i in range(tokens):
        word = rng.choice(WORDS)
        yield (" " if i else "") + word
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def generate(server: str, stream: str, prompt: str, tokens: int, rate: float, token: Optional[str]) -> None:
    with jobcast.Stream(server, stream, token=token) as s:
        s.append({"role": "user", "content": prompt}, type="prompt")
        count = 0
        with s.batcher(max_events=200, max_delay=0.05) as b:
            for piece in fake_model(prompt, tokens, rate):
                if s.cancel_event.is_set():
                    break
                b.append(piece, type="token")
                count += 1
        # The final data; had anything above raised, leaving the block would fail the stream.
        s.complete(data={"tokens": count, "cancelled": s.cancel_requested})


def watch_in_terminal(server: str, stream: str, token: Optional[str]) -> None:
    for item in jobcast.watch(server, stream, token=token):
        if isinstance(item, jobcast.Event) and item.type == "token":
            print(item.data, end="", flush=True)
        elif isinstance(item, jobcast.End):
            print(f"\n[{item.state}: {item.data}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:7700")
    ap.add_argument("--stream", default=None, help="default: chat-<time>")
    ap.add_argument("--prompt", default="Explain jobcast in one paragraph.")
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--rate", type=float, default=40.0, help="tokens per second")
    ap.add_argument("--token", default=None, help="a JWT with publish/subscribe rights, when auth is on")
    ap.add_argument("--watch", action="store_true", help="also print the stream from a Python watcher")
    args = ap.parse_args()
    stream = args.stream or f"chat-{int(time.time())}"
    print(f"open {args.server}/#/streams/{stream}")
    watcher = None
    if args.watch:
        watcher = threading.Thread(target=watch_in_terminal, args=(args.server, stream, args.token))
        watcher.start()
    generate(args.server, stream, args.prompt, args.tokens, args.rate, args.token)
    if watcher is not None:
        watcher.join()



if __name__ == "__main__":
    main()
