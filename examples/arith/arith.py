"""Trivial routes used by the tests and as a first example of a "routes" endpoint."""
import time

# Counts how often this file is imported: the runtime must import it once, not per request.
IMPORTS = globals().get("IMPORTS", 0) + 1


def add(a, b):
    return {"sum": a + b}


def scale(x, factor=2.0, label="scaled"):
    """Called positionally: the route template's order is the argument order."""
    return {"label": label, "value": x * factor}


def square(x):
    return x * x


def describe(text, count, ratio, flag, items, options, blob, mode="fast"):
    """Echo what arrived, with Python type names, so tests can see the coercions."""
    values = dict(text=text, count=count, ratio=ratio, flag=flag, items=items, options=options,
                  blob=blob, mode=mode)
    return {name: {"type": type(value).__name__, "value": value.decode("latin-1") if isinstance(value, bytes) else value}
            for name, value in values.items()}


def count(n, delay=0.05):
    """A streamed response: one line per number, produced slowly."""
    for i in range(n):
        yield f"{i}\n"
        time.sleep(delay)


def count_until_released(n, release_file):
    """Yield one chunk, then wait until the test creates `release_file` before yielding more,
    so the test can prove it read the first chunk before the last one existed."""
    import os

    yield "first\n"
    deadline = time.monotonic() + 30
    while not os.path.exists(release_file) and time.monotonic() < deadline:
        time.sleep(0.02)
    for i in range(1, n):
        yield f"{i}\n"


def events(n):
    """Non-text items are streamed as JSON lines."""
    for i in range(n):
        yield {"i": i}


def fail(message="boom"):
    raise RuntimeError(message)


def reverse_bytes(data):
    return bytes(reversed(data))


def imports():
    return {"imports": IMPORTS}
