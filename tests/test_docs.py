"""The project's own documents: the spec the code points to is in the repository, and every pointer
to one of its sections ("docs/math.md section 3 step 4", 'docs/math.md, "Exact distances"') names a
section that is there."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "out", "runs", "__pycache__")]
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".h", ".cpp", ".cu")):
                yield os.path.join(folder, name)


def test_spec_pointers_stay_inside_the_repository_and_name_existing_sections():
    with open(os.path.join(ROOT, "docs", "math.md")) as f:
        spec = f.read()
    sections = set(re.findall(r"^## (\d+)\. ", spec, flags=re.M))
    assert sections == {"1", "2", "3", "4"}
    steps = set(re.findall(r"^(\d+)\. ", spec.split("## 3.")[1].split("## 4.")[0], flags=re.M))
    assert steps == {"1", "2", "3", "4", "5", "6"}
    headings = re.findall(r"^### (.+)$", spec, flags=re.M)
    for sub in ("The matmul form and its numerics", "Exact distances", "Streaming in distance space (the merge)",
                "Gradients", "Precision modes"):
        assert sub in headings, sub
    checked = 0
    for path in _text_files():
        with open(path, errors="replace") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        assert not re.search(r"\.\./shared/", text), f"{rel} points outside the repository"
        for number, step in re.findall(r"docs/math\.md,? sections? (\d)(?: step (\d))?", text):
            assert number in sections, f"{rel}: docs/math.md section {number}"
            assert not step or number == "3" and step in steps, f"{rel}: docs/math.md section {number} step {step}"
            checked += 1
        for quoted in re.findall(r'docs/math\.md,? ((?:"[^"]+"(?:,? and |, )?)+)', text):
            for name in re.findall(r'"([^"]+)"', quoted):  # a subsection named in quotes: the start of a heading
                name = " ".join(name.replace("//", " ").split())  # as wrapped in a C++ comment
                assert any(h.startswith(name) for h in headings), f"{rel}: docs/math.md, {name!r}"
                checked += 1
    assert checked >= 10
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "(docs/math.md)" in f.read()
