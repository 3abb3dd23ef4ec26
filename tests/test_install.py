"""install.sh, the systemd units, bridge.env.example and products.json: the production set-up.

install.sh runs for real under a temporary --prefix (no root, user or systemctl needed).
"""

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

REPO = Path(__file__).resolve().parent.parent
OPERATOR_MD = REPO.parent / "shared" / "OPERATOR.md"
UNITS = ("g2a-bridge-web.service", "g2a-bridge-worker.service")
GENERATED = ("OUR_API_CLIENT_ID", "OUR_API_CLIENT_SECRET", "BRIDGE_SECRET_KEY")
# Same pattern as install.sh: "NAME=..." or "# NAME=..." at the start of a line.
NAME_RE = re.compile(r"^(?:# ?)?([A-Z][A-Z0-9_]*)=", re.M)
# A first install builds a venv; everything else is quick.
INSTALL_TIMEOUT = 300


def run_install(src, *args):
    return subprocess.run(
        ["bash", str(src / "install.sh"), *args],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL,
    )


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def copy_source(dest):
    """A private clone, so that edits to it (and other people's edits to the repo) stay apart."""
    ignore = shutil.ignore_patterns(".git", ".venv", "data", "__pycache__", ".pytest_cache", "*.db")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


class Installed:
    """Paths of one --prefix install, named as in OPERATOR.md."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.code = prefix / "opt/g2a-bridge"
        self.venv_python = self.code / ".venv/bin/python"
        self.etc = prefix / "etc/g2a-bridge"
        self.env_file = self.etc / "bridge.env"
        self.data = prefix / "var/lib/g2a-bridge"
        self.unit_dir = prefix / "etc/systemd/system"
        self.wrapper = prefix / "usr/local/bin/g2a-bridge"


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    """First install, then a plain re-run, then a re-run from a newer example; results kept."""
    src = copy_source(tmp_path_factory.mktemp("src") / "g2a-bridge")
    at = Installed(tmp_path_factory.mktemp("root"))
    runs = {"first": run_install(src, "--prefix", str(at.prefix), "--no-systemd")}
    assert_ok(runs["first"])
    at.env_after_first = at.env_file.read_bytes()
    (at.data / "bridge.db").write_bytes(b"pretend database")
    runs["again"] = run_install(src, "--prefix", str(at.prefix), "--no-systemd")
    at.env_after_again = at.env_file.read_bytes()
    with open(src / "bridge.env.example", "a") as example:
        example.write("# A setting from a newer version.\n# BRAND_NEW_SETTING=7\n")
    runs["upgrade"] = run_install(src, "--prefix", str(at.prefix), "--no-systemd")
    at.env_after_upgrade = at.env_file.read_bytes()
    at.runs = runs
    return at


def test_every_install_run_exits_0_even_though_the_credentials_are_still_missing(install):
    for result in install.runs.values():
        assert_ok(result)
    assert f"edit: {install.env_file}" in install.runs["first"].stdout


def test_the_code_is_copied_without_the_developer_folders(install):
    assert (install.code / "bridge").is_dir()
    assert (install.code / "requirements.txt").is_file()
    assert (install.code / "products.json").is_file()
    assert (install.code / "bridge.env.example").is_file()
    for unit in UNITS:
        assert (install.code / "systemd" / unit).is_file()
    for never in (".git", "data", "tests", ".env"):
        assert not (install.code / never).exists(), never


def test_the_venv_has_the_requirements_and_finds_the_code_from_any_directory(install):
    assert os.access(install.venv_python, os.X_OK)
    probe = "import bridge, dotenv, peewee, waitress; print(*bridge.__path__, sep='\\n')"
    result = subprocess.run(
        [str(install.venv_python), "-c", probe], cwd=install.data,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert str(install.code / "bridge") in result.stdout.splitlines()


def test_bridge_env_is_private_and_holds_freshly_generated_credentials(install):
    assert mode(install.env_file) == 0o600
    env = dotenv_values(install.env_file)
    assert re.fullmatch(r"[0-9a-f]{32}", env["OUR_API_CLIENT_ID"])
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", env["OUR_API_CLIENT_SECRET"])
    assert len(base64.urlsafe_b64decode(env["BRIDGE_SECRET_KEY"])) == 32


def test_the_generated_secret_key_is_a_fernet_key(install):
    fernet = pytest.importorskip("cryptography.fernet")
    key = dotenv_values(install.env_file)["BRIDGE_SECRET_KEY"]
    assert fernet.Fernet(key).decrypt(fernet.Fernet(key).encrypt(b"key")) == b"key"


def test_bridge_env_points_at_the_installed_database_and_mapping(install):
    env = dotenv_values(install.env_file)
    assert env["DATABASE_URL"] == f"sqlite:///{install.data}/bridge.db"
    assert env["PRODUCTS_FILE"] == str(install.etc / "products.json")


def test_the_operator_credentials_are_left_empty_for_the_operator(install):
    env = dotenv_values(install.env_file)
    for name in ("CWS_CLIENT_ID", "CWS_CLIENT_SECRET", "G2A_API_KEY", "G2A_API_SECRET"):
        assert env[name] == "", name
    assert "CWS_CLIENT_ID" in install.runs["first"].stdout


def test_products_json_is_copied_from_the_example(install):
    installed = install.etc / "products.json"
    assert json.loads(installed.read_text()) == json.loads((REPO / "products.json").read_text())


def test_the_data_folder_is_private(install):
    assert install.data.is_dir()
    assert mode(install.data) == 0o700


def test_the_units_point_at_the_prefix(install):
    for unit in UNITS:
        text = (install.unit_dir / unit).read_text()
        command = "web" if "web" in unit else "worker"
        assert f"ExecStart={install.code}/.venv/bin/python -P -m bridge {command}\n" in text
        assert f"EnvironmentFile={install.env_file}\n" in text
        assert "WorkingDirectory=/\n" in text
        assert f"ReadWritePaths={install.data}\n" in text
        assert f"DATABASE_URL=sqlite:///{install.data}/bridge.db\n" in text
        # Every path in the unit was moved under the prefix.
        for line in text.splitlines():
            for path in re.findall(r"/(?:opt|etc|var/lib)/g2a-bridge", line):
                assert f"{install.prefix}{path}" in line, line


def test_the_wrapper_is_executable_and_hands_the_env_file_to_python(install):
    assert os.access(install.wrapper, os.X_OK)
    text = install.wrapper.read_text()
    assert f"ENV_FILE='{install.env_file}'" in text
    assert f'exec "{install.venv_python}" -P -m bridge "$@"' in text
    # CWS secrets contain "$": the file must never be sourced by a shell.
    assert not re.search(r"^\s*(\.|source)\s", text, re.M)


def test_code_planted_in_the_data_folder_is_never_imported_by_the_wrapper(install):
    """The service user can write the data folder; the wrapper runs as root. Python must import nothing from it."""
    marker = install.prefix / "planted-code-ran"
    planted = {"bridge/__main__.py": "", "bridge/__init__.py": "", "argparse.py": "", "dotenv.py": ""}
    for name in planted:
        (install.data / name).parent.mkdir(exist_ok=True)
        (install.data / name).write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    try:
        result = subprocess.run([str(install.wrapper), "credentials"], cwd=install.data,
                                capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(install.data / "bridge")
        for name in ("argparse.py", "dotenv.py"):
            (install.data / name).unlink()
    assert not marker.exists(), marker.read_text()
    assert result.returncode == 0 and "OUR_API_CLIENT_SECRET=" in result.stdout, result.stderr


def test_the_wrapper_starts_python_in_safe_path_mode_outside_the_data_folder(install):
    text = install.wrapper.read_text()
    assert "\ncd / " in text and f'cd "{install.data}"' not in text
    assert re.findall(r'"\S+/python"( -P)? -m bridge', text) == [" -P", " -P"]


def test_a_second_run_keeps_config_and_data(install):
    assert install.env_after_again == install.env_after_first
    assert (install.data / "bridge.db").read_bytes() == b"pretend database"
    assert "bridge.env kept" in install.runs["again"].stdout


def test_an_upgrade_appends_new_settings_commented_out_and_changes_nothing_else(install):
    assert install.env_after_upgrade.startswith(install.env_after_first)
    added = install.env_after_upgrade[len(install.env_after_first):].decode()
    assert "# BRAND_NEW_SETTING=7\n" in added
    assert "BRAND_NEW_SETTING" not in dotenv_values(install.env_file)
    assert "BRAND_NEW_SETTING" in install.runs["upgrade"].stdout


def test_uninstall_removes_code_units_and_wrapper_and_keeps_config_and_data(install, tmp_path):
    # A copy of the install, so the other tests here still see it whole.
    at = Installed(tmp_path / "root")
    shutil.copytree(install.prefix, at.prefix, symlinks=True)
    result = run_install(REPO, "--uninstall", "--prefix", str(at.prefix), "--no-systemd")
    assert_ok(result)
    assert not at.code.exists()
    assert not at.wrapper.exists()
    for unit in UNITS:
        assert not (at.unit_dir / unit).exists()
    assert at.env_file.read_bytes() == install.env_file.read_bytes()
    assert (at.etc / "products.json").exists()
    assert (at.data / "bridge.db").exists()
    assert "kept" in result.stdout


def test_help_lists_the_options():
    result = run_install(REPO, "--help")
    assert_ok(result)
    for option in ("--prefix DIR", "--no-systemd", "--uninstall", "--help"):
        assert option in result.stdout


def test_an_unknown_option_is_bad_usage():
    result = run_install(REPO, "--bogus")
    assert result.returncode == 2
    assert "unknown option: --bogus" in result.stderr


def test_install_sh_is_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(REPO / "install.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- systemd units ---------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "ProtectClock": "yes", "ProtectHostname": "yes", "RestrictSUIDSGID": "yes",
    "RestrictRealtime": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet": "",
    "UMask": "0077", "ReadWritePaths": "/var/lib/g2a-bridge",
}


def unit_settings(unit):
    """(section, key) -> list of values; systemd units repeat keys, so configparser won't do."""
    settings, section = {}, None
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key), []).append(value)
    return settings


