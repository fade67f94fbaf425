"""One bounded memo for the memory model's per-configuration work.

The search calls the memory model thousands of times with configurations that differ only
in a few fields; each term caches on the fields it depends on (its own key)."""
from __future__ import annotations

from typing import Any, Callable, Hashable


def memoized(cache: dict, key: Hashable, limit: int, compute: Callable[[], Any]) -> Any:
    """cache[key], computing it on a miss; the cache is emptied when it passes `limit` entries."""
    hit = cache.get(key)
    if hit is None:
        if len(cache) > limit:
            cache.clear()
        hit = cache[key] = compute()
    return hit
