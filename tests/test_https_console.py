"""The audit console (gatewayd.https.console) against a real Gateway over TLS: who gets in
(policy: auditors with a fresh MFA; staff 403 everywhere; console off 404), search filters and
paging, a record's page, CSV/JSONL downloads, live sessions and the kill (CSRF, reason, audit
first), audit.read written before anything is shown, chain status."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from https_harness import Harness, csrf_token, running_gateway

import gatewayd.https.console as console_module
from gatewayd.audit import AuditLog, AuditWriteError
from gatewayd.audit.index import AuditIndex, SearchPage
from gatewayd.https.console import ChainWatch

ADMIN = "/.gatewayd/admin/"
HTML = {"Accept": "text/html"}
ORIGIN = {"Origin": "https://gateway.test"}  # the harness's https.public_url
# Every console route and the method it answers, plus a wrong method on the search page.
ROUTES = [("GET", ""), ("GET", "records/1"), ("GET", "sessions"), ("GET", "chain"),
          ("GET", "export.csv"), ("GET", "export.jsonl"), ("GET", "report?month=2026-11"),
          ("GET", "console.css"), ("GET", "?user=alice"), ("POST", "sessions/kill"),
          ("POST", ""), ("GET", "no-such-page")]


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path, console={"page_size": 10}):
        yield harness


async def get(client: aiohttp.ClientSession, gw: Harness, path: str,
              **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
    async with client.get(gw.base + ADMIN + path, allow_redirects=False,
                          headers={**HTML, **kwargs.pop("headers", {})}, **kwargs) as resp:
        return resp.status, await resp.text(), resp


async def kill(client: aiohttp.ClientSession, gw: Harness, form: dict[str, str],
               headers: dict[str, str] | None = None) -> tuple[int, str, aiohttp.ClientResponse]:
    sent = {**ORIGIN, **HTML, **(headers or {})}
    async with client.post(gw.base + ADMIN + "sessions/kill", data=form, headers=sent,
                           allow_redirects=False) as resp:
        return resp.status, await resp.text(), resp


def handle_of(gw: Harness, user: str) -> str:
    return next(s.handle for s in gw.gateway.sessions.sessions() if s.user == user)


def emit_many(gw: Harness, count: int, **fields: Any) -> None:
    for n in range(count):
        gw.gateway.audit.emit("access.deny", frontend="https", service="groupware",
                              method="GET", path=f"/groupware/{n}", status=403, **fields)


def reads(gw: Harness) -> list[dict[str, Any]]:
    return gw.audit_events("audit.read")


# --- who gets in ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_staff_gets_403_on_every_console_url(gw: Harness, method: str, path: str) -> None:
    alice = await gw.signed_in("alice")
    carol = await gw.signed_in("carol")
    carol_handle = handle_of(gw, "carol")
    form = {"csrf_token": "forged", "session": carol_handle, "reason": "x"}
    async with alice.request(method, gw.base + ADMIN + path, headers={**HTML, **ORIGIN},
                             data=form if method == "POST" else None,
                             allow_redirects=False) as resp:
        assert resp.status == 403, await resp.text()
        assert "Access denied" in await resp.text()
    assert carol.closed is False and any(s.handle == carol_handle
                                         for s in gw.gateway.sessions.sessions())
    assert not reads(gw) and not gw.audit_events("admin.session_kill")
    denied = gw.audit_events("access.deny")
    assert denied[-1]["user"] == "alice" and denied[-1]["service"] == "admin"


async def test_no_session_goes_to_the_login_page(gw: Harness) -> None:
    status, _, resp = await get(gw.client(), gw, "sessions")
    assert status == 302
    assert resp.headers["Location"].startswith("/.gatewayd/login?next=")


async def test_console_disabled_is_404_even_for_an_auditor(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path, console={"enabled": False}):
        carol = await gw.signed_in("carol")
        for path in ("", "sessions", "?user=alice"):
            status, body, _ = await get(carol, gw, path)
            assert status == 404, body
        assert not reads(gw)


async def test_an_auditor_with_a_stale_code_is_asked_to_step_up(gw: Harness) -> None:
    carol = await gw.signed_in("carol")
    status, _, _ = await get(carol, gw, "sessions")
    assert status == 200  # just signed in: a fresh code
    gw.clock.advance(8 * 60)
    assert (await get(carol, gw, "sessions"))[0] == 200  # active: the idle timeout restarts
    gw.clock.advance(8 * 60)  # the code is 16 minutes old; the rule wants 15 at most
    status, _, resp = await get(carol, gw, "?user=alice")
    assert status == 302
    target = resp.headers["Location"]
    assert target.startswith("/.gatewayd/stepup?next=")
    assert not reads(gw)  # nothing was read before the step-up
    async with carol.get(gw.base + target, headers=HTML) as page:
        token = csrf_token(await page.text(), "/.gatewayd/stepup")
    async with carol.post(gw.base + "/.gatewayd/stepup", allow_redirects=False,
                          headers={"Origin": gw.base, **HTML},
                          data={"code": gw.code("carol"), "csrf_token": token,
                                "next": ADMIN + "?user=alice"}) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == ADMIN + "?user=alice"
    status, body, _ = await get(carol, gw, "?user=alice")
    assert status == 200 and 'id="results"' in body
    assert gw.audit_events("access.step_up")[-1]["service"] == "admin"


# --- search --------------------------------------------------------------------------------


async def test_search_by_user_pages_back_newest_first_and_is_audited(gw: Harness) -> None:
    emit_many(gw, 23, user="alice", source_ip="192.0.2.7", device="pc-0042")
    emit_many(gw, 5, user="bob", source_ip="192.0.2.8")
    carol = await gw.signed_in("carol")
    seen: list[int] = []
    query = "?user=alice"
    for _ in range(4):
        status, body, _ = await get(carol, gw, query)
        assert status == 200, body
        seqs = [int(s) for s in re.findall(r'href="/.gatewayd/admin/records/(\d+)"', body)]
        seen += seqs
        users = re.findall(r"</a></td><td>[^<]*</td><td>[^<]*</td><td>([^<]*)</td>", body)
        assert set(users) == {"alice"}
        older = re.search(r'id="older" href="/.gatewayd/admin/(\?[^"]+)"', body)
        if older is None:
            break
        query = older.group(1).replace("&amp;", "&")
    expected = sorted((r["seq"] for r in gw.audit_events() if r.get("user") == "alice"),
                      reverse=True)
    assert len(expected) >= 23 and seen == expected  # every one, newest first, once
    searches = [r for r in reads(gw) if r["view"] == "search"]
    assert [r["records"] for r in searches] == [10, 10, len(expected) - 20]
    assert all(r["filter_user"] == "alice" and r["user"] == "carol" for r in searches)
    assert searches[1]["before_seq"] == seen[9]
    assert searches[0]["session"] == handle_of(gw, "carol")


async def test_search_filters_by_device_event_result_text_and_time(gw: Harness) -> None:
    emit_many(gw, 2, user="alice", device="pc-0042", source_ip="192.0.2.7")
    emit_many(gw, 3, user="alice", device="pc-0099", source_ip="192.0.2.7")
    carol = await gw.signed_in("carol")
    _, body, _ = await get(carol, gw, "?device=pc-0042")
    assert body.count("pc-0042</td>") == 2 and "pc-0099</td>" not in body
    _, body, _ = await get(carol, gw, "?event=auth.*&user=carol")
    assert "auth.success" in body and "access.deny" not in body
    _, body, _ = await get(carol, gw, "?result=failure&user=alice")
    assert body.count("access.deny") == 5
    _, body, _ = await get(carol, gw, "?text=/groupware/1&user=alice")
    assert body.count("/groupware/1</td>") == 2  # one per device batch
    # The audit log stamps records with the real clock: split the window at a record's time
    # (audit-timezone local time, as a datetime-local field sends it, here with seconds).
    first_0099 = next(r for r in gw.audit_events() if r.get("device") == "pc-0099")
    split = first_0099["ts"][:-6]  # without its +09:00
    _, body, _ = await get(carol, gw, f"?user=alice&from={split}")
    assert body.count("pc-0099</td>") == 3 and "pc-0042</td>" not in body
    last = reads(gw)[-1]
    assert last["filter_since"] == first_0099["ts"] and last["records"] == 3
    _, body, _ = await get(carol, gw, f"?user=alice&device=pc-0042&to={split}")
    assert body.count("pc-0042</td>") == 2
    _, body, _ = await get(carol, gw, "?user=alice&from=2099-01-01T00:00")
    assert "No records match." in body


@pytest.mark.parametrize(("query", "message"), [
    ("?from=yesterday", "from: expected a date and time"),
    ("?to=2026-13-01T00:00", "to: expected a date and time"),
    ("?from=2026-11-24T10:00&to=2026-11-24T09:00", "to: must be later than from"),
    ("?result=maybe", "result: choose success or failure"),
    ("?text=" + "x" * 201, "text: at most 200 characters"),
    ("?user=%07bell", "user: control characters"),
    ("?user=alice&before_seq=-1", "before_seq: expected a record number"),
    # Unicode digits: "²".isdigit() is True but int("²") raises; "٣" would be read as 3.
    ("?user=alice&before_seq=%C2%B2", "before_seq: expected a record number"),
    ("?user=alice&before_seq=%D9%A3", "before_seq: expected a record number"),
    ("export.csv?user=alice&before_seq=%C2%B2", "before_seq: expected a record number"),
    ("export.jsonl?user=alice&before_seq=%C2%B2", "before_seq: expected a record number"),
    ("report?month=%D9%A2%D9%A0%D9%A2%D9%A6-11", "month: expected a month"),
    ("report?month=9999-12", "month: expected a month"),  # past datetime's last year
    ("report?month=3000-01", "month: expected a month"),
])
async def test_bad_search_input_is_a_400_page(gw: Harness, query: str, message: str) -> None:
    carol = await gw.signed_in("carol")
    status, body, _ = await get(carol, gw, query)
    assert status == 400 and message in body
    assert not reads(gw)


async def test_user_text_is_escaped_everywhere(gw: Harness) -> None:
    evil = '<script>alert("x")</script>'
    gw.gateway.audit.emit("access.deny", user=evil, frontend="https", path="/<b>")
    carol = await gw.signed_in("carol")
    _, body, resp = await get(carol, gw, "?text=script")
    assert evil not in body and "&lt;script&gt;" in body
    assert "script-src" not in resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"


# --- record, export ------------------------------------------------------------------------


async def test_a_record_shows_every_field_and_links_to_its_context(gw: Harness) -> None:
    await gw.signed_in("alice")
    start = gw.audit_events("session.start")[-1]
    carol = await gw.signed_in("carol")
    status, body, _ = await get(carol, gw, f"records/{start['seq']}")
    assert status == 200
    for key in ("user", "session", "source_ip", "hash", "prev"):
        assert f"<th>{key}</th>" in body and str(start[key]) in body
    assert f'href="/.gatewayd/admin/?session={start["session"]}"' in body
    day = start["ts"][:10]
    assert f"user=alice&amp;from={day}T00%3A00" in body  # "this user that day"
    read = reads(gw)[-1]
    assert read["view"] == "record" and read["record_seq"] == start["seq"]
    assert read["records"] == 1
    status, _, _ = await get(carol, gw, "records/999999")
    assert status == 404 and reads(gw)[-1]["records"] == 0


async def test_csv_and_jsonl_downloads_hold_the_whole_search(gw: Harness) -> None:
    emit_many(gw, 13, user="alice")
    emit_many(gw, 2, user="bob")
    carol = await gw.signed_in("carol")
    status, body, resp = await get(carol, gw, "export.csv?user=alice")
    assert status == 200
    assert resp.headers["Content-Disposition"] == 'attachment; filename="audit-export.csv"'
    rows = list(csv.DictReader(io.StringIO(body.removeprefix("\ufeff"))))
    alice = [r for r in gw.audit_events() if r.get("user") == "alice"]
    assert len(alice) >= 13 and len(rows) == len(alice)
    assert {r["user"] for r in rows} == {"alice"}
    assert [int(r["seq"]) for r in rows] == sorted((r["seq"] for r in alice), reverse=True)
    status, body, resp = await get(carol, gw, "export.jsonl?user=bob")
    records = [json.loads(line) for line in body.splitlines()]
    assert records == sorted((r for r in gw.audit_events() if r.get("user") == "bob"),
                             key=lambda r: -r["seq"])  # the stored records, newest first
    exports = [r for r in reads(gw) if r["view"] == "export"]
    assert [(r["format"], r["filter_user"]) for r in exports] == [("csv", "alice"),
                                                                  ("jsonl", "bob")]


async def test_nothing_is_shown_when_audit_read_cannot_be_written(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    emit_many(gw, 3, user="alice")
    carol = await gw.signed_in("carol")
    audit = gw.gateway.audit
    real_emit = audit.emit

    def failing_emit(event: str, **fields: object) -> Any:
        if event == "audit.read":
            raise AuditWriteError(event, None, OSError(28, "No space left on device"))
        return real_emit(event, **fields)

    monkeypatch.setattr(audit, "emit", failing_emit)
    for path in ("?user=alice", "records/1", "export.csv?user=alice", "chain",
                 "report?month=2001-01"):
        status, body, _ = await get(carol, gw, path)
        assert status == 503, path
        assert "/groupware/" not in body


# --- sessions and kill ---------------------------------------------------------------------


async def test_an_auditor_ends_a_session_with_a_reason(gw: Harness) -> None:
    alice = await gw.signed_in("alice")
    carol = await gw.signed_in("carol")
    victim = handle_of(gw, "alice")
    status, body, _ = await get(carol, gw, "sessions")
    assert status == 200 and victim in body
    assert body.count('action="/.gatewayd/admin/sessions/kill"') == 1  # not her own session
    token = csrf_token(body, "/.gatewayd/admin/sessions/kill")
    status, _, resp = await kill(carol, gw, {"csrf_token": token, "session": victim,
                                             "reason": "laptop reported stolen"})
    assert status == 303
    assert resp.headers["Location"] == f"{ADMIN}sessions?killed={victim}"
    assert all(s.handle != victim for s in gw.gateway.sessions.sessions())
    async with alice.get(gw.base + "/groupware/", headers=HTML, allow_redirects=False) as after:
        assert after.status == 302 and "/.gatewayd/login" in after.headers["Location"]
    record = gw.audit_events("admin.session_kill")[-1]
    assert record["operator"] == "carol" and record["via"] == "console"
    assert record["user"] == "alice" and record["session"] == victim
    assert record["reason"] == "laptop reported stolen"
    ended = gw.audit_events("session.end")[-1]
    assert ended["session"] == victim and ended["reason"] == "admin_kill"


@pytest.mark.parametrize("token", ["", "v1.1.forged", "logout"])
async def test_a_kill_without_the_right_csrf_token_is_refused(gw: Harness, token: str) -> None:
    await gw.signed_in("alice")
    carol = await gw.signed_in("carol")
    victim = handle_of(gw, "alice")
    if token == "logout":  # a genuine token, of another form
        token = gw.gateway.https.csrf.issue("logout", handle_of(gw, "carol"))  # type: ignore[union-attr]
    status, body, _ = await kill(carol, gw, {"csrf_token": token, "session": victim,
                                             "reason": "test"})
    assert status == 403 and "expired" in body
    assert any(s.handle == victim for s in gw.gateway.sessions.sessions())
    assert not gw.audit_events("admin.session_kill")


async def test_a_cross_origin_kill_is_refused_before_the_console(gw: Harness) -> None:
    await gw.signed_in("alice")
    carol = await gw.signed_in("carol")
    victim = handle_of(gw, "alice")
    _, body, _ = await get(carol, gw, "sessions")
    token = csrf_token(body, "/.gatewayd/admin/sessions/kill")
    status, _, _ = await kill(carol, gw, {"csrf_token": token, "session": victim,
                                          "reason": "x"},
                              headers={"Origin": "https://evil.example"})
    assert status == 403
    assert any(s.handle == victim for s in gw.gateway.sessions.sessions())
    assert gw.audit_events("access.deny")[-1]["reason"] == "cross_origin"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("reason", "   ", "reason: say why"),
    ("session", "zz", "session: expected a session id"),
    ("session", "own", "your own session"),
])
async def test_a_kill_needs_a_reason_and_another_session(
        gw: Harness, field: str, value: str, message: str) -> None:
    await gw.signed_in("alice")
    carol = await gw.signed_in("carol")
    _, body, _ = await get(carol, gw, "sessions")
    form = {"csrf_token": csrf_token(body, "/.gatewayd/admin/sessions/kill"),
            "session": handle_of(gw, "alice"), "reason": "ok"}
    form[field] = handle_of(gw, "carol") if value == "own" else value
    status, body, _ = await kill(carol, gw, form)
    assert status == 400 and message in body
    assert len(gw.gateway.sessions.sessions()) == 2
    assert not gw.audit_events("admin.session_kill")


async def test_a_kill_that_cannot_be_audited_ends_nothing(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    await gw.signed_in("alice")
    carol = await gw.signed_in("carol")
    _, body, _ = await get(carol, gw, "sessions")
    token = csrf_token(body, "/.gatewayd/admin/sessions/kill")

    def refuse(**_: object) -> None:
        raise AuditWriteError("admin.session_kill", None, OSError(28, "No space left"))

    monkeypatch.setattr(gw.gateway, "record_admin_kill", refuse)
    status, _, _ = await kill(carol, gw, {"csrf_token": token, "session": handle_of(gw, "alice"),
                                          "reason": "x"})
    assert status == 503
    assert {s.user for s in gw.gateway.sessions.sessions()} == {"alice", "carol"}


# --- chain ---------------------------------------------------------------------------------


async def test_chain_status_shows_the_last_verified_checkpoint(gw: Harness) -> None:
    emit_many(gw, 3, user="alice")
    gw.gateway.audit.checkpoint()
    checkpoint = gw.audit_events("audit.checkpoint")[-1]
    carol = await gw.signed_in("carol")
    status, body, _ = await get(carol, gw, "chain")
    assert status == 200 and 'id="chain-ok"' in body
    assert f"seq {checkpoint['seq']}, covers up to {checkpoint['covers_seq']}" in body
    read = reads(gw)[-1]  # seqs, checkpoint and problems are audit data: the view is recorded
    assert (read["view"], read["user"]) == ("chain", "carol")


def test_chain_watch_reads_only_new_bytes_and_catches_an_edit(tmp_path: Path) -> None:
    """ChainWatch on its own: a real log, then a forged record appended."""
    log = tmp_path / "audit.log"

    async def write() -> None:
        async with AuditLog(log, node="n1", signing_key_path=tmp_path / "k.key") as audit:
            for n in range(5):
                audit.emit("access.deny", user="alice", path=f"/{n}")
            audit.checkpoint()

    asyncio.run(write())
    watch = ChainWatch()
    first = watch.status(log)
    assert first.verified and first.problem is None and first.checkpoint_seq is not None
    again = watch.status(log)
    assert again.records_checked == first.records_checked  # nothing new: nothing re-read
    last = json.loads(log.read_text().splitlines()[-1])
    forged = {**last, "seq": last["seq"] + 1, "event": "access.allow", "prev": last["hash"]}
    with log.open("a") as stream:
        stream.write(json.dumps(forged) + "\n")
    after = watch.status(log)
    assert after.records_checked == first.records_checked + 1
    assert not after.verified and "does not match its hash" in str(after.problem)


# --- usage report --------------------------------------------------------------------------


async def test_the_usage_report_is_linked_shown_and_audited(gw: Harness) -> None:
    pytest.importorskip("gatewayd.report")
    carol = await gw.signed_in("carol")
    _, body, _ = await get(carol, gw, "")
    assert 'href="/.gatewayd/admin/report?month=2026-11"' in body  # the gateway clock's month
    month = gw.audit_events()[0]["ts"][:7]  # records carry the real time
    status, body, resp = await get(carol, gw, f"report?month={month}")
    assert status == 200 and "usage report" in body.lower()
    policy = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script" not in policy
    assert resp.headers["Cache-Control"] == "no-store"
    read = reads(gw)[-1]
    assert (read["view"], read["month"], read["user"]) == ("report", month, "carol")
    status, body, _ = await get(carol, gw, "report?month=2026-13")
    assert status == 400 and "month: expected a month" in body
    status, _, _ = await get(carol, gw, "report?month=2001-01")
    assert status == 404
    read = reads(gw)[-1]  # a read that found nothing is still a read
    assert (read["view"], read["month"], read["records"]) == ("report", "2001-01", 0)
    status, _, _ = await get(carol, gw, "records/%C2%B2")
    assert status == 404  # not a record number: no such page


# --- bounded work: timeouts, busy, incomplete results -----------------------------------


async def test_an_export_that_times_out_mid_stream_ends_with_a_visible_marker(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    emit_many(gw, 12, user="alice")
    carol = await gw.signed_in("carol")
    release, calls = threading.Event(), []
    real_search = AuditIndex.search

    def search(self: AuditIndex, *args: Any, **kwargs: Any) -> SearchPage:
        calls.append(kwargs.get("before_seq"))
        if len(calls) == 2:  # the second batch hangs (a slow disk, a huge scan)
            release.wait(10)
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(AuditIndex, "search", search)
    monkeypatch.setattr(console_module, "EXPORT_BATCH", 5)
    monkeypatch.setattr(console_module, "SEARCH_TIMEOUT", 0.3)
    for suffix in ("csv", "jsonl"):
        calls.clear()
        release.clear()
        async with asyncio.timeout(8):  # the old code never ended the body: the client hung
            status, body, _ = await get(carol, gw, f"export.{suffix}?user=alice")
        assert status == 200
        lines = body.removeprefix("\ufeff").splitlines()
        if suffix == "csv":
            assert lines[0].startswith("ts,seq,") and len(lines) == 1 + 5 + 1
            assert lines[-1].startswith("EXPORT INCOMPLETE: the audit log could not be read "
                                        "in time. 5 records were written above")
        else:
            assert len(lines) == 5 + 1
            assert json.loads(lines[-1]) == {"export_incomplete": True, "records": 5,
                                             "reason": "the audit log could not be read in "
                                                       "time"}
        release.set()
        # The next index work waits for the hung call to return; nothing else ran for the
        # export (its scan stopped with the download).
        status, _, _ = await get(carol, gw, "?user=alice")
        assert status == 200 and len(calls) == 3


async def test_an_export_cut_at_the_record_limit_says_so(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    emit_many(gw, 13, user="alice")
    carol = await gw.signed_in("carol")
    monkeypatch.setattr(console_module, "EXPORT_MAX_RECORDS", 7)
    monkeypatch.setattr(console_module, "EXPORT_BATCH", 5)
    status, body, _ = await get(carol, gw, "export.csv?user=alice")
    rows = list(csv.reader(io.StringIO(body.removeprefix("\ufeff"))))
    assert status == 200 and len(rows) == 1 + 7 + 1
    assert rows[-1] == ["EXPORT INCOMPLETE: stopped at 7 records, the most one download holds "
                        "(gatewayd audit export has no limit). 7 records were written above; "
                        "the rest of the search is missing."]
    status, body, _ = await get(carol, gw, "export.jsonl?user=alice")
    assert json.loads(body.splitlines()[-1])["export_incomplete"] is True
    monkeypatch.setattr(console_module, "EXPORT_MAX_RECORDS", 10_000)
    status, body, _ = await get(carol, gw, "export.jsonl?user=alice")
    assert "export_incomplete" not in body and len(body.splitlines()) >= 13


async def test_slow_console_work_does_not_delay_logins(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewer's probe: slow index work plus many console requests used to fill the
    loop's default executor, and a login (TOTP in a thread) then failed after 5 s."""
    carol = await gw.signed_in("carol")
    release, entered = threading.Event(), threading.Event()
    real_refresh = AuditIndex.refresh
    seen: list[float | None] = []

    def slow_refresh(self: AuditIndex, *, max_seconds: float | None = None) -> None:
        seen.append(max_seconds)
        entered.set()
        release.wait(10)  # stands for the first indexing of a large log
        real_refresh(self, max_seconds=max_seconds)

    monkeypatch.setattr(AuditIndex, "refresh", slow_refresh)
    monkeypatch.setattr(console_module, "BUSY_WAIT", 0.0)
    first = asyncio.create_task(get(carol, gw, "?user=u0"))
    await asyncio.to_thread(entered.wait, 5)
    try:
        others = await asyncio.gather(*(get(carol, gw, f"?user=u{n}") for n in range(1, 40)))
        assert {status for status, _, _ in others} == {503}  # busy: not queued in threads
        assert "Try again" in others[0][1]
        assert others[0][2].headers["Retry-After"] == "5"
        status, body, _ = await gw.login(gw.client(), "bob")
        assert status == 303, body  # the old code: 503 after the login's 5 s timeout
    finally:
        release.set()
    status, _, _ = await first
    assert status == 200 and seen == [console_module.REFRESH_SECONDS]


