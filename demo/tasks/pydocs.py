"""Plain English text that ships with Python itself: the docstrings of standard-library modules.

Two fixed, disjoint module lists: `PRETRAIN_MODULES` are the built-in base model's plain-text corpus (and the
"general" task's train split); `HELDOUT_MODULES` are never trained on and feed the "general" task's test split.
A docstring that also appears in a pretraining module (a re-exported function) is dropped from the held-out side.

Only docstrings written on the object itself are used (`obj.__doc__`, not `inspect.getdoc`, which inherits a parent's
docstring and would repeat `int`'s for every enum constant). Docstrings change between Python releases, so the text
is identical for one Python version; the module split, and with it train/test disjointness, holds on every version.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from functools import lru_cache

logger = logging.getLogger(__name__)

PRETRAIN_MODULES: tuple[str, ...] = (
    "builtins", "abc", "argparse", "array", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "gzip", "hashlib",
    "heapq", "io", "inspect", "itertools", "json", "logging", "math", "operator", "os", "os.path", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "shutil", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "traceback", "types", "typing", "urllib.parse", "uuid", "weakref", "zipfile",
)  # fmt: skip
HELDOUT_MODULES: tuple[str, ...] = (
    "filecmp", "fnmatch", "ftplib", "getopt", "glob", "graphlib", "hmac", "imaplib", "mimetypes", "plistlib",
    "poplib", "quopri", "sched", "secrets", "selectors", "shelve", "shlex", "smtplib", "statistics", "timeit",
    "trace", "wave",
)  # fmt: skip

_MIN_CHARS = 40  # shorter docstrings ("Return self.") teach nothing and would dominate by count
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Za-z][A-Za-z0-9 ,;:'()\-/.]*$")  # plain prose: no code, no markup, ASCII only


def _own_doc(obj: object) -> str | None:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


@lru_cache(maxsize=None)
def module_docstrings(name: str) -> tuple[str, ...]:
    """The docstrings of module `name`: the module's, its public functions' and classes', and their methods'.

    Deterministic order (sorted attribute names), duplicates dropped; a module that does not import on this Python
    yields nothing (logged) rather than failing the whole corpus.
    """
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        logger.warning("standard-library module %s is not importable here (%s); its docstrings are skipped", name, exc)
        return ()
    found: list[str | None] = [_own_doc(module)]
    for attr in sorted(dir(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue  # constants would repeat their type's docstring
        found.append(_own_doc(obj))
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    found.append(_own_doc(member))
    return tuple(dict.fromkeys(d for d in found if d and len(d) >= _MIN_CHARS))


def corpus(modules: tuple[str, ...]) -> list[str]:
    """All docstrings of `modules`, in order, without duplicates."""
    return list(dict.fromkeys(doc for name in modules for doc in module_docstrings(name)))


@lru_cache(maxsize=1)
def pretrain_corpus() -> tuple[str, ...]:
    return tuple(corpus(PRETRAIN_MODULES))


@lru_cache(maxsize=1)
def heldout_corpus() -> tuple[str, ...]:
    seen = set(pretrain_corpus())
    return tuple(doc for doc in corpus(HELDOUT_MODULES) if doc not in seen)


def prose_sentences(docs: tuple[str, ...], min_words: int = 8, max_words: int = 30) -> list[str]:
    """Sentences of plain prose from `docs`: paragraphs joined into lines, split at sentence ends, code dropped."""
    out: list[str] = []
    for doc in docs:
        for paragraph in doc.split("\n\n"):
            text = " ".join(paragraph.split())
            for sentence in _SENTENCE_END.split(text):
                n_words = len(sentence.split())
                if min_words <= n_words <= max_words and _PROSE.match(sentence):
                    out.append(sentence)
    return list(dict.fromkeys(out))


@lru_cache(maxsize=2)
def pretrain_sentences() -> tuple[str, ...]:
    return tuple(prose_sentences(pretrain_corpus()))


@lru_cache(maxsize=2)
def heldout_sentences() -> tuple[str, ...]:
    seen = set(pretrain_sentences())
    return tuple(s for s in prose_sentences(heldout_corpus()) if s not in seen)