@pytest.mark.parametrize("unit", UNITS)
def test_each_unit_runs_its_command_as_the_service_user_with_the_installed_config(unit):
    service = {key: values for (section, key), values in unit_settings(unit).items() if section == "Service"}
    command = "web" if "web" in unit else "worker"
    # Safe path mode, started in a folder the service user cannot write: nothing in the data folder is imported.
    assert service["ExecStart"] == [f"/opt/g2a-bridge/.venv/bin/python -P -m bridge {command}"]
    assert service["WorkingDirectory"] == ["/"]
    assert service["EnvironmentFile"] == ["/etc/g2a-bridge/bridge.env"]
    assert "PRODUCTS_FILE=/etc/g2a-bridge/products.json" in service["Environment"]
    assert "DATABASE_URL=sqlite:////var/lib/g2a-bridge/bridge.db" in service["Environment"]
    assert service["User"] == service["Group"] == ["g2a-bridge"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartSec"] == ["5"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], key
    assert unit_settings(unit)[("Unit", "After")] == ["network-online.target"]


def test_the_worker_gets_sigterm_and_15_seconds_to_stop_warm():
    service = unit_settings("g2a-bridge-worker.service")
    assert service[("Service", "KillSignal")] == ["SIGTERM"]
    assert service[("Service", "TimeoutStopSec")] == ["15"]


def systemd_verify(*units):
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).strip()


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    probe = tmp_path / "probe.service"
    probe.write_text(f"[Service]\nExecStart={sys.executable} -V\n")
    status, output = systemd_verify(probe)
    if status != 0 or output:
        pytest.skip(f"systemd-analyze verify cannot run here: {output or status}")
    # The venv does not exist on this machine: point ExecStart at a binary that does, so that
    # verify's only possible complaints are about the units themselves.
    copies = []
    for unit in UNITS:
        text = (REPO / "systemd" / unit).read_text()
        copy = tmp_path / unit
        copy.write_text(text.replace("/opt/g2a-bridge/.venv/bin/python", sys.executable))
        copies.append(copy)
    assert systemd_verify(*copies) == (0, "")


