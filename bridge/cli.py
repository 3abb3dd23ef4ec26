"""`python -m bridge COMMAND`: argparse commands with honest exit codes (0 ok, 1 runtime failure, 2 bad usage/config)."""
import argparse
import secrets
import sys
import threading

from . import log as logsetup
from . import pause, simulator, web
from .config import load_settings
from .errors import BridgeError, ConfigError
from .migrations import open_database

EPILOG = "Configuration comes from the environment, ./.env or ENV_FILE; see README.md."


def start(args, require_credentials=True):
    """Settings, logging and the database: what every command that touches the bridge needs."""
    settings = load_settings(require_credentials=require_credentials)
    masker = logsetup.setup(settings.log_level, settings.log_format, settings.secrets())
    masker.add(settings.our_client_id)
    open_database(settings.database_url)
    return settings


def _cmd_web(args):
    settings = start(args)
    web.watch_mapping(settings, threading.Event())
    web.serve(settings, web.create_app(settings))
    return 0


def _cmd_simulate(args):
    return simulator.main(["--cws-port", str(args.cws_port), "--g2a-port", str(args.g2a_port)])


def _cmd_credentials(args):
    print(f"OUR_API_CLIENT_ID={secrets.token_hex(16)}")
    print(f"OUR_API_CLIENT_SECRET={secrets.token_urlsafe(32)}")
    print("# paste both into G2A's \"Import API credentials\" form and into bridge.env", file=sys.stderr)
    return 0


def _cmd_pause(args):
    start(args, require_credentials=False)
    pause.set_paused(True)
    print(f"paused: G2A sees no stock, offers are not activated; {pause.REMEDY}")
    return 0


def _cmd_resume(args):
    start(args, require_credentials=False)
    pause.set_paused(False)
    print("resumed: selling again")
    return 0


COMMANDS = {
    "web": (_cmd_web, "serve G2A's merchant API with Waitress on HOST:PORT", "g2a-bridge web"),
    "simulate": (_cmd_simulate, "run the bundled fake CWS and fake G2A on loopback",
                 "g2a-bridge simulate --cws-port 8081 --g2a-port 8082"),
    "credentials": (_cmd_credentials, "print a new random client id/secret pair for G2A", "g2a-bridge credentials"),
    "pause": (_cmd_pause, "stop selling (persisted; web and worker obey within 2 s)", "g2a-bridge pause"),
    "resume": (_cmd_resume, "start selling again", "g2a-bridge resume"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="g2a-bridge", description="Dropship CodesWholesale stock on G2A.",
                                     epilog=EPILOG)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (func, summary, example) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary, epilog=f"example: {example}")
        command.set_defaults(func=func)
        if name == "simulate":
            command.add_argument("--cws-port", type=int, default=8081, help="fake CWS port (default 8081)")
            command.add_argument("--g2a-port", type=int, default=8082, help="fake G2A port (default 8082)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except BridgeError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
