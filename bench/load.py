"""Closed-loop load on one route at N keep-alive connections: wrk (Debian package `wrk`) when installed, else
Python clients (slower, but the same for everything compared in one run). Returns (req/s, p99 ms, non-2xx)."""
import http.client
import json
import re
import shutil
import statistics
import subprocess
import threading
import time


def tool():
    return "wrk" if shutil.which("wrk") else "python"


def hammer(port, method, path, headers, body, seconds, connections, folder):
    """`body`: None, one body, or a list of bodies sent in turn."""
    bodies = body if isinstance(body, list) else [body]
    run = _wrk if tool() == "wrk" else _python
    return run(port, method, path, headers, bodies, seconds, connections, folder)


def _wrk(port, method, path, headers, bodies, seconds, connections, folder):
    script = folder / "load.lua"
    lines = [f'wrk.method = "{method}"'] + [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    if bodies != [None]:
        lines += ["bodies = {" + ", ".join(json.dumps(body) for body in bodies) + "}", "turn = 0",
                  "request = function()", "  turn = turn % #bodies + 1",
                  "  return wrk.format(nil, nil, nil, bodies[turn])", "end"]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{seconds}s",
                          "--latency", "-s", str(script), f"http://127.0.0.1:{port}{path}"],
                         capture_output=True, text=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, p99, int(non2xx.group(1)) if non2xx else 0


def _ms(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def _python(port, method, path, headers, bodies, seconds, connections, folder):
    latencies, errors, stop_at = [], [0], time.monotonic() + seconds

    def client():
        conn, turn = http.client.HTTPConnection("127.0.0.1", port), 0
        while time.monotonic() < stop_at:
            started, turn = time.perf_counter(), turn + 1
            conn.request(method, path, bodies[turn % len(bodies)], headers)
            answer = conn.getresponse()
            answer.read()
            latencies.append(time.perf_counter() - started)
            errors[0] += not 200 <= answer.status < 300
    threads = [threading.Thread(target=client) for _ in range(connections)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000
    return len(latencies) / seconds, p99, errors[0]
