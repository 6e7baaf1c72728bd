#!/usr/bin/env python3
"""Soak load against a running `keel serve` (loopback only; scripts/soak starts the server).

For --minutes M: --clients streaming clients (each one request at a time, on a new connection),
about --disconnect of them hanging up mid-stream at a random token; --slow slow readers (a tiny
receive buffer, a few bytes at a time); --idle kept-alive connections that send one request and
then sit idle until the server's idle timeout closes them, then come back. Then the load stops,
the server is given time to settle, and the script asserts, from /metrics and the JSON
telemetry endpoints:
  - keel_kv_blocks_used == 0 and keel_state_slots_used == 0 (when the model has state slots);
  - keel_num_requests_running == 0 and keel_num_requests_waiting == 0;
  - keel_request_success_total + keel_request_aborted_total == requests the server accepted;
  - GET /v1/telemetry/requests holds min(finished, its ring) records, all 'length' or 'stop';
  - no client saw a 5xx, a malformed response or a stream cut off that it did not cut itself;
  - the server's RSS at the end is within --rss-growth-mb of its RSS after the warm-up, and
    within the KV pools' size (+128 MB) of its RSS at start-up.
Prints the figures. Standard library only. Exit status 0 when every assertion holds.
"""

import argparse
import http.client
import json
import random
import socket
import sys
import threading
import time

WORDS = ("stone water lantern river bridge town night market bell road garden north tide "
         "glass ember harbor winter copper field").split()


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.values = {}

    def add(self, name, amount=1):
        with self.lock:
            self.values[name] = self.values.get(name, 0) + amount

    def get(self, name):
        with self.lock:
            return self.values.get(name, 0)

    def snapshot(self):
        with self.lock:
            return dict(self.values)


def prompt_text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))


def request_body(rng, index, max_tokens):
    if rng.random() < 0.3:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": prompt_text(rng)}]}
    else:
        path = "/v1/completions"
        body = {"prompt": prompt_text(rng)}
    body.update({"max_tokens": max_tokens, "stream": True, "temperature": 0.7, "seed": index,
                 "ignore_eos": True})
    return path, json.dumps(body)


