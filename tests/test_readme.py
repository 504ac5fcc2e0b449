"""The README is the front door: at most 150 lines, the two set-up commands first (.ci/run runs them), and
every link it gives leads to a file that exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_is_short_opens_with_the_two_commands_and_its_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count("\n") <= 150
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)[:2]
    assert blocks[0].startswith("python3 -m venv .venv") and "pip install torch==2.13.0" in blocks[0]
    assert "python -m pytest" in blocks[1]
    links = re.findall(r"\]\(((?!https?://)[^)]+)\)", text)
    assert links and [link for link in links if not (REPO / link).exists()] == []
    for doc in sorted((REPO / "docs").glob("*.md")):  # each page's relative links too
        for link in re.findall(r"\]\(((?!https?://|#)[^)#]+)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / link).exists(), f"{doc.name}: broken link {link}"
