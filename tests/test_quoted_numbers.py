"""Every number a results table quotes exists in a results file (issue #12: prose must match the data).

What is checked:

* every table in a ``Results`` section of ``milestones/*.md`` (the section runs to the next
  heading of its level or above, and includes its subsections): each number in a cell, except the
  row's label (first column) and its source column, must appear in one of the results files linked
  in that section (``results/X.json`` or ``.log``); a row whose source names a test or the chapter
  instead of a results file is not checked (the row says where it comes from);
* the README's status column: each number must appear in the results files linked from that
  milestone's page, unless it is listed in ``README_NOT_MEASURED`` (targets and workload sizes).

A quoted number matches a value when the value rounds to it at the precision quoted (21,619 matches
21619.3; 21.6k matches it too), after the unit conversion its unit allows, read from the text just
after the number or from the column's header (1.63 ms matches 0.00163 s; 2.05% matches 0.0205;
32.9 GiB matches a byte count). A ratio (×) matches only a value as is. A ratio the files do not
hold as a value is listed in ``DERIVED`` with the two values it divides; anything else is a finding:
fix the page, never the JSON. Per-request records, the dynamic mode's per-step records and profiler
timelines are not searched (thousands of numbers would match anything).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "milestones" / "results"
# Unit -> factors from a value in a file to the value as quoted (files hold seconds, fractions, bytes, B/s ...).
UNITS = {
    "ms": (1, 1e3, 1e-3),
    "µs": (1, 1e6, 1e3),
    "s": (1, 1e-3),
    "%": (1, 100),
    "GiB": (1, 2**-30, 2**-10),
    "MiB": (1, 2**-20, 2**10),
    "GB/s": (1, 1e-9),
    "TB/s": (1, 1e-3, 1e-12),
    "TFLOP/s": (1, 1e-12),
}
_UNIT = re.compile(r"(ms|µs|GiB|MiB|GB/s|TB/s|TFLOP/s|%|(?<![/\w])s(?!\w))")
_CHAIN = re.compile(r"(?:\s*(?:–|→|vs|/)\s*[\d,]+(?:\.\d+)?k?)+")
SKIPPED_KEYS = {"timeline", "requests", "steered_steps"}

# Ratios quoted on a page that no file holds as a value: (page, quoted text, file, numerator, denominator).
# A path is dotted keys; ``results[config=M2]`` picks the list element whose ``config`` is ``M2``.
# The label is the column the ratio sits in (tables) or the quoted text (README).


def m5_itl_gain(quoted: str, file: str, m5: str = "M5") -> tuple[str, str, str, str, str]:
    """A README ratio of M4's p99 ITL over M5's (the issue's 4x target) in one serve run's JSON."""
    return ("README.md", quoted, file, "results[config=M4].p99_itl_ms", f"results[config={m5}].p99_itl_ms")


DERIVED: list[tuple[str, str, str, str, str]] = [
    ("M2.md", "vs static", "M2-h200.json", "results[*].output_tokens_per_s",
     "results[config=M2/static].output_tokens_per_s"),
    ("M3.md", "vs M2", "M3-h200.json", "results[*].output_tokens_per_s", "results[config=M2].output_tokens_per_s"),
    ("M4.md", "FA2 vs naive", "M4-prefill-h200.json", "results[*].naive.time_us", "results[*].flash_attn.time_us"),
    ("M4.md", "FA2 vs Triton", "M4-prefill-h200.json", "results[*].triton.time_us", "results[*].flash_attn.time_us"),
    ("README.md", "1.42×", "M2M3-repeats-h200.json", "results[config=M2].output_tokens_per_s",
     "results[config=M2/static].output_tokens_per_s"),
    ("README.md", "3.1×", "M2-h200.json", "results[config=M2].output_tokens_per_s",
     "results[config=M2/static].output_tokens_per_s"),
    ("README.md", "23×", "M2-h200.json", "results[config=M2].output_tokens_per_s",
     "results[config=M2/sequential@2].output_tokens_per_s"),
    ("README.md", "1.17×", "M2M3-repeats-h200.json", "results[config=M3].output_tokens_per_s",
     "results[config=M3/naive].output_tokens_per_s"),
    ("README.md", "2.06×", "M3-h200.json", "results[config=M3].output_tokens_per_s",
     "results[config=M2].output_tokens_per_s"),
    ("README.md", "1.09×", "M4-prefill-h100.json", "results[prompt_len=16384].triton.time_us",
     "results[prompt_len=16384].flash_attn.time_us"),
    ("README.md", "5.3×", "M4-fastpath-W-h200.json", "results[config=M4].output_tokens_per_s",
     "results[config=M3].output_tokens_per_s"),
    ("README.md", "1.22×", "M4-nosync-W-h200.json", "results[config=M4].output_tokens_per_s",
     "results[config=M4/sync].output_tokens_per_s"),
    m5_itl_gain("4.0×", "M5-warmed-h200.json"),
    ("README.md", "41×", "M4-hf-cb-h200.json", "results[config=M4].output_tokens_per_s",
     "results[config=HF].output_tokens_per_s"),
    m5_itl_gain("4.2×", "M5-preset-h200.json"),
    m5_itl_gain("5.4×", "M5-serve-mixed-qwen3-8b-h200.json", m5="M5/budget=512"),
    m5_itl_gain("3.69×", "M5-preset-nosync-h200.json"),
    m5_itl_gain("4.57×", "M5-preset-nosync-seed1-h200.json"),
    m5_itl_gain("3.72×", "M5-preset-nosync-seed2-h200.json"),
    m5_itl_gain("7.03×", "M5-saturated-12-qwen3-8b-h200.json"),
    m5_itl_gain("4.66×", "M5-splits-16x200-seed0-h200.json"),
    m5_itl_gain("3.93×", "M5-splits-16x200-seed1-h200.json"),
    m5_itl_gain("5.64×", "M5-splits-16x200-seed2-h200.json"),
    m5_itl_gain("4.90×", "M5-splits-16x200-seed3-h200.json"),
    m5_itl_gain("5.62×", "M5-splits-16x200-seed4-h200.json"),
    ("README.md", "0.71×", "M7-throughput-pairs-h200.json", "results[config=M7/gptq].output_tokens_per_s",
     "results[config=M7].output_tokens_per_s"),
    ("M7.md", "Gluon vs bf16", "M7-ws-decode-h200.json", "rows[*].bf16_us", "rows[*].best_ws.us"),
    ("M7.md", "Gluon vs Triton", "M7-ws-decode-h200.json", "rows[*].tuned.us", "rows[*].best_ws.us"),
    ("M7.md", "byte permute vs before", "M7-perm-decode-h200.json", "rows[*].tuned_shift.us", "rows[*].tuned.us"),
    ("M7.md", "byte permute vs bf16", "M7-perm-decode-h200.json", "rows[*].bf16_us", "rows[*].tuned.us"),
    ("README.md", "0.82×", "M7-throughput-pairs64-h200.json", "results[config=M7/gptq].output_tokens_per_s",
     "results[config=M7].output_tokens_per_s"),
    *(("M5.md", "M4 / M5", f"M5-splits-16{n}-seed{s}-h200.json", "results[config=M4].p99_itl_ms",
       "results[config=M5].p99_itl_ms") for n, seeds in (("", 3), ("x200", 5)) for s in range(seeds)),
]  # fmt: skip

# Numbers in the README's status column that are not measurements: targets, workload sizes, counts of things.
README_NOT_MEASURED: dict[str, list[str]] = {
    "M4 part 2": ["target 1.0 ms", "target 1.5 ms"],
    "M5": ["down to 1 token/step", "target 4×", "knee, 512", "target 15 ms", "20 ms target"],
    "M6": ["target 8×", "target 3×"],
}


@dataclass(frozen=True)
class Quoted:
    """A number as a page prints it: value, decimals shown, and whether it was a ratio (×)."""

    text: str
    value: float
    decimals: int
    ratio: bool
    scales: tuple[float, ...] = (1,)

    def matches(self, x: float) -> bool:
        tol = 0.5 * 10.0 ** (-self.decimals) * (1 + 1e-9) * (1e3 if self.text.endswith("k") else 1)
        return any(abs(abs(x) * s - self.value) <= tol for s in self.scales)


_NUMBER = re.compile(r"(?<![\w.#§/@\-])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(k)?(?![\w\-]*[A-Za-z_])(?!\.\d)(\s*×)?")


def numbers_in(text: str, header: str = "") -> list[Quoted]:
    """The numbers of a cell or sentence; code spans, links and labels glued to letters (``g128``, ``4-bit``) skipped.

    A number's units are the one right after it (``1.63 ms``) and any its column's ``header`` names.
    """
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\{\w+\}", " ", text)
    header_units = _UNIT.findall(header)
    found = []
    for m in _NUMBER.finditer(text):
        whole, frac, kilo, times = m.groups()
        value = float(whole.replace(",", "") + ("." + frac if frac else ""))
        if kilo:
            value *= 1e3
        chain = _CHAIN.match(text, m.end())  # "1.6–3.2×", "58.8 → 23 ms", "6.8 vs 5.3 ms": the last one's unit
        times = times or (chain and text[chain.end() : chain.end() + 1] == "×")
        scales = (1.0,)
        if not times:
            end = chain.end() if chain else m.end()
            after = _UNIT.match(text, end + (text[end : end + 1] == " "))
            units = ([after.group(1)] if after else []) + header_units
            scales = tuple(sorted({f for u in units for f in UNITS[u]})) or (1.0,)
        text_q = m.group(0).strip() + ("×" if times and not m.group(4) else "")
        found.append(Quoted(text_q, value, len(frac) if frac else 0, bool(times), scales))
    return found


@cache
def values_in(name: str) -> tuple[float, ...]:
    """Every number in a results file: the JSON's numeric leaves (strings that are a number too: Nsight Compute
    prints ``"27,648"``), or the numbers printed in a log."""
    text = (RESULTS / name).read_text()
    if name.endswith(".log"):
        return tuple(float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text.replace(",", "")))
    out: list[float] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in SKIPPED_KEYS:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            out.append(float(node))
        elif isinstance(node, str) and re.fullmatch(r"-?[\d,]+(?:\.\d+)?", node):
            out.append(float(node.replace(",", "")))

    walk(json.loads(text))
    return tuple(out)


def resolve_list(node: object, path: str) -> object:
    """The node at ``path``: dotted keys; ``key[field=value]`` picks a list element by field, ``key[i]`` by index."""
    for part in re.findall(r"[^.\[\]]+(?:\[[^\]]*\])?", path):
        key, _, sel = part.partition("[")
        node = node[key]  # type: ignore[index]
        if sel:
            field, eq, want = sel.rstrip("]").partition("=")
            node = next(n for n in node if str(n[field]) == want) if eq else node[int(field)]  # type: ignore[index]
    return node


def resolve(data: object, path: str) -> float:
    value = resolve_list(data, path)
    assert isinstance(value, (int, float)), f"{path} is not a number"
    return float(value)


def derived_for(page: str) -> dict[str, list[float]]:
    """Label (a column header or the quoted text) -> the ratios ``DERIVED`` lists for it on ``page``.

    ``[*]`` in both paths pairs the list's elements one by one (a column of ratios, one per row).
    """
    out: dict[str, list[float]] = {}
    for where, label, name, num, den in DERIVED:
        if where != page:
            continue
        data = json.loads((RESULTS / name).read_text())
        n = len(resolve_list(data, num.split("[*]")[0])) if "[*]" in num else 1
        for i in range(n):
            try:
                a, b = (resolve(data, path.replace("[*]", f"[{i}]")) for path in (num, den))
            except KeyError:  # a row without one of the two values has no ratio
                continue
            out.setdefault(label, []).append(a / b)
    return out


LINK = re.compile(r"results/([\w.\-]+\.(?:json|log))")


def results_sections(page: Path) -> list[tuple[str, str]]:
    """``(heading, body)`` of every section whose heading says Results (subsections included)."""
    lines = page.read_text().splitlines()
    sections, i = [], 0
    while i < len(lines):
        m = re.match(r"(#+) (.*)", lines[i])
        if m and "Results" in m.group(2):
            level, body = len(m.group(1)), []
            j = i + 1
            while j < len(lines):
                n = re.match(r"(#+) ", lines[j])
                if n and len(n.group(1)) <= level:
                    break
                body.append(lines[j])
                j += 1
            sections.append((m.group(2), "\n".join(body)))
            i = j
        else:
            i += 1
    return sections


def table_rows(body: str) -> list[tuple[str, list[str], list[str]]]:
    """``(caption, header, cells)`` of every data row of every Markdown table in ``body``.

    The caption is the paragraph right above the table (where a table states its unit, e.g. "(ms)").
    """
    rows, header, paragraph, caption, blank = [], None, [], "", False
    for line in body.splitlines():
        if not line.startswith("|"):
            header = None
            if line.strip():
                paragraph = [line] if blank else paragraph + [line]
            blank = not line.strip()
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header, caption = cells, " ".join(paragraph)
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append((caption, header, cells))
    return rows


def existing(names: list[str]) -> list[str]:
    return [n for n in dict.fromkeys(names) if (RESULTS / n).exists()]


def check(where: str, numbers: list[Quoted], files: list[str], derived: list[float]) -> list[str]:
    """The numbers found in none of ``files`` (nor among the ratios ``derived`` for them), as failure lines."""
    missing = []
    for q in numbers:
        if any(q.matches(v) for v in derived):
            continue
        if not any(q.matches(v) for name in files for v in values_in(name)):
            missing.append(f"{where}: {q.text} is in none of {files or '(no results file linked)'}")
    return missing


PAGES = sorted((ROOT / "milestones").glob("M*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_results_tables_quote_results_files(page: Path):
    missing = []
    derived = derived_for(page.name)
    for heading, body in results_sections(page):
        files = existing(LINK.findall(body))
        previous_source = None
        for caption, header, cells in table_rows(body):
            lower = [h.lower() for h in header]
            source_col = lower.index("source") if "source" in lower else None
            source = cells[source_col] if source_col is not None else None
            if source == "same":
                source = previous_source
            previous_source = source
            if source is not None and not LINK.search(source):
                continue  # a test, the chapter, or "no JSON": the row names its own evidence
            row_files = existing(LINK.findall(source)) if source else files
            for col, cell in enumerate(cells):
                if col == 0 or col == source_col:
                    continue
                where = f"{page.name} [{heading}] row {cells[0]!r}, column {header[col]!r}"
                units = header[col] + " " + caption
                missing += check(where, numbers_in(cell, units), row_files or files, derived.get(header[col], []))
    assert not missing, "numbers quoted but not found in the results files:\n" + "\n".join(missing)


def readme_status() -> dict[str, str]:
    """Milestone (``M4``, ``M4 part 2``) -> its status cell in the README's table."""
    rows = {}
    for _, header, cells in table_rows((ROOT / "README.md").read_text()):
        if header[:1] == ["Milestone"]:
            rows[cells[0]] = cells[header.index("Status")]
    return rows


