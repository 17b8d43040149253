"""Benchmark sections of a shared Markdown file: each writer replaces only its own."""

from llmsparse.core.outputs import write_section


def test_write_section_creates_appends_and_replaces_only_its_own(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "a", "first A")
    write_section(path, "b", "only B")
    write_section(path, "a", "second A")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "first A" not in text and text.count("second A") == 1 and text.count("only B") == 1
    assert text.index("<!-- a:begin -->") < text.index("second A") < text.index("<!-- a:end -->")
    assert text.index("<!-- a:end -->") < text.index("<!-- b:begin -->")
