"""install.sh, the systemd units, bridge.env.example and products.json: the production set-up.

install.sh runs for real under a temporary --prefix (no root, user or systemctl needed).
"""

import base64
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import DEMO, free_port, write_products
from dotenv import dotenv_values

from bridge.postbacks import expected_hash
from bridge.sim import CWS_CLIENT_ID, CWS_CLIENT_SECRET, CWS_CLIENT_SIGNATURE, G2A_API_KEY, G2A_API_SECRET

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
        assert f"LoadCredential=bridge.env:{install.env_file}\n" in text
        assert f"Environment=ENV_FILE=/run/credentials/{unit}/bridge.env\n" in text
        assert "WorkingDirectory=/\n" in text
        assert f"ReadWritePaths={install.data}\n" in text
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


def unit_settings(unit, folder=REPO / "systemd"):
    """(section, key) -> list of values; systemd units repeat keys, so configparser won't do."""
    settings, section = {}, None
    for line in (folder / unit).read_text().splitlines():
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
    # bridge.env is read by the bridge (python-dotenv), never by systemd, and is the only source of settings. It
    # stays 0600 root: systemd copies it into the service's credentials folder, where ENV_FILE points.
    assert "EnvironmentFile" not in service
    assert service["LoadCredential"] == ["bridge.env:/etc/g2a-bridge/bridge.env"]
    assert f"ENV_FILE=/run/credentials/{unit}/bridge.env" in service["Environment"]
    assert "MALLOC_ARENA_MAX=2" in service["Environment"]  # bench/soak.py, docs/decisions.md
    assert ("PYTHONMALLOC=malloc" in service["Environment"]) == (command == "worker")  # bridge/memory.py
    assert not [value for value in service["Environment"] if value.split("=")[0] in NAME_RE.findall(
        (REPO / "bridge.env.example").read_text())]
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


def test_the_env_example_names_only_files_the_repo_has():
    example = (REPO / "bridge.env.example").read_text()
    for name in set(re.findall(r"\b[\w.-]+\.(?:md|json|sh)\b", example)):
        assert (REPO / name).exists() or (REPO / "docs" / name).exists(), f"bridge.env.example points to {name}"


def systemd_env_file(path):
    """KEY=value lines as systemd's EnvironmentFile= reads them (systemd.exec(5)): whole-line comments only, so an
    inline "# note" stays in the value; one pair of surrounding quotes is removed."""
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def test_the_env_example_parses_the_same_for_systemd_and_python_dotenv():
    example = REPO / "bridge.env.example"
    assert systemd_env_file(example) == dotenv_values(example)


# --- the installed units and wrapper, run as systemd and an operator would ---------------------------------
# These edit the installed bridge.env (restored afterwards), so they stay last in the module.

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def service_settings(unit_file):
    return {key: values for (section, key), values in unit_settings(unit_file.name, unit_file.parent).items()
            if section == "Service"}


def unit_environment(unit_file):
    """The variables of a unit's Environment= lines."""
    env = {}
    for line in service_settings(unit_file).get("Environment", []):
        env.update(item.partition("=")[::2] for item in shlex.split(line))
    return env


def load_credentials(unit_file, credentials):
    """What systemd does at each start for LoadCredential=NAME:FILE (systemd.exec(5), "Credentials"): it reads FILE
    as root and puts a read-only copy NAME in /run/credentials/UNIT/ (here `credentials`/UNIT, a folder of its own),
    which only the service's user may read, and sets CREDENTIALS_DIRECTORY. Returns (folder, path it stands for)."""
    folder = credentials / unit_file.name
    folder.mkdir(parents=True)
    for entry in service_settings(unit_file).get("LoadCredential", []):
        name, _, source = entry.partition(":")
        shutil.copyfile(source, folder / name)
        (folder / name).chmod(0o400)
    folder.chmod(0o500)
    return folder, f"/run/credentials/{unit_file.name}"


