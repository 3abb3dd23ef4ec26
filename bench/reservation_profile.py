"""Where a POST /reservation's microseconds go: the web app and the bare app (bench/bare_app.py) called in-process
through WSGI, no network, one thread; CPU per request for each, then the top of a cProfile of the bridge.

Usage: .venv/bin/python bench/reservation_profile.py [--requests 3000] [--products 50] [--profile 25]
The bridge is the real create_app() behind the real WSGI wrapper, logging at WARNING as in contention_bench;
its products' CWS state is fresh (STOCK_MAX_AGE_SECONDS=3600), so no call leaves the process.
"""
import argparse
import cProfile
import io
import json
import logging
import pstats
import sys
import tempfile
import time
import uuid
import wsgiref.util
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlencode

import bare_app
from bridge import db, log, migrations, web
from bridge.config import load_settings
from bridge.metrics import Metrics
from bridge.products import MappingWatcher

CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret-0123456789abcdef"
FIRST_G2A_ID = 10000090000000


def environment(folder):
    return {"ENV_FILE": str(folder / "empty.env"), "OUR_API_CLIENT_ID": CLIENT_ID,
            "OUR_API_CLIENT_SECRET": CLIENT_SECRET, "CWS_CLIENT_ID": "x", "CWS_CLIENT_SECRET": "x",
            "CWS_CLIENT_SIGNATURE": "x", "CWS_API_BASE_URL": "http://127.0.0.1:9", "G2A_API_KEY": "x",
            "G2A_API_SECRET": "x", "G2A_API_BASE_URL": "http://127.0.0.1:9",
            "DATABASE_URL": f"sqlite:///{folder}/bridge.db", "PRODUCTS_FILE": str(folder / "products.json"),
            "BRIDGE_SECRET_KEY": "q3Tq1Xqz8b0Yw5H2cXc3mR3J0uQnQ9yD2mVd3v4o1cE=", "STOCK_MAX_AGE_SECONDS": "3600",
            "LOG_LEVEL": "WARNING"}


def seed(folder, settings, count):
    """`count` mapped products with plenty of fresh CWS stock; their G2A ids."""
    ids = {FIRST_G2A_ID + n: str(uuid.uuid4()) for n in range(count)}
    (folder / "products.json").write_text(json.dumps(
        {"products": [{"cws_product_id": cws, "g2a_product_id": g2a} for g2a, cws in ids.items()]}))
    MappingWatcher(settings.products_file, settings.default_fixed_profit, settings.default_fee).poll()
    db.CwsProduct.update(quantity=10**7, cost=Decimal("5.00"), fetched_at=db.utcnow(), checked_at=db.utcnow()).execute()
    return list(ids)


def call(app, method, path, body=b"", headers=None, query=""):
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query, REMOTE_ADDR="127.0.0.1",
                   CONTENT_LENGTH=str(len(body)), CONTENT_TYPE="application/json", **(headers or {}))
    environ["wsgi.input"] = io.BytesIO(body)
    seen = []
    answer = b"".join(app(environ, lambda status, headers, exc_info=None: seen.append(status)))
    return seen[0], answer


def bridge(folder, products):
    settings = load_settings(environment(folder))
    log.setup("WARNING")
    migrations.open_database(settings.database_url)
    g2a_ids = seed(folder, settings, products)
    metrics = Metrics("web")
    app = web.AccessLog(web.create_app(settings, metrics=metrics), metrics)
    _, body = call(app, "GET", "/oauth/token", query=urlencode({"client_id": CLIENT_ID,
                                                                "client_secret": CLIENT_SECRET}))
    return app, {"HTTP_AUTHORIZATION": "Bearer " + json.loads(body)["access_token"]}, g2a_ids


def run(app, headers, bodies, requests):
    """CPU microseconds per request over `requests` POST /reservation calls."""
    started = time.process_time()
    for n in range(requests):
        status, answer = call(app, "POST", "/reservation", bodies[n % len(bodies)], headers)
        assert status.startswith("200"), answer
    return (time.process_time() - started) / requests * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--products", type=int, default=50)
    parser.add_argument("--profile", type=int, default=25, help="profile lines to print (0: none)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "empty.env").write_text("")
        app, headers, g2a_ids = bridge(folder, args.products)
        bodies = [json.dumps([{"product_id": g2a_id, "quantity": 1}]).encode() for g2a_id in g2a_ids]
        bare = bare_app.make_app(str(folder / "bare.db"), "peewee")
        run(app, headers, bodies, 200), run(bare, {}, bodies, 200)  # warm both
        ours, theirs = run(app, headers, bodies, args.requests), run(bare, {}, bodies, args.requests)
        print(f"CPU per POST /reservation, in-process: bridge {ours:.0f} us, bare app (peewee insert) "
              f"{theirs:.0f} us, ratio {theirs / ours:.2f}x")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(run, app, headers, bodies, args.requests)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
            print(out.getvalue())
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