async def test_an_unfinished_index_is_shown_and_refuses_exports(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    emit_many(gw, 3, user="alice")
    carol = await gw.signed_in("carol")
    monkeypatch.setattr(AuditIndex, "complete", property(lambda self: False))
    monkeypatch.setattr(AuditIndex, "progress", property(lambda self: 0.426))
    status, body, _ = await get(carol, gw, "?user=alice")
    assert status == 200 and "Indexing the audit log: 42 % done" in body
    status, body, _ = await get(carol, gw, "export.csv?user=alice")
    assert status == 503 and "still being indexed (42 % done)" in body
    monkeypatch.undo()
    real_search = AuditIndex.search

    def lossy(self: AuditIndex, *args: Any, **kwargs: Any) -> SearchPage:
        return replace(real_search(self, *args, **kwargs), complete=False)

    monkeypatch.setattr(AuditIndex, "search", lossy)
    status, body, _ = await get(carol, gw, "?user=alice")
    assert status == 200 and 'id="incomplete"' in body and "records may be missing" in body
    status, body, _ = await get(carol, gw, "export.jsonl?user=alice")
    assert status == 200
    assert json.loads(body.splitlines()[-1])["reason"].startswith(
        "part of the audit log changed while it was read")


async def test_reports_are_built_one_at_a_time_cached_and_survive_a_rotation_race(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    report = pytest.importorskip("gatewayd.report")
    carol = await gw.signed_in("carol")
    month = gw.audit_events()[0]["ts"][:7]
    real_build = report.build_usage
    builds: list[str] = []
    mode = {"fail": 0}
    release, entered = threading.Event(), threading.Event()
    release.set()

    def build(paths: Any, **kwargs: Any) -> Any:
        builds.append(kwargs["since"].strftime("%Y-%m"))
        entered.set()
        release.wait(10)
        if mode["fail"]:
            mode["fail"] -= 1
            raise FileNotFoundError(2, "No such file or directory", str(paths[0]))
        return real_build(paths, **kwargs)

    monkeypatch.setattr(report, "build_usage", build)
    # A month before the live file began: built once, then served from the cache.
    for _ in range(2):
        status, _, _ = await get(carol, gw, "report?month=2001-01")
        assert status == 404
    assert builds == ["2001-01"]
    # Retention removed a file between listing and reading: one retry, then a 503.
    mode["fail"] = 1
    status, _, _ = await get(carol, gw, f"report?month={month}")
    assert status == 200 and builds[-2:] == [month, month]
    mode["fail"] = 2
    status, body, _ = await get(carol, gw, f"report?month={month}")
    assert status == 503 and "files changed while the report was being built" in body
    # One build at a time: a second report request does not queue a thread.
    monkeypatch.setattr(console_module, "BUSY_WAIT", 0.0)
    release.clear()
    entered.clear()
    first = asyncio.create_task(get(carol, gw, f"report?month={month}"))
    await asyncio.to_thread(entered.wait, 5)
    try:
        status, body, _ = await get(carol, gw, "report?month=2002-02")
        assert status == 503 and "busy" in body
    finally:
        release.set()
    status, _, _ = await first
    assert status == 200


async def test_the_console_threads_end_with_the_gateway(gw: Harness) -> None:
    client = await gw.signed_in("carol")
    status, _, _ = await get(client, gw, "?user=alice")
    assert status == 200
    assert any(t.name.startswith("gatewayd-console") for t in threading.enumerate())
    await gw.gateway.stop()
    for _ in range(50):  # the pool is shut down at stop; idle workers exit at once
        if not any(t.name.startswith("gatewayd-console") and t.is_alive()
                   for t in threading.enumerate()):
            break
        await asyncio.sleep(0.05)
    assert not any(t.name.startswith("gatewayd-console") and t.is_alive()
                   for t in threading.enumerate())


async def test_a_cached_report_is_not_served_after_the_seat_limit_changed(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gatewayd.report")
    # As for a past month: the files the report reads do not change between the two views
    # (here the live file grows with each audit.read, so the shape is pinned).
    monkeypatch.setattr(console_module, "_log_shape", lambda *_: ("unchanged",))
    carol = await gw.signed_in("carol")
    month = gw.audit_events()[0]["ts"][:7]
    seats = gw.gateway.settings.sessions.max_concurrent
    status, body, _ = await get(carol, gw, f"report?month={month}")
    assert status == 200 and f"of {seats} seats" in body
    # A reload changes the contract size; the same month's report must say the new one.
    settings = gw.gateway.settings
    gw.gateway.settings = settings.model_copy(update={
        "sessions": settings.sessions.model_copy(update={"max_concurrent": seats + 7})})
    status, body, _ = await get(carol, gw, f"report?month={month}")
    assert status == 200 and f"of {seats + 7} seats" in body
