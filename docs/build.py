"""Build the documentation into docs/_build/ (``make docs``); any warning fails the build.

    python docs/build.py [--out docs/_build] [--check-only]

1. Checks the pages: every relative link between docs/*.md resolves (and its #anchor names a
   heading of the target), and every ``docs/<page>.md`` a docstring or comment in genkernel/ or
   recipes/ points at exists (with its section, when one is quoted after it as
   ``docs/page.md, "Heading"``).
2. Renders docs/*.md to HTML (docs/_build/*.html; markdown2, which pdoc depends on).
3. Builds the API reference from the docstrings with pdoc into docs/_build/api/: every public
   module of genkernel (the recipes are scripts, documented by their own --help).

Warnings raised while importing the documented modules by third-party packages (deprecations in
torch or diffusers) are not ours to fix and are shown but tolerated; any other warning, and
anything pdoc reports, is an error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import re
import shutil
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
DOC_REF = re.compile(r"docs/([A-Za-z0-9_\-]+\.md)(?:#([\w\-]+)|,\s*\"([^\"]+)\")?")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(page: Path) -> dict[str, str]:
    """``{anchor: heading}`` of a Markdown page (fenced code skipped)."""
    out, fenced = {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip()
            out[slug(title)] = title
    return out


def check_pages() -> list[str]:
    """Broken links between the pages and broken docs/ references in the code, as messages."""
    problems = []
    pages = sorted(DOCS.glob("*.md"))
    anchors = {p.name: headings(p) for p in pages}
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue  # an absolute URL
            path, _, anchor = target.partition("#")
            if path and not (DOCS / path).exists():
                problems.append(f"{page.name}: link to {target!r}: {path} does not exist")
            elif anchor and path.endswith(".md") and anchor not in anchors.get(Path(path).name, {}):
                problems.append(f"{page.name}: link to {target!r}: no heading with anchor #{anchor} in {path}")
            elif anchor and not path and anchor not in anchors[page.name]:
                problems.append(f"{page.name}: link to #{anchor}: no such heading")
    for folder in ("genkernel", "recipes"):
        for source in sorted((ROOT / folder).rglob("*.py")):
            text = source.read_text(encoding="utf-8")
            for match in DOC_REF.finditer(text):
                name, anchor, section = match.groups()
                where = f"{source.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
                if name not in anchors:
                    problems.append(f"{where}: points at docs/{name}, which does not exist")
                elif anchor and anchor not in anchors[name]:
                    problems.append(f"{where}: points at docs/{name}#{anchor}, no such heading")
                elif section and slug(" ".join(section.split())) not in anchors[name]:  # wrapped quotes too
                    problems.append(f"{where}: points at docs/{name}, section {section!r}, no such heading")
    return problems


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · genkernel</title>
<style>body {{ font-family: system-ui, sans-serif; max-width: 52em; margin: 2em auto; padding: 0 1em; line-height: 1.5; }}
pre, code {{ background: #f4f5f7; }} pre {{ padding: 0.6em; overflow: auto; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccd; padding: 2px 6px; }} nav {{ font-size: 0.9em; margin-bottom: 1.5em; }}</style></head>
<body><nav><a href="index.html">genkernel docs</a> · <a href="api/index.html">API reference</a></nav>
{body}</body></html>
"""


def render_pages(out: Path) -> None:
    import markdown2

    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"\]\(([\w\-]+)\.md(#[\w\-]+)?\)", r"](\1.html\2)", text)
        text = re.sub(r"\]\(examples/", "](examples/", text)
        body = markdown2.markdown(text, extras=["tables", "fenced-code-blocks", "header-ids", "code-friendly", "cuddled-lists"])
        # markdown2's header ids differ from GitHub's in places: use GitHub's, which the links were checked against
        body = re.sub(r'<h([1-6]) id="[^"]*">(.*?)</h\1>',
                      lambda m: f'<h{m.group(1)} id="{slug(re.sub("<[^>]+>", "", m.group(2)))}">{m.group(2)}</h{m.group(1)}>', body)
        title = next(iter(headings(page).values()), page.stem)
        (out / f"{page.stem}.html").write_text(PAGE.format(title=title, body=body), encoding="utf-8")
    examples = out / "examples"
    examples.mkdir(exist_ok=True)
    for example in sorted((DOCS / "examples").glob("*.py")):
        shutil.copy(example, examples / example.name)


def public_modules() -> list[str]:
    """Every public module of genkernel (no private names, no recipes)."""
    import genkernel

    names = ["genkernel"]
    for info in pkgutil.walk_packages(genkernel.__path__, "genkernel."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts) or info.name.startswith("genkernel.recipes"):
            continue
        names.append(info.name)
    return names


def pdoc_specs(modules: list[str]) -> list[str]:
    """The fewest module specifications that make pdoc document ``modules``: pdoc walks a package's
    submodules itself unless the package's ``__all__`` leaves them out (genkernel's does), and warns
    about a module named twice. Private modules and the recipes are excluded by pattern."""
    wanted = set(modules)

    def walked(name: str) -> set[str]:  # what pdoc documents for the spec `name` (its rule, extract.iter_modules2)
        module = importlib.import_module(name)
        out = {name}
        names = getattr(module, "__all__", None)
        for info in pkgutil.iter_modules(getattr(module, "__path__", []), f"{name}."):
            if names is None or info.name.rpartition(".")[2] in names:
                out |= walked(info.name) if info.ispkg else {info.name}
        return out

    specs: list[str] = []
    covered: set[str] = set()
    for name in modules:
        if name not in covered:
            specs.append(name)
            covered |= walked(name)
    missing = wanted - covered
    if missing:
        raise RuntimeError(f"modules pdoc would not document: {sorted(missing)}")
    return [*specs, r"!.*\._", r"!genkernel\.recipes"]


def build_api(out: Path) -> list[str]:
    """pdoc into ``out``; returns the problems (warnings from pdoc or genkernel, pdoc's log errors)."""
    import pdoc
    import pdoc.render

    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                problems.append(f"pdoc log: {record.getMessage()}")

    handler = Collect()
    logging.getLogger("pdoc").addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modules = public_modules()
        for name in modules:  # import first, so import-time warnings are attributed below
            importlib.import_module(name)
        pdoc.render.configure(docformat="restructuredtext", show_source=False, footer_text="genkernel API reference")
        pdoc.pdoc(*pdoc_specs(modules), output_directory=out)
    logging.getLogger("pdoc").removeHandler(handler)
    for warning in caught:
        origin = str(warning.filename)
        ours = f"{ROOT}/genkernel" in origin or f"{ROOT}/recipes" in origin or "/pdoc/" in origin
        message = f"{warning.category.__name__}: {warning.message} ({origin}:{warning.lineno})"
        if ours:
            problems.append(message)
        else:
            print(f"[docs] tolerated third-party warning: {message}", file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DOCS / "_build"))
    parser.add_argument("--check-only", action="store_true", help="check links and references, build nothing")
    args = parser.parse_args(argv)
    problems = check_pages()
    if not args.check_only and not problems:
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        render_pages(out)
        problems += build_api(out / "api")
    for problem in problems:
        print(f"[docs] ERROR {problem}", file=sys.stderr)
    if problems:
        print(f"[docs] {len(problems)} problem(s): the build fails", file=sys.stderr)
        return 1
    print(f"[docs] built {args.out} (pages and API reference), no warnings" if not args.check_only else "[docs] checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
