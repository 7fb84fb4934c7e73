"""docs/recipes/<recipe>.md are generated from the Config dataclasses and must be up to date."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_config_docs.py"
_spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
gen_config_docs = importlib.util.module_from_spec(_spec)
sys.modules["gen_config_docs"] = gen_config_docs
_spec.loader.exec_module(gen_config_docs)


def test_committed_docs_match_the_config_dataclasses():
    problems = gen_config_docs.stale_pages()
    assert not problems, f"{problems}: run python scripts/gen_config_docs.py"


def test_every_field_of_every_recipe_is_documented():
    pages = gen_config_docs.expected_pages()
    assert gen_config_docs.DOCS_DIR / "sft_loop.md" in pages
    for path, text in pages.items():
        module = __import__(f"training.recipes.{path.stem}", fromlist=["Config"])
        names = []
        for f in dataclasses.fields(module.Config):
            default = gen_config_docs._default(f)
            if dataclasses.is_dataclass(default):
                names += [f"{f.name}.{g.name}" for g in dataclasses.fields(default)]
            else:
                names.append(f.name)
        assert len(names) > 20
        for name in names:
            assert f"| `{name}` |" in text, f"{path.name} lacks {name}"
        assert "| `infra.num_threads` | `int \\| None` | `None` | torch intra-op threads" in text


def test_attribute_docstrings_are_inherited_and_overridden(tmp_path):
    @dataclasses.dataclass(kw_only=True)
    class Base:
        a: int = 1
        """Base doc of a."""
        b: str = "x"
        """Base doc of b."""

    @dataclasses.dataclass(kw_only=True)
    class Child(Base):
        a: int = 2
        b: str = "y"
        """Child doc of b."""

    rows = {name: (default, doc) for name, _, default, doc in gen_config_docs.field_rows(Child)}
    assert rows["`a`"] == ("`2`", "Base doc of a.")
    assert rows["`b`"] == ("`'y'`", "Child doc of b.")


def test_check_mode_reports_a_stale_page(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gen_config_docs, "DOCS_DIR", tmp_path)
    (tmp_path / "sft_loop.md").write_text("old\n")
    (tmp_path / "gone_loop.md").write_text(f"{gen_config_docs.GENERATED_MARKER} old\n")
    (tmp_path / "handwritten.md").write_text("notes\n")
    monkeypatch.setattr(gen_config_docs, "REPO", tmp_path.parent)
    assert gen_config_docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "sft_loop.md is stale; run python scripts/gen_config_docs.py" in err
    assert "gone_loop.md documents no recipe" in err
    assert gen_config_docs.main([]) == 0
    assert not (tmp_path / "gone_loop.md").exists()  # a generated page of a removed recipe
    assert gen_config_docs.main(["--check"]) == 0
    assert (tmp_path / "handwritten.md").exists()  # pages it did not generate are left alone