def unit_process(unit_file, credentials):
    """(argv, cwd, environment) of a unit's ExecStart as systemd starts it: its credentials loaded (into
    `credentials`), Environment= lines (paths in /run/credentials/UNIT pointing at that copy), then EnvironmentFile=
    files read systemd's way, and no other variable but PATH."""
    service = service_settings(unit_file)
    folder, run_path = load_credentials(unit_file, credentials)
    env = {"PATH": SYSTEMD_PATH, "CREDENTIALS_DIRECTORY": str(folder)}
    env.update({name: value.replace(run_path, str(folder)) for name, value in unit_environment(unit_file).items()})
    for path in service.get("EnvironmentFile", []):
        env.update(systemd_env_file(path.lstrip("-")))
    (command,) = service["ExecStart"]
    return shlex.split(command), service["WorkingDirectory"][0], env


@pytest.fixture
def live_config(install, sim, tmp_path):
    """The installed bridge.env filled in as an operator would, inline comments included, pointed at the
    simulator; yields the web's base URL."""
    original = install.env_file.read_bytes()
    port = free_port()
    install.env_file.write_bytes(original + (
        "\n# Filled in by the operator.\n"
        f"CWS_CLIENT_ID={CWS_CLIENT_ID}\nCWS_CLIENT_SECRET={CWS_CLIENT_SECRET}\n"
        f"CWS_CLIENT_SIGNATURE='{CWS_CLIENT_SIGNATURE}'   # from the CWS panel\n"
        f"G2A_API_KEY={G2A_API_KEY}\nG2A_API_SECRET={G2A_API_SECRET}\n"
        "G2A_ENV=sandbox  # testing\n"
        f"CWS_API_BASE_URL={sim.cws_url}\nG2A_API_BASE_URL={sim.g2a_url}\n"
        f"PORT={port}  # behind Caddy\nSYNC_INTERVAL_SECONDS=1\n"
        f"DATABASE_URL=sqlite:///{tmp_path}/bridge.db\n"
        f"PRODUCTS_FILE={tmp_path}/products.json\n").encode())
    write_products(tmp_path / "products.json", DEMO)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        install.env_file.write_bytes(original)


def start_process(argv, cwd, env, log_path, shell=False):
    """In a session of its own, so that stopping it also stops a command a shell runs (the printed lines)."""
    log = open(log_path, "wb")
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, shell=shell,
                               start_new_session=True)
    log.close()
    return process


