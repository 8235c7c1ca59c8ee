"""The repository explains itself: every citation in its code, ``--help`` and Markdown points to a section
that exists inside the repository, and nothing cites a document a user of the repository does not have."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_CITATION = re.compile(r"docs/([\w-]+)\.md((?:(?:,? | and |/|–|-)?§\d+(?:\.\d+)*)*)")
README_CITATION = re.compile(r'README \\?"([^"\\]+)\\?"')
# The project's planning documents live outside the repository; a citation of them is a dead end for users.
OUTSIDE = re.compile(r"\b(SPEC|DESIGN)(\.md)?\b")


def repository_texts():
    """Every tracked or new (not ignored) Python and Markdown file, with its text."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.md"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return {name: (REPO / name).read_text() for name in listed if (REPO / name).is_file()}


def help_texts():
    return {f"train-{m}.py --help": subprocess.run(["python", f"train-{m}.py", "--help"], cwd=REPO,
                                                   capture_output=True, text=True, timeout=60).stdout
            for m in ("SL", "PL", "MT", "MM", "L2I-O", "L2I-L")}


def headings(markdown):
    return [line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")]


def section_numbers(markdown):
    """``3.3`` for "### 3.3 L2I-O …", ``2`` for "## 2. Shared machinery"."""
    return {m.group(1) for m in (re.match(r"(\d+(?:\.\d+)*)\.?\s", h) for h in headings(markdown)) if m}


@pytest.fixture(scope="module")
def texts():
    return {**repository_texts(), **help_texts()}


def test_no_citation_of_documents_outside_the_repository(texts):
    offending = [f"{name}:{n}: {line.strip()}" for name, text in texts.items() if name != "tests/test_docs.py"
                 for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert offending == [], "\n".join(offending)


def test_every_docs_citation_names_an_existing_section(texts):
    broken = []
    for name, text in texts.items():
        flat = " ".join(text.split())   # argparse wraps help lines; citations may span them
        for match in DOC_CITATION.finditer(flat):
            path = REPO / "docs" / f"{match.group(1)}.md"
            if not path.is_file():
                broken.append(f"{name}: {match.group(0)} (no such file)")
                continue
            numbers = section_numbers(path.read_text())
            for number in re.findall(r"§(\d+(?:\.\d+)*)", match.group(2)):
                if number not in numbers:
                    broken.append(f"{name}: {match.group(0)} (no section {number} in docs/{match.group(1)}.md)")
    assert broken == [], "\n".join(broken)


def method_steps(section):
    """The numbered steps ("5. …") of ``section`` (e.g. "3.3") of docs/method.md, and those it takes from
    another method ("Steps 1-4 as MT")."""
    text = (REPO / "docs" / "method.md").read_text()
    start = re.search(rf"^#+ {re.escape(section)}\.? .*$", text, re.M)
    end = re.search(r"^#+ ", text[start.end():], re.M)
    body = text[start.end():start.end() + end.start()] if end else text[start.end():]
    steps = {int(n) for n in re.findall(r"^(\d+)\. ", body, re.M)}
    for first, last in re.findall(r"^Steps (\d+)-(\d+) ", body, re.M):
        steps.update(range(int(first), int(last) + 1))
    return steps


def comment_steps(script):
    """The step numbers of the numbered comments (``# 5-6.``, ``# 14.``) of a script's ``train_step``."""
    text = (REPO / script).read_text()
    step = text[text.index("def train_step"):text.index("\ndef ", text.index("def train_step") + 1)]
    numbers = set()
    for first, last in re.findall(r"#\s+(\d+)(?:-(\d+))?\.", step):
        numbers.update(range(int(first), int(last or first) + 1))
    return numbers


@pytest.mark.parametrize("script", [f"train-{m}.py" for m in ("SL", "PL", "MT", "MM", "L2I-O", "L2I-L")])
def test_step_comments_are_the_steps_of_the_method_reference(script):
    """Each script's docstring cites its docs/method.md section first; the numbered comments of its
    ``train_step`` cover exactly the numbered steps of that section."""
    section = re.search(r"docs/method\.md §(\d+\.\d+)", (REPO / script).read_text()).group(1)
    assert comment_steps(script) == method_steps(section), section


def test_every_readme_section_citation_exists(texts):
    titles = headings((REPO / "README.md").read_text())
    cited = {m.group(1) for text in texts.values() for m in README_CITATION.finditer(" ".join(text.split()))}
    assert cited, "no README section is cited"
    missing = sorted(c for c in cited if not any(title.startswith(c) for title in titles))
    assert missing == [], missing
