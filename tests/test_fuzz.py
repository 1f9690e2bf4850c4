"""The fuzz suite at CI size (issue 11): random CNNs x random commands, and random corruptions of valid models. Every
outcome is a verified model or exit 1/2 with one line: never exit 3, never a traceback, never a NaN model, never a
changed input (the oracle is tests/fuzzing.py); and (issue 21) every other file carve reads, mutated
(tests/fuzzing_files.py). ``python tools/fuzz.py`` runs the same cases at >= 2,000 and records the outcomes in
benchmarks/fuzz.json."""

from __future__ import annotations

import pytest
from fuzzing import CORRUPTIONS, cnn, commands, corrupt_commands, corruptions, fresh, run_corruption, run_pipeline
from fuzzing_files import SURFACES, run_file_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@FUZZ
@given(proto=cnn(), command=commands(), seed=st.integers(0, 1000))
def test_random_cnns_through_random_commands(proto, command, seed, tmp_path_factory):
    run_pipeline(proto, command, fresh(tmp_path_factory.getbasetemp() / "fuzz-pipeline"), seed)


@FUZZ
@given(proto=cnn(), damage=corruptions(), command=corrupt_commands())
def test_corrupted_models_are_refused_in_one_line(proto, damage, command, tmp_path_factory):
    kind, seed = damage
    run_corruption(proto, kind, seed, command, fresh(tmp_path_factory.getbasetemp() / "fuzz-corrupt"))


def test_every_corruption_kind_is_generated():
    assert len(CORRUPTIONS) >= 10


@pytest.mark.parametrize("surface", SURFACES)
def test_every_file_surface_keeps_the_promises(surface, tmp_path_factory):
    """The files family (issue 21) at CI size: each surface, a few random mutations, the same oracle."""
    work = tmp_path_factory.getbasetemp() / "fuzz-files"
    for seed in range(5):
        run_file_case(surface, 1000 * SURFACES.index(surface) + seed, fresh(work / "case"), work)
