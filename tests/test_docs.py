"""The docs say only what exists: every `grace` subcommand and flag, and every project path, named in code in
README.md and docs/ is checked against the CLI's parser and the tree; the results pages are what `grace results`
generates from docs/results/data/."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?<![\w./-])grace ([a-z][\w-]*)(.*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
PATH = re.compile(r"(?<![\w./-])((?:grace_plugin|registry|eval_suites|configs|bench|tests|docs|\.ci)/[\w./-]*)")


def _subparsers(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def cli_surface() -> dict[str, dict]:
    """``{command: {"flags": {...}, "sub": {subcommand: {flags}}}}`` from the CLI's own parser."""
    from grace_app.cli import _parser

    surface = {}
    for name, sp in _subparsers(_parser()).choices.items():
        nested = _subparsers(sp)
        surface[name] = {"flags": {o for a in sp._actions for o in a.option_strings},
                         "sub": {n: {o for a in s._actions for o in a.option_strings}
                                 for n, s in (nested.choices.items() if nested else [])}}
    return surface


def code_segments(text: str) -> list[str]:
    """Lines of fenced code blocks, and inline code spans outside them."""
    segments = []
    for block in FENCE.findall(text):
        segments += block.splitlines()[1:-1]
    segments += INLINE.findall(FENCE.sub("", text))
    return segments


