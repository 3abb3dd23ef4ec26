"""README.md moves with the code: the two set-up commands first, every command, variable, worker job and alert kind."""
import re
from pathlib import Path

import pytest
from conftest import SECRET_KEY

from bridge.cli import COMMANDS
from bridge.config import Settings
from bridge.lease import Lease
from bridge.worker import Worker, build_jobs
from test_config import DOCUMENTED, EXTRAS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title):
    return README.split(f"\n## {title}\n")[1].split("\n## ")[0]


def test_the_readme_starts_with_the_two_set_up_commands():
    first_block = README.split("```")[1]
    commands = [line.split()[0] for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    assert README.index("```") < README.index("\n## ")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_documented(name):
    assert f"`g2a-bridge {name}" in section("Commands")


def test_every_command_the_readme_mentions_exists():
    mentioned = set(re.findall(r"(?:`|sudo )g2a-bridge ([a-z]+)\b", README))
    assert len(mentioned) > 5
    assert mentioned <= set(COMMANDS)


def test_every_variable_config_reads_is_in_the_configuration_table():
    table = section("Configuration")
    source = (ROOT / "bridge" / "config.py").read_text()
    read = set(re.findall(r'(?:raw|required|number|boolean|choice|url|client_pairs)\("([A-Z][A-Z0-9_]+)"', source))
    read |= {"DATABASE_URL", "ENV_FILE", "G2A_API_HASH", "G2A_API_URL"}
    assert set(DOCUMENTED) | set(EXTRAS) <= read
    missing = [name for name in sorted(read) if f"`{name}`" not in table]
    assert missing == []


def test_install_sh_variables_are_documented():
    for name in ("PYTHON", "G2A_BRIDGE_PIP_ARGS"):
        assert f"`{name}`" in section("Configuration")
        assert f"{name}" in (ROOT / "install.sh").read_text()


def test_every_worker_job_is_in_the_worker_table(database):  # the jobs check the key against a database
    jobs = build_jobs(Settings(bridge_secret_key=SECRET_KEY), None, None, None, None)
    names = Worker(jobs, Lease(), None).jobs
    table = section("Commands").split("### The worker")[1]
    assert [name for name in names if f"| {name} |" not in table] == []


def test_every_alert_kind_is_documented():
    sources = "".join(path.read_text() for path in (ROOT / "bridge").glob("*.py"))
    kinds = set(re.findall(r'raise_alert\(\s*"([a-z_]+)"', sources))
    assert {"order_failed", "low_balance", "auction_deactivated", "sync_failing", "auth_failed"} <= kinds
    assert [kind for kind in sorted(kinds) if f"`{kind}`" not in section("Daily operations")] == []


def test_the_lead_has_placeholders_for_observability_and_benchmarks():
    assert "\n## Observability\n" in README and "\n## Benchmarks\n" in README
