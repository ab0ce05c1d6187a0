"""The HTML of ``GET /admin/status``: the admin JSON views as one server-rendered page.

Plain HTML with inline CSS and a meta refresh: no script, no external asset, every value
passed through ``html.escape``. ``render`` takes the same data ``/admin/backends`` and
``/admin/config`` answer, so the page and the JSON cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

#: Seconds between the page's reloads of itself.
REFRESH = 5

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:60%}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f3}.meta{color:#555}.empty{color:#777;font-style:italic}
.healthy,.ok,.start{color:#0a7a2f;font-weight:600}.unhealthy,.error{color:#b00020;font-weight:600}
.ejected{color:#b35c00;font-weight:600}.unchanged{color:#555}
.reason{color:#b00020;font-family:ui-monospace,monospace;font-size:.9em}
.bar{width:12em;height:.8em;background:#e4e4e8;display:inline-block;vertical-align:middle}
.bar span{display:block;height:100%;background:#2b6cb0}
code{font-family:ui-monospace,monospace}
"""


def _text(value: object) -> str:
    return "—" if value is None or value == "" else escape(str(value))


def _row(cells: Iterable[str], header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], empty: str,
           name: str) -> str:
    if not rows:
        return f'<p class="empty" id="{name}">{escape(empty)}</p>'
    body = "".join(_row(r) for r in rows)
    return (f'<table id="{name}"><thead>{_row((escape(h) for h in head), header=True)}'
            f"</thead><tbody>{body}</tbody></table>")


def _state(state: object) -> str:
    word = escape(str(state))
    return f'<span class="{word}">{word}</span>'


def _models(backends: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    rows = []
    models = config.get("models", {})
    for name, view in backends.items():
        members = view.get("backends", [])
        up = sum(1 for b in members if b.get("up"))
        groups = ", ".join(models.get(name, {}).get("endpoints", []))
        rows.append([f"<code>{escape(name)}</code>", _text(groups), _text(view.get("policy")),
                     f"{up} of {len(members)}", _text(view.get("in_flight")),
                     _text(view.get("queued"))])
    return _table(("model", "groups", "policy", "backends up", "in flight", "queued"), rows,
                  "no models", "models")


def _engine(load: Mapping[str, Any] | None) -> str:
    """A backend's last ``/metrics`` reading (the scored policies'), or why there is none."""
    if not load:
        return "—"
    if "running" not in load:
        return f'<span class="reason">{escape(str(load.get("error")))}</span>'
    kv = load.get("kv_cache_usage") or 0.0
    text = (f"waiting {load.get('waiting')}, running {load.get('running')}, "
            f"KV {kv * 100:.0f} %, {load.get('age_s')} s old")
    error = load.get("error")
    return escape(text) + ("" if not error else
                           f'<br><span class="reason">{escape(str(error))}</span>')


def _backends(backends: Mapping[str, Any]) -> str:
    rows = []
    for name, view in backends.items():
        for url, reason in view.get("discovery_errors", {}).items():
            rows.append([f"<code>{escape(name)}</code>", _text(url), _state("unhealthy"),
                         "—", "—", "—", f'<span class="reason">{escape(str(reason))}</span>'])
        for b in view.get("backends", []):
            limit = b.get("max_in_flight")
            in_flight = _text(b.get("in_flight")) + ("" if limit is None else f" / {_text(limit)}")
            reason = b.get("last_error")
            rows.append([
                f"<code>{escape(name)}</code>",
                (f"{_text(b['name'])}: " if b.get("name") else "") + f"{_text(b.get('url'))}<br>"
                f"<span class=meta>{_text(b.get('address'))}</span>",
                _state(b.get("state")) + ("" if b.get("up") or b.get("state") != "ejected"
                                          else " (no traffic)"),
                in_flight, _engine(b.get("engine_load")), _text(b.get("consecutive_5xx")),
                "—" if not reason else f'<span class="reason">{escape(str(reason))}</span>',
            ])
    return _table(("model", "backend", "health", "in flight", "engine", "failures in a row",
                   "last failure"), rows, "no backends", "backends")


def _reloads(config: Mapping[str, Any]) -> str:
    rows = [[_text(r.get("at")), _state(r.get("result")), f"<code>{_text(r.get('sha256'))}</code>",
             "—" if not r.get("error") else f'<span class="reason">{escape(r["error"])}</span>']
            for r in reversed(config.get("recent_reloads", []))]
    return _table(("at", "outcome", "sha256 served", "reason"), rows, "no loads yet", "reloads")


def _batches(batches: Sequence[Mapping[str, Any]] | str | None) -> str:
    if batches is None:
        return ""
    if isinstance(batches, str):
        table = f'<p class="reason" id="batches">batches unavailable: {escape(batches)}</p>'
    else:
        rows = []
        for b in batches:
            counts = b.get("request_counts", {})
            total, done = counts.get("total") or 0, (counts.get("completed") or 0) + (
                counts.get("failed") or 0)
            share = 100 * done // total if total else 0
            rows.append([
                f"<code>{_text(b.get('id'))}</code>", _text(b.get("tenant")),
                _state(b.get("status")), _text(b.get("endpoint")), _text(b.get("model")),
                f'<span class="bar"><span style="width:{share}%"></span></span> '
                f"{done} of {total} ({_text(counts.get('failed'))} failed)",
                _text(b.get("created_at")),
            ])
        table = _table(("batch", "tenant", "status", "endpoint", "model", "progress",
                        "created"), rows, "no batch in progress", "batches")
    return f"<h2>Batches in progress</h2>{table}"


def render(backends: Mapping[str, Any], config: Mapping[str, Any],
           batches: Sequence[Mapping[str, Any]] | str | None, now: str) -> str:
    """The page: ``backends`` and ``config`` as ``/admin/backends`` and ``/admin/config``
    answer them, ``batches`` the running batches (a string: why they could not be read;
    None: batch is off), ``now`` the time of rendering."""
    last_error = config.get("last_error")
    refused = ("" if not last_error else
               f'<p class="reason" id="last-error">last refused edit: {escape(last_error)}</p>')
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH}">'
        "<title>routeyard status</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>routeyard status</h1>"
        f'<p class="meta">config <code>{_text(config.get("sha256"))}</code> from '
        f'{_text(config.get("source"))}, loaded {_text(config.get("loaded_at"))}; '
        f"page rendered {escape(now)}</p>{refused}"
        f"<h2>Models</h2>{_models(backends, config)}"
        f"<h2>Backends</h2>{_backends(backends)}"
        f"<h2>Reloads</h2>{_reloads(config)}"
        f"{_batches(batches)}"
        "</body></html>\n"
    )