def problems(text: str, surface: dict, root: Path = ROOT) -> list[str]:
    out = []
    for seg in code_segments(text):
        for m in COMMAND.finditer(seg):
            cmd, rest = m.group(1), m.group(2).split(" #")[0]
            if cmd not in surface:
                out.append(f"unknown command `grace {cmd}`")
                continue
            flags = set(surface[cmd]["flags"])
            if surface[cmd]["sub"]:
                words = rest.split()
                if not words or words[0] not in surface[cmd]["sub"]:
                    out.append(f"`grace {cmd}` needs one of {sorted(surface[cmd]['sub'])}: {seg.strip()!r}")
                    continue
                flags |= surface[cmd]["sub"][words[0]]
            out += [f"`grace {cmd}` has no flag {f}" for f in FLAG.findall(rest) if f not in flags]
        for p in PATH.findall(seg):
            p = p.rstrip(".,:;)")
            if not any(ch in p for ch in "*<{") and not (root / p).exists():
                out.append(f"no such path {p}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_flags_and_paths_exist(page):
    assert problems(page.read_text(), cli_surface()) == []


def test_the_check_fails_on_a_removed_flag_command_or_path():
    text = ("Run `grace train --recipe ft --no-such-flag 3`, then\n\n```bash\ngrace evaluate --model m\n"
            "grace shards --out x\npython bench/no_such_bench.py   # see grace_plugin/trainer.py\n```\n")
    got = problems(text, cli_surface())
    assert got == ["unknown command `grace evaluate`",
                   "`grace shards` needs one of ['convert']: 'grace shards --out x'",
                   "no such path bench/no_such_bench.py",
                   "`grace train` has no flag --no-such-flag"]


def test_results_pages_are_what_grace_results_generates(tmp_path):
    """docs/results/*.md equal a fresh regeneration from docs/results/data/ (nothing edited by hand)."""
    from grace_app.studies.publish import regenerate

    regenerate(ROOT / "docs" / "results" / "data", tmp_path)
    committed = sorted(p.name for p in (ROOT / "docs" / "results").glob("*.md"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.md"))
    for name in committed:
        assert (tmp_path / name).read_text() == (ROOT / "docs" / "results" / name).read_text(), name


def test_results_add_and_regenerate_a_study_and_a_bench(tmp_path):
    """`grace results --add`: a study folder and a bench JSON become pages (the study's with its plot drawn from
    its study.json, beside its tables), the index lists them by group and the nav block of mkdocs.yml names exactly
    them, under their titles."""
    import json

    from grace_app.cli import main

    study = tmp_path / "studies" / "table6"
    study.mkdir(parents=True)
    axes = {"id": 50.0, "ood": 40.0, "adv": 10.0, "hm": 20.0}
    agg = {**axes, **{f"{k}_std": 0.0 for k in axes}}
    (study / "study.json").write_text(json.dumps({
        "study": "table6", "seeds": [0], "steps": 3, "size": "small", "seconds": 1.0, "methods": None,
        "column_definitions": {"ours": "ours", "paper": "paper"},
        "rows": {"ft": {"label": "ft", "axes": agg, "paper_axes": agg, "runs": []}},
        "paper_rows": [], "verdicts": [], "claims_omitted": 0}))
    bench = tmp_path / "sc.json"
    bench.write_text(json.dumps({"bench": "step_cost", "arch": "tiny", "batch": 4, "device": "cpu", "reps": 1,
                                 "torch": "x", "rows": {"ft": {"ms_per_step": 10.0, "ratio_to_ft": 1.0,
                                                               "floor": None, "images_per_s": 400.0,
                                                               "peak_gib": None, "mfu": None}}}))
    yml = tmp_path / "mkdocs.yml"
    yml.write_text("nav:\n  - Results:\n    # results-nav: written by `grace results`\n    - results/old.md\n"
                   "    # end results-nav\n  - Last: last.md\n")
    data, out = tmp_path / "data", tmp_path / "results"
    try:
        rc = main(["results", "--add", str(study), "--add", str(bench), "--data", str(data), "--out", str(out),
                   "--mkdocs", str(yml)])
    except SystemExit as e:  # pragma: no cover
        rc = e.code
    assert rc == 0
    assert sorted(p.name for p in data.iterdir()) == ["bench-step_cost-cpu-tiny-b4.json", "study-table6.json"]
    bench = "bench-step_cost-cpu-tiny-b4"
    assert sorted(p.name for p in out.glob("*.md")) == [f"{bench}.md", "index.md", "study-table6.md"]
    page = (out / "study-table6.md").read_text()
    assert (out / "study-table6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.index("](study-table6.png)") < page.index("| row |")  # the plot before the tables
    assert "| ft | 10.0 | 1.00 | - | 400 | - | - |" in (out / "bench-step_cost-cpu-tiny-b4.md").read_text()
    assert "# Table6 study, default world" in page
    index = (out / "index.md").read_text()
    assert "## Studies, default world\n\n- [Table6 study, default world](study-table6.md)" in index
    assert index.index("## Studies, default world") < index.index("## Benchmarks")
    world1 = tmp_path / "studies" / "table6-world1"  # the same study on a second world: a page of its own
    world1.mkdir()
    doc = json.loads((study / "study.json").read_text())
    (world1 / "study.json").write_text(json.dumps(dict(doc, world_seed=1, seeds=[1])))
    assert main(["results", "--add", str(world1), "--data", str(data), "--out", str(out), "--mkdocs", ""]) == 0
    assert "# Table6 study, world seed 1" in (out / "study-table6-world1.md").read_text()
    assert "# Table6 study, default world\n" in (out / "study-table6.md").read_text()  # world 0's page untouched
    (data / "study-table6-world1.json").unlink()
    (out / "study-table6-world1.md").unlink()
    summary = tmp_path / "report" / "summary.json"  # grace report's: rows, but not a quickstart's
    summary.parent.mkdir()
    summary.write_text(json.dumps({"definition": "strict", "rows": []}))
    assert main(["results", "--add", str(summary.parent), "--data", str(data), "--out", str(out), "--mkdocs",
                 ""]) == 2
    assert yml.read_text() == ("nav:\n  - Results:\n    # results-nav: written by `grace results`\n"
                               "    - results/index.md\n"
                               '    - "Studies, default world":\n'
                               '      - "Table6 study, default world": results/study-table6.md\n'
                               '    - "Benchmarks":\n'
                               f'      - "Step cost: tiny, batch 4, cpu": results/{bench}.md\n'
                               "    # end results-nav\n  - Last: last.md\n")


def test_results_add_a_bench_table(tmp_path):
    """A bench's table JSON (bench/lora_capacity.py, bench/grace_corners.py) becomes bench-<name>.md with its rows."""
    import json

    from grace_app.cli import main

    src = tmp_path / "t.json"
    src.write_text(json.dumps({"bench": "table", "name": "grace_corners", "title": "Corners", "command": "x",
                               "notes": ["a note"], "columns": ["rho", "status", "delta_l"],
                               "rows": [{"rho": 0.005, "status": "finished", "delta_l": 0.123456},
                                        {"rho": 0.05, "status": "diverged: a|b", "delta_l": None}]}))
    data, out = tmp_path / "data", tmp_path / "results"
    assert main(["results", "--add", str(src), "--data", str(data), "--out", str(out), "--mkdocs", ""]) == 0
    page = (out / "bench-grace_corners.md").read_text()
    assert "# Corners" in page and "a note" in page
    assert "| 0.005 | finished | 0.1235 |" in page and "| 0.05 | diverged: a\\|b | - |" in page
    # a bench that wrote its JSON straight into the data folder (--json docs/results/data/...) is added in place
    placed = data / "bench-grace_corners.json"
    placed.write_text(src.read_text().replace('"Corners"', '"Corners again"'))
    assert main(["results", "--add", str(placed), "--data", str(data), "--out", str(out), "--mkdocs", ""]) == 0
    assert "# Corners again" in (out / "bench-grace_corners.md").read_text()


def test_quickstart_page_names_its_tiny_clip():
    """A quickstart page says which tiny CLIP its rows start from (sha256, pretraining steps and threads), so two
    pages are comparable only when that sentence matches; an older summary without the record renders without it."""
    from grace_app.studies.publish import page_markdown

    row = {"method": "zero-shot", "id": 0.6, "ood": 0.4, "adv": 0.0, "hm": 0.0, "n": {}}
    doc = {"rows": [dict(row, paper=row)], "definition": "strict", "world": "v2", "seeds": [1], "steps": 300,
           "seconds": 1.0, "world_seed": 1,
           "tiny_clip": {"sha256": "ab" * 32, "pretrain": {"steps": 1500, "threads": 2}}}
    text = page_markdown(doc)
    assert "Tiny CLIP abababababab (sha256), pretrained 1500 steps on 2 thread(s), world v2 seed 1." in text
    del doc["tiny_clip"]
    assert "Tiny CLIP" not in page_markdown(doc)


_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b|\b(January|February|March|April|May|June|July|August|September|"
                   r"October|November|December) \d{1,2}, 20\d\d\b")
_COMMIT = re.compile(r"git show [0-9a-f]{7,40}|\bcommit [0-9a-f]{7,40}\b|`[0-9a-f]{7,40}`")


def _reference_pages():
    root = Path(__file__).resolve().parents[1]
    return [root / "README.md"] + sorted(p for p in (root / "docs").glob("*.md") if p.name != "HISTORY.md")


def test_reference_pages_carry_no_dates_or_commit_ids():
    """README and docs/*.md say what is; what changed, and when, is docs/HISTORY.md's (results pages are generated
    and dated by their generator)."""
    bad = [f"{p.name}:{i}: {m.group(0)}" for p in _reference_pages()
           for i, line in enumerate(p.read_text().splitlines(), 1) for m in (_DATE.search(line) or
                                                                              _COMMIT.search(line),) if m]
    assert bad == []


def test_the_date_and_commit_check_sees_them():
    assert _DATE.search("measured on 2026-12-06") and _COMMIT.search("see `git show eabb0cf:README.md`")
    assert _DATE.search("(December 6, 2026; every trial)")
    assert not _DATE.search("arXiv 2603.27139") and not _COMMIT.search("sha256 2672fda12ef5 (sha256)")


_SECTION_REF = re.compile(r'(README|docs/[A-Za-z0-9_/]+\.md) "([^"]+)"')


def _section_refs(root: Path):
    """Every ``README "Heading"`` or ``docs/PAGE.md "Heading"`` named in code, configs and tox/pyproject comments; a
    reference may be wrapped over two lines of a comment or docstring."""
    import re

    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix not in (".py", ".yaml", ".ini", ".toml") or \
                {".git", ".tox", "site"} & set(p.relative_to(root).parts):
            continue
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", p.read_text())
        for m in _SECTION_REF.finditer(text):
            yield p.relative_to(root), m.group(1), m.group(2)


def _headings(page: Path) -> set[str]:
    return {line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")}


def test_section_references_in_code_resolve():
    root = Path(__file__).resolve().parents[1]
    refs = [r for r in _section_refs(root) if r[0].parts[0] != "tests"]  # (this file names the form itself)
    assert len(refs) >= 5  # the check is reading the references
    bad = []
    for where, page, heading in refs:
        path = root / ("README.md" if page == "README" else page)
        if not path.is_file() or heading not in _headings(path):
            bad.append(f"{where}: {page} \"{heading}\"")
    assert bad == []


def test_a_broken_section_reference_is_found(tmp_path):
    (tmp_path / "README.md").write_text("# x\n## Train\n")
    (tmp_path / "a.py").write_text('# see README "Train" and README\n# "Evaluation\n# suites"\n')
    refs = list(_section_refs(tmp_path))
    assert [(r[1], r[2]) for r in refs] == [("README", "Train"), ("README", "Evaluation suites")]
    assert "Evaluation suites" not in _headings(tmp_path / "README.md")


def test_results_refuses_a_malformed_source_in_one_line(tmp_path, capsys):
    """A bench table whose rows are not objects keyed by its columns is refused naming the file, not a traceback."""
    import json

    from grace_app.cli import main

    data = tmp_path / "data"
    data.mkdir()
    (data / "bench-x.json").write_text(json.dumps({"bench": "table", "name": "x", "columns": ["a"], "rows": [[1]]}))
    assert main(["results", "--data", str(data), "--out", str(tmp_path / "out"), "--mkdocs", ""]) == 2
    err = capsys.readouterr().err
    assert "bench-x.json: not a study.json" in err and len(err.strip().splitlines()) == 1


def test_readme_vqa_table_is_the_generated_one():
    """The README's VQA quick-start rows are the results page's (generated from its summary.json), to the digit."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Visual question answering", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "[" in ln]
    page = (ROOT / "docs" / "results" / "quickstart-vqa.md").read_text()
    assert len(rows) == 5 and all(r in page for r in rows), rows


def test_a_bench_table_written_by_the_helper_becomes_a_page(tmp_path):
    """bench scripts write their tables with publish.write_bench_table; `grace results --add` makes the page: title,
    command, notes, one row per record (None as '-', '|' escaped)."""
    from grace_app.cli import main
    from grace_app.studies.publish import write_bench_table

    src = write_bench_table(tmp_path / "x.json", "my bench", "My bench", "python bench/x.py", ["a note"],
                            ["model", "score"], [{"model": "a|b", "score": 1.5}, {"model": "c", "score": None}],
                            summary=[1])
    data, out = tmp_path / "data", tmp_path / "results"
    assert main(["results", "--add", str(src), "--data", str(data), "--out", str(out), "--mkdocs", ""]) == 0
    page = (out / "bench-my-bench.md").read_text()
    assert "# My bench" in page and "`python bench/x.py`." in page and "- a note" in page
    assert "| a\\|b | 1.5 |" in page and "| c | - |" in page
