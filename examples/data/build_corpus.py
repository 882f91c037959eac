"""Builds `stdlib-docstrings.txt`, the corpus of examples/configs/tiny-from-scratch.toml, from the
docstrings of Python's own standard library (no download; PSF-licensed text that ships with Python).

    python examples/data/build_corpus.py            # rewrites examples/data/stdlib-docstrings.txt

The output depends on the Python version; the committed file was built with CPython 3.11.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

# Prose-heavy, import-safe modules.
MODULES = [
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "doctest",
    "email.message",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
]
MAX_BYTES = 400_000


def docstrings(module) -> list[str]:
    out = []
    seen = set()

    def add(obj):
        doc = inspect.getdoc(obj)
        if doc and id(obj) not in seen and len(doc) > 80:
            seen.add(id(obj))
            out.append(doc)

    add(module)
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            add(obj)
            for _, member in sorted(vars(obj).items()):
                if inspect.isfunction(member):
                    add(member)
        elif inspect.isfunction(obj):
            add(obj)
    return out


def clean(text: str) -> str:
    # Printable ASCII + newline only, so the char tokenizer never needs <unk>.
    text = text.replace("\t", "    ")
    text = re.sub(r"[^\x20-\x7e\n]", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def main() -> None:
    warnings.simplefilter("ignore")
    parts, size = [], 0
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for doc in docstrings(module):
            doc = clean(doc)
            parts.append(doc)
            size += len(doc) + 2
            if size >= MAX_BYTES:
                break
        if size >= MAX_BYTES:
            break
    out = Path(__file__).with_name("stdlib-docstrings.txt")
    out.write_text("\n\n".join(parts) + "\n", encoding="ascii")
    print(
        f"{out}: {out.stat().st_size:,} bytes from {len(parts)} docstrings (Python {sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
