"""Hypothesis strategies for the JSON metadata files Phalanx reads (state.json, COMPLETE, model.json,
store manifests): arbitrary JSON, arbitrary bytes, and a valid document with fields replaced,
removed or added at any depth."""
from __future__ import annotations

import json

from hypothesis import strategies as st

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3) | st.floats() | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)


@st.composite
def mutations_of(draw, valid):
    """`valid` with one to three changes: a value replaced by any JSON, a key removed or added, at any depth
    (depth 0 replaces the whole document)."""
    def mutate(v, depth):
        if isinstance(v, dict) and v and depth < 5 and draw(st.integers(0, 3)):
            out = dict(v)
            k = draw(st.sampled_from(sorted(v)))
            op = draw(st.sampled_from(["into", "into", "delete", "add"]))
            if op == "delete":
                del out[k]
            elif op == "add":
                out[draw(st.text(max_size=8))] = draw(JSON)
            else:
                out[k] = mutate(v[k], depth + 1)
            return out
        if isinstance(v, list) and v and depth < 5 and draw(st.integers(0, 3)):
            out = list(v)
            i = draw(st.integers(0, len(v) - 1))
            out[i] = mutate(v[i], depth + 1)
            return out
        return draw(JSON)

    doc = valid
    for _ in range(draw(st.integers(1, 3))):
        doc = mutate(doc, 0)
    return doc


def file_contents(valid) -> st.SearchStrategy[bytes]:
    """What a metadata file may hold: bytes that are not JSON or not UTF-8, any JSON, or `valid` changed."""
    return st.one_of(st.binary(max_size=40), JSON.map(lambda v: json.dumps(v).encode()),
                     mutations_of(valid).map(lambda v: json.dumps(v).encode()),
                     st.just(json.dumps(valid).encode()))