def get(port, path, timeout=30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def metrics(port):
    status, text = get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        # Families with several samples (per-label) are summed; the ones asserted on have one.
        values[name] = values.get(name, 0.0) + float(value)
    return values


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stream_once(port, rng, index, counters, disconnect_at, slow):
    """One streaming request. disconnect_at: hang up after that many events (None: read all)."""
    path, body = request_body(rng, index, rng.randint(8, 48) if not slow else 96)
    # Long: a request may queue behind max_waiting others on a slow machine; the server, not
    # the client, is under test.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        connection.connect()
        if slow:
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status == 429:
            counters.add("rejected_429")
            response.read()
            time.sleep(float(response.getheader("Retry-After", "1")))
            return
        if response.status != 200:
            counters.add(f"error_status_{response.status}")
            counters.add("client_errors")
            response.read()
            return
        counters.add("accepted")
        events = 0
        while True:
            if disconnect_at is not None and events >= disconnect_at:
                counters.add("disconnected")
                return  # finally: close the socket mid-stream
            if slow:
                time.sleep(0.05)
            line = response.readline()
            if not line:
                counters.add("slow_cut" if slow else "cut_off")
                if not slow:
                    counters.add("client_errors")
                return
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                counters.add("completed")
                return
            event = json.loads(payload)
            if "error" in event:
                counters.add("slow_error_event" if slow else "error_event")
                if not slow:
                    counters.add("client_errors")
                return
            events += 1
            counters.add("events")
    except (OSError, http.client.HTTPException, ValueError) as error:
        counters.add("slow_exception" if slow else "client_exception")
        if not slow:
            counters.add("client_errors")
            counters.add(f"exception {type(error).__name__}")
    finally:
        connection.close()


def streaming_client(port, seed, counters, stop, disconnect, slow):
    rng = random.Random(seed)
    index = seed * 1000003
    while not stop.is_set():
        index += 1
        disconnect_at = rng.randint(1, 7) if (not slow and rng.random() < disconnect) else None
        stream_once(port, rng, index, counters, disconnect_at, slow)


def idle_client(port, counters, stop):
    """Keeps a connection open and silent after one /health, until the server closes it."""
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            counters.add("idle_connect_failed")
            time.sleep(1)
            continue
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(5)
            head = sock.recv(65536)
            if not head.startswith(b"HTTP/1.1 200"):
                counters.add("idle_bad_answer")
                counters.add("client_errors")
            sock.settimeout(1)
            while not stop.is_set():
                try:
                    data = sock.recv(4096)
                except socket.timeout:
                    continue
                if not data:
                    counters.add("idle_closed_by_server")
                    break
        except OSError:
            counters.add("idle_closed_by_server")
        finally:
            sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="the keel serve process (RSS)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--disconnect", type=float, default=0.10)
    parser.add_argument("--slow", type=int, default=4)
    parser.add_argument("--idle", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=60.0,
                        help="RSS after this much load is the baseline of the growth bound")
    parser.add_argument("--rss-growth-mb", type=float, default=64.0,
                        help="bound on RSS growth from the warm-up to the end")
    parser.add_argument("--kv-pool-mb", type=float, default=0.0,
                        help="the KV pools' size over all ranks: RSS may grow by this much "
                             "(+128 MB) from start-up to the end, as the pool's pages are touched")
    parser.add_argument("--settle-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--request-ring", type=int, default=4096,
                        help="finished-request records the server keeps (TelemetryConfig)")
    args = parser.parse_args()

    counters = Counters()
    stop = threading.Event()
    start_metrics = metrics(args.port)
    rss_start = rss_mb(args.pid)
    threads = []
    for c in range(args.clients):
        threads.append(threading.Thread(target=streaming_client, daemon=True,
                                        args=(args.port, args.seed * 100000 + c, counters, stop,
                                              args.disconnect, False)))
    for c in range(args.slow):
        threads.append(threading.Thread(target=streaming_client, daemon=True,
                                        args=(args.port, args.seed * 100000 + 50000 + c,
                                              counters, stop, 0.0, True)))
    idle_threads = [threading.Thread(target=idle_client, daemon=True,
                                     args=(args.port, counters, stop)) for _ in range(args.idle)]
    t0 = time.monotonic()
    for thread in threads + idle_threads:
        thread.start()
    duration = args.minutes * 60
    rss_warm = None
    rss_peak = rss_start
    max_open = 0
    next_report = t0 + 30
    while time.monotonic() - t0 < duration:
        time.sleep(2)
        now = time.monotonic()
        rss = rss_mb(args.pid)
        rss_peak = max(rss_peak, rss)
        if rss_warm is None and now - t0 >= min(args.warmup_s, duration / 2):
            rss_warm = rss
        m = metrics(args.port)
        max_open = max(max_open, m.get("keel_http_open_connections", 0))
        if now >= next_report:
            next_report += 30
            snap = counters.snapshot()
            print(f"[{now - t0:6.0f} s] accepted {snap.get('accepted', 0)} completed "
                  f"{snap.get('completed', 0)} disconnected {snap.get('disconnected', 0)} "
                  f"running {m.get('keel_num_requests_running', 0):.0f} waiting "
                  f"{m.get('keel_num_requests_waiting', 0):.0f} kv_blocks "
                  f"{m.get('keel_kv_blocks_used', 0):.0f} open "
                  f"{m.get('keel_http_open_connections', 0):.0f} rss {rss:.0f} MB", flush=True)
    stop.set()
    load_s = time.monotonic() - t0
    for thread in threads + idle_threads:
        thread.join(timeout=max(1.0, args.settle_s - (time.monotonic() - t0 - load_s)))
    stragglers = sum(thread.is_alive() for thread in threads + idle_threads)

    # Settle: nothing running or waiting, every block back.
    deadline = time.monotonic() + args.settle_s
    while True:
        end_metrics = metrics(args.port)
        if (end_metrics["keel_num_requests_running"] == 0
                and end_metrics["keel_num_requests_waiting"] == 0
                and end_metrics["keel_kv_blocks_used"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(1)
    rss_end = rss_mb(args.pid)
    if rss_warm is None:
        rss_warm = rss_end
    snap = counters.snapshot()
    delta = {name: end_metrics.get(name, 0) - start_metrics.get(name, 0)
             for name in ("keel_request_success_total", "keel_request_aborted_total",
                          "keel_generation_tokens_total", "keel_http_slow_reader_aborts_total",
                          "keel_http_evicted_idle_total", "keel_http_evicted_slow_total",
                          "keel_http_refused_total", "keel_num_preemptions_total")}
    finished = int(delta["keel_request_success_total"])
    aborted = int(delta["keel_request_aborted_total"])
    accepted = snap.get("accepted", 0)
    status, body = get(args.port, "/v1/telemetry/requests?limit=1000000")
    records = json.loads(body)["requests"] if status == 200 else []
    reasons = sorted({record["finish_reason"] for record in records})
    health_status, _ = get(args.port, "/health")

    print()
    print(f"soak: {load_s / 60:.1f} min of load, {args.clients} streaming clients "
          f"({args.disconnect:.0%} disconnecting), {args.slow} slow readers, {args.idle} idle "
          f"kept-alive connections")
    print(f"  requests accepted (sent)   {accepted}")
    print(f"  finished                   {finished}")
    print(f"  aborted                    {aborted}")
    print(f"  client disconnects         {snap.get('disconnected', 0)}")
    print(f"  completed streams          {snap.get('completed', 0)}")
    print(f"  429 (retried)              {snap.get('rejected_429', 0)}")
    print(f"  slow-reader aborts         {int(delta['keel_http_slow_reader_aborts_total'])}"
          f" (slow streams cut {snap.get('slow_cut', 0) + snap.get('slow_error_event', 0)})")
    print(f"  idle closed by the server  {snap.get('idle_closed_by_server', 0)}")
    print(f"  evicted idle/slow, refused {int(delta['keel_http_evicted_idle_total'])}/"
          f"{int(delta['keel_http_evicted_slow_total'])}, {int(delta['keel_http_refused_total'])}")
    print(f"  preemptions                {int(delta['keel_num_preemptions_total'])}")
    print(f"  tokens generated           {int(delta['keel_generation_tokens_total'])} "
          f"({delta['keel_generation_tokens_total'] / load_s:.1f} tok/s)")
    print(f"  max open connections       {max_open:.0f}")
    print(f"  RSS MB start/warm/peak/end {rss_start:.0f} / {rss_warm:.0f} / {rss_peak:.0f} / "
          f"{rss_end:.0f}")
    print(f"  client errors              {snap.get('client_errors', 0)}"
          + "".join(f"; {k} {v}" for k, v in snap.items()
                    if k.startswith("error_status") or k.startswith("exception")))

    failures = []

    def check(ok, text):
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
        if not ok:
            failures.append(text)

    print()
    check(stragglers == 0, f"every client thread ended ({stragglers} still running)")
    check(end_metrics["keel_kv_blocks_used"] == 0,
          f"KV blocks in use back to 0 ({end_metrics['keel_kv_blocks_used']:.0f})")
    if "keel_state_slots_used" in end_metrics:
        check(end_metrics["keel_state_slots_used"] == 0,
              f"state slots in use back to 0 ({end_metrics['keel_state_slots_used']:.0f})")
    else:
        print("  n/a  state slots: the model has no recurrent state")
    check(end_metrics["keel_num_requests_running"] == 0
          and end_metrics["keel_num_requests_waiting"] == 0,
          f"running/waiting 0 ({end_metrics['keel_num_requests_running']:.0f}/"
          f"{end_metrics['keel_num_requests_waiting']:.0f})")
    check(finished + aborted == accepted,
          f"finished + aborted == sent ({finished} + {aborted} = {finished + aborted} vs "
          f"{accepted})")
    check(accepted > 0 and snap.get("disconnected", 0) > 0, "load ran and some clients hung up")
    ring = len(records)
    check(status == 200 and ring == min(finished, args.request_ring)
          and all(reason in ("length", "stop") for reason in reasons),
          f"/v1/telemetry/requests: {ring} records of {finished} finished (ring "
          f"{args.request_ring}), reasons {reasons}")
    check(end_metrics.get("keel_http_open_connections", 0) <= 1,
          f"connections back to this one ({end_metrics.get('keel_http_open_connections', 0):.0f})")
    check(health_status == 200, f"/health {health_status}")
    check(snap.get("client_errors", 0) == 0, f"no client errors ({snap.get('client_errors', 0)})")
    check(rss_end <= rss_start + args.kv_pool_mb + 128,
          f"RSS end {rss_end:.0f} MB <= start {rss_start:.0f} MB + KV pools "
          f"{args.kv_pool_mb:.0f} MB + 128 MB")
    check(rss_end <= rss_warm + args.rss_growth_mb,
          f"RSS end {rss_end:.0f} MB <= warm {rss_warm:.0f} MB + {args.rss_growth_mb:.0f} MB")
    print()
    print("soak: PASS" if not failures else f"soak: FAIL ({len(failures)})")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
