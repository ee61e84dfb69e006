"""Kopf's own API requests (its watches among them) retry for as long as the API server is away."""

from __future__ import annotations

import itertools

import kopf

from kubetune_operator.main import EndlessBackoffs


def test_kopf_retries_never_run_out_and_restart_for_every_request() -> None:
    backoffs = EndlessBackoffs()
    first = list(itertools.islice(backoffs, 1000))
    assert first[:6] == [1, 1, 2, 3, 5, 8] and set(first[6:]) == {10}
    assert list(itertools.islice(backoffs, 6)) == first[:6]  # a fresh sequence for the next request
    settings = kopf.OperatorSettings()
    settings.networking.error_backoffs = backoffs
    assert not hasattr(settings.networking.error_backoffs, "__len__")  # Kopf counts no last attempt