# --- bridge.env.example and products.json ----------------------------------------------

def operator_md_section(title):
    if not OPERATOR_MD.exists():
        pytest.skip(f"{OPERATOR_MD} not found (shared/ sits beside the clone in CI)")
    return OPERATOR_MD.read_text().split(f"\n## {title}")[1].split("\n## ")[0]


def test_the_env_example_has_every_documented_variable_and_no_other():
    table = operator_md_section("Configuration")
    documented = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            documented |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1]))
    example = (REPO / "bridge.env.example").read_text()
    assert set(NAME_RE.findall(example)) == documented


def test_the_env_example_names_each_variable_once_after_a_one_line_explanation():
    lines = (REPO / "bridge.env.example").read_text().splitlines()
    names = [NAME_RE.match(line).group(1) for line in lines if NAME_RE.match(line)]
    assert len(names) == len(set(names))
    for number, line in enumerate(lines):
        if NAME_RE.match(line) and not NAME_RE.match(lines[number - 1]):
            assert lines[number - 1].startswith("# "), line


def test_the_env_example_leaves_credentials_empty_and_everything_else_at_its_default():
    values = dotenv_values(REPO / "bridge.env.example")
    assert set(values) == {
        *GENERATED, "CWS_CLIENT_ID", "CWS_CLIENT_SECRET", "CWS_CLIENT_SIGNATURE",
        "G2A_API_KEY", "G2A_API_SECRET",
    }
    assert set(values.values()) == {""}


def test_products_json_is_the_documented_example():
    documented = operator_md_section("products.json").split("```json\n")[1].split("```")[0]
    assert json.loads((REPO / "products.json").read_text()) == json.loads(documented)