def test_readme_status_quotes_results_files():
    missing = []
    derived = derived_for("README.md")
    status = readme_status()
    assert status, "README.md has no milestone table with a Status column"
    for milestone, cell in status.items():
        page = ROOT / "milestones" / f"{milestone.split()[0]}.md"
        files = existing([n for _, body in results_sections(page) for n in LINK.findall(body)] + LINK.findall(cell))
        exempt = README_NOT_MEASURED.get(milestone, [])
        for snippet in exempt:
            assert snippet in cell, f"README_NOT_MEASURED[{milestone!r}] lists {snippet!r}, no longer in the status"
        text = cell
        for snippet in exempt:
            text = text.replace(snippet, " ")
        for q in numbers_in(text):
            missing += check(f"README.md status of {milestone}", [q], files, derived.get(q.text.replace(" ", ""), []))
    assert not missing, "numbers quoted but not found in the results files:\n" + "\n".join(missing)


def test_the_matcher_allows_only_the_rounding_shown():
    q = {n.text: n for n in numbers_in("21,619 and 1.63 ms, 5.3× and 21.6k tok/s; g128, 4-bit, M2, `64`, 3.09×, 2%")}
    assert list(q) == ["21,619", "1.63", "5.3×", "21.6k", "3.09×", "2"]
    assert q["21,619"].matches(21619.3) and not q["21,619"].matches(21620.6) and not q["21,619"].matches(21.6193)
    assert q["1.63"].matches(0.00163) and q["1.63"].matches(1.634) and not q["1.63"].matches(1.6351)
    assert q["21.6k"].matches(21619.3) and q["5.3×"].ratio and not q["5.3×"].matches(0.0053)
    assert q["2"].matches(0.0205) and numbers_in("3", header="TTFT (ms)")[0].matches(0.003)
    repeats = json.loads((RESULTS / "M2M3-repeats-h200.json").read_text())
    assert resolve(repeats, "results[config=M2/static].num_steps") == 1863
