"""The README's Python API example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example_runs():
    text = README.read_text()
    section = text[text.index("### Python API"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block under '### Python API'"
    exec(compile(blocks[0], "README.md (Python API)", "exec"), {})
