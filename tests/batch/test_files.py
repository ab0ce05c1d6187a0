"""Files: upload checks, listing and pagination, content, delete, tenant isolation."""

from __future__ import annotations

import openai
import pytest

from tests.batch.conftest import Server, chat_line, jsonl, wait_batch


def test_upload_roundtrip_any_purpose(local_server: Server) -> None:
    client = local_server.client()
    data = bytes(range(256)) * 1000  # not JSONL: fine for user_data
    made = client.files.create(file=("blob.bin", data), purpose="user_data")
    assert (made.object, made.bytes, made.purpose, made.filename) == \
        ("file", len(data), "user_data", "blob.bin")
    assert client.files.retrieve(made.id).id == made.id
    assert client.files.content(made.id).content == data


def test_batch_upload_rejects_bad_json_with_line_number(local_server: Server) -> None:
    client = local_server.client()
    body = jsonl([chat_line("a"), chat_line("b")]) + b'{"custom_id": "c", broken\n'
    before = set((local_server.storage / "files").iterdir()) if local_server.storage else set()
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.jsonl", body), purpose="batch")
    assert "Line 3" in str(info.value) and info.value.body["param"] == "file"
    after = set((local_server.storage / "files").iterdir())
    assert after == before  # no object left behind


def test_batch_upload_rejects_non_object_lines_and_empty_files(local_server: Server) -> None:
    client = local_server.client()
    with pytest.raises(openai.BadRequestError, match="Line 2 is JSON but not an object"):
        client.files.create(file=("x.jsonl", jsonl([chat_line("a"), [1, 2]])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="no requests"):
        client.files.create(file=("x.jsonl", b"\n\n"), purpose="batch")


def test_batch_upload_size_limit(local_server: Server) -> None:
    line = (jsonl([chat_line("x" * 1000)]))
    body = line * (9 * 1024 * 1024 // len(line))  # over the server's 8 MiB batch limit
    with pytest.raises(openai.APIStatusError) as info:
        local_server.client().files.create(file=("big.jsonl", body), purpose="batch")
    assert info.value.status_code == 413


def test_upload_needs_multipart_file_and_known_purpose(local_server: Server) -> None:
    http = local_server.http()
    assert http.post("/v1/files", json={"purpose": "batch"}).status_code == 400
    no_file = http.post("/v1/files", files={"purpose": (None, "batch")})
    assert no_file.status_code == 400 and "no `file`" in no_file.json()["error"]["message"]
    bad = http.post("/v1/files", files={"purpose": (None, "nope"), "file": ("a", b"x")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "purpose"


def test_purpose_after_file_is_still_checked(local_server: Server) -> None:
    """httpx puts fields first; a hand-made form may send the file before the purpose."""
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"x.jsonl\"\r\n\r\nnot json\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}--\r\n").encode()
    r = local_server.http().post("/v1/files", content=body, headers={
        "content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400 and "Line 1" in r.json()["error"]["message"]


def test_list_filters_orders_and_paginates(local_server: Server) -> None:
    client = local_server.client("lister")
    ids = [client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line(str(i))])),
                               purpose="batch").id for i in range(5)]
    other = client.files.create(file=("u.txt", b"hello"), purpose="user_data").id
    page = client.files.list(purpose="batch", limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    assert [f.id for f in client.files.list(purpose="batch", limit=2)] == ids[::-1]  # auto-pages
    asc = client.files.list(purpose="batch", order="asc", limit=3)
    assert [f.id for f in asc.data] == ids[:3]
    nxt = client.files.list(purpose="batch", order="asc", limit=3, after=ids[2])
    assert [f.id for f in nxt.data] == ids[3:] and not nxt.has_more
    assert {f.id for f in client.files.list()} == {*ids, other}
    raw = local_server.http("lister").get("/v1/files", params={"limit": 1}).json()
    assert set(raw) == {"object", "data", "first_id", "last_id", "has_more"}
    assert local_server.http("lister").get("/v1/files", params={"limit": 0}).status_code == 400


def test_delete_removes_row_and_object(local_server: Server) -> None:
    client = local_server.client()
    made = client.files.create(file=("d.txt", b"bye"), purpose="user_data")
    path = local_server.storage / "files" / made.id
    assert path.exists()
    deleted = client.files.delete(made.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (made.id, True, "file")
    assert not path.exists()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(made.id)


def test_tenants_see_only_their_own(local_server: Server) -> None:
    a, b, anon = local_server.client("A"), local_server.client("B"), local_server.client(None)
    mine = a.files.create(file=("t.jsonl", jsonl([chat_line("t1")])), purpose="batch")
    batch = a.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    for other in (b, anon):
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.files.delete(mine.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")
        assert mine.id not in {f.id for f in other.files.list()}
        assert batch.id not in {x.id for x in other.batches.list()}
    done = wait_batch(a, batch.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(done.output_file_id)  # outputs belong to the batch's tenant
    assert a.files.content(done.output_file_id).text
    r = local_server.http().get("/v1/files", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_input_of_running_batch_cannot_be_deleted(local_server: Server) -> None:
    client = local_server.client()
    lines = [chat_line(f"busy-{i}", model="slow-model") for i in range(4)]
    made = client.files.create(file=("busy.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    with pytest.raises(openai.ConflictError):
        client.files.delete(made.id)
    wait_batch(client, batch.id)
    assert client.files.delete(made.id).deleted
