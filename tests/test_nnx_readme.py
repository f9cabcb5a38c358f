"""The README's Flax NNX quickstart runs as written and prints what its comments say."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def nnx_quickstart() -> str:
  section = README.read_text().split('### Flax NNX', 1)[1]
  return re.search(r'```python\n(.*?)```', section, re.DOTALL)[1]


def test_readme_nnx_quickstart_runs_and_prints_its_comments():
  code = nnx_quickstart()
  expected = [line.split('#')[-1].strip() for line in code.splitlines()
              if line.startswith('print(')]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), 'exec'), {'__name__': 'readme_nnx'})  # noqa: S102
  assert out.getvalue().split('\n')[:-1] == expected