def stop_process(process):
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until(check, what, process, log_path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: exit {process.poll()}\n{Path(log_path).read_text(errors='replace')}")


def health(url):
    try:
        return requests.get(f"{url}/health", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_the_installed_units_run_with_the_config_the_cli_reads_inline_comments_included(install, live_config,
                                                                                           tmp_path):
    web_log, worker_log = tmp_path / "web.log", tmp_path / "worker.log"
    processes = [unit_process(install.unit_dir / unit, tmp_path / "credentials") for unit in UNITS]
    # They read systemd's copy of the 0600 file, never the file itself.
    assert all(str(install.env_file) not in " ".join(env.values()) for _, _, env in processes)
    web = start_process(*processes[0], web_log)
    worker = start_process(*processes[1], worker_log)
    try:
        wait_until(lambda: health(live_config), "the web unit serving /health", web, web_log)
        postback = {"type": "STOCK", "authHash": expected_hash(CWS_CLIENT_ID, CWS_CLIENT_SIGNATURE),
                    "products": [{"productId": DEMO[0]["cws_product_id"]}]}
        assert requests.post(f"{live_config}/cws/postback", json=postback, timeout=5).status_code == 200
        wait_until(lambda: "sync.full_pass" in worker_log.read_text(errors="replace"),
                   "the worker unit completing a sync pass", worker, worker_log)
    finally:
        stop_process(web)
        stop_process(worker)


def foreground_commands(output):
    return [line.strip() for line in output.splitlines() if line.strip().startswith("cd ") and " -m bridge " in line]


def test_the_install_prints_the_two_foreground_commands_and_they_run_as_the_units_do(install, live_config,
                                                                                      tmp_path):
    commands = foreground_commands(install.runs["first"].stdout)
    assert len(commands) == 2
    for command, unit in zip(commands, UNITS):
        service = service_settings(install.unit_dir / unit)
        # The file systemd would copy for the unit comes on standard input, opened by root's shell (the service
        # user cannot open it), and ENV_FILE=- reads it there.
        assert command.startswith(f"cd {service['WorkingDirectory'][0]} && umask 077 && ")
        assert command.endswith(f"{service['ExecStart'][0]} <{install.env_file}")
        env = unit_environment(install.unit_dir / unit)
        assert env.pop("ENV_FILE").startswith("/run/credentials/") and " env ENV_FILE=- " in command
        assert all(f" {name}={value} " in command for name, value in env.items())
    log = tmp_path / "web.log"
    web = start_process(commands[0], "/", {"PATH": SYSTEMD_PATH}, log, shell=True)
    try:
        wait_until(lambda: health(live_config), "the printed web command serving /health", web, log)
    finally:
        stop_process(web)


def test_the_readme_shows_the_foreground_commands_a_root_install_prints(install):
    printed = [command.replace(str(install.prefix), "").replace(" env ", " runuser -u g2a-bridge -- env ", 1)
               for command in foreground_commands(install.runs["first"].stdout)]
    readme = (REPO / "README.md").read_text().split("### Without systemd")[1].split("```sh\n")[1].split("```")[0]
    assert readme.splitlines() == printed


def test_the_wrapper_gives_help_without_reading_the_config_or_entering_the_data_folder(install):
    hidden = [(install.env_file, install.env_file.with_name("hidden.env")), (install.data, install.data.with_name("x"))]
    for path, away in hidden:
        path.rename(away)
    try:
        for args in (["--help"], ["status", "--help"]):
            result = subprocess.run([str(install.wrapper), *args], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert "usage:" in result.stdout
        refused = subprocess.run([str(install.wrapper), "status"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "cannot read" in refused.stderr
    finally:
        for path, away in hidden:
            away.rename(path)


def test_uninstall_warns_about_running_services_and_removes_the_wants_links(install, tmp_path):
    at = Installed(tmp_path / "root")
    shutil.copytree(install.prefix, at.prefix, symlinks=True)
    wants = at.unit_dir / "multi-user.target.wants"
    wants.mkdir()
    for unit in UNITS:
        (wants / unit).symlink_to(f"../{unit}")
    # A process that looks like a web started by hand from this install.
    running = subprocess.Popen(["bash", "-c", 'exec -a "$0" sleep 60', f"{at.code}/.venv/bin/python -m bridge web"])
    try:
        result = run_install(REPO, "--uninstall", "--prefix", str(at.prefix), "--no-systemd")
    finally:
        running.kill()
        running.wait()
    assert_ok(result)
    assert f"still running (PID {running.pid})" in result.stdout and "keep going" in result.stdout
    assert not any(wants.iterdir())


def test_an_env_file_without_the_paths_gets_this_installs_paths(install, tmp_path):
    env_file = tmp_path / "bridge.env"
    env_file.write_text("OUR_API_CLIENT_ID=x\n# DATABASE_URL=sqlite:///elsewhere.db\n")
    result = source_install(f"VENV={install.code}/.venv ENV_FILE={env_file} DATA_DIR=/srv/data ETC_DIR=/srv/etc",
                            "append_install_paths")
    assert result.stdout.split() == ["DATABASE_URL", "PRODUCTS_FILE"]
    values = dotenv_values(env_file)
    assert values["DATABASE_URL"] == "sqlite:////srv/data/bridge.db"
    assert values["PRODUCTS_FILE"] == "/srv/etc/products.json"
    again = source_install(f"VENV={install.code}/.venv ENV_FILE={env_file} DATA_DIR=/x ETC_DIR=/y",
                           "append_install_paths")
    assert again.stdout == "" and dotenv_values(env_file)["DATABASE_URL"] == "sqlite:////srv/data/bridge.db"


# --- single install.sh functions (sourced) ------------------------------------------------------------------

def source_install(*lines, path=None):
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    env.pop("SUDO_USER", None)
    script = "\n".join([f"source {shlex.quote(str(REPO / 'install.sh'))}", *lines])
    return subprocess.run([shutil.which("bash"), "-c", script], capture_output=True, text=True, env=env, timeout=60)


def system_python_is_new_enough():
    return subprocess.run(["/usr/bin/python3", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                          capture_output=True).returncode == 0 if Path("/usr/bin/python3").exists() else False


def test_the_system_python_is_chosen_over_a_python3_first_on_root_path(tmp_path):
    if not system_python_is_new_enough():
        pytest.skip("/usr/bin/python3 is missing or older than 3.11")
    fake_home = tmp_path / "root/.pyenv/shims"
    fake_home.mkdir(parents=True)
    (fake_home / "python3").symlink_to(sys.executable)
    path = f"{fake_home}:{os.environ['PATH']}"
    assert source_install("PYTHON=", "pick_python", 'echo "$PYTHON"', path=path).stdout == "/usr/bin/python3\n"
    chosen = source_install("PYTHON=python3", "pick_python", 'echo "$PYTHON"', path=path)
    assert chosen.stdout == "python3\n"  # an explicit PYTHON is the operator's choice


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root and runuser")


def test_every_run_makes_bridge_env_0600_owned_by_root_and_the_service_group_again(tmp_path):
    env_file = tmp_path / "bridge.env"
    env_file.write_text("OUR_API_CLIENT_ID=x\n")
    env_file.chmod(0o640)  # as installs before LoadCredential= left it
    tools = tmp_path / "bin"  # a chown that notes its arguments: the g2a-bridge group need not exist here
    tools.mkdir()
    (tools / "chown").write_text(f"#!/bin/sh\necho \"$*\" >{tmp_path / 'chown.args'}\n")
    (tools / "chown").chmod(0o755)
    result = source_install(f"MANAGE_USER=1 ENV_FILE={env_file}", "own_env_file", path=f"{tools}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert mode(env_file) == 0o600
    assert (tmp_path / "chown.args").read_text() == f"root:g2a-bridge {env_file}\n"


@needs_root
def test_an_interpreter_the_service_user_cannot_run_fails_the_install_in_one_line(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    real = Path(os.path.realpath(sys.executable))
    shutil.copy2(real, private / "python3")
    result = source_install(f"check_runnable_by nobody {shlex.quote(str(private / 'python3'))}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "the service user nobody cannot run" in result.stderr
    assert source_install("check_runnable_by nobody /usr/bin/python3").returncode == 0


def test_an_interpreter_under_a_home_folder_fails_the_install_in_one_line():
    homed = [python for python in (shutil.which("python3"), sys.executable) if python and
             os.path.realpath(python).startswith(("/root/", "/home/"))]
    if not homed:
        pytest.skip("no Python under /root or /home here")
    result = source_install(f"check_runnable_by nobody {shlex.quote(homed[0])}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "ProtectHome=yes" in result.stderr


def test_hints_say_sudo_only_to_a_user_who_has_it_and_needs_it(tmp_path):
    no_sudo = tmp_path / "bin"
    no_sudo.mkdir()
    for tool in ("id", "dirname"):
        if shutil.which(tool):
            (no_sudo / tool).symlink_to(shutil.which(tool))
    assert source_install("sudo_prefix", path=str(no_sudo)).stdout == ""
    fake_sudo = tmp_path / "sudo-bin"
    fake_sudo.mkdir()
    (fake_sudo / "sudo").write_text("#!/bin/sh\n")
    (fake_sudo / "sudo").chmod(0o755)
    path = f"{fake_sudo}:{os.environ['PATH']}"
    expected = "" if os.geteuid() == 0 else "sudo "  # root who logged in as root types no sudo
    assert source_install("sudo_prefix", path=path).stdout == expected
    if os.geteuid() == 0:
        assert source_install("export SUDO_USER=alice", "sudo_prefix", path=path).stdout == "sudo "
