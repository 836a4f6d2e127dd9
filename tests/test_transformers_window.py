"""Sliding windows and learned sinks through the transformers adapter, on real models (tiny, random-init, CPU, gloo).

Mistral (one window on every layer), Gemma 3 text (sliding and full layers) and gpt-oss (sliding and full layers,
learned sinks ``s_aux`` on every layer): a packed batch at CP 2 and 4 and as Ulysses 2 x ring 2 gives the loss and
CP-summed gradients (the sinks' included) of the same weights run in float64 with transformers' own attention
(sdpa's, or gpt-oss's eager one with its sinks) on every document as its own unpacked sequence, within 1e-5.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="transformers not installed (pip install 'ringattn[transformers]')")

from . import transformers_cases as tc  # noqa: E402
from .dist import unwrap  # noqa: E402
from .test_transformers import TOL, assert_close  # noqa: E402

KINDS = ("mistral", "gemma3", "gpt_oss")


@pytest.fixture(scope="module")
def setups():
    docs = tc.documents()
    out = {}
    for kind in KINDS:
        state = tc.build(kind, seed=11).state_dict()
        out[kind] = (state, tc.collator_batch(docs), tc.reference(kind, state, docs, sum(len(d) - 1 for d in docs)))
    return out


def _cases(setups, ulysses=None):
    return [
        dict(kind=kind, strategy=strategy, state=setups[kind][0], batch=setups[kind][1], ulysses=ulysses)
        for kind in KINDS
        for strategy in (("zigzag", "balanced") if ulysses is None else ("zigzag",))
    ]


@pytest.mark.parametrize("cp", [2, 4])
def test_windowed_and_sink_models_match_unpacked_documents(cp, setups, rank_pools):
    cases = _cases(setups)
    results = unwrap(rank_pools(cp).run(tc.run_cases, cases))[0]
    for case, got in zip(cases, results):
        assert_close(got, setups[case["kind"]][2], f"CP={cp} {case['kind']} {case['strategy']}")


def test_windowed_and_sink_models_under_ulysses_2_x_ring_2(setups, rank_pools):
    cases = _cases(setups, ulysses=2)
    results = unwrap(rank_pools(4).run(tc.run_cases, cases))[0]
    for case, got in zip(cases, results):
        assert_close(got, setups[case["kind"]][2], f"2x2 {case['kind']}")


def test_the_reference_sees_the_window_and_the_sinks(setups):
    """Not vacuous: the window (and gpt-oss's sinks) change the reference, so matching it means honouring them."""
    import torch

    docs = tc.documents()
    for kind in KINDS:
        state, _, (loss, _, _) = setups[kind]
        model = tc.build(kind, state, sliding_window=10**6).double()  # every window longer than every document
        if kind == "gpt_oss":
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.sinks.fill_(-1e4)
        total = 0.0
        for doc in docs:
            ids = torch.tensor([doc])
            total += model(
                input_ids=ids, labels=ids, num_items_in_batch=sum(len(d) - 1 for d in docs), use_cache=False
            ).loss.item()
        assert abs(total - loss) > 10 * TOL, f"{kind}: the window/sinks do not change the loss beyond the tolerance"
