"""`python -m bridge COMMAND`: argparse commands with honest exit codes (0 ok, 1 failure, 2 bad usage/config)."""
import argparse
import json
import secrets
import sys
import threading

from peewee import PeeweeException

from . import db, demo, doctor, pause, report, sim, status, web, worker
from . import log as logsetup
from .budget import budgets_for
from .config import load_settings
from .cws import CwsClient
from .errors import BridgeError, ConfigError
from .metrics import Metrics
from .migrations import open_database
from .products import MappingWatcher
from .sync import SyncEngine

EPILOG = "Configuration comes from the environment, ./.env or ENV_FILE; see README.md."
# Failures an operator can act on from one line; anything else is a bug and keeps its traceback.
EXPECTED = (BridgeError, PeeweeException, OSError)
DAEMONS = ("web", "worker")  # they log at LOG_LEVEL; one-shot commands show warnings only, unless --verbose


def start(args, require_credentials=True):
    """Settings, logging and the database: what every command that touches the bridge needs."""
    settings = load_settings(require_credentials=require_credentials)
    setup_logging(settings, args)
    open_database(settings.database_url)
    return settings


def setup_logging(settings, args):
    level = settings.log_level
    if args.command not in DAEMONS and not args.verbose and level in ("DEBUG", "INFO"):
        level = "WARNING"
    masker = logsetup.setup(level, settings.log_format, settings.secrets())
    masker.add(settings.our_client_id)


def fulfilment_for(settings):
    return worker.fulfilment_for(settings, CwsClient(settings, budgets=budgets_for(settings, "cli")))


def _cmd_web(args):
    settings = start(args)
    stop = threading.Event()
    web.watch_mapping(settings, stop)
    metrics = Metrics("web")
    app = web.create_app(settings, metrics=metrics)
    web.publish_metrics(metrics, stop)
    web.serve(settings, app, metrics)
    return 0


def _cmd_worker(args):
    return worker.main(start(args))


def _cmd_simulate(args):
    return sim.main(["--cws-port", str(args.cws_port), "--g2a-port", str(args.g2a_port)])


def _cmd_demo(args):
    return demo.main(["--serve"] if args.serve else [])


def _cmd_status(args):
    settings = start(args, require_credentials=False)
    figures = status.collect(settings, db.utcnow())
    print(json.dumps(figures, indent=2) if args.json else status.render(figures))
    return 1 if figures["attention"] else 0


def _cmd_pause(args):
    start(args, require_credentials=False)
    pause.set_paused(True)
    print(f"paused: {pause.EFFECT}; {pause.REMEDY}")
    return 0


def _cmd_resume(args):
    start(args, require_credentials=False)
    pause.set_paused(False)
    print("resumed: selling again")
    return 0


def _cmd_sync(args):
    settings = start(args)
    MappingWatcher(settings.products_file, settings.default_fixed_profit, settings.default_fee).poll()
    clients = worker.upstream_clients(settings, role="cli")
    # Paced like the worker's sweep, and counted in the same catalogue window (budget.SHARED): a sync while the
    # worker sweeps slows both down, never adds to what CWS is asked.
    engine = SyncEngine(settings, *clients, pause.PauseSwitch(settings.service_enabled))
    report = engine.full_pass(db.utcnow(), dry_run=args.dry_run)
    for change in report.changes:
        print(change)
    for error in report.errors:
        print(f"! {error}")
    print(_sync_summary(report, args.dry_run))
    if report.failed or report.errors:
        raise BridgeError(f"the pass had {report.failed} failed writes and {len(report.errors)} errors (above)")
    return 0


def _sync_summary(report, dry_run):
    if dry_run:
        return f"dry run: {len(report.changes)} changes planned for {report.products} products, nothing sent"
    return (f"{report.products} products: {report.writes} writes sent, {report.failed} failed, "
            f"{report.deferred} price cuts deferred")


def _cmd_orders(args):
    settings = start(args, require_credentials=False)
    rows = fulfilment_for(settings).list_orders(state=args.state, limit=args.limit)
    for row in rows:
        print(f"{row['created_at'][:19]}  {row['state']:<10}  {row['id']}  g2a {row['g2a_order_id']}"
              + (f"  ({row['failure']})" if row.get("failure") else ""))
    print(f"{len(rows)} orders" + (f" in state {args.state}" if args.state else ""))
    return 0


def _cmd_order(args):
    settings = start(args, require_credentials=False)
    order = fulfilment_for(settings).describe(args.order_id, reveal=args.reveal)
    items = order.pop("items")
    for name, value in order.items():
        print(f"{name:<20} {'' if value is None else value}")
    for item in items:
        print(f"item {item['position']}: {item['id']}  {item['g2a_product_id']}  {item['kind']}  {item['state']}  "
              f"{item['key'] or '-'}")
    return 0


def _cmd_retry(args):
    settings = start(args)
    print(fulfilment_for(settings).retry(args.order_id, db.utcnow()))
    return 0


def _cmd_doctor(args):
    try:
        settings = load_settings()
    except ConfigError as err:
        for result in doctor.config_failures(err):
            print(result.line())
        print(f"error: the configuration has {len(err.problems)} problems (above); no other check was run",
              file=sys.stderr)
        return 2
    setup_logging(settings, args)
    failed = 0
    for result in doctor.checks(settings):
        print(result.line(), flush=True)
        failed += not result.ok
    if failed:
        print(f"error: {failed} checks failed (above)", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args):
    settings = start(args, require_credentials=False)
    now = db.utcnow()
    sales = report.build(settings, report.parse_since(args.since, now), now, by=args.by)
    if args.json:
        print(json.dumps(report.as_json(sales), indent=2))
    else:
        print(report.as_csv(sales) if args.csv else report.as_text(sales), end="" if args.csv else "\n")
    return 0


