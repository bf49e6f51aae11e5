"""Replacing a marked block of a Markdown file, as the benchmark scripts write docs/RESULTS.md."""

import os


def replace_block(path: str, name: str, text: str) -> None:
    """Puts ``text`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``:
    in place of the block's old content where the markers exist, else appended (a missing
    file is created)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    doc = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = (doc.rstrip() + "\n\n" if doc else "") + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
