"""Case lists for ``pytest.mark.parametrize`` that keep a few cases in the fast run."""

import pytest


def fast_subset(cases, ids, fast):
  """``cases`` as ``pytest.param``s named ``ids``; all but the ids in ``fast`` are marked
  ``slow`` (the full suite runs them, ``-m "not slow"`` skips them: docs/testing.md)."""
  params = []
  for case, case_id in zip(cases, ids, strict=True):
    values = case if isinstance(case, tuple) else (case,)
    marks = () if case_id in fast else (pytest.mark.slow,)
    params.append(pytest.param(*values, id=case_id, marks=marks))
  return params
