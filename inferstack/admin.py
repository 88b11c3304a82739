"""``inferstack mode`` and ``inferstack workers``: the admin API from a terminal
(``INFERSTACK_API_URL``, default the local API; ``INFERSTACK_ADMIN_KEY`` when the API
needs one)."""

from __future__ import annotations

import os
import sys
import time

import httpx


def api_url() -> str:
    port = os.environ.get("INFERSTACK_PORT") or os.environ.get("PORT") or "8000"
    return os.environ.get("INFERSTACK_API_URL") or f"http://127.0.0.1:{port}"


def _client(url: str | None) -> httpx.Client:
    key = os.environ.get("INFERSTACK_ADMIN_KEY")
    return httpx.Client(base_url=url or api_url(), timeout=30,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def _fail(r: httpx.Response) -> int:
    try:
        message = r.json()["error"]["message"]
    except Exception:  # noqa: BLE001
        message = r.text
    print(f"{r.status_code}: {message}", file=sys.stderr)
    return 1


def _units(units: list[dict]) -> str:
    return "; ".join(f"{u['name']} {'+'.join(u['devices'])} {u['state']}" + (f" ({u['model']})" if u.get("model") else "")
                     for u in units)


def show_workers(url: str | None = None) -> int:
    with _client(url) as c:
        hosts, workers = c.get("/v1/admin/hosts"), c.get("/v1/admin/workers")
    if hosts.status_code != 200:
        return _fail(hosts)
    if workers.status_code != 200:
        return _fail(workers)
    for h in hosts.json()["data"]:
        mode = f"tp {h['model']} x{h['size']}" if h["mode"] == "tp" else "individual"
        print(f"host {h['host_id']}: {mode}, {h['state']}; devices {', '.join(h['devices'])}; {_units(h['units'])}"
              + (f"\n  last change {h['command']}: {h['command_state']} {h['error']}".rstrip() if h["command"] else ""))
    for w in workers.json()["data"]:
        print(f"worker {w['id']} on {w.get('host_id', '?')}: {w.get('mode', 'individual')} {'+'.join(w['devices'])}, "
              f"{w['state']}, models {', '.join(w['models']) or '-'}")
    return 0


def change_mode(host: str, mode: str, model: str | None, size: int | None, *, wait: bool = True,
                url: str | None = None, timeout_s: float = 1800) -> int:
    body = {"mode": mode} | ({"model": model} if model else {}) | ({"size": size} if size else {})
    with _client(url) as c:
        r = c.post(f"/v1/admin/hosts/{host}/mode", json=body)
        if r.status_code != 202:
            return _fail(r)
        change = r.json()
        print(f"{change['id']}: {host} -> {mode}" + (f" {change['model']} x{change['size']}" if model else ""))
        if not wait:
            return 0
        deadline, last = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            r = c.get(f"/v1/admin/hosts/{host}")
            if r.status_code != 200:
                return _fail(r)
            h = r.json()
            mine = h["command"] == change["id"]
            line = f"{h['state']}: {_units(h['units'])}" if mine else "queued behind an earlier change"
            if line != last:
                print(f"  {line}", flush=True)
                last = line
            if mine and h["command_state"] in ("done", "failed"):
                if h["command_state"] == "failed":
                    print(f"failed: {h['error']}", file=sys.stderr)
                    return 1
                print("done")
                return 0
            time.sleep(1)
    print(f"still not done after {timeout_s:.0f} s; see `inferstack workers`", file=sys.stderr)
    return 1
