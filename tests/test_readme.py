"""The README's quickstarts (linen and NNX) run as written and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'


def first_python_block(after_heading: str) -> str:
  section = README.read_text().split(after_heading + '\n', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.DOTALL)[1]


@pytest.mark.slow
@pytest.mark.parametrize('heading', ['## Quickstart (linen)', '### Flax NNX'])
def test_readme_quickstart_runs_and_prints_its_comments(heading):
  code = first_python_block(heading)
  expected = [line.split('#')[-1].strip() for line in code.splitlines()
              if line.startswith('print(')]
  assert expected, 'the quickstart prints nothing to check'
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), 'exec'), {'__name__': 'readme_quickstart'})  # noqa: S102
  assert out.getvalue().split('\n')[:-1] == expected