def _cmd_credentials(args):
    print(f"OUR_API_CLIENT_ID={secrets.token_hex(16)}")
    print(f"OUR_API_CLIENT_SECRET={secrets.token_urlsafe(32)}")
    print("# paste both into G2A's \"Import API credentials\" form and into bridge.env", file=sys.stderr)
    return 0


def _simulate_options(command):
    command.add_argument("--cws-port", type=int, default=8081, help="fake CWS port (default 8081)")
    command.add_argument("--g2a-port", type=int, default=8082, help="fake G2A port (default 8082)")


def _demo_options(command):
    command.add_argument("--serve", action="store_true", help="keep everything running and print curl lines")


def _status_options(command):
    command.add_argument("--json", action="store_true", help="print the figures as JSON")


def _report_options(command):
    command.add_argument("--since", type=_since, default="7d",
                         help="24h, 7d, 30d (any count of h or d) or a date YYYY-MM-DD (default 7d)")
    command.add_argument("--by", choices=("product", "day"), default="product", help="one row per product or day")
    output = command.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--csv", action="store_true", help="print the rows and the total as CSV")


def _since(text):
    try:
        report.parse_since(text, db.utcnow())
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--since ")) from None
    return text


def _sync_options(command):
    command.add_argument("--dry-run", action="store_true", help="read CWS and G2A, print the changes, send nothing")


def _orders_options(command):
    command.add_argument("--state", choices=db.ORDER_STATES, help="only orders in this state")
    command.add_argument("--limit", type=_positive, default=20, help="how many, newest first (default 20)")


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _order_options(command):
    command.add_argument("order_id", metavar="ID", help="our order id, the G2A order id or the reservation id")
    command.add_argument("--reveal", action="store_true", help="show the keys in full")


RETRY_DESCRIPTION = (
    "Drive a FAILED or stuck order again; it never buys twice. A FAILED order CWS holds is polled again, and if "
    "CWS completed it with fewer codes than bought, exactly the missing units are bought once under a new client "
    "order id. A FAILED order CWS refused takes returned keys from the pool first, then looks for its purchase in "
    "CWS's order history (adopted if there) and sends it only when CWS has no trace of it. A claimed order "
    "(purchase outcome unknown) is looked up in CWS's history now: adopted if there, sent again only "
    "CWS_RESEND_GRACE_SECONDS after its last send. A preorder or fulfilling order is checked at CWS now. A "
    "completed order is refused. Prints where the order is now.")


def _retry_options(command):
    command.description = RETRY_DESCRIPTION
    command.add_argument("order_id", metavar="ORDER_ID",
                         help="the FAILED or stuck (claimed, preorder, fulfilling) order to drive again")


# name: (function, options, summary, example)
COMMANDS = {
    "web": (_cmd_web, None, "serve G2A's merchant API with Waitress on HOST:PORT", "g2a-bridge web"),
    "worker": (_cmd_worker, None, "run the daemon: sync, CWS order polling, recovery, cleanup, alerts",
               "g2a-bridge worker"),
    "simulate": (_cmd_simulate, _simulate_options, "run the bundled fake CWS and fake G2A on loopback",
                 "g2a-bridge simulate --cws-port 8081 --g2a-port 8082"),
    "demo": (_cmd_demo, _demo_options, "run the bridge against the simulator and play G2A once",
             "g2a-bridge demo --serve"),
    "status": (_cmd_status, _status_options, "one screen: selling, offers, orders, sync, balance, worker "
               "(exit 1 when something needs attention)", "g2a-bridge status --json"),
    "pause": (_cmd_pause, None, "stop selling (persisted; web and worker obey within 2 s)", "g2a-bridge pause"),
    "resume": (_cmd_resume, None, "start selling again", "g2a-bridge resume"),
    "sync": (_cmd_sync, _sync_options, "run one reconcile pass of the G2A offers now", "g2a-bridge sync --dry-run"),
    "orders": (_cmd_orders, _orders_options, "list orders, newest first", "g2a-bridge orders --state failed"),
    "order": (_cmd_order, _order_options, "show one order and its keys (masked unless --reveal)",
              "g2a-bridge order 80201000000001"),
    "retry": (_cmd_retry, _retry_options, "drive a FAILED or stuck order again (never buys twice)",
              "g2a-bridge retry 3f6c1c52-7a3e-4c55-9b0e-1d2f3a4b5c6d"),
    "doctor": (_cmd_doctor, None, "check config, database, products.json, keys, CWS and G2A "
               "(exit 1 when a check fails, 2 on bad config)", "g2a-bridge doctor"),
    "report": (_cmd_report, _report_options, "sales and money: orders, keys, revenue, G2A fee, CWS cost, profit, "
               "returns, failed and stuck orders, best and worst products (read-only)",
               "g2a-bridge report --since 30d --by day"),
    "credentials": (_cmd_credentials, None, "print a new random client id/secret pair for G2A",
                    "g2a-bridge credentials"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="g2a-bridge", description="Dropship CodesWholesale stock on G2A.",
                                     epilog=EPILOG)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (func, options, summary, example) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary, epilog=f"example: {example}")
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks for errors")
        if options:
            options(command)
        command.set_defaults(func=func)
    return parser


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help (0) or bad usage (2), already printed by argparse
        return exit.code
    try:
        return args.func(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except EXPECTED as err:
        if args.verbose:
            raise
        print(f"error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
