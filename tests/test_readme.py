"""The README's configs table is generated from the config files, never typed by hand."""

from tests.scripts import REPO, load_script


def test_readme_configs_table_matches_the_configs():
    module = load_script("update_readme")
    text = (REPO / "README.md").read_text()
    assert module.render(text) == text, "README table is stale: python experiments/update_readme.py"


def test_readme_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
    text = (REPO / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in quickstart.split("```bash")[1:]]
    commands = [c.split("```")[0].strip() for c in commands]
    assert len(commands) == 2
    assert "jaxgen train --config configs/bert.py:smoke" in commands[0]
    assert commands[1] in (REPO / ".ci/run").read_text()
